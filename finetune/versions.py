"""Model versions, per Label Studio project: every fine-tuned candidate is recorded under the project it was
trained on; each project has its own active version; servers follow each project's pointer.

Redis keys (`ns` = the namespace, REDIS_NAMESPACE (finetune.keyspace)):

| key                 | type    | content                                                                      |
|---------------------|---------|------------------------------------------------------------------------------|
| `ns:versions`       | hash    | version -> JSON record (path, parent, project, created, metrics, samples,    |
|                     |         | status, checksum of the weights, broken reason)                              |
| `ns:versions:order` | zset    | version, score = creation time                                               |
| `ns:active:project` | hash    | project -> JSON `{"version", "path"}`: the version that project is served    |
| `ns:default`        | string  | JSON `{"version", "path"}`: served to projects without their own version     |
|                     |         | (`clipseg versions --set-default V`); absent: the configured base (MODEL)     |
| `ns:artifact:{v}`   | hash    | file name -> bytes of version v's checkpoint (config JSON + trainable weights), |
|                     |         | so servers on other machines can materialise it without a shared disk        |
| `ns:events[:dbN]`   | channel | a `VersionActivated` (finetune.version_events): project null = the default    |
|                     |         | published when a pointer changes                                             |
| `ns:active`         | string  | the single pointer of releases before per-project models: read once, moved  |
|                     |         | to its version's project (or to `ns:default`), then renamed `ns:active:legacy` |

A project's lineage is the records whose `project` is that project, plus the base records (status "base",
project null) that every lineage starts from. The first fine-tune of a project records the base model it
started from as a version with status "base" (path = MODEL), so `clipseg rollback` can return to it.
"""
from __future__ import annotations

import json
import logging
import os
import time
from pathlib import Path
from dataclasses import asdict, dataclass, field, fields
from typing import Any

from redis import Redis
from redis.exceptions import WatchError

from clipseg_model.atomic import atomic_directory
from clipseg_model.checkpoint import CHECKSUM_KEY, is_checkpoint, read_checkpoint_config
from finetune.version_events import VersionActivated
from finetune.keyspace import NAMESPACE

STATUSES = ("candidate", "promoted", "rejected", "inconclusive", "base")  # inconclusive: too little evidence
log = logging.getLogger(__name__)
Pointer = tuple[str, str]  # (version, checkpoint path)


class UnknownVersionError(KeyError):
    pass


class WrongProjectError(ValueError):
    pass


@dataclass
class VersionRecord:
    """One model version: where its checkpoint lives and why it was (not) promoted."""

    version: str
    path: str
    parent: str | None = None
    created: float = field(default_factory=time.time)
    status: str = "candidate"
    reason: str = ""
    metrics: dict[str, Any] = field(default_factory=dict)  # e.g. corrections_miou, base_miou (candidate and parent)
    samples: dict[str, int] = field(default_factory=dict)  # corrections / held_out / replay counts
    project: str | None = None
    checksum: str = ""  # SHA-256 of trainable.safetensors, checked by every server that loads it
    broken: str = ""  # why a server could not load it (then nobody tries it again until it is activated anew)

    def to_json(self) -> str:
        return json.dumps(asdict(self))

    @classmethod
    def from_json(cls, raw: str | bytes) -> "VersionRecord":
        data = json.loads(raw)
        known = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in data.items() if k in known})


def _text(value: str | bytes) -> str:
    return value.decode() if isinstance(value, bytes) else value


class VersionRegistry:
    """Version records and the per-project active pointers in Redis (shared by servers, workers and the CLI)."""

    def __init__(self, conn: Redis, namespace: str = NAMESPACE):
        self.conn = conn
        self.ns = namespace

    # ---- key names (one home) ------------------------------------------------------------------------------
    @property
    def channel(self) -> str:
        """Redis pub/sub ignores the database number, so the channel names it: two deployments sharing one Redis
        server on different databases must not hear each other's activations (DB 0 keeps the plain name)."""
        db = int((getattr(getattr(self.conn, "connection_pool", None), "connection_kwargs", None) or {}).get("db") or 0)
        return f"{self.ns}:events" + (f":db{db}" if db else "")

    @property
    def _versions(self) -> str:
        return f"{self.ns}:versions"

    @property
    def _order(self) -> str:
        return f"{self.ns}:versions:order"

    @property
    def _project_active(self) -> str:
        return f"{self.ns}:active:project"

    @property
    def _default(self) -> str:
        return f"{self.ns}:default"

    @property
    def _legacy_active(self) -> str:
        return f"{self.ns}:active"

    def _artifact(self, version: str) -> str:
        return f"{self.ns}:artifact:{version}"

    # ---- records -------------------------------------------------------------------------------------------
    def record(self, rec: VersionRecord) -> None:
        if not rec.checksum and rec.status != "base" and is_checkpoint(rec.path):
            rec.checksum = read_checkpoint_config(rec.path)[1].get(CHECKSUM_KEY) or ""
        pipe = self.conn.pipeline()
        pipe.hset(self._versions, rec.version, rec.to_json())
        pipe.zadd(self._order, {rec.version: rec.created})
        pipe.execute()

    def record_base(self, version: str, path: str) -> bool:
        """Record the configured base model (status "base") once, so `clipseg rollback` can return to it.

        `path` is MODEL as configured (a hub id or a local directory). Returns True when it was recorded now.
        """
        rec = VersionRecord(version, path, status="base", reason="the configured base model (MODEL)")
        if not self.conn.hsetnx(self._versions, version, rec.to_json()):
            return False
        self.conn.zadd(self._order, {version: rec.created})
        return True

    def get(self, version: str) -> VersionRecord:
        raw = self.conn.hget(self._versions, version)
        if raw is None:
            raise UnknownVersionError(f"no model version {version!r}; `clipseg versions` lists them")
        return VersionRecord.from_json(raw)

    def list(self, project: str | None = None) -> list[VersionRecord]:
        """All versions, oldest first; with `project`, that project's lineage (its versions and the base records)."""
        names = [_text(n) for n in self.conn.zrange(self._order, 0, -1)]
        if not names:
            return []
        records = [VersionRecord.from_json(r) for r in self.conn.hmget(self._versions, names) if r is not None]
        if project is None:
            return records
        return [r for r in records if r.project in (str(project), None)]

    def known_versions(self) -> set[str]:
        """Every version recorded here and every parent one started from (e.g. the base model): the versions this
        backend made or serves, whose predictions are ours."""
        records = self.list()
        return {r.version for r in records} | {r.parent for r in records if r.parent}

    def projects(self) -> list[str]:
        """Projects with recorded versions or an active pointer, sorted."""
        names = {r.project for r in self.list() if r.project} | set(self.pointers()[1])
        return sorted(names, key=lambda p: (len(p), p))

    def set_status(self, version: str, status: str) -> VersionRecord:
        """Change a version's status without activating it (e.g. "rejected")."""
        rec = self.get(version)
        rec.status = status
        self.conn.hset(self._versions, version, rec.to_json())
        return rec

    def mark_broken(self, version: str, reason: str) -> None:
        """Record that `version` could not be loaded (a server falls back to its parent, then the base)."""
        try:
            rec = self.get(version)
        except UnknownVersionError:
            return
        if rec.broken != reason:
            rec.broken = reason
            self.conn.hset(self._versions, version, rec.to_json())

    def lineage(self, version: str) -> list[VersionRecord]:
        """`version`, its parent, its parent's parent ... (as far as records exist; cycles are cut)."""
        chain: list[VersionRecord] = []
        seen: set[str] = set()
        current: str | None = version
        while current and current not in seen:
            seen.add(current)
            try:
                rec = self.get(current)
            except UnknownVersionError:
                break
            chain.append(rec)
            current = rec.parent
        return chain

    # ---- pointers ------------------------------------------------------------------------------------------
    def pointers(self) -> tuple[Pointer | None, dict[str, Pointer]]:
        """(default pointer or None, {project: pointer}) in one round trip: what servers poll."""
        pipe = self.conn.pipeline(transaction=False)
        pipe.exists(self._legacy_active)
        pipe.get(self._default)
        pipe.hgetall(self._project_active)
        legacy, default, projects = pipe.execute()
        if legacy:
            self.migrate_legacy()
            return self.pointers()

        def pointer(raw) -> Pointer:
            data = json.loads(raw)
            return data["version"], data["path"]

        return (pointer(default) if default else None), {_text(p): pointer(raw) for p, raw in projects.items()}

    def active(self, project: str | int | None = None) -> Pointer | None:
        """(version, checkpoint path) that `project` is served: its own pointer, else the default; None means the
        configured base model (MODEL). Without `project`: the default."""
        default, projects = self.pointers()
        if project is not None and str(project) in projects:
            return projects[str(project)]
        return default

    def own_active(self, project: str | int) -> Pointer | None:
        """`project`'s own pointer (None when it follows the default)."""
        return self.pointers()[1].get(str(project))

    def activate(self, version: str, status: str | None = "promoted", reason: str = "", *,
                 project: str | int | None = None) -> VersionRecord:
        """Make `version` what `project` is served (None: the default for projects without their own) and tell
        every server (pub/sub); its record's status is set when given, and a broken mark is cleared (an operator
        who activates it again wants it tried again)."""
        rec = self.get(version)
        if project is not None and rec.project not in (str(project), None):
            raise WrongProjectError(f"version {version} belongs to project {rec.project}, not {project}")
        if status:
            rec.status = status
        if reason:
            rec.reason = reason
        rec.broken = ""
        pointer = json.dumps({"version": rec.version, "path": rec.path})
        event = VersionActivated(rec.version, None if project is None else str(project), rec.path)
        pipe = self.conn.pipeline()
        pipe.hset(self._versions, version, rec.to_json())
        if project is None:
            pipe.set(self._default, pointer)
        else:
            pipe.hset(self._project_active, str(project), pointer)
        pipe.publish(self.channel, event.to_json())
        pipe.execute()
        return rec

    def rollback(self, version: str, project: str | int | None = None) -> VersionRecord:
        """Make an earlier version of `project`'s lineage active again (`clipseg rollback --project P V`); without
        `project`, the project the version was trained on (a base record needs `project`, or sets the default)."""
        if project is None:
            project = self.get(version).project
        return self.activate(version, status=None, project=project,
                             reason=f"made active again by rollback at {time.strftime('%Y-%m-%d %H:%M:%S')}")

    def set_default(self, version: str) -> VersionRecord:
        """Serve `version` to every project without a version of its own (`clipseg versions --set-default V`)."""
        return self.activate(version, status=None, project=None)

    def migrate_legacy(self) -> str | None:
        """Move the single pointer of the previous release (`ns:active`) to the project its version was trained
        on (`VersionRecord.project`), or to the default when it has none (a base model). Records, artifacts and
        checkpoints are untouched: each record already names its project, so every version stays listed in its
        project's lineage. Idempotent and safe with several processes (WATCH/MULTI). Returns the project (or
        "default"), None when there was nothing to move."""
        with self.conn.pipeline() as pipe:
            while True:
                try:
                    pipe.watch(self._legacy_active)
                    raw = pipe.get(self._legacy_active)
                    if raw is None:
                        pipe.unwatch()
                        return None
                    version = json.loads(raw)["version"]
                    rec_raw = pipe.hget(self._versions, version)
                    project = VersionRecord.from_json(rec_raw).project if rec_raw else None
                    pipe.multi()
                    if project:
                        pipe.hsetnx(self._project_active, project, raw)  # a newer pointer of its own wins
                    else:
                        pipe.setnx(self._default, raw)
                    pipe.rename(self._legacy_active, f"{self._legacy_active}:legacy")
                    pipe.execute()
                    log.info("moved the single active version %s of the previous release to %s", version,
                             f"project {project}" if project else "the default")
                    return project or "default"
                except WatchError:
                    continue

    # ---- artifacts -----------------------------------------------------------------------------------------
    def store_artifact(self, version: str, checkpoint_dir: str | os.PathLike) -> int:
        """Copy the checkpoint's small files (config + trainable weights, not `base/`) into Redis; returns bytes."""
        files = {p.name: p.read_bytes() for p in Path(checkpoint_dir).iterdir() if p.is_file()}
        self.conn.hset(self._artifact(version), mapping=files)
        return sum(len(b) for b in files.values())

    def materialize(self, version: str, models_dir: str | os.PathLike) -> str:
        """Local directory of `version`: its recorded path when it exists here, else written from Redis."""
        rec = self.get(version)
        if rec.status == "base" or Path(rec.path).is_dir():  # a base model loads from MODEL (hub id or dir)
            return rec.path
        target = Path(models_dir) / version
        if target.is_dir():
            return str(target)
        files = self.conn.hgetall(self._artifact(version))
        if not files:
            raise UnknownVersionError(f"version {version!r}: {rec.path} is not on this machine and Redis has no copy")
        try:
            with atomic_directory(target) as tmp:
                for name, data in files.items():
                    (tmp / (name.decode() if isinstance(name, bytes) else name)).write_bytes(data)
        except FileExistsError:
            pass  # another process materialised it first
        return str(target)

