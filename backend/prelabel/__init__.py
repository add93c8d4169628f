"""Pre-label runs: predict a whole Label Studio project in the background and write the predictions through its API.

    queue_prelabel ──> plan job ──> chunks of task ids in Redis ──> one work job per chunk on PRELABEL_QUEUE
    (CLI, /predict         (checks the credentials,                    each work job claims chunks until none is left:
     over budget,           lists the tasks)                            read the chunk's tasks (with their predictions)
     a promotion)                                                       -> skip those that have one of this version
                                                                        -> download ahead in threads -> predict
                                                                        -> import the predictions in batches

Chunks are leased, not owned by an RQ job: a work job claims the first chunk that is not done and whose lease key
(`SET NX EX LEASE_S`) is free, and a thread renews the lease while it works. A SIGKILLed worker's lease runs out after
LEASE_S and any other work job of the run (or the restarted worker's) takes the chunk over; a job with nothing left to
claim waits for the leases of others, so the last live job picks up a dead one's chunk. Before writing, every chunk
re-reads its tasks' predictions from Label Studio, so a retried chunk skips what the dead one already wrote: no task
gets two predictions of one version. RQ's own retry (after the heartbeat TTL) is the backstop when every job died.

Redis keys (`ns` = namespace, default "clipseg"; `R` = run id):

| key                          | type   | content                                                                  |
|------------------------------|--------|--------------------------------------------------------------------------|
| `ns:prelabel:runs`           | zset   | run id, score = creation time                                            |
| `ns:prelabel:run:R`          | hash   | project, state, version, unlabeled_only, chunk_size, tasks, chunks, error |
| `ns:prelabel:run:R:chunks`   | hash   | chunk index -> JSON list of task ids                                     |
| `ns:prelabel:run:R:state`    | hash   | chunk index -> pending / running / done / failed                         |
| `ns:prelabel:run:R:progress` | hash   | chunk index -> JSON {done, total, written, skipped, failed, worker, ...}  |
| `ns:prelabel:run:R:lease:i`  | string | the claiming job's token, expires after LEASE_S unless renewed            |
| `ns:prelabel:active:P`       | string | run id of project P's unfinished run (one at a time per project)         |
"""
from __future__ import annotations

import json
import logging
import threading
import time
import uuid
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, Iterable, Mapping, Sequence

from redis import Redis

from finetune.triggers import PRELABEL_QUEUE

log = logging.getLogger(__name__)

LEASE_S = 20  # a dead worker's chunk is taken over this long after its last renewal
RENEW_S = 5
MAX_CHUNK_ATTEMPTS = 3
PREFETCH_THREADS = 4  # image downloads overlapped with inference
BATCH_CPU, BATCH_CUDA = 8, 32  # images per predict call
WAIT_POLL_S = 1.0
API_TIMEOUT_S = 60.0
JOB_RETRIES = (2, [5, 30])  # RQ retries of a plan or work job: count, waits in seconds
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

    @classmethod
    def from_hash(cls, run_id: str, raw: Mapping[bytes, bytes]) -> "RunInfo":
        d = {k.decode(): v.decode() for k, v in raw.items()}
        return cls(run_id, d["project"], d.get("state", "planning"), d.get("version") or None,
                   d.get("unlabeled_only") == "1", int(d.get("chunk_size", 100)), int(d.get("tasks", 0)),
                   int(d.get("chunks", 0)), d.get("reason", ""), d.get("error", ""), float(d.get("created", 0)),
                   json.loads(d["task_ids"]) if d.get("task_ids") else None)


class PrelabelRuns:
    """The Redis side of pre-label runs: create, plan, claim/renew/finish chunks, read progress."""

    def __init__(self, conn: Redis, namespace: str = "clipseg"):
        self.conn = conn
        self.ns = namespace
        self._claim = conn.register_script(_CLAIM)
        self._renew = conn.register_script(_RENEW)
        self._finish = conn.register_script(_FINISH)

    def key(self, run_id: str, part: str = "") -> str:
        return f"{self.ns}:prelabel:run:{run_id}" + (f":{part}" if part else "")

    def active_key(self, project: str) -> str:
        return f"{self.ns}:prelabel:active:{project}"

    def create(self, project: str, *, task_ids: Sequence[int] | None, unlabeled_only: bool, chunk_size: int,
               version: str | None, reason: str) -> tuple[str, bool]:
        """(run id, created): a new run, or the project's unfinished one (one run per project at a time)."""
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
        pipe = self.conn.pipeline()
        pipe.hset(self.key(run_id), mapping=record)
        pipe.zadd(f"{self.ns}:prelabel:runs", {run_id: record["created"]})
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
        return [r.decode() for r in self.conn.zrevrange(f"{self.ns}:prelabel:runs", 0, limit - 1)]

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
                "reason": info.reason, "error": info.error, "tasks": info.tasks, "chunks": len(chunks),
                "chunks_done": sum(c["state"] == "done" for c in chunks.values()), **totals,
                "failed": len(failed), "failed_tasks": failed,
                "chunk_progress": {i: {k: c.get(k) for k in ("state", "done", "total", "worker", "attempts")}
                                   for i, c in chunks.items()}}


def plan_job_id(run_id: str) -> str:
    return f"prelabel-{run_id}-plan"


def work_job_id(run_id: str, index: int) -> str:
    return f"prelabel-{run_id}-w{index}"


def _retry():
    """RQ's retry policy of a pre-label job (JOB_RETRIES), or None for none."""
    from rq import Retry

    count, waits = JOB_RETRIES
    return Retry(max=count, interval=waits) if count else None


def queue_prelabel(conn: Redis, project: int | str, *, task_ids: Sequence[int] | None = None,
                   unlabeled_only: bool = False, chunk_size: int = 100, version: str | None = None,
                   reason: str = "manual", job_timeout: int = 3600, namespace: str = "clipseg") -> tuple[str, bool]:
    """Queue a pre-label run of `project` (all its tasks, or `task_ids`); (run id, created). A project has at most
    one unfinished run: asking again returns that run. `version`: the run waits until the worker serves it."""
    from rq import Queue

    runs = PrelabelRuns(conn, namespace)
    run_id, created = runs.create(str(project), task_ids=task_ids, unlabeled_only=unlabeled_only,
                                  chunk_size=max(1, int(chunk_size)), version=version, reason=reason)
    if created:
        Queue(PRELABEL_QUEUE, connection=conn).enqueue(
            "backend.prelabel.plan_job", run_id, namespace=namespace, job_id=plan_job_id(run_id),
            job_timeout=job_timeout, retry=_retry(),
            meta={"kind": "prelabel", "run": run_id, "project": str(project), "stage": "planning"},
            description=f"pre-label project {project}: plan ({reason})")
    return run_id, created


# ---- Label Studio --------------------------------------------------------------------------------------------------
def connect(settings, project: str):
    """(SDK client, project label config) after checking URL, key and project; raises PrelabelError naming the
    setting to fix. Nothing is written before this passes."""
    import httpx
    from label_studio_sdk import LabelStudio
    from label_studio_sdk.core.api_error import ApiError

    url, key = settings.label_studio_url.rstrip("/"), settings.label_studio_api_key
    if not url:
        raise PrelabelError("LABEL_STUDIO_URL is not set: a pre-label run writes predictions through Label Studio's "
                            "API; set it (e.g. http://localhost:8080) in the worker's environment")
    if not key:
        raise PrelabelError("LABEL_STUDIO_API_KEY is not set: give the worker a legacy token or a personal access "
                            "token (Label Studio: Account & Settings)")
    try:
        client = LabelStudio(base_url=url, api_key=key, timeout=API_TIMEOUT_S)
        config = client.projects.get(id=int(project)).label_config
    except ApiError as exc:
        if exc.status_code in (401, 403):
            raise PrelabelError(f"Label Studio at LABEL_STUDIO_URL={url} refused LABEL_STUDIO_API_KEY (HTTP "
                                f"{exc.status_code}): is it a valid token of a user who can see project {project}?") from None
        if exc.status_code == 404:
            raise PrelabelError(f"Label Studio at LABEL_STUDIO_URL={url} has no project {project}") from None
        raise PrelabelError(f"Label Studio at LABEL_STUDIO_URL={url} answered HTTP {exc.status_code}: {exc.body}") from None
    except (httpx.HTTPError, OSError) as exc:
        raise PrelabelError(f"cannot reach Label Studio at LABEL_STUDIO_URL={url}: {type(exc).__name__}: {exc}") from None
    if not config:
        raise PrelabelError(f"project {project} has no labeling config")
    return client, config


def _task_dict(task: Any) -> dict[str, Any]:
    return task if isinstance(task, dict) else task.dict()


def list_task_ids(client, project: str, unlabeled_only: bool) -> list[int]:
    """Every task id of the project (without an annotation, with `unlabeled_only`), in id order."""
    ids = []
    for task in client.tasks.list(project=int(project), fields="task_only", page_size=1000,
                                  include="id,total_annotations,cancelled_annotations"):
        t = _task_dict(task)
        if unlabeled_only and (t.get("total_annotations") or 0) + (t.get("cancelled_annotations") or 0) > 0:
            continue
        ids.append(int(t["id"]))
    return sorted(ids)


def read_tasks(client, project: str, task_ids: Sequence[int]) -> list[dict[str, Any]]:
    """The tasks (data, annotations, predictions) of `task_ids`, as Label Studio has them now, in id order."""
    query = json.dumps({"selectedItems": {"all": False, "included": list(task_ids)}})
    tasks = [_task_dict(t) for t in client.tasks.list(project=int(project), fields="all", query=query,
                                                        page_size=max(1, len(task_ids)))]
    wanted = set(task_ids)
    return sorted((t for t in tasks if t.get("id") in wanted), key=lambda t: t["id"])


def post_json(client, path: str, body: Any, params: Mapping[str, Any] | None = None) -> None:
    """POST `body` (serialised with orjson) to Label Studio's `path` with the SDK client's auth and retries.

    The SDK's own methods (e.g. `projects.import_predictions`) run its generic JSON encoder over every integer of the
    brush RLE (~7 us each, holding the GIL): ~0.1 s per 8 small masks and seconds for big noisy ones, taken from
    inference. Its HTTP client is still used, so auth (legacy token, or a PAT refreshed into access tokens) is the SDK's.
    """
    import orjson
    from label_studio_sdk.core.api_error import ApiError

    response = client._client_wrapper.httpx_client.request(
        path, method="POST", params=dict(params or {}), content=orjson.dumps(body),
        headers={"content-type": "application/json"})
    if not 200 <= response.status_code < 300:
        raise ApiError(status_code=response.status_code, headers=dict(response.headers), body=response.text[:500])


def _annotated(task: Mapping[str, Any]) -> bool:
    return bool(task.get("annotations")) or (task.get("total_annotations") or 0) > 0


def _versions(task: Mapping[str, Any]) -> list[tuple[int | None, str | None]]:
    return [(p.get("id"), p.get("model_version")) for p in (task.get("predictions") or []) if isinstance(p, dict)]


# ---- the model in a worker -----------------------------------------------------------------------------------------
_MODELS: dict[tuple, Any] = {}
_SERVICES: dict[str, Any] = {}


def serving_segmenter(settings, conn: Redis, version: str | None = None, timeout: float = 300.0,
                      project: str | None = None):
    """The segmenter of the version every server serves `project` (its active one, else the default, else MODEL),
    loaded once per worker process and following promotions; with `version`, wait until that one is served."""
    from backend.serving.model import ServingModel
    from finetune.versions import VersionRegistry

    key = (settings.model, settings.device, settings.threshold, settings.precision_mode, str(settings.data_dir))
    model = _MODELS.get(key)
    if model is None:
        model = ServingModel.from_settings(settings, registry_factory=lambda: VersionRegistry(conn), check_interval=0.0)
        model.start()
        _MODELS[key] = model
    deadline = time.monotonic() + timeout
    while True:
        model.check_for_update(force=True, wait=max(0.0, deadline - time.monotonic()))
        model.wait_ready(max(0.0, deadline - time.monotonic()))
        if model.ready:
            view = model.for_project(project)  # per-project models (issue 14): that project's own version
            if version is None or view.version == version:
                return view
        if time.monotonic() > deadline:
            raise PrelabelError(model.error or f"model version {version} did not load within {timeout:.0f} s")
        time.sleep(0.2)


# ---- one chunk -----------------------------------------------------------------------------------------------------
@dataclass
class ChunkResult:
    total: int = 0
    done: int = 0
    written: int = 0
    skipped: int = 0
    replaced: int = 0
    failed_tasks: list[dict[str, Any]] = field(default_factory=list)

    def as_dict(self) -> dict[str, Any]:
        return {"total": self.total, "done": self.done, "written": self.written, "skipped": self.skipped,
                "replaced": self.replaced, "failed": len(self.failed_tasks), "failed_tasks": self.failed_tasks}


class ChunkPredictor:
    """Predicts one chunk: re-read its tasks, skip what already has this version, download ahead, predict in
    batches, import predictions in batches on a writer thread (so API writes overlap the next batch's inference)."""

    def __init__(self, client, project: str, config, segmenter, service, *, our_versions: Iterable[str] = (),
                 unlabeled_only: bool = False, replace_older: bool = True, batch: int = BATCH_CPU,
                 still_mine=lambda: True, on_progress=lambda result: None):
        self.client, self.project, self.config = client, project, config
        self.segmenter, self.service = segmenter, service
        self.our_versions = set(our_versions)
        self.unlabeled_only, self.replace_older, self.batch = unlabeled_only, replace_older, batch
        self.still_mine, self.on_progress = still_mine, on_progress
        self.timings = {"read": 0.0, "wait_downloads": 0.0, "predict": 0.0, "write": 0.0, "wait_writes": 0.0}
        self._prefetch = ThreadPoolExecutor(PREFETCH_THREADS, thread_name_prefix="prelabel-fetch")
        self._writer = ThreadPoolExecutor(1, thread_name_prefix="prelabel-write")

    def close(self) -> None:
        self._prefetch.shutdown(wait=False, cancel_futures=True)
        self._writer.shutdown(wait=True)

    def _download(self, task: Mapping[str, Any]) -> Exception | None:
        """Fetch the image into the fetcher's cache; predict_service.answer decodes it from there."""
        from backend.images import ImageFetchError
        from backend.labelstudio.image_refs import task_image_ref

        ref = task_image_ref(task, self.config)
        if ref is None:
            return ImageFetchError(f"task has no '{self.config.image_key}' field", 400)
        try:
            self.service.fetcher.fetch_bytes(ref, task.get("id"))
        except Exception as exc:  # noqa: BLE001 - one task's failure is listed, the chunk goes on
            return exc
        return None

    def _older_ours(self, task: Mapping[str, Any], version: str) -> list[int]:
        """Ids of the task's predictions this run replaces: older versions of ours, on unannotated tasks only."""
        if not self.replace_older or _annotated(task):
            return []
        return [pid for pid, v in _versions(task) if pid is not None and v != version and v in self.our_versions]

    def _write(self, rows: list[tuple[dict[str, Any], dict[str, Any]]], result: ChunkResult) -> None:
        if not rows:
            return
        if not self.still_mine():
            raise PrelabelError("lost the chunk's lease to another worker; stopping without writing")
        started = time.perf_counter()
        version = rows[0][1]["model_version"]
        old = {task["id"]: self._older_ours(task, version) for task, _ in rows}
        # Tasks whose every prediction is an older one of ours: one bulk delete before the import (the action deletes
        # all of a task's predictions). Tasks that also hold others' predictions: one DELETE per old one, after.
        whole = [t["id"] for t, _ in rows if old[t["id"]] and len(old[t["id"]]) == len(_versions(t))]
        if whole:
            post_json(self.client, "api/dm/actions", {"selectedItems": {"all": False, "included": whole}},
                      params={"id": "delete_tasks_predictions", "project": int(self.project)})
        post_json(self.client, f"api/projects/{int(self.project)}/import/predictions", [
            {"task": task["id"], "result": answer["result"], "score": answer["score"],
             "model_version": answer["model_version"]} for task, answer in rows])
        result.written += len(rows)
        for task, _ in rows:
            if task["id"] not in whole:
                for pid in old[task["id"]]:
                    self.client.predictions.delete(id=pid)
            result.replaced += len(old[task["id"]])
        self.timings["write"] += time.perf_counter() - started

    def run(self, task_ids: Sequence[int]) -> ChunkResult:
        version = self.segmenter.version
        result = ChunkResult(total=len(task_ids))
        t0 = time.perf_counter()
        tasks = read_tasks(self.client, self.project, task_ids)
        self.timings["read"] += time.perf_counter() - t0
        found = {t["id"] for t in tasks}
        for missing in sorted(set(task_ids) - found):  # deleted from Label Studio since the plan
            result.skipped += 1
        todo = []
        for task in tasks:
            if any(v == version for _, v in _versions(task)) or (self.unlabeled_only and _annotated(task)):
                result.skipped += 1
            else:
                todo.append(task)
        result.done = result.skipped
        downloads: list[Future] = [self._prefetch.submit(self._download, t) for t in todo]
        writes: list[Future] = []
        for start in range(0, len(todo), self.batch):
            batch, ok = todo[start:start + self.batch], []
            t0 = time.perf_counter()
            for task, fut in zip(batch, downloads[start:start + self.batch]):
                error = fut.result()
                if error is not None:
                    result.failed_tasks.append({"task": task["id"], "error": str(error)})
                    log.warning("task %s: no prediction: %s", task["id"], error)
                else:
                    ok.append(task)
            t1 = time.perf_counter()
            self.timings["wait_downloads"] += t1 - t0
            rows = []
            for task, answer in zip(ok, self.service.answer(self.segmenter, self.config, ok, None, self.project)):
                if answer.error:  # the bytes did not decode
                    result.failed_tasks.append({"task": task["id"], "error": answer.error})
                else:
                    rows.append((task, answer.to_json(version)))
            self.timings["predict"] += time.perf_counter() - t1
            writes.append(self._writer.submit(self._write, rows, result))
            for w in [w for w in writes if w.done()]:
                w.result()  # surface a failed write at once
            result.done += len(batch)
            self.on_progress(result)
        t0 = time.perf_counter()
        for w in writes:
            w.result()
        self.timings["wait_writes"] += time.perf_counter() - t0
        result.done = result.total
        log.info("chunk of %d tasks: %s", len(task_ids), {k: round(v, 2) for k, v in self.timings.items()})
        return result


# ---- RQ jobs -------------------------------------------------------------------------------------------------------
def _job_settings():
    from backend.settings import Settings

    return Settings.from_env()


def plan_job(run_id: str, namespace: str = "clipseg") -> dict[str, Any]:
    """RQ job: check Label Studio access, list the run's tasks, split them into chunks, queue one work job each."""
    from rq import Queue, get_current_job

    job = get_current_job()
    conn = job.connection
    settings = _job_settings()
    runs = PrelabelRuns(conn, namespace)
    info = runs.info(run_id)
    if info is None:
        raise PrelabelError(f"pre-label run {run_id} does not exist")
    if info.state != "planning":  # an RQ retry of a plan that failed for good or already went through
        return {"run": run_id, "project": info.project, "state": info.state, "error": info.error}
    try:
        client, _ = connect(settings, info.project)
        task_ids = info.task_ids if info.task_ids is not None else list_task_ids(client, info.project, info.unlabeled_only)
    except PrelabelError as exc:
        runs.fail(run_id, str(exc))
        raise
    chunks = [task_ids[i:i + info.chunk_size] for i in range(0, len(task_ids), info.chunk_size)]
    runs.plan(run_id, chunks)
    queue = Queue(PRELABEL_QUEUE, connection=conn)
    for i in range(len(chunks)):
        queue.enqueue("backend.prelabel.work_job", run_id, namespace=namespace, job_id=work_job_id(run_id, i),
                      job_timeout=settings.job_timeout, retry=_retry(),
                      meta={"kind": "prelabel", "run": run_id, "project": info.project, "stage": "queued"},
                      description=f"pre-label project {info.project}: work ({len(chunks)} chunks)")
    log.info("pre-label run %s: project %s, %d tasks in %d chunks", run_id, info.project, len(task_ids), len(chunks))
    return {"run": run_id, "project": info.project, "tasks": len(task_ids), "chunks": len(chunks)}


class _Lease:
    """Renews a chunk's lease in a thread while the chunk is worked on."""

    def __init__(self, runs: PrelabelRuns, run_id: str, index: int, token: str):
        self.runs, self.run_id, self.index, self.token = runs, run_id, index, token
        self.mine = True
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="prelabel-lease", daemon=True)

    def _loop(self) -> None:
        while not self._stop.wait(RENEW_S):
            try:
                self.mine = self.runs.renew(self.run_id, self.index, self.token)
            except Exception as exc:  # noqa: BLE001 - Redis blip: try again next time, the lease has slack
                log.warning("lease renewal failed: %s", exc)
            if not self.mine:
                return

    def __enter__(self) -> "_Lease":
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()


def work_job(run_id: str, namespace: str = "clipseg") -> dict[str, Any]:
    """RQ job: claim chunks of the run until none is left (waiting for others' leases to finish or run out)."""
    from rq import get_current_job

    from backend.labelstudio.config import LabelConfig
    from backend.metrics import BackendMetrics
    from backend.images import ImageFetcher
    from backend.serving.predict_service import PredictService
    from finetune.versions import VersionRegistry

    job = get_current_job()
    conn = job.connection
    settings = _job_settings()
    runs = PrelabelRuns(conn, namespace)
    info = runs.info(run_id)
    if info is None or info.state in ("done", "failed"):
        return {"run": run_id, "chunks": [], "note": "run already settled"}
    client, label_config = connect(settings, info.project)
    segmenter = serving_segmenter(settings, conn, info.version, project=info.project)
    config = LabelConfig.from_settings(label_config, settings)
    key = repr(settings)
    service = _SERVICES.get(key)
    if service is None:  # one per worker process, like the model: its thread pools and image cache are reused
        service = _SERVICES[key] = PredictService(ImageFetcher.from_settings(settings), BackendMetrics())
    # Versions this backend made or started from (a record's parent is the version it replaced, e.g. the base model):
    # only their predictions are ever replaced; predictions imported from elsewhere stay.
    records = VersionRegistry(conn).list()
    ours = {r.version for r in records} | {r.parent for r in records if r.parent}
    batch = BATCH_CUDA if str(segmenter.model.device).startswith("cuda") else BATCH_CPU
    token = f"{job.worker_name or 'inline'}:{job.id}:{uuid.uuid4().hex[:8]}"
    worked: list[dict[str, Any]] = []
    try:
        while True:
            index = runs.claim(run_id, token, info.chunks)
            if index is None:
                if runs.settle(run_id):
                    break
                time.sleep(WAIT_POLL_S)  # others hold leases: take over any that runs out
                continue
            attempts = int(runs.progress(run_id).get(index, {}).get("attempts", 0)) + 1
            base = {"worker": job.worker_name, "attempts": attempts}

            def progress(r: ChunkResult, index=index, base=base) -> None:
                runs.set_progress(run_id, index, {**base, **r.as_dict()})
                job.meta.update({"stage": "predicting", "chunk": index, "chunks": info.chunks, "done": r.done,
                                 "total": r.total, "progress": r.done / max(1, r.total)})
                job.save_meta()

            progress(ChunkResult(total=len(runs.chunk_tasks(run_id, index))))
            with _Lease(runs, run_id, index, token) as lease:
                predictor = ChunkPredictor(client, info.project, config, segmenter, service, our_versions=ours,
                                           unlabeled_only=info.unlabeled_only,
                                           replace_older=settings.prelabel_replace_older, batch=batch,
                                           still_mine=lambda lease=lease: lease.mine, on_progress=progress)
                try:
                    result = predictor.run(runs.chunk_tasks(run_id, index))
                except Exception as exc:
                    predictor.close()
                    state = "failed" if attempts >= MAX_CHUNK_ATTEMPTS else "pending"
                    runs.set_progress(run_id, index, {**base, "error": f"{type(exc).__name__}: {exc}"})
                    runs.finish(run_id, index, token, state)
                    raise
                predictor.close()
            progress(result)
            if runs.finish(run_id, index, token):
                worked.append({"chunk": index, **result.as_dict()})
            else:
                log.warning("chunk %d of run %s was taken over by another worker", index, run_id)
    finally:
        job.meta.update({"stage": "done"})
        job.save_meta()
    summary = runs.summary(run_id)
    return {"run": run_id, "chunks": worked, "failed_tasks": [f for w in worked for f in w["failed_tasks"]],
            "run_state": summary["state"]}


# ---- fresh suggestions after a promotion ---------------------------------------------------------------------------
class PromotionRefresher:
    """Listens on the versions channel; when a project's version is activated, queues a pre-label run of that
    project's unannotated tasks with that version (once per version, however many servers listen)."""

    def __init__(self, conn: Redis, settings, namespace: str = "clipseg"):
        from finetune.versions import VersionRegistry

        self.conn, self.settings, self.ns = conn, settings, namespace
        self.registry = VersionRegistry(conn)
        self._stop = threading.Event()

    def handle(self, event: Mapping[str, Any]) -> str | None:
        """Queue the refresh for an "activated" event; the run id, or None when there is nothing to do."""
        if event.get("event") != "activated" or not event.get("version"):
            return None
        version = str(event["version"])
        try:
            project = self.registry.get(version).project
        except Exception:  # noqa: BLE001 - unknown version: nothing to refresh
            return None
        if not project:
            return None  # the base model (no project): a rollback to it refreshes nothing
        if not (self.settings.label_studio_url and self.settings.label_studio_api_key):
            # the run could only fail: say once per version what is missing instead of queueing it
            log.warning("version %s of project %s is active, but fresh suggestions need LABEL_STUDIO_URL and "
                        "LABEL_STUDIO_API_KEY (PRELABEL_ON_PROMOTE=false silences this)", version, project)
            return None
        if not self.conn.set(f"{self.ns}:prelabel:refreshed:{version}", "1", nx=True, ex=7 * 86400):
            return None  # another server queued it
        run_id, _ = queue_prelabel(self.conn, project, unlabeled_only=True, chunk_size=self.settings.prelabel_chunk,
                                   version=version, reason=f"promoted {version}", job_timeout=self.settings.job_timeout,
                                   namespace=self.ns)
        log.info("version %s of project %s is active: pre-label run %s queued for its unannotated tasks",
                 version, project, run_id)
        return run_id

    def _listen(self) -> None:
        while not self._stop.is_set():
            try:
                pubsub = self.conn.pubsub(ignore_subscribe_messages=True)
                pubsub.subscribe(self.registry.channel)
                while not self._stop.is_set():
                    message = pubsub.get_message(timeout=1.0)
                    if message and message.get("type") == "message":
                        self.handle(json.loads(message["data"]))
            except Exception as exc:  # noqa: BLE001 - Redis restarts: subscribe again
                log.debug("promotion listener: %s; retrying", exc)
                self._stop.wait(2.0)

    def start(self) -> "PromotionRefresher":
        threading.Thread(target=self._listen, name="promotion-refresher", daemon=True).start()
        return self

    def stop(self) -> None:
        self._stop.set()
