"""Queueing a pre-label run and its RQ jobs: one plan job, then one work job per chunk on PRELABEL_QUEUE.

Every job carries the run's `PrelabelSpec` (as a dict). Job paths stored in Redis are `backend.prelabel.jobs.plan_job`
and `backend.prelabel.jobs.work_job`; the previous release queued `backend.prelabel.plan_job` / `work_job` without a
spec, which still resolve (re-exported by the package) and fall back to the worker's own settings, with a warning.
Every key a job reads and writes is in the spec's namespace (`PrelabelSpec.namespace`); jobs of the previous release
carry theirs as a `namespace` keyword instead (always "clipseg"), which fills in for a spec without one.
"""
from __future__ import annotations

import logging
import threading
import time
import uuid
from typing import Any, Mapping, Sequence

from redis import Redis

from backend.prelabel.chunk import BATCH_CPU, BATCH_CUDA, ChunkPredictor, ChunkResult
from backend.prelabel.client import connect, list_task_ids
from backend.prelabel.runs import RENEW_S, PrelabelError, PrelabelRuns, RunInfo, plan_job_id, work_job_id
from backend.prelabel.spec import PrelabelSpec
from finetune.exemplars import ExemplarStore
from backend.prelabel.worker import WorkerContext
from backend.studio.run_notice import RunNotice, done_notice, failed_notice, progress_notice
from finetune.triggers import PRELABEL_QUEUE
from finetune.versions import VersionRegistry
from finetune.worker import JobAbandoned
from finetune.keyspace import NAMESPACE

log = logging.getLogger(__name__)

MAX_CHUNK_ATTEMPTS = 3
WAIT_POLL_S = 1.0
JOB_RETRIES = (2, [5, 30])  # RQ retries of a plan or work job: count, waits in seconds
PLAN_JOB = "backend.prelabel.jobs.plan_job"
WORK_JOB = "backend.prelabel.jobs.work_job"


def _retry():
    """RQ's retry policy of a pre-label job (JOB_RETRIES), or None for none."""
    from rq import Retry

    count, waits = JOB_RETRIES
    return Retry(max=count, interval=waits) if count else None


def queue_prelabel(conn: Redis, spec: PrelabelSpec, *, task_ids: Sequence[int] | None = None,
                   reason: str = "manual") -> tuple[str, bool]:
    """Queue a pre-label run of `spec.project` (all its tasks, or `task_ids`) in `spec.namespace`; (run id, created).
    A project has at most one unfinished run: asking again returns that run. With `spec.version` the run waits until
    it is served."""
    from rq import Queue

    runs = PrelabelRuns(conn, spec.namespace)
    run_id, created = runs.create(spec.project, task_ids=task_ids, unlabeled_only=spec.unlabeled_only,
                                  chunk_size=spec.chunk_size, version=spec.version, reason=reason, spec=spec.to_dict())
    if created:
        Queue(PRELABEL_QUEUE, connection=conn).enqueue(
            PLAN_JOB, run_id, spec=spec.to_dict(), job_id=plan_job_id(run_id),
            job_timeout=spec.job_timeout, retry=_retry(),
            meta={"kind": "prelabel", "run": run_id, "project": spec.project, "stage": "planning",
                  "spec": spec.summary()},
            description=f"pre-label project {spec.project}: plan ({reason})")
    return run_id, created


def _namespace_of(spec: Mapping[str, Any] | None, namespace: str | None) -> str:
    """The namespace a job works in: its spec's, else its `namespace` keyword (the previous release's), else the
    default."""
    return str((spec or {}).get("namespace") or namespace or NAMESPACE)


def _spec_of(info: RunInfo, spec: Mapping[str, Any] | None, context: WorkerContext, namespace: str) -> PrelabelSpec:
    """The run's recipe in `namespace`: the job's spec, else the run record's, else (a job of the previous release)
    the worker's settings."""
    data = spec or info.spec
    if data:
        return PrelabelSpec.from_dict({**data, "namespace": namespace})
    log.warning("pre-label run %s carries no spec (queued by the previous release): using this worker's settings",
                info.run_id)
    return PrelabelSpec.from_settings(context.settings, info.project, version=info.version, unlabeled_only=info.unlabeled_only,
                                      chunk_size=info.chunk_size, namespace=namespace)


def _job_start(run_id: str, namespace: str):
    """(the current RQ job, its connection, this worker's context, the runs, the run's record or None)."""
    from rq import get_current_job

    job = get_current_job()
    runs = PrelabelRuns(job.connection, namespace)
    return job, job.connection, WorkerContext.current(), runs, runs.info(run_id)


def plan_job(run_id: str, namespace: str | None = None, spec: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """RQ job: check Label Studio access, list the run's tasks, split them into chunks, queue one work job each.
    `namespace`: only in jobs of the previous release (this one's specs carry it)."""
    from rq import Queue

    namespace = _namespace_of(spec, namespace)
    job, conn, context, runs, info = _job_start(run_id, namespace)
    if info is None:
        raise PrelabelError(f"pre-label run {run_id} does not exist")
    if info.state != "planning":  # an RQ retry of a plan that failed for good or already went through
        return {"run": run_id, "project": info.project, "state": info.state, "error": info.error}
    recipe = _spec_of(info, spec, context, namespace)
    registry = VersionRegistry(conn, namespace)
    client = None
    try:
        client, _ = connect(context.settings, info.project)
        task_ids = info.task_ids if info.task_ids is not None else list_task_ids(client, info.project, info.unlabeled_only)
    except PrelabelError as exc:
        runs.fail(run_id, str(exc))
        if client is not None and recipe.notify:
            RunNotice.for_project(client, info.project, registry, recipe.version).show(
                failed_notice(str(exc)), final=True, keep=True)
        raise
    chunks = [task_ids[i:i + info.chunk_size] for i in range(0, len(task_ids), info.chunk_size)]
    runs.plan(run_id, chunks)
    if recipe.notify:
        RunNotice.for_project(client, info.project, registry, recipe.version).show(
            progress_notice(0, len(task_ids), recipe.version), final=True)
    queue = Queue(PRELABEL_QUEUE, connection=conn)
    for i in range(len(chunks)):
        queue.enqueue(WORK_JOB, run_id, spec=recipe.to_dict(), job_id=work_job_id(run_id, i),
                      job_timeout=recipe.job_timeout, retry=_retry(),
                      meta={"kind": "prelabel", "run": run_id, "project": info.project, "stage": "queued",
                            "spec": recipe.summary()},
                      description=f"pre-label project {info.project}: work ({len(chunks)} chunks)")
    log.info("pre-label run %s: project %s, %d tasks in %d chunks (%s)", run_id, info.project, len(task_ids),
             len(chunks), recipe.summary())
    return {"run": run_id, "project": info.project, "tasks": len(task_ids), "chunks": len(chunks)}


def _tell(notice: RunNotice, runs: PrelabelRuns, run_id: str, version: str | None, final: bool = False) -> None:
    """The run's progress, or its end, in the title."""
    summary = runs.summary(run_id)
    if summary["state"] == "done":
        _follow(notice, version)
        notice.show(done_notice(summary["done"] - summary["failed"], version, summary["failed"]), final=True,
                    keep=True)
    elif summary["state"] == "failed":
        notice.show(failed_notice(summary["error"] or "see `clipseg prelabel --status`"), final=True, keep=True)
    else:
        notice.show(progress_notice(summary["done"], summary["tasks"], version, summary["failed"]), final=final)


def _follow(notice: RunNotice, version: str | None) -> None:
    """Label Studio's current model := the version the run wrote (its predictions now exist, so it is accepted)."""
    from backend.studio.api import api_error_text
    from backend.studio.model_version import set_model_version

    if not version:
        return
    try:
        set_model_version(notice.client, notice.project, version)
    except Exception as exc:  # noqa: BLE001 - the run is done either way
        log.warning("project %s: cannot set Label Studio's model_version to %s: %s", notice.project, version,
                    api_error_text(exc))


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


def work_job(run_id: str, namespace: str | None = None, spec: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """RQ job: claim chunks of the run until none is left (waiting for others' leases to finish or run out).
    `namespace`: only in jobs of the previous release (this one's specs carry it)."""
    from backend.labelstudio.config import parse_label_config

    namespace = _namespace_of(spec, namespace)
    job, conn, context, runs, info = _job_start(run_id, namespace)
    if info is None or info.state in ("done", "failed"):
        return {"run": run_id, "chunks": [], "note": "run already settled"}
    recipe = _spec_of(info, spec, context, namespace)
    client, label_config = connect(context.settings, info.project)
    segmenter = context.segmenter(conn, recipe)
    config = parse_label_config(label_config, polygon=recipe.polygon)
    service = context.service(conn, namespace)
    exemplars = [ExemplarStore(conn, namespace).get(info.project, name) for name in recipe.exemplar_names]
    if not exemplars:  # the project's label prototypes, as its /predict applies them (same records, same version)
        from backend.serving.prototypes import ProjectPrototypes

        segmenter = ProjectPrototypes(conn, service.visual_prompts.exemplar, namespace=namespace).apply(info.project, segmenter)
    # Versions this backend made or started from (a record's parent is the version it replaced, e.g. the base model):
    # only their predictions are ever replaced; predictions imported from elsewhere stay.
    registry = VersionRegistry(conn, namespace)
    ours = registry.known_versions()
    notice = (RunNotice.for_project(client, info.project, registry, recipe.version, segmenter.version)
              if recipe.notify else None)
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
            base = {"worker": job.worker_name, "attempts": attempts, "version": segmenter.version}

            def progress(r: ChunkResult, index=index, base=base) -> None:
                runs.set_progress(run_id, index, {**base, **r.as_dict()})
                job.meta.update({"stage": "predicting", "chunk": index, "chunks": info.chunks, "done": r.done,
                                 "total": r.total, "progress": r.done / max(1, r.total)})
                job.save_meta()
                if notice is not None and notice.due():
                    _tell(notice, runs, run_id, segmenter.version)

            progress(ChunkResult(total=len(runs.chunk_tasks(run_id, index))))
            with _Lease(runs, run_id, index, token) as lease:
                predictor = ChunkPredictor(client, info.project, config, recipe.prompt_settings, segmenter, service,
                                           our_versions=ours, unlabeled_only=info.unlabeled_only,
                                           replace_older=recipe.replace_older and not exemplars,
                                           batch=batch, still_mine=lambda lease=lease: lease.mine,
                                           on_progress=progress, exemplars=exemplars)
                try:
                    result = predictor.run(runs.chunk_tasks(run_id, index))
                except JobAbandoned:  # the worker shuts down: this job is requeued, the chunk is free at once
                    predictor.close()
                    runs.release(run_id, index, token)
                    raise
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
        context.recorder(conn, namespace).flush()  # a forked job process ends with the job: write the review records first
        job.meta.update({"stage": "done"})
        job.save_meta()
    summary = runs.summary(run_id)
    if notice is not None:
        _tell(notice, runs, run_id, segmenter.version, final=True)
    return {"run": run_id, "chunks": worked, "failed_tasks": [f for w in worked for f in w["failed_tasks"]],
            "run_state": summary["state"]}
