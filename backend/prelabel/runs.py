"""The Redis side of pre-label runs: run records, chunk leases (Lua, so a claim is atomic) and progress.

Redis keys (`ns` = the namespace, REDIS_NAMESPACE (finetune.keyspace); `R` = run id):

| key                          | type   | content                                                                  |
|------------------------------|--------|--------------------------------------------------------------------------|
| `ns:prelabel:runs`           | zset   | run id, score = creation time                                            |
| `ns:prelabel:run:R`          | hash   | project, state, version, unlabeled_only, chunk_size, tasks, chunks, error |
| `ns:prelabel:run:R:chunks`   | hash   | chunk index -> JSON list of task ids                                     |
| `ns:prelabel:run:R:state`    | hash   | chunk index -> pending / running / done / failed                         |
| `ns:prelabel:run:R:progress` | hash   | chunk index -> JSON {done, total, written, skipped, failed, worker, ...}  |
| `ns:prelabel:run:R:lease:i`  | string | the claiming job's token, expires after LEASE_S unless renewed            |
| `ns:prelabel:active:P`       | string | run id of project P's unfinished run (one at a time per project)         |
| `ns:prelabel:refreshed:V`    | string | set once version V's promotion refresh is queued (any server), 7 days    |
"""
from __future__ import annotations

import json
import logging
import time
import uuid
from dataclasses import dataclass
from typing import Any, Mapping, Sequence

from redis import Redis

from finetune.keyspace import NAMESPACE

log = logging.getLogger(__name__)

LEASE_S = 20  # a dead worker's chunk is taken over this long after its last renewal
RENEW_S = 5
STALL_GRACE_S = 30.0  # a run younger than this is never judged stalled (its first job may not be queued yet)

_CLAIM = """
local n = tonumber(ARGV[3])
for i = 0, n - 1 do
  local st = redis.call('HGET', KEYS[1], tostring(i))
  if st == 'pending' or st == 'running' then
    if redis.call('SET', ARGV[1] .. i, ARGV[2], 'NX', 'EX', tonumber(ARGV[4])) then
      redis.call('HSET', KEYS[1], tostring(i), 'running')
      return i
    end
  end
end
return -1
"""
_RENEW = """
if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('EXPIRE', KEYS[1], tonumber(ARGV[2])) end
return 0
"""
_FINISH = """
if redis.call('GET', KEYS[1]) ~= ARGV[1] then return 0 end
redis.call('HSET', KEYS[2], ARGV[2], ARGV[3])
redis.call('DEL', KEYS[1])
return 1
"""


class PrelabelError(RuntimeError):
    """A run cannot go on (bad settings, Label Studio refusing); the message names the setting to fix."""


# ---- the run records in Redis ------------------------------------------------------------------------------------
@dataclass
class RunInfo:
    run_id: str
    project: str
    state: str  # planning, running, done, failed
    version: str | None
    unlabeled_only: bool
    chunk_size: int
    tasks: int
    chunks: int
    reason: str
    error: str
    created: float
    task_ids: list[int] | None = None
    spec: dict[str, Any] | None = None  # the PrelabelSpec's dict; None for a run queued by the previous release

    @classmethod
    def from_hash(cls, run_id: str, raw: Mapping[bytes, bytes]) -> "RunInfo":
        d = {k.decode(): v.decode() for k, v in raw.items()}
        return cls(run_id, d["project"], d.get("state", "planning"), d.get("version") or None,
                   d.get("unlabeled_only") == "1", int(d.get("chunk_size", 100)), int(d.get("tasks", 0)),
                   int(d.get("chunks", 0)), d.get("reason", ""), d.get("error", ""), float(d.get("created", 0)),
                   json.loads(d["task_ids"]) if d.get("task_ids") else None,
                   json.loads(d["spec"]) if d.get("spec") else None)


class PrelabelRuns:
    """The Redis side of pre-label runs: create, plan, claim/renew/finish chunks, read progress."""

    def __init__(self, conn: Redis, namespace: str = NAMESPACE):
        self.conn = conn
        self.ns = namespace
        self._claim = conn.register_script(_CLAIM)
        self._renew = conn.register_script(_RENEW)
        self._finish = conn.register_script(_FINISH)

    def key(self, run_id: str, part: str = "") -> str:
        return f"{self.ns}:prelabel:run:{run_id}" + (f":{part}" if part else "")

    def active_key(self, project: str) -> str:
        return f"{self.ns}:prelabel:active:{project}"

    @property
    def runs_key(self) -> str:
        return f"{self.ns}:prelabel:runs"

    def refreshed_key(self, version: str) -> str:
        return f"{self.ns}:prelabel:refreshed:{version}"

    def mark_refreshed(self, version: str, ttl_s: int = 7 * 86400) -> bool:
        """True for the first caller only (any server): that one queues `version`'s promotion refresh."""
        return bool(self.conn.set(self.refreshed_key(version), "1", nx=True, ex=ttl_s))

    def create(self, project: str, *, task_ids: Sequence[int] | None, unlabeled_only: bool, chunk_size: int,
               version: str | None, reason: str, spec: Mapping[str, Any] | None = None) -> tuple[str, bool]:
        """(run id, created): a new run, or the project's unfinished one (one run per project at a time).
        `spec`: the run's PrelabelSpec as a dict, kept with the record (`clipseg prelabel --status` shows it)."""
        run_id = f"{project}-{time.strftime('%Y%m%d-%H%M%S')}-{uuid.uuid4().hex[:6]}"
        for _ in range(3):
            if self.conn.set(self.active_key(project), run_id, nx=True):
                break
            current = self.conn.get(self.active_key(project))
            if current is not None:
                info = self.current(current.decode())
                if info is not None and info.state in ("planning", "running"):
                    return info.run_id, False
                self.conn.delete(self.active_key(project))  # a finished or vanished run: stale
        else:
            raise RuntimeError(f"could not take the pre-label slot of project {project}")
        record = {"project": project, "state": "planning", "version": version or "", "chunk_size": chunk_size,
                  "unlabeled_only": int(unlabeled_only), "reason": reason, "created": time.time(), "error": ""}
        if task_ids is not None:
            record["task_ids"] = json.dumps([int(t) for t in task_ids])
        if spec is not None:
            record["spec"] = json.dumps(dict(spec))
        pipe = self.conn.pipeline()
        pipe.hset(self.key(run_id), mapping=record)
        pipe.zadd(self.runs_key, {run_id: record["created"]})
        pipe.execute()
        return run_id, True

    def info(self, run_id: str) -> RunInfo | None:
        raw = self.conn.hgetall(self.key(run_id))
        return RunInfo.from_hash(run_id, raw) if raw else None

    def current(self, run_id: str) -> RunInfo | None:
        """The run's record, after settling a run that can no longer move: planning or running, yet none of its RQ
        jobs is queued, running or waiting for a retry (each failed for good, or expired). Without this a run whose
        every job failed would stay "running" and hold its project's slot for ever."""
        from rq.job import Job

        from finetune.triggers import ACTIVE_STATUSES, failure_line

        info = self.info(run_id)
        if info is None or info.state not in ("planning", "running") or time.time() - info.created < STALL_GRACE_S:
            return info
        ids = [plan_job_id(run_id)] + [work_job_id(run_id, i) for i in range(info.chunks)]
        jobs = [j for j in Job.fetch_many(ids, connection=self.conn) if j is not None]
        if any(j.get_status(refresh=False) in ACTIVE_STATUSES for j in jobs):
            return info
        if info.state == "running" and self.settle(run_id):  # every chunk is done or failed already
            return self.info(run_id)
        errors = [e for e in map(failure_line, jobs) if e]
        reason = f"; last error: {errors[-1]}" if errors else ""
        self.fail(run_id, f"every job of the run stopped before it finished{reason}")
        log.warning("pre-label run %s: every job stopped before it finished; marked failed%s", run_id, reason)
        return self.info(run_id)

    def runs(self, limit: int = 20) -> list[str]:
        return [r.decode() for r in self.conn.zrevrange(self.runs_key, 0, limit - 1)]

    def plan(self, run_id: str, chunks: Sequence[Sequence[int]], version: str | None = None) -> None:
        pipe = self.conn.pipeline()
        if chunks:
            pipe.hset(self.key(run_id, "chunks"), mapping={str(i): json.dumps(list(c)) for i, c in enumerate(chunks)})
            pipe.hset(self.key(run_id, "state"), mapping={str(i): "pending" for i in range(len(chunks))})
        fields = {"state": "running" if chunks else "done", "tasks": sum(len(c) for c in chunks), "chunks": len(chunks)}
        if version:
            fields["version"] = version
        pipe.hset(self.key(run_id), mapping=fields)
        pipe.execute()
        if not chunks:
            self._release_project(run_id)

    def fail(self, run_id: str, error: str) -> None:
        self.conn.hset(self.key(run_id), mapping={"state": "failed", "error": error})
        self._release_project(run_id)

    def _release_project(self, run_id: str) -> None:
        info = self.info(run_id)
        if info is not None:
            key = self.active_key(info.project)
            if self.conn.get(key) == run_id.encode():
                self.conn.delete(key)

    def chunk_tasks(self, run_id: str, index: int) -> list[int]:
        return json.loads(self.conn.hget(self.key(run_id, "chunks"), str(index)) or b"[]")

    def claim(self, run_id: str, token: str, chunks: int) -> int | None:
        """Index of a chunk now leased to `token`: pending, or running under an expired lease; None if none."""
        index = int(self._claim(keys=[self.key(run_id, "state")],
                                args=[self.key(run_id, "lease:"), token, chunks, LEASE_S]))
        return None if index < 0 else index

    def renew(self, run_id: str, index: int, token: str) -> bool:
        return bool(self._renew(keys=[self.key(run_id, f"lease:{index}")], args=[token, LEASE_S]))

    def finish(self, run_id: str, index: int, token: str, state: str = "done") -> bool:
        """Mark the chunk `state` if `token` still holds its lease; False when another job took it over."""
        return bool(self._finish(keys=[self.key(run_id, f"lease:{index}"), self.key(run_id, "state")],
                                 args=[token, str(index), state]))

    def release(self, run_id: str, index: int, token: str) -> None:
        """Give a chunk back (its job failed): another job claims it at once."""
        self._finish(keys=[self.key(run_id, f"lease:{index}"), self.key(run_id, "state")], args=[token, str(index), "pending"])

    def set_progress(self, run_id: str, index: int, progress: Mapping[str, Any]) -> None:
        self.conn.hset(self.key(run_id, "progress"), str(index), json.dumps(progress))

    def progress(self, run_id: str) -> dict[int, dict[str, Any]]:
        states = {int(k): v.decode() for k, v in self.conn.hgetall(self.key(run_id, "state")).items()}
        prog = {int(k): json.loads(v) for k, v in self.conn.hgetall(self.key(run_id, "progress")).items()}
        return {i: {"state": states[i], **prog.get(i, {})} for i in sorted(states)}

    def settle(self, run_id: str) -> bool:
        """When every chunk is done or failed: mark the run done and free the project. True once settled."""
        info = self.info(run_id)
        if info is None or info.state in ("done", "failed"):
            return True
        states = [v.decode() for v in self.conn.hvals(self.key(run_id, "state"))]
        if any(s not in ("done", "failed") for s in states):
            return False
        self.conn.hset(self.key(run_id), "state", "done")
        self._release_project(run_id)
        return True

    def summary(self, run_id: str) -> dict[str, Any]:
        """The run's record plus totals over its chunks and every task that got no prediction (with the reason)."""
        info = self.current(run_id)
        if info is None:
            raise KeyError(run_id)
        chunks = self.progress(run_id)
        totals = {k: sum(c.get(k, 0) for c in chunks.values()) for k in ("done", "written", "skipped", "replaced")}
        failed = [f for c in chunks.values() for f in c.get("failed_tasks", [])]
        return {"run": run_id, "project": info.project, "state": info.state, "version": info.version,
                "predicts_with": self.predicts_with(info, chunks), "spec": info.spec,
                "reason": info.reason, "error": info.error, "tasks": info.tasks, "chunks": len(chunks),
                "chunks_done": sum(c["state"] == "done" for c in chunks.values()), **totals,
                "failed": len(failed), "failed_tasks": failed,
                "chunk_progress": {i: {k: c.get(k) for k in ("state", "done", "total", "worker", "attempts")}
                                   for i, c in chunks.items()}}


    def predicts_with(self, info: RunInfo, chunks: Mapping[int, Mapping[str, Any]]) -> str:
        """The version `info`'s run predicts with, for its status: the one it is pinned to (a promotion's refresh),
        else the versions its chunks were predicted with, else what it will use: the project's served version."""
        from clipseg_model.checkpoint import base_version_name
        from finetune.versions import VersionRegistry

        if info.version:
            return info.version
        used = sorted({str(c["version"]) for c in chunks.values() if c.get("version")})
        if used:
            return ", ".join(used)
        active = VersionRegistry(self.conn, self.ns).active(info.project)
        model = (info.spec or {}).get("model")
        served = active[0] if active else base_version_name(model) if model else None
        return f"the project's served version (now {served})" if served else "the project's served version"


def plan_job_id(run_id: str) -> str:
    return f"prelabel-{run_id}-plan"


def work_job_id(run_id: str, index: int) -> str:
    return f"prelabel-{run_id}-w{index}"


