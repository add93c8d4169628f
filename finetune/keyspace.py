"""The default prefix of every Redis key of one deployment (RQ's own `rq:*` keys aside): REDIS_NAMESPACE.

Each class names its own keys under the namespace it is given (`CorrectionStore`, `VersionRegistry`,
`ExemplarStore`, `finetune.triggers.lock_key`, and in the backend `PrelabelRuns` and `StoredLabelConfigs`); the
version-activated channel is `VersionRegistry.channel`. The namespace is a setting (`REDIS_NAMESPACE`, read in
`backend.settings`): the server, every CLI command and both workers pass it on, and every queued job carries the
namespace of whoever queued it in its spec (`FinetuneSpec.namespace`, `PrelabelSpec.namespace`), so a worker works
in the job's namespace, whatever its own. Two deployments with different namespaces can therefore share one Redis
database: they see none of each other's corrections, versions, version events, locks, runs or label configs. They
do share RQ's queues (`rq:*`) and the workers' liveness keys (`finetune.triggers`): a worker serves the jobs of
every namespace on its database.

`NAMESPACE` is the default, where REDIS_NAMESPACE is unset: the prefix every earlier release wrote. Queued jobs of
the previous release carry `namespace="clipseg"` in their kwargs (pre-label jobs) or no namespace in their spec
(fine-tunes): both run in this default.
"""
from __future__ import annotations

NAMESPACE = "clipseg"
