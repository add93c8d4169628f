"""Queue-facing commands: `clipseg worker | scheduler | finetune | jobs | versions | rollback | status`.

All of them need REDIS_URL (`clipseg serve` without it runs an embedded Redis and its own worker and scheduler).
"""
from __future__ import annotations

import argparse
import json
import os
import socket
import sys
import time
from datetime import datetime

from clipseg_model.errors import ClipsegError


def _redis(settings):
    if not settings.redis_url:
        raise ClipsegError("REDIS_URL is not set: point it at the Redis that `clipseg serve` uses "
                           "(e.g. unix:///path/to/data/redis/redis.sock?db=0 for the embedded one)")
    import redis

    conn = redis.Redis.from_url(settings.redis_url, socket_connect_timeout=3)
    try:
        conn.ping()
    except redis.ConnectionError as exc:
        raise ClipsegError(f"cannot reach Redis at {settings.redis_url}: {exc}") from exc
    return conn


def _when(ts: float | None) -> str:
    return datetime.fromtimestamp(ts).strftime("%Y-%m-%d %H:%M:%S") if ts else "-"


# ---- worker ------------------------------------------------------------------------------------------------
def configure_worker(parser: argparse.ArgumentParser, settings) -> None:
    parser.add_argument("--burst", action="store_true", help="exit when the queue is empty")
    parser.add_argument("--worker-class", choices=["simple", "spawn"], default="simple",
                        help="simple: jobs run in this process (never forks after CUDA is initialised); "
                             "spawn: a fresh process per job")
    parser.add_argument("--name", default=None)
    parser.add_argument("--queues", default=None,
                        help="comma-separated queues in priority order (default: fine-tunes, then pre-label chunks)")


def run_worker(args: argparse.Namespace, settings) -> int:
    from finetune.triggers import WORKER_QUEUES, WorkerHeartbeat
    from finetune.worker import SimpleWorker, SpawnWorker, WorkerContext

    conn = _redis(settings)
    # What a job does comes with the job (its spec, its namespace); where it writes and which device trains is this
    # worker's, also in a spawned work horse (WorkerContext.hand_down).
    WorkerContext.install(settings.data_dir, settings.device)
    cls = SimpleWorker if args.worker_class == "simple" else SpawnWorker
    name = args.name or f"clipseg-{socket.gethostname()}-{os.getpid()}"
    queues = [q.strip() for q in args.queues.split(",") if q.strip()] if args.queues else list(WORKER_QUEUES)
    worker = cls(queues, connection=conn, name=name)
    # Heartbeats let others find this worker's job abandoned in seconds if it dies; its first sweep recovers the
    # jobs of workers that died before it started (a restart).
    heartbeat = WorkerHeartbeat(redis_conn_for_thread(settings), name, queue_names=queues).start()
    try:
        # with_scheduler: RQ's scheduler moves delayed retries (Retry intervals) back onto the queue.
        worker.work(burst=args.burst, with_scheduler=True, logging_level=settings.log_level)
    finally:
        heartbeat.stop()
    return 0


def redis_conn_for_thread(settings):
    """A connection of its own for a background thread, with timeouts so a hung Redis cannot stall it."""
    import redis

    return redis.Redis.from_url(settings.redis_url, socket_connect_timeout=3, socket_timeout=5)


# ---- scheduler -----------------------------------------------------------------------------------------------
def configure_scheduler(parser: argparse.ArgumentParser, settings) -> None:
    parser.add_argument("--interval", type=int, default=settings.finetune_interval,
                        help=f"seconds between checks for new corrections (default FINETUNE_INTERVAL={settings.finetune_interval})")


def run_scheduler(args: argparse.Namespace, settings) -> int:
    from finetune.triggers import schedule_periodic_check

    scheduler = schedule_periodic_check(_redis(settings), args.interval, job_timeout=settings.job_timeout,
                                        namespace=settings.namespace, spec=settings.finetune_spec().to_dict())
    print(f"scheduler: checking for new corrections every {args.interval} s", file=sys.stderr)
    scheduler.start()
    return 0


# ---- finetune ------------------------------------------------------------------------------------------------
def configure_finetune(parser: argparse.ArgumentParser, settings) -> None:
    parser.add_argument("--project", required=True, help="Label Studio project id")
    parser.add_argument("--now", action="store_true", help="queue it even below the FINETUNE_EVERY threshold")
    parser.add_argument("--inline", action="store_true", help="run the job in this process instead of a worker")
    parser.add_argument("--wait", action="store_true", help="wait for the queued job and print its result")


def run_finetune(args: argparse.Namespace, settings) -> int:
    conn = _redis(settings)
    spec = settings.finetune_spec(args.project)
    if args.inline:
        from finetune.jobs import finetune_project
        from finetune.worker import WorkerContext

        WorkerContext.install(settings.data_dir, settings.device)
        print(json.dumps(finetune_project(args.project, spec, redis_url=settings.redis_url), indent=2, default=str))
        return 0
    from finetune.triggers import maybe_enqueue_finetune

    result = maybe_enqueue_finetune(conn, args.project, "manual" if args.now else "correction",
                                    every_n=settings.finetune_every, job_timeout=settings.job_timeout,
                                    namespace=settings.namespace, spec=spec.to_dict())
    if not result.enqueued:
        print(f"not queued: {result.detail} (job {result.job_id or '-'}, {result.new_corrections} new corrections)")
        return 0 if result.detail == "active" else 1
    print(f"queued {result.job_id} for project {args.project}")
    if args.wait:
        from rq.job import Job

        job = Job.fetch(result.job_id, connection=conn)
        while job.get_status(refresh=True) not in ("finished", "failed", "stopped", "canceled"):
            meta = job.get_meta(refresh=True)
            print(f"  {meta.get('stage')}: {meta.get('progress', 0):.0%} {meta.get('message', '')}", file=sys.stderr)
            time.sleep(2)
        print(json.dumps({"status": str(job.get_status()), "result": job.return_value()}, indent=2, default=str))
    return 0


# ---- jobs -----------------------------------------------------------------------------------------------------
def configure_jobs(parser: argparse.ArgumentParser, settings) -> None:
    parser.add_argument("--json", action="store_true")


def job_rows(conn) -> list[dict]:
    """Every fine-tune job RQ still knows: queued, scheduled, running, finished and failed, with progress."""
    from rq import Queue
    from rq.job import Job

    from finetune.triggers import WORKER_QUEUES, failure_line

    ids: list[tuple[str, str]] = []
    for queue in (Queue(queue_name, connection=conn) for queue_name in WORKER_QUEUES):
        ids += [(i, "queued") for i in queue.get_job_ids()]
        for name, registry in (("scheduled", queue.scheduled_job_registry), ("running", queue.started_job_registry),
                               ("finished", queue.finished_job_registry), ("failed", queue.failed_job_registry)):
            ids += [(i, name) for i in registry.get_job_ids()]
    rows = []
    for job_id, where in ids:
        try:
            job = Job.fetch(job_id, connection=conn)
        except Exception:  # noqa: BLE001 - expired between listing and fetching
            continue
        meta = job.meta or {}
        failure = failure_line(job) if where == "failed" else ""
        kind = "periodic-check" if job.func_name == "finetune.triggers.periodic_check" else "finetune"
        result = job.return_value() if where == "finished" else None
        rows.append({"id": job_id, "kind": kind, "state": where, "project": meta.get("project"), "stage": meta.get("stage"),
                     "progress": meta.get("progress"), "step": meta.get("step"), "total_steps": meta.get("total_steps"),
                     "loss": meta.get("loss"), "message": meta.get("message"), "enqueued": job.enqueued_at,
                     "error": failure, "description": job.description, "spec": meta.get("spec"),
                     "result": result if kind == "periodic-check" else None,
                     # pre-label work jobs (backend.prelabel): the chunk they work on and how far it is
                     "run": meta.get("run"), "chunk": meta.get("chunk"), "chunks": meta.get("chunks"),
                     "done": meta.get("done"), "total": meta.get("total")})
    return rows


def run_jobs(args: argparse.Namespace, settings) -> int:
    rows = job_rows(_redis(settings))
    if args.json:
        print(json.dumps(rows, indent=2, default=str))
        return 0
    if not rows:
        print("no jobs")
    for r in rows:
        if r["kind"] == "periodic-check":  # the scheduler's look for new corrections, not a fine-tune
            queued = [x["project"] for x in (r["result"] or []) if x.get("enqueued")]
            outcome = (f"queued fine-tunes for projects {', '.join(queued)}" if queued else
                       "nothing new" if r["result"] is not None else "")
            print(f"{r['id']:<34} {r['state']:<9} periodic check for new corrections {outcome} {r['error']}".rstrip())
            continue
        progress = f"{r['progress']:.0%}" if isinstance(r["progress"], (int, float)) else "-"
        if r["run"]:
            chunk = f"chunk {r['chunk']}/{r['chunks']} {r['done']}/{r['total']} tasks" if r["chunk"] is not None else ""
            print(f"{r['id']:<34} {r['state']:<9} project {r['project']!s:<5} pre-label {r['stage'] or '-':<10} "
                  f"{progress:>5} {chunk} {r['error']}".rstrip())
            continue
        print(f"{r['id']:<34} {r['state']:<9} project {r['project']!s:<5} {r['stage'] or '-':<10} {progress:>5} "
              f"step {r['step'] or 0}/{r['total_steps'] or '-'} {r['message'] or ''} {r['error']}".rstrip())
        if r["spec"]:
            from finetune.spec import FinetuneSpec

            print(f"{'':<34} spec: {FinetuneSpec.from_dict(r['spec']).summary()}")
    return 0


# ---- versions / rollback -------------------------------------------------------------------------------------
def configure_versions(parser: argparse.ArgumentParser, settings) -> None:
    parser.add_argument("--project", default=None, help="only this project's lineage (its versions and the base)")
    parser.add_argument("--set-default", metavar="VERSION", default=None,
                        help="serve VERSION to every project that has no version of its own")
    parser.add_argument("--json", action="store_true")


def _active_of(default, pointers, project: str | None) -> str | None:
    pointer = pointers.get(project, default) if project is not None else default
    return pointer[0] if pointer else None


def run_versions(args: argparse.Namespace, settings) -> int:
    from dataclasses import asdict

    from finetune.corrections import CorrectionStore
    from finetune.versions import UnknownVersionError, VersionRegistry

    conn = _redis(settings)
    registry = VersionRegistry(conn, settings.namespace)
    if args.set_default:
        try:
            rec = registry.set_default(args.set_default)
        except UnknownVersionError as exc:
            raise ClipsegError(str(exc.args[0])) from exc
        print(f"version {rec.version} is now served to projects without a version of their own")
        return 0
    project = None if args.project is None else str(args.project)
    default, pointers = registry.pointers()
    store = CorrectionStore(conn, settings.namespace)
    records = registry.list(project)
    review: dict[str, dict] = {}
    for p in ([project] if project is not None else store.projects()):
        review.update(store.review_stats(p))
    projects = [project] if project is not None else registry.projects()
    base = "base model " + settings.model
    if args.json:
        print(json.dumps({"active": _active_of(default, pointers, project), "default": default[0] if default else None,
                          "projects": {p: _active_of(default, pointers, p) for p in projects},
                          "versions": [{**asdict(r), "review": review.get(r.version)} for r in records]}, indent=2))
        return 0
    print(f"default: {default[0] if default else base} (projects without a version of their own)")
    for p in projects:
        own = "" if p in pointers else " (the default)"
        print(f"project {p}: active {_active_of(default, pointers, p) or base}{own}")
    actives = {v for v, _ in pointers.values()} | ({default[0]} if default else set())
    nan = float("nan")
    for r in records:
        m = r.metrics
        mark = "*" if r.version in actives else " "
        line = (f"{mark} {r.version:<28} {'project ' + r.project if r.project else 'base':<11} {r.status:<9} "
                f"{_when(r.created)} parent {r.parent or '-':<24} "
                f"corrections mIoU {m.get('corrections_miou', nan):.3f} (parent {m.get('parent_corrections_miou', nan):.3f}) "
                f"base mIoU {m.get('base_miou', nan):.3f} (parent {m.get('parent_base_miou', nan):.3f}) "
                f"samples {r.samples.get('corrections', 0)}+{r.samples.get('replay', 0)}")
        if m.get("replay_source"):
            line += f" replay {m['replay_source']}"
        if m.get("threshold") is not None:
            line += f" threshold {m['threshold']:.2f}"
        ev = m.get("evidence")
        if ev:
            line += f" evidence n={ev['n']} diff {ev['difference']:+.3f} bound {ev['bound']:+.3f}"
        kept = m.get("forgetting")
        if kept and kept.get("n"):
            line += (f" forgetting ({kept['scale']}) n={kept['n']} drop {kept['drop']:+.3f} bound {kept['bound']:+.3f}"
                     f" budget {kept['budget']:g}")
        rv = review.get(r.version)
        if rv:
            line += f" review IoU {rv['mean_iou']:.3f} (n={int(rv['n'])})"
        if r.broken:
            line += f" BROKEN: {r.broken}"
        print(f"{line} {r.reason}".rstrip())
    return 0


def configure_rollback(parser: argparse.ArgumentParser, settings) -> None:
    parser.add_argument("--project", default=None,
                        help="the project to roll back (default: the project VERSION was trained on)")
    parser.add_argument("version", help="a version from `clipseg versions --project P`")


def run_rollback(args: argparse.Namespace, settings) -> int:
    from finetune.versions import UnknownVersionError, VersionRegistry, WrongProjectError

    registry = VersionRegistry(_redis(settings), settings.namespace)
    try:
        rec = registry.rollback(args.version, project=args.project)
    except UnknownVersionError as exc:
        raise ClipsegError(str(exc.args[0])) from exc
    except WrongProjectError as exc:
        raise ClipsegError(str(exc)) from exc
    project = args.project if args.project is not None else rec.project
    whom = f"project {project}" if project is not None else "projects without a version of their own"
    print(f"version {rec.version} is active again for {whom} ({rec.path}); servers reload it between requests")
    return 0


# ---- status ------------------------------------------------------------------------------------------------
def configure_status(parser: argparse.ArgumentParser, settings) -> None:
    parser.add_argument("--json", action="store_true")


def run_status(args: argparse.Namespace, settings, extra: dict[str, dict] | None = None,
               extra_lines: list[str] = ()) -> int:
    """Print the status; `extra` sections (e.g. the webhook spool, which backend/ owns) are added to the JSON and
    `extra_lines` to the text."""
    from rq import Queue, Worker

    from finetune.corrections import CorrectionStore
    from finetune.triggers import QUEUE_NAME
    from finetune.versions import VersionRegistry

    conn = _redis(settings)
    queue = Queue(QUEUE_NAME, connection=conn)
    workers = Worker.all(connection=conn)
    store = CorrectionStore(conn, settings.namespace)
    registry = VersionRegistry(conn, settings.namespace)
    default, pointers = registry.pointers()
    projects = sorted(set(store.projects()) | set(registry.projects()), key=lambda p: (len(p), p))
    from clipseg_model.checkpoint import base_version_name

    from finetune.prototypes import PrototypeStore

    base = base_version_name(settings.model)
    prototypes = PrototypeStore(conn, settings.namespace)
    status = {
        "redis": {"url": settings.redis_url, "namespace": settings.namespace, "version": conn.info("server").get("redis_version"),
                  "used_memory": conn.info("memory").get("used_memory_human")},
        "queue": {"queued": len(queue), "running": queue.started_job_registry.count,
                  "failed": queue.failed_job_registry.count, "scheduled": queue.scheduled_job_registry.count},
        "workers": [{"name": w.name, "state": str(w.get_state()), "job": w.get_current_job_id()} for w in workers],
        "projects": {p: {"corrections": store.count(p), "new": store.new_since_last_finetune(p),
                         "active_version": _active_of(default, pointers, p) or base, "own_version": p in pointers,
                         "prototypes": {label: {"examples": r.examples, "weight": r.weight}
                                        for label, r in sorted(prototypes.all(p).items())}}
                     for p in projects},
        "active_version": default[0] if default else base,
        "versions": len(registry.list()),
        **(extra or {}),
    }
    if args.json:
        print(json.dumps(status, indent=2, default=str))
        return 0
    r = status["redis"]
    print(f"redis     {r['url']} namespace {r['namespace']} (v{r['version']}, {r['used_memory']})")
    q = status["queue"]
    print(f"queue     {q['queued']} queued, {q['running']} running, {q['scheduled']} scheduled, {q['failed']} failed")
    print(f"workers   {len(workers)}: " + (", ".join(f"{w['name']} ({w['state']})" for w in status["workers"]) or "none"))
    for p, c in status["projects"].items():
        print(f"project   {p}: model {c['active_version']}{'' if c['own_version'] else ' (the default)'}, "
              f"{c['corrections']} corrections, {c['new']} new since the last fine-tune"
              + "".join(f"; prototype {label!r} weight {r['weight']:g} ({r['examples']} examples)"
                        for label, r in c["prototypes"].items()))
    print(f"model     {status['active_version']} for projects without their own ({status['versions']} versions recorded)")
    for line in extra_lines:
        print(line)
    return 0


# ---- data ----------------------------------------------------------------------------------------------------
def configure_data(parser: argparse.ArgumentParser, settings) -> None:
    sub = parser.add_subparsers(dest="action", required=True)
    fetch = sub.add_parser("fetch-replay", help="store a RefCOCO replay subset (images embedded) under DATA_DIR/replay, once")
    fetch.add_argument("--source", default="lmms-lab/RefCOCO",
                       help="hub id, or a local folder in the lmms-lab/RefCOCO parquet layout (default lmms-lab/RefCOCO)")
    fetch.add_argument("--split", default="val", help="split to draw from (default val)")
    fetch.add_argument("--rows", type=int, default=500, help="rows to keep (each with its image and phrases)")
    fetch.add_argument("--seed", type=int, default=0)


def run_data(args: argparse.Namespace, settings) -> int:
    from finetune.replay import choose_source, fetch_replay

    target = fetch_replay(args.source, settings.data_dir, args.split, args.rows, args.seed,
                          cache_dir=str(settings.data_dir / "replay" / "hf-cache"))
    print(f"replay subset stored in {target}; fine-tunes now replay: "
          f"{choose_source(settings.finetune_spec(), settings.data_dir).describe()}")
    return 0
