"""Model versions: every fine-tuned candidate is recorded; one is active; servers follow the active one.

Redis keys (`ns` = namespace, default "clipseg"):

| key                 | type    | content                                                                      |
|---------------------|---------|------------------------------------------------------------------------------|
| `ns:versions`       | hash    | version -> JSON record (path, parent, created, metrics, samples, status)      |
| `ns:versions:order` | zset    | version, score = creation time                                               |
| `ns:active`         | string  | JSON `{"version", "path"}` of the model every server should serve            |
| `ns:artifact:{v}`   | hash    | file name -> bytes of version v's checkpoint (config JSON + trainable weights), |
|                     |         | so servers on other machines can materialise it without a shared disk        |
| `ns:events`         | channel | `{"event": "activated", "version", "path"}` published when `ns:active` changes |

No `ns:active` key means "serve the configured base model (MODEL)". The first fine-tune records that base model
as a version with status "base" (path = MODEL), so `clipseg rollback` can return to it.
"""
from __future__ import annotations

import json
import os
import time
from pathlib import Path
from dataclasses import asdict, dataclass, field
from typing import Any

from redis import Redis

from clipseg_model.atomic import atomic_directory

STATUSES = ("candidate", "promoted", "rejected", "base")


class UnknownVersionError(KeyError):
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

    def to_json(self) -> str:
        return json.dumps(asdict(self))

    @classmethod
    def from_json(cls, raw: str | bytes) -> "VersionRecord":
        return cls(**json.loads(raw))


class VersionRegistry:
    """Version records and the active-version pointer in Redis (shared by servers, workers and the CLI)."""

    def __init__(self, conn: Redis, namespace: str = "clipseg"):
        self.conn = conn
        self.ns = namespace

    @property
    def channel(self) -> str:
        return f"{self.ns}:events"

    def record(self, rec: VersionRecord) -> None:
        pipe = self.conn.pipeline()
        pipe.hset(f"{self.ns}:versions", rec.version, rec.to_json())
        pipe.zadd(f"{self.ns}:versions:order", {rec.version: rec.created})
        pipe.execute()

    def record_base(self, version: str, path: str) -> bool:
        """Record the configured base model (status "base") once, so `clipseg rollback` can return to it.

        `path` is MODEL as configured (a hub id or a local directory). Returns True when it was recorded now.
        """
        rec = VersionRecord(version, path, status="base", reason="the configured base model (MODEL)")
        if not self.conn.hsetnx(f"{self.ns}:versions", version, rec.to_json()):
            return False
        self.conn.zadd(f"{self.ns}:versions:order", {version: rec.created})
        return True

    def get(self, version: str) -> VersionRecord:
        raw = self.conn.hget(f"{self.ns}:versions", version)
        if raw is None:
            raise UnknownVersionError(f"no model version {version!r}; `clipseg versions` lists them")
        return VersionRecord.from_json(raw)

    def list(self) -> list[VersionRecord]:
        """All versions, oldest first."""
        names = [n.decode() if isinstance(n, bytes) else n for n in self.conn.zrange(f"{self.ns}:versions:order", 0, -1)]
        if not names:
            return []
        raws = self.conn.hmget(f"{self.ns}:versions", names)
        return [VersionRecord.from_json(r) for r in raws if r is not None]

    def active(self) -> tuple[str, str] | None:
        """(version, checkpoint path) every server should serve, or None for the configured base model."""
        raw = self.conn.get(f"{self.ns}:active")
        if raw is None:
            return None
        data = json.loads(raw)
        return data["version"], data["path"]

    def activate(self, version: str, status: str | None = "promoted", reason: str = "") -> VersionRecord:
        """Make `version` active and tell every server (pub/sub); its record's status is set when given."""
        rec = self.get(version)
        if status:
            rec.status = status
        if reason:
            rec.reason = reason
        pipe = self.conn.pipeline()
        pipe.hset(f"{self.ns}:versions", version, rec.to_json())
        pipe.set(f"{self.ns}:active", json.dumps({"version": rec.version, "path": rec.path}))
        pipe.publish(self.channel, json.dumps({"event": "activated", "version": rec.version, "path": rec.path}))
        pipe.execute()
        return rec

    def set_status(self, version: str, status: str) -> VersionRecord:
        """Change a version's status without activating it (e.g. "rejected")."""
        rec = self.get(version)
        rec.status = status
        self.conn.hset(f"{self.ns}:versions", version, rec.to_json())
        return rec

    def store_artifact(self, version: str, checkpoint_dir: str | os.PathLike) -> int:
        """Copy the checkpoint's small files (config + trainable weights, not `base/`) into Redis; returns bytes."""
        files = {p.name: p.read_bytes() for p in Path(checkpoint_dir).iterdir() if p.is_file()}
        self.conn.hset(f"{self.ns}:artifact:{version}", mapping=files)
        return sum(len(b) for b in files.values())

    def materialize(self, version: str, models_dir: str | os.PathLike) -> str:
        """Local directory of `version`: its recorded path when it exists here, else written from Redis."""
        rec = self.get(version)
        if rec.status == "base" or Path(rec.path).is_dir():  # a base model loads from MODEL (hub id or dir)
            return rec.path
        target = Path(models_dir) / version
        if target.is_dir():
            return str(target)
        files = self.conn.hgetall(f"{self.ns}:artifact:{version}")
        if not files:
            raise UnknownVersionError(f"version {version!r}: {rec.path} is not on this machine and Redis has no copy")
        try:
            with atomic_directory(target) as tmp:
                for name, data in files.items():
                    (tmp / (name.decode() if isinstance(name, bytes) else name)).write_bytes(data)
        except FileExistsError:
            pass  # another process materialised it first
        return str(target)

    def rollback(self, version: str) -> VersionRecord:
        """Make an earlier version active again (`clipseg rollback V`)."""
        return self.activate(version, status=None, reason=f"made active again by rollback at {time.strftime('%Y-%m-%d %H:%M:%S')}")
