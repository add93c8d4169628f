"""Fine-tune triggers with a real Redis and real `rq worker` processes: at most one job per project."""
from __future__ import annotations

import multiprocessing
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import redis
from rq import Queue, Retry
from rq.job import Job, JobStatus
from rq.registry import FailedJobRegistry, FinishedJobRegistry

from finetune.corrections import CorrectionStore, Region
from finetune.triggers import active_job_id, lock_key, maybe_enqueue_finetune, periodic_check
from tests.fixtures.webhooks import scene

ROOT = Path(__file__).resolve().parents[1]
JOB = "tests.fixtures.jobs.finetune_project"
ENV = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}


def worker_cmd(url: str, *extra: str) -> list[str]:
    return [sys.executable, "-m", "rq.cli", "worker", "--url", url, "--logging_level", "WARNING", *extra, "clipseg"]


def run_burst_worker(url: str) -> subprocess.CompletedProcess:
    proc = subprocess.run(worker_cmd(url, "--burst"), env=ENV, cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc


def add_corrections(store: CorrectionStore, n: int, project: int = 1, start: int = 0) -> None:
    image, mask = scene(seed=project)
    for i in range(start, start + n):
        store.put_annotation(project, i, project * 1000 + i, [Region("cat", mask, "cat")], image, updated=1.0)


def jobs_in_queue(conn) -> list[Job]:
    return Queue("clipseg", connection=conn).get_jobs()


def kill_worker_mid_job(redis_url: str, job: Job) -> None:
    """Start `clipseg worker` (both queues), wait until it runs `job`, then SIGKILL it and its work horse: no
    clean-up at all, the job stays STARTED in RQ."""
    worker = subprocess.Popen([sys.executable, "-m", "backend.cli", "worker"], env={**ENV, "REDIS_URL": redis_url},
                              cwd=ROOT, start_new_session=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.time() + 60
        while job.get_status(refresh=True) != JobStatus.STARTED:
            assert time.time() < deadline, "worker did not start the job"
            time.sleep(0.1)
    finally:
        os.killpg(worker.pid, signal.SIGKILL)
        worker.wait()
    assert job.get_status(refresh=True) == JobStatus.STARTED


def test_nth_correction_enqueues_exactly_one_job(redis_conn, redis_url):
    store = CorrectionStore(redis_conn)
    results = []
    for i in range(25):
        add_corrections(store, 1, start=i)
        results.append(maybe_enqueue_finetune(redis_conn, 1, "correction", every_n=20, job_func=JOB))
    assert [r.enqueued for r in results] == [False] * 19 + [True] + [False] * 5
    assert {r.detail for r in results[:19]} == {"below_threshold"} and {r.detail for r in results[20:]} == {"active"}
    [job] = jobs_in_queue(redis_conn)
    assert job.id == results[19].job_id and job.args == ("1",) and job.func_name == JOB
    assert job.timeout == 3600 and job.retries_left == 2 and job.retry_intervals == [10, 60]
    assert job.failure_ttl == 30 * 24 * 3600 and job.meta["stage"] == "queued" and job.meta["new_corrections"] == 20

    run_burst_worker(redis_url)
    job = Job.fetch(job.id, connection=redis_conn)
    assert job.get_status() == JobStatus.FINISHED and job.return_value()["samples"] == 25
    assert job.meta["progress"] == 1.0 and job.meta["stage"] == "done"
    assert redis_conn.get(lock_key(1)) is None  # released by the success callback
    assert store.new_since_last_finetune(1) == 0
    add_corrections(store, 19, start=100)
    assert not maybe_enqueue_finetune(redis_conn, 1, "correction", every_n=20, job_func=JOB).enqueued
    add_corrections(store, 1, start=200)
    assert maybe_enqueue_finetune(redis_conn, 1, "correction", every_n=20, job_func=JOB).enqueued


def test_concurrent_threads_enqueue_one(redis_conn, redis_url):
    add_corrections(CorrectionStore(redis_conn), 3)
    barrier = threading.Barrier(16)
    results = []

    def trigger():
        conn = redis.Redis.from_url(redis_url)
        barrier.wait()
        results.append(maybe_enqueue_finetune(conn, 1, "manual", job_func=JOB))

    threads = [threading.Thread(target=trigger) for _ in range(16)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sum(r.enqueued for r in results) == 1
    assert len({r.job_id for r in results}) == 1
    assert len(jobs_in_queue(redis_conn)) == 1


def _trigger_in_process(url: str, barrier, out) -> None:
    conn = redis.Redis.from_url(url)
    barrier.wait()
    for reason in ("manual", "start_training", "periodic"):
        r = maybe_enqueue_finetune(conn, 7, reason, job_func=JOB)
        out.put((r.enqueued, r.job_id))


def test_concurrent_processes_enqueue_one(redis_conn, redis_url):
    add_corrections(CorrectionStore(redis_conn), 2, project=7)
    ctx = multiprocessing.get_context("spawn")
    barrier, out = ctx.Barrier(8), ctx.Queue()
    procs = [ctx.Process(target=_trigger_in_process, args=(redis_url, barrier, out)) for _ in range(8)]
    for p in procs:
        p.start()
    results = [out.get(timeout=60) for _ in range(24)]
    for p in procs:
        p.join(30)
        assert p.exitcode == 0
    assert sum(enqueued for enqueued, _ in results) == 1
    assert len({job_id for _, job_id in results}) == 1
    assert len(jobs_in_queue(redis_conn)) == 1


def test_start_training_and_manual(redis_conn):
    store = CorrectionStore(redis_conn)
    assert maybe_enqueue_finetune(redis_conn, 1, "start_training", job_func=JOB).detail == "no_corrections"
    assert maybe_enqueue_finetune(redis_conn, 1, "periodic", job_func=JOB).detail == "no_new"
    add_corrections(store, 1)
    assert maybe_enqueue_finetune(redis_conn, 1, "start_training", job_func=JOB).enqueued
    assert maybe_enqueue_finetune(redis_conn, 2, "manual", job_func=JOB).enqueued  # --now: no corrections needed
    assert maybe_enqueue_finetune(redis_conn, 2, "manual", job_func=JOB).detail == "active"
    with pytest.raises(ValueError):
        maybe_enqueue_finetune(redis_conn, 1, "because")


def test_failed_job_stays_visible_and_releases_the_lock(redis_conn, redis_url):
    add_corrections(CorrectionStore(redis_conn), 1)
    r = maybe_enqueue_finetune(redis_conn, 1, "manual", job_func="tests.fixtures.jobs.failing_finetune",
                               retry_intervals=(0,))
    # retries: the lock holds through the first failures (no second job while RQ retries)
    assert maybe_enqueue_finetune(redis_conn, 1, "manual", job_func=JOB).detail == "active"
    run_burst_worker(redis_url)
    job = Job.fetch(r.job_id, connection=redis_conn)
    assert job.get_status() == JobStatus.FAILED and job.retries_left == 0
    assert r.job_id in FailedJobRegistry("clipseg", connection=redis_conn).get_job_ids()
    assert "failed on purpose" in job.latest_result().exc_string
    assert redis_conn.get(lock_key(1)) is None
    again = maybe_enqueue_finetune(redis_conn, 1, "manual", job_func=JOB)
    assert again.enqueued and again.job_id != r.job_id


def test_stale_lock_is_taken_over(redis_conn):
    add_corrections(CorrectionStore(redis_conn), 1)
    redis_conn.set(lock_key(1), "finetune-1-gone")  # job expired or deleted
    r = maybe_enqueue_finetune(redis_conn, 1, "manual", job_func=JOB)
    assert r.enqueued and redis_conn.get(lock_key(1)).decode() == r.job_id
    Job.fetch(r.job_id, connection=redis_conn).cancel()
    assert active_job_id(redis_conn, 1) is None
    assert maybe_enqueue_finetune(redis_conn, 1, "manual", job_func=JOB).enqueued


@pytest.mark.slow
@pytest.mark.parametrize("retries", [0, 2])
def test_killed_worker_releases_the_project_in_seconds(redis_conn, redis_url, retries):
    """A worker SIGKILLed mid-job (no clean-up at all): its heartbeat names a dead PID on this host, so the next
    trigger finds the job abandoned at once; RQ fails it (the lock is released) or schedules its retry."""
    add_corrections(CorrectionStore(redis_conn), 1)
    r = maybe_enqueue_finetune(redis_conn, 1, "manual", job_func="tests.fixtures.jobs.sleeping_finetune",
                               retry_max=retries, retry_intervals=[1], job_kwargs={"seconds": 60})
    job = Job.fetch(r.job_id, connection=redis_conn)
    kill_worker_mid_job(redis_url, job)
    killed = time.monotonic()
    again = maybe_enqueue_finetune(redis_conn, 1, "manual", job_func=JOB)
    assert time.monotonic() - killed < 5
    if retries:  # RQ schedules a retry of the abandoned job: it is still the project's one job
        assert again.detail == "active" and again.job_id == r.job_id
        assert job.get_status(refresh=True) == JobStatus.SCHEDULED
    else:
        assert again.enqueued and again.job_id != r.job_id
        assert job.get_status(refresh=True) == JobStatus.FAILED


@pytest.mark.slow
def test_next_worker_recovers_a_killed_workers_prelabel_job(redis_conn, redis_url):
    """The heartbeat's sweep covers every queue a worker serves: a pre-label job whose worker was SIGKILLed is
    scheduled for its retry by the next worker's first sweep, not left STARTED until RQ's hour-long timeout."""
    from finetune.triggers import PRELABEL_QUEUE, WorkerHeartbeat

    job = Queue(PRELABEL_QUEUE, connection=redis_conn).enqueue(
        "tests.fixtures.jobs.sleeping_finetune", "1", seconds=60, retry=Retry(max=1, interval=[30]))
    kill_worker_mid_job(redis_url, job)
    beat = WorkerHeartbeat(redis_conn, "w-next").start()
    try:
        job.refresh()
        assert job.get_status(refresh=False) == JobStatus.SCHEDULED and job.retries_left == 0
    finally:
        beat.stop()


def test_heartbeat_expiry_marks_a_silent_worker_gone(redis_conn):
    """A worker on another machine cannot be checked by PID: it is gone once its heartbeat key expires."""
    from finetune.triggers import WorkerHeartbeat, worker_gone

    beat = WorkerHeartbeat(redis_conn, "w-remote", ttl=1).start()
    beat._stop.set()  # the thread stops beating, as if the machine had died
    redis_conn.set("clipseg:worker:alive:w-remote", "other-host:1", ex=1)
    assert not worker_gone(redis_conn, "w-remote")
    time.sleep(1.2)
    assert worker_gone(redis_conn, "w-remote")
    assert not worker_gone(redis_conn, "plain-rq-worker")  # no heartbeats ever: RQ's own expiry applies


def test_periodic_check_enqueues_per_project_with_new_corrections(redis_conn, redis_url):
    store = CorrectionStore(redis_conn)
    add_corrections(store, 2, project=1)
    add_corrections(store, 1, project=2)
    store.mark_trained(2)
    results = periodic_check(redis_conn, job_func=JOB)
    assert {(r["project"], r["enqueued"], r["detail"]) for r in results} == {("1", True, "enqueued"),
                                                                            ("2", False, "no_new")}
    assert periodic_check(redis_conn, job_func=JOB)[0]["detail"] == "active"
    run_burst_worker(redis_url)
    assert store.new_since_last_finetune(1) == 0


@pytest.mark.slow
def test_cron_scheduler_runs_the_periodic_check(redis_conn, redis_url):
    """rq's CronScheduler (own process) enqueues periodic_check; a worker runs it, which enqueues the fine-tune."""
    store = CorrectionStore(redis_conn)
    add_corrections(store, 3, project=5)
    code = (
        "import redis, logging; from finetune.triggers import schedule_periodic_check; "
        f"schedule_periodic_check(redis.Redis.from_url({redis_url!r}), 60, job_func={JOB!r}).start()"
    )
    cron = subprocess.Popen([sys.executable, "-c", code], env=ENV, cwd=ROOT, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.time() + 30
        while not jobs_in_queue(redis_conn):
            assert time.time() < deadline and cron.poll() is None, cron.stderr.read() if cron.poll() is not None else ""
            time.sleep(0.1)
    finally:
        cron.send_signal(signal.SIGTERM)
        cron.wait(10)
    checks = [j for j in jobs_in_queue(redis_conn) if j.func_name == "finetune.triggers.periodic_check"]
    # the interval: a check not started within one expires; its finished record stays two intervals (120 s here: a
    # burst worker on a loaded machine took ~60 s to return, past the 20 s that an interval of 10 s gave)
    assert checks and checks[0].ttl == 60
    run_burst_worker(redis_url)
    finished = FinishedJobRegistry("clipseg", connection=redis_conn).get_job_ids()
    funcs = sorted(Job.fetch(j, connection=redis_conn).func_name for j in finished)
    assert JOB in funcs and "finetune.triggers.periodic_check" in funcs
    assert store.new_since_last_finetune(5) == 0 and redis_conn.get(lock_key(5)) is None
