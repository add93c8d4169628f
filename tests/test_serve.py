"""`clipseg serve` as a user runs it (embedded Redis + worker + scheduler) and several workers sharing one Redis."""
from __future__ import annotations

import base64
import json
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

from tests.e2e.ls_harness import free_port, wait_for_http
from tests.fixtures.webhooks import annotation_event, brush_region, scene

ROOT = Path(__file__).resolve().parents[1]


def _env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k != "REDIS_URL"}
    return {**env, "PYTHONPATH": str(ROOT), "HF_HUB_OFFLINE": "1", **extra}


def _cli(*args: str, env: dict[str, str]) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "backend.cli", *args], env=env, cwd=ROOT, capture_output=True,
                          text=True, timeout=120)


def _start_serve(port: int, env: dict[str, str], log: Path) -> subprocess.Popen:
    proc = subprocess.Popen([sys.executable, "-m", "backend.cli", "serve", "--host", "127.0.0.1", "--port", str(port)],
                            env=env, cwd=ROOT, stdout=log.open("ab"), stderr=subprocess.STDOUT, start_new_session=True)
    wait_for_http(f"http://127.0.0.1:{port}/health", timeout=90, proc=proc, log_path=log)
    deadline = time.monotonic() + 60
    while not requests.get(f"http://127.0.0.1:{port}/health", timeout=5).json()["ready"]:
        assert time.monotonic() < deadline, log.read_text()[-3000:]
        time.sleep(0.2)
    return proc


def _stop(proc: subprocess.Popen) -> list[psutil.Process]:
    """Ctrl-C as a user would; returns the descendants that were running just before."""
    children = psutil.Process(proc.pid).children(recursive=True)
    os.killpg(proc.pid, signal.SIGINT)
    proc.wait(60)
    return children


def _webhook(port: int, i: int) -> None:
    jpg, mask = scene(64, 48, seed=i)
    event = annotation_event([brush_region(mask, "circle", f"r{i}")], annotation_id=500 + i, task_id=40 + i, project_id=9,
                             data={"image": "data:image/jpeg;base64," + base64.b64encode(jpg).decode()})
    resp = requests.post(f"http://127.0.0.1:{port}/webhook", json=event, timeout=5)
    assert resp.status_code == 201, resp.text


@pytest.mark.slow
def test_serve_embedded_runs_the_whole_loop_and_keeps_corrections(tiny_model_factory, tmp_path):
    data = tmp_path / "data"
    env = _env(MODEL=str(tiny_model_factory("tiny-clipseg")), DATA_DIR=str(data), FINETUNE_EVERY="3",
               FINETUNE_STEPS="3", FINETUNE_INTERVAL="3600")
    port, log = free_port(), tmp_path / "serve.log"
    proc = _start_serve(port, env, log)
    try:
        for i in range(3):
            _webhook(port, i)
        redis_env = {**env, "REDIS_URL": f"unix://{data.resolve() / 'redis' / 'redis.sock'}?db=0"}
        deadline = time.monotonic() + 120
        while True:  # the embedded worker picks the fine-tune up and finishes it
            jobs = json.loads(_cli("jobs", "--json", env=redis_env).stdout or "[]")
            finished = [j for j in jobs if j["state"] == "finished" and str(j["project"]) == "9"]
            if finished:
                break
            assert time.monotonic() < deadline, (jobs, log.read_text()[-3000:])
            time.sleep(1)
        versions = json.loads(_cli("versions", "--json", env=redis_env).stdout)
        trained = [v for v in versions["versions"] if v["status"] != "base"]  # the first fine-tune also records the base
        assert len(trained) == 1 and trained[0]["samples"]["corrections"] >= 1
    finally:
        children = _stop(proc)
    assert proc.returncode in (0, -signal.SIGINT, 130)
    time.sleep(1)
    assert not [c for c in children if c.is_running() and c.status() != psutil.STATUS_ZOMBIE], "Ctrl-C stopped everything"

    proc = _start_serve(port, env, log)  # restart: corrections and versions come back from the append-only file
    try:
        status = json.loads(_cli("status", "--json", env=redis_env).stdout)
        assert status["projects"]["9"]["corrections"] == 3
        assert status["versions"] == 2  # the base model and the fine-tuned one
    finally:
        _stop(proc)


def test_two_workers_share_jobs_and_never_run_one_twice(redis_url, redis_conn):
    queue = Queue("clipseg", connection=redis_conn)
    tags = [f"job{i}" for i in range(12)]
    for tag in tags:
        queue.enqueue("tests.fixtures.jobs.record_run", tag, 0.3)
    env = _env(REDIS_URL=redis_url)
    workers = [subprocess.Popen([sys.executable, "-m", "backend.cli", "worker", "--burst", "--name", f"w{i}-{os.getpid()}"],
                                env=env, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL) for i in range(2)]
    for w in workers:
        assert w.wait(120) == 0
    runs = [int(redis_conn.get(f"runs:{t}") or 0) for t in tags]
    assert runs == [1] * len(tags)
    ran_by = {redis_conn.get(f"ran-by:{t}").decode() for t in tags}
    assert len(ran_by) == 2, f"both workers should have taken jobs: {ran_by}"
