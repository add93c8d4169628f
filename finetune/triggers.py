"""When to fine-tune: enqueue at most one fine-tune job per project on the RQ queue "clipseg".

Triggers (the `reason` argument):
- "correction": after a correction is stored; enqueues when the project has >= `every_n` new corrections
  (new = stored or updated after the last `CorrectionStore.mark_trained`, which the job calls when it succeeds).
- "start_training": Label Studio's START_TRAINING webhook; enqueues if the project has any correction.
- "manual": `clipseg finetune --now`; always enqueues (unless one is already queued or running).
- "periodic": `periodic_check`, run by RQ's cron scheduler; enqueues for every project with new corrections.

At most one fine-tune per project is queued or running, also under concurrent triggers from threads, processes or
machines: the key `{ns}:finetune:lock:{project}` holds the job id, and it is written in the same MULTI/EXEC as the
job itself (WATCH on the key), so the key never points at a job that does not exist yet. The job's success,
failure (once retries are used up) and stopped callbacks delete the key if it still names that job. A key whose
job is gone, finished, failed, stopped or canceled is stale and taken over; for a job still marked "started" the
queue's StartedJobRegistry is cleaned first, which fails (or retries) executions whose worker is gone.

Abandoned jobs are found in seconds: RQ alone notices a worker killed with SIGKILL only when the job's execution
entry expires (its monitoring interval + 60 s, ~3,660 s for the default JOB_TIMEOUT). `clipseg worker` therefore
runs a `WorkerHeartbeat` thread that refreshes `clipseg:worker:alive:{name}` ("host:pid", TTL `ALIVE_TTL` s) every
`HEARTBEAT_S` s. A started job whose worker sends these heartbeats and whose key has expired, or names a dead PID
on this host (a restart: found at once), is abandoned: its execution entry is expired and RQ's own clean-up fails
it or schedules its retry, running the callbacks that release the lock. Every heartbeat thread sweeps the
started jobs every `SWEEP_S` s, and every trigger checks the job it finds, so no trigger waits on a dead worker.
The liveness keys are not under a deployment's namespace (REDIS_NAMESPACE): like RQ's queues and worker registry
they belong to the Redis database, since a worker serves the jobs of every namespace there and any deployment's
trigger must be able to tell that it is gone. Their prefix stays the one earlier releases wrote (`WORKER_KEYS`).

Periodic scheduling, what rq 3.0 offers: `Queue.enqueue_in/enqueue_at` (needs a worker started with
`--with-scheduler`; re-scheduling itself from inside the job is a chain that breaks or forks if one link is lost),
`Repeat(times, interval)` (a finite number of repeats), and `rq.cron.CronScheduler` (since 2.4; `rq cron CONFIG`),
a separate process that enqueues registered functions every `interval` seconds or on a cron string. We use the cron
scheduler: `schedule_periodic_check(conn, interval)` returns one with `periodic_check` registered, to `.start()` in
its own process (`clipseg scheduler`), or to drive from a thread with `run_periodic_checks`. Several schedulers
would each enqueue checks; that is harmless because the check itself enqueues at most one fine-tune per project.

Retries use `Retry(max=2, interval=[10, 60])`: the delayed retries need a worker started with `--with-scheduler`.
A fine-tune abandoned at a worker's shutdown (`finetune.worker`: serve stopping) is no failure: it goes back to the
front of its queue, keeps the lock and its retries, and the next worker runs it first.
"""
from __future__ import annotations

import logging
import os
import socket
import threading
import time
import uuid
from dataclasses import asdict, dataclass
from typing import Any, Mapping, Sequence

from redis import Redis, RedisError, WatchError
from rq import Callback, Queue, Retry
from rq.cron import CronScheduler
from rq.exceptions import NoSuchJobError
from rq.job import Job, JobStatus
from rq.registry import StartedJobRegistry
from rq.timeouts import TimerDeathPenalty

from clipseg_model.atomic import pid_running
from finetune.corrections import CorrectionStore
from finetune.worker import JobAbandoned
from finetune.keyspace import NAMESPACE

logger = logging.getLogger(__name__)

QUEUE_NAME = "clipseg"
# Pre-label chunks (backend.prelabel) have a queue of their own: `clipseg worker` serves QUEUE_NAME first, so a
# fine-tune waits at most for one chunk, and a big pre-label run never sits behind (or starves) fine-tunes.
PRELABEL_QUEUE = "clipseg-prelabel"
WORKER_QUEUES = (QUEUE_NAME, PRELABEL_QUEUE)  # what `clipseg worker` serves, in priority order
DEFAULT_JOB = "finetune.jobs.finetune_project"
REASONS = ("correction", "start_training", "manual", "periodic")
ACTIVE_STATUSES = frozenset({
    JobStatus.CREATED, JobStatus.QUEUED, JobStatus.STARTED, JobStatus.DEFERRED, JobStatus.SCHEDULED,
    JobStatus.RATE_LIMITED, JobStatus.READY_TO_ENQUEUE,
})

_RELEASE = """
if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('DEL', KEYS[1]) end
return 0
"""


@dataclass(frozen=True)
class TriggerResult:
    """Outcome of a trigger. detail: enqueued, active (one is queued/running), below_threshold, no_new, no_corrections."""

    project: str
    reason: str
    enqueued: bool
    detail: str
    job_id: str | None = None
    new_corrections: int = 0


def lock_key(project: int | str, namespace: str = NAMESPACE) -> str:
    """Redis key naming the project's queued or running fine-tune job (value: the RQ job id)."""
    return f"{namespace}:finetune:lock:{project}"


# Worker liveness --------------------------------------------------------------------------------------------

ALIVE_TTL = 10  # seconds without a heartbeat after which a worker counts as gone
HEARTBEAT_S = 2.0
SWEEP_S = 5.0


WORKER_KEYS = NAMESPACE  # prefix of the workers' liveness keys: one per Redis database, like RQ's (module docstring)


def _alive_key(worker_name: str) -> str:
    return f"{WORKER_KEYS}:worker:alive:{worker_name}"


def _beats_key(worker_name: str) -> str:
    """Set once by a worker that sends heartbeats: only such workers can be declared gone by their absence."""
    return f"{WORKER_KEYS}:worker:beats:{worker_name}"


def worker_gone(conn: Redis, worker_name: str | None) -> bool:
    """True when `worker_name` sends heartbeats and has stopped: its key expired, or it names a dead local PID."""
    if not worker_name or not conn.exists(_beats_key(worker_name)):
        return False  # not one of ours (a plain `rq worker`): RQ's own, slower expiry applies
    raw = conn.get(_alive_key(worker_name))
    if raw is None:
        return True
    host, _, pid = raw.decode().rpartition(":")
    return host == socket.gethostname() and pid.isdigit() and not pid_running(int(pid))


def _started_registry(conn: Redis, queue_name: str) -> StartedJobRegistry:
    # Only the main thread may use SIGALRM, which the default death penalty of failure callbacks needs.
    penalty = None if threading.current_thread() is threading.main_thread() else TimerDeathPenalty
    return StartedJobRegistry(queue_name, connection=conn, death_penalty_class=penalty)


def recover_abandoned(conn: Redis, queue_name: str = QUEUE_NAME, only: str | None = None) -> list[str]:
    """Fail (or schedule the retry of) started jobs whose worker is gone; returns their ids.

    Expires their execution entries in the StartedJobRegistry, then lets RQ's clean-up do the rest (failure
    callback → the project's lock is released, retry, FailedJobRegistry), exactly as for an expired entry.
    `only`: look at this job id alone.
    """
    registry = _started_registry(conn, queue_name)
    abandoned: dict[str, list[bytes]] = {}
    workers: dict[str | None, bool] = {}
    for member in conn.zrange(registry.key, 0, -1):
        job_id = member.decode().rsplit(":", 1)[0]
        if only is not None and job_id != only:
            continue
        try:
            job = Job.fetch(job_id, connection=conn)
        except NoSuchJobError:
            continue
        if job.get_status(refresh=False) != JobStatus.STARTED:
            continue
        if job.worker_name not in workers:
            workers[job.worker_name] = worker_gone(conn, job.worker_name)
        if workers[job.worker_name]:
            abandoned.setdefault(job_id, []).append(member)
    if abandoned:
        conn.zadd(registry.key, {m: 1 for members in abandoned.values() for m in members}, xx=True)
        for job_id in abandoned:
            logger.warning("job %s on queue %s abandoned: its worker stopped sending heartbeats", job_id, queue_name)
    registry.cleanup()
    return list(abandoned)


class WorkerHeartbeat:
    """A daemon thread that tells the others this worker lives, and sweeps the jobs of workers that do not on every
    queue it serves (`queue_names`: a pre-label chunk of a killed worker is recovered like a fine-tune)."""

    def __init__(self, conn: Redis, worker_name: str, *, queue_names: Sequence[str] = WORKER_QUEUES,
                 interval: float = HEARTBEAT_S, ttl: int = ALIVE_TTL, sweep: float = SWEEP_S) -> None:
        self.conn, self.name, self.queue_names = conn, worker_name, tuple(queue_names)
        self.interval, self.ttl, self.sweep = interval, ttl, sweep
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="worker-heartbeat", daemon=True)

    def beat(self) -> None:
        self.conn.set(_beats_key(self.name), 1, ex=30 * 24 * 3600)
        self.conn.set(_alive_key(self.name), f"{socket.gethostname()}:{os.getpid()}", ex=self.ttl)

    def start(self) -> "WorkerHeartbeat":
        self.beat()
        try:
            self.sweep_abandoned()  # jobs of a worker that died before us
        except Exception as exc:  # noqa: BLE001 - the next sweep tries again
            logger.warning("abandoned-job sweep: %s", exc)
        self._thread.start()
        return self

    def sweep_abandoned(self) -> list[str]:
        """`recover_abandoned` on each of this worker's queues; the ids it failed or scheduled for retry."""
        return [job_id for queue in self.queue_names for job_id in recover_abandoned(self.conn, queue)]

    def stop(self) -> None:
        self._stop.set()
        try:
            self.conn.delete(_alive_key(self.name))
        except RedisError:
            pass

    def _run(self) -> None:
        last_sweep = 0.0
        while not self._stop.wait(self.interval):
            try:
                self.beat()
                if time.monotonic() - last_sweep >= self.sweep:
                    last_sweep = time.monotonic()
                    self.sweep_abandoned()
            except Exception as exc:  # noqa: BLE001 - Redis down for a while: keep beating when it is back
                logger.warning("worker heartbeat: %s", exc)


def failure_line(job: Job) -> str:
    """The last line of the job's latest failure (the exception and its message); "" if it has none."""
    latest = job.latest_result()
    lines = (latest.exc_string or "").strip().splitlines() if latest is not None else []
    return lines[-1].strip() if lines else ""


def _status(conn: Redis, job_id: str, queue_name: str) -> JobStatus | None:
    """The job's real status in RQ; None if the job is gone. Abandoned executions are failed or retried first."""
    try:
        job = Job.fetch(job_id, connection=conn)
    except NoSuchJobError:
        return None
    status = job.get_status(refresh=False)
    if status == JobStatus.STARTED:
        recover_abandoned(conn, queue_name, only=job_id)
        try:
            status = job.get_status(refresh=True)
        except NoSuchJobError:
            return None
    return status


def active_job_id(conn: Redis, project: int | str, *, namespace: str = NAMESPACE, queue_name: str = QUEUE_NAME) -> str | None:
    """Id of the project's fine-tune job if one is queued, scheduled for retry or running; else None."""
    raw = conn.get(lock_key(project, namespace))
    if raw is None:
        return None
    job_id = raw.decode()
    return job_id if _status(conn, job_id, queue_name) in ACTIVE_STATUSES else None


def maybe_enqueue_finetune(
    conn: Redis,
    project: int | str,
    reason: str = "correction",
    every_n: int = 20,
    *,
    namespace: str = NAMESPACE,
    queue_name: str = QUEUE_NAME,
    job_func: str = DEFAULT_JOB,
    job_kwargs: Mapping[str, Any] | None = None,
    spec: Mapping[str, Any] | None = None,
    job_timeout: int = 3600,
    retry_max: int = 2,
    retry_intervals: Sequence[int] = (10, 60),
    result_ttl: int = 7 * 24 * 3600,
    failure_ttl: int = 30 * 24 * 3600,
    min_new: int = 1,
    store: CorrectionStore | None = None,
) -> TriggerResult:
    """Enqueue `job_func(project, **job_kwargs)` on `queue_name` if `reason` calls for it and none is active.

    Args:
        conn: Redis connection (bytes responses) holding both the corrections and the RQ queue.
        project: Label Studio project id.
        reason: "correction" (needs >= every_n new corrections), "start_training" (needs any correction),
            "manual" (always) or "periodic" (needs >= min_new new corrections).
        job_func: dotted path of the job function, imported by the worker.
        namespace: the deployment's key prefix (REDIS_NAMESPACE): its corrections and lock, and the namespace the
            job works in (written into its spec).
        spec: the fine-tune's recipe (`finetune.spec.FinetuneSpec.to_dict()`, any project): passed to the job as
            its `spec` keyword with this project and `namespace` filled in, and kept in the job's meta for
            `clipseg jobs`.
        retry_max / retry_intervals: RQ Retry; retry_max=0 disables retries.
        result_ttl / failure_ttl: seconds finished / failed jobs stay visible.
    Returns:
        TriggerResult; `enqueued` is True for exactly one of any number of concurrent callers.
    """
    if reason not in REASONS:
        raise ValueError(f"reason must be one of {REASONS}, not {reason!r}")
    project = str(project)
    store = store or CorrectionStore(conn, namespace)
    new = store.new_since_last_finetune(project)
    if reason == "correction" and new < every_n:
        return TriggerResult(project, reason, False, "below_threshold", None, new)
    if reason == "periodic" and new < max(1, min_new):
        return TriggerResult(project, reason, False, "no_new", None, new)
    if reason == "start_training" and store.count(project) == 0:
        return TriggerResult(project, reason, False, "no_corrections", None, new)

    key = lock_key(project, namespace)
    queue = Queue(queue_name, connection=conn)
    job_id = f"finetune-{project}-{uuid.uuid4().hex[:12]}"
    meta = {
        "project": project, "reason": reason, "lock_key": key, "new_corrections": new,
        "watermark": store.watermark(project), "enqueued_by": f"{socket.gethostname()}:{os.getpid()}",
        # progress fields the job updates (job.meta[...] = ...; job.save_meta())
        "stage": "queued", "progress": 0.0, "step": 0, "total_steps": None, "message": "",
    }
    kwargs = dict(job_kwargs or {})
    if spec is not None:
        kwargs["spec"] = {**spec, "project": project, "namespace": namespace}
        meta["spec"] = kwargs["spec"]
        meta["total_steps"] = spec.get("steps")
    with conn.pipeline() as pipe:
        while True:
            try:
                pipe.watch(key)
                current = pipe.get(key)
                if current is not None:
                    current_id = current.decode()
                    status = _status(conn, current_id, queue_name)
                    if status in ACTIVE_STATUSES:
                        pipe.unwatch()
                        return TriggerResult(project, reason, False, "active", current_id, new)
                    logger.warning("stale fine-tune lock taken over", extra={"project": project, "job": current_id,
                                                                              "status": str(status)})
                pipe.multi()
                pipe.set(key, job_id)
                queue.enqueue(
                    job_func,
                    args=(project,),
                    kwargs=kwargs,
                    job_id=job_id,
                    job_timeout=job_timeout,
                    result_ttl=result_ttl,
                    failure_ttl=failure_ttl,
                    retry=Retry(max=retry_max, interval=list(retry_intervals)) if retry_max > 0 else None,
                    meta=meta,
                    description=f"fine-tune project {project} ({reason}, {new} new corrections)",
                    on_success=Callback(release_on_success),
                    on_failure=Callback(release_on_failure),
                    on_stopped=Callback(release_on_stopped),
                    pipeline=pipe,
                )
                pipe.execute()
                break
            except WatchError:
                continue  # the key changed under us: look again
    logger.info("fine-tune enqueued", extra={"project": project, "job": job_id, "reason": reason, "new": new})
    return TriggerResult(project, reason, True, "enqueued", job_id, new)


# RQ callbacks (run by the worker; also by StartedJobRegistry.cleanup for abandoned jobs) -------------------------


def _release(job: Job, connection: Redis) -> None:
    key = (job.meta or {}).get("lock_key")
    if key:
        connection.eval(_RELEASE, 1, key, job.id)


def release_on_success(job: Job, connection: Redis, result: Any, *args: Any, **kwargs: Any) -> None:
    """Success callback: the project may be fine-tuned again."""
    _release(job, connection)


def release_on_failure(job: Job, connection: Redis, *exc_info: Any, **kwargs: Any) -> None:
    """Failure callback: release the project's lock unless RQ is about to retry the job, or the job was abandoned at
    a worker's shutdown (`finetune.worker`: it goes back to its queue and still holds the lock)."""
    if exc_info and isinstance(exc_info[0], type) and issubclass(exc_info[0], JobAbandoned):
        return
    if not job.should_retry:
        _release(job, connection)


def release_on_stopped(job: Job, connection: Redis, *args: Any, **kwargs: Any) -> None:
    """Stopped callback (`rq.command.send_stop_job_command`): release the project's lock."""
    _release(job, connection)


# Periodic check ----------------------------------------------------------------------------------------------


def periodic_check(conn: Redis | None = None, **trigger_kwargs: Any) -> list[dict]:
    """Enqueue a fine-tune for every project with new corrections (at most one per project).

    Runs as an RQ job (the connection then comes from the job) or directly with `conn`. `trigger_kwargs` go to
    `maybe_enqueue_finetune` (namespace, job_func, job_kwargs, min_new, ...). Returns the TriggerResults as dicts.
    """
    if conn is None:
        from rq import get_current_job

        job = get_current_job()
        if job is None:
            raise ValueError("periodic_check needs a connection outside an RQ job")
        conn = job.connection
    store = CorrectionStore(conn, trigger_kwargs.get("namespace", NAMESPACE))
    results = [maybe_enqueue_finetune(conn, p, "periodic", store=store, **trigger_kwargs) for p in store.projects()]
    enqueued = [r.project for r in results if r.enqueued]
    logger.info("periodic check", extra={"projects": len(results), "enqueued": enqueued})
    return [asdict(r) for r in results]


def schedule_periodic_check(
    conn: Redis,
    interval_s: int = 3600,
    *,
    queue_name: str = QUEUE_NAME,
    scheduler: CronScheduler | None = None,
    cron: str | None = None,
    **trigger_kwargs: Any,
) -> CronScheduler:
    """Register `periodic_check` with an rq cron scheduler (every `interval_s` seconds, or on a `cron` string).

    Returns the scheduler; call `.start()` in a process of its own (it blocks and installs signal handlers), or
    pass it to `run_periodic_checks` from a thread. A check not started within one interval expires (ttl).
    """
    scheduler = scheduler or CronScheduler(connection=conn, name=f"clipseg-cron:{socket.gethostname()}:{os.getpid()}")
    scheduler.register(
        periodic_check,
        queue_name,
        kwargs={"queue_name": queue_name, **trigger_kwargs},
        interval=None if cron else interval_s,
        cron=cron,
        job_timeout=300,
        ttl=interval_s,
        result_ttl=interval_s * 2,
        failure_ttl=7 * 24 * 3600,
        name="clipseg-periodic-check",
    )
    return scheduler


def run_periodic_checks(scheduler: CronScheduler, stop: threading.Event) -> None:
    """Drive `scheduler` from the calling thread until `stop` is set (no signal handlers, unlike `.start()`)."""
    scheduler.register_birth()
    try:
        while not stop.is_set():
            if scheduler.enqueue_jobs():
                scheduler.save()
            scheduler.heartbeat()
            stop.wait(max(0.1, scheduler.calculate_sleep_interval()))
    finally:
        scheduler.register_death()
