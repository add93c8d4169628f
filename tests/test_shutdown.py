"""Stopping `clipseg serve` (issue 26): within 10 s of SIGTERM or Ctrl-C, with a fine-tune in progress abandoned
cleanly (back at the front of its queue, its project's lock and retries kept) and run by the next worker."""
from __future__ import annotations

import base64
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest
import requests
from rq import Queue
from rq.job import Job, JobStatus

from finetune.triggers import QUEUE_NAME, lock_key, maybe_enqueue_finetune
from tests.e2e.ls_harness import free_port, wait_for_http
from tests.fixtures.webhooks import annotation_event, brush_region, scene

ROOT = Path(__file__).resolve().parents[1]
STOP_WITHIN_S = 10.0


def _env(**extra: str) -> dict[str, str]:
    return {**os.environ, "PYTHONPATH": str(ROOT), "HF_HUB_OFFLINE": "1", **extra}


def _gone(procs: list[psutil.Process]) -> bool:
    for p in procs:
        try:
            if p.is_running() and p.status() != psutil.STATUS_ZOMBIE:
                return False
        except psutil.NoSuchProcess:
            pass
    return True


@pytest.mark.slow
def test_sigterm_stops_serve_within_10_s_and_the_running_fine_tune_is_run_again(
        redis_url, redis_conn, tiny_model_factory, tmp_path):
    tag = "shutdown"
    trigger = maybe_enqueue_finetune(redis_conn, 7, "manual", job_func="tests.fixtures.jobs.slow_first_run",
                                     job_kwargs={"tag": tag, "seconds": 120})
    assert trigger.enqueued
    env = _env(REDIS_URL=redis_url, MODEL=str(tiny_model_factory("tiny-clipseg")), DATA_DIR=str(tmp_path / "data"))
    port, log = free_port(), tmp_path / "serve.log"
    proc = subprocess.Popen([sys.executable, "-m", "backend.cli", "serve", "--port", str(port), "--worker"],
                            env=env, cwd=ROOT, stdout=log.open("ab"), stderr=subprocess.STDOUT, start_new_session=True)
    try:
        wait_for_http(f"http://127.0.0.1:{port}/health", timeout=60, proc=proc, log_path=log)
        deadline = time.monotonic() + 60
        while not (requests.get(f"http://127.0.0.1:{port}/health", timeout=5).json()["ready"]
                   and redis_conn.get(f"runs:{tag}") == b"1"):  # the model is served and the fine-tune runs
            assert time.monotonic() < deadline, log.read_text()[-3000:]
            time.sleep(0.2)
        tree = [psutil.Process(proc.pid), *psutil.Process(proc.pid).children(recursive=True)]
        assert len(tree) >= 3, [p.cmdline()[:4] for p in tree]  # serve, its gunicorn worker, the RQ worker
        assert Job.fetch(trigger.job_id, connection=redis_conn).get_status() == JobStatus.STARTED

        started = time.monotonic()
        os.kill(proc.pid, signal.SIGTERM)
        while not _gone(tree) and time.monotonic() - started < STOP_WITHIN_S + 5:
            time.sleep(0.05)
        took = time.monotonic() - started
        left = [p.pid for p in tree if not _gone([p])]
        print(f"serve and its {len(tree) - 1} descendants stopped {took:.2f} s after SIGTERM")
        assert not left and took < STOP_WITHIN_S, f"{len(left)} processes left after {took:.1f} s:\n{log.read_text()[-3000:]}"
    finally:
        for p in psutil.Process(proc.pid).children(recursive=True) if proc.poll() is None else []:
            p.kill()
        proc.kill()
        proc.wait(10)

    # The fine-tune is back at the front of its queue, not failed: lock, retries and first run's count intact.
    job = Job.fetch(trigger.job_id, connection=redis_conn)
    assert job.get_status() == JobStatus.QUEUED, log.read_text()[-3000:]
    assert Queue(QUEUE_NAME, connection=redis_conn).get_job_ids()[:1] == [trigger.job_id]
    assert job.meta["abandoned"] == 1 and job.retries_left == 2
    assert redis_conn.get(lock_key(7)) == trigger.job_id.encode()
    queue = Queue(QUEUE_NAME, connection=redis_conn)
    assert not queue.started_job_registry.get_job_ids() and not queue.failed_job_registry.get_job_ids()
    # a trigger meanwhile queues no second fine-tune of the project
    again = maybe_enqueue_finetune(redis_conn, 7, "manual", job_func="tests.fixtures.jobs.slow_first_run",
                                   job_kwargs={"tag": tag})
    assert (again.enqueued, again.detail, again.job_id) == (False, "active", trigger.job_id)

    # The next worker runs it (later: here at once) and then the project's lock is free.
    worker = subprocess.run([sys.executable, "-m", "backend.cli", "worker", "--burst"], env=env, cwd=ROOT,
                            capture_output=True, text=True, timeout=60)
    assert worker.returncode == 0, worker.stderr[-2000:]
    job = Job.fetch(trigger.job_id, connection=redis_conn)
    assert job.get_status() == JobStatus.FINISHED and job.return_value() == 2
    assert redis_conn.get(lock_key(7)) is None


def _webhook(port: int, i: int, project: int) -> None:
    jpg, mask = scene(64, 48, seed=i)
    event = annotation_event([brush_region(mask, "circle", f"r{i}")], annotation_id=700 + i, task_id=60 + i,
                             project_id=project, data={"image": "data:image/jpeg;base64," + base64.b64encode(jpg).decode()})
    assert requests.post(f"http://127.0.0.1:{port}/webhook", json=event, timeout=5).status_code == 201


@pytest.mark.slow
def test_ctrl_c_abandons_a_real_fine_tune_and_the_embedded_redis_keeps_it_queued(tiny_model_factory, tmp_path):
    """The measured case of issue 26: Ctrl-C (SIGINT to serve's process group, as a terminal sends it) on the one-
    machine serve (embedded Redis) while a real fine-tune trains took 25-30 s. Redis stops last, so the abandoned
    fine-tune is in the append-only file as queued, with its lock, for the next start."""
    import redis

    from backend.cli.embedded_redis import EmbeddedRedis

    data = tmp_path / "data"
    env = {k: v for k, v in _env(MODEL=str(tiny_model_factory("tiny-clipseg")), DATA_DIR=str(data), FINETUNE_EVERY="3",
                                 FINETUNE_STEPS="100000", FINETUNE_INTERVAL="3600").items() if k != "REDIS_URL"}
    port, log = free_port(), tmp_path / "serve.log"
    proc = subprocess.Popen([sys.executable, "-m", "backend.cli", "serve", "--port", str(port)],
                            env=env, cwd=ROOT, stdout=log.open("ab"), stderr=subprocess.STDOUT, start_new_session=True)
    try:
        wait_for_http(f"http://127.0.0.1:{port}/health", timeout=60, proc=proc, log_path=log)
        for i in range(3):  # the third correction queues the fine-tune
            _webhook(port, i, project=8)
        conn = redis.Redis(unix_socket_path=str(data.resolve() / "redis" / "redis.sock"))
        deadline = time.monotonic() + 60
        while True:  # it trains (a few steps done), and the model is served
            raw = conn.get(lock_key(8))
            meta = Job.fetch(raw.decode(), connection=conn).get_meta(refresh=True) if raw else {}
            if (meta.get("stage") == "training" and (meta.get("step") or 0) > 3
                    and requests.get(f"http://127.0.0.1:{port}/health", timeout=5).json()["ready"]):
                break
            assert time.monotonic() < deadline, log.read_text()[-3000:]
            time.sleep(0.2)
        job_id = raw.decode()
        tree = [psutil.Process(proc.pid), *psutil.Process(proc.pid).children(recursive=True)]
        assert len(tree) >= 5, [p.cmdline()[:4] for p in tree]  # serve, redis-server, gunicorn, worker, scheduler
        started = time.monotonic()
        os.killpg(proc.pid, signal.SIGINT)
        while not _gone(tree) and time.monotonic() - started < STOP_WITHIN_S + 5:
            time.sleep(0.05)
        took = time.monotonic() - started
        print(f"Ctrl-C: serve and its {len(tree) - 1} descendants stopped {took:.2f} s after SIGINT")
        assert _gone(tree) and took < STOP_WITHIN_S, f"after {took:.1f} s:\n{log.read_text()[-3000:]}"
    finally:
        for p in psutil.Process(proc.pid).children(recursive=True) if proc.poll() is None else []:
            p.kill()
        proc.kill()
        proc.wait(10)

    with EmbeddedRedis(data / "redis") as server:  # what the next serve's worker finds in the append-only file
        conn = redis.Redis.from_url(server.url)
        job = Job.fetch(job_id, connection=conn)
        assert job.get_status() == JobStatus.QUEUED and job.meta["abandoned"] == 1 and job.retries_left == 2
        assert Queue(QUEUE_NAME, connection=conn).get_job_ids()[:1] == [job_id]
        assert conn.get(lock_key(8)) == job_id.encode()
        assert not Queue(QUEUE_NAME, connection=conn).failed_job_registry.get_job_ids()


def test_a_worker_leaves_its_command_channel_at_once(redis_conn):
    """RQ 3.0 sends UNSUBSCRIBE before it stops its pub/sub thread; when the reply reaches the thread first, the
    thread blocks in get_message for another 60 s and redis-py 8.2's stop() waits for it: 1 in 5 `--burst` workers
    took 60.4 s to exit here. The main thread descheduled right after sending (a loaded machine) is that order made
    certain: our workers still leave at once."""
    from finetune.worker import SimpleWorker

    worker = SimpleWorker([Queue(QUEUE_NAME, connection=redis_conn)], connection=redis_conn, name="leaves-at-once")
    worker.subscribe()
    time.sleep(0.2)  # the thread is in get_message
    send = worker.pubsub.unsubscribe

    def send_then_stall(*args, **kwargs):
        out = send(*args, **kwargs)
        time.sleep(0.5)  # the reply arrives while the main thread is away
        return out

    worker.pubsub.unsubscribe = send_then_stall
    started = time.monotonic()
    worker.unsubscribe()
    took = time.monotonic() - started
    assert not worker.pubsub_thread.is_alive() and took < 5, f"unsubscribing took {took:.1f} s"
