"""The prefix of every Redis key this project writes (RQ's own `rq:*` keys aside).

Each class names its own keys under it (`CorrectionStore`, `VersionRegistry`, `finetune.triggers`, and in the
backend `PrelabelRuns` and `StoredLabelConfigs`); the `namespace` parameters they take default to this one name.
Not a setting: nothing runs two namespaces in one Redis (another Redis database keeps two deployments apart), and
queued jobs of earlier releases carry `namespace="clipseg"` in their kwargs, so the value stays.
"""
from __future__ import annotations

NAMESPACE = "clipseg"
