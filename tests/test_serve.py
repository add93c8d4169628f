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


def _parts(data: Path) -> dict:
    return json.loads((data / "run" / "parts.json").read_text())


def _wait(predicate, timeout: float, what: str, log: Path) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, f"{what}; log:\n{log.read_text()[-3000:]}"
        time.sleep(0.2)


@pytest.mark.slow
def test_serve_supervises_its_parts_and_one_serve_per_data_dir(tiny_model_factory, tmp_path):
    """Real `clipseg serve`: its redis-server and worker SIGKILLed → restarted with a log line, nothing lost; a
    second serve on the same DATA_DIR refused with one line; serve SIGKILLed → no child survives it (parent-death
    signal); the next serve takes the stale lock over and has every correction."""
    data = tmp_path / "data"
    env = _env(MODEL=str(tiny_model_factory("tiny-clipseg")), DATA_DIR=str(data), FINETUNE_EVERY="1000")
    port, log = free_port(), tmp_path / "serve.log"
    proc = _start_serve(port, env, log)
    redis_env = {**env, "REDIS_URL": f"unix://{data.resolve() / 'redis' / 'redis.sock'}?db=0"}

    def stored() -> int:
        out = _cli("status", "--json", env=redis_env)
        return json.loads(out.stdout)["projects"].get("9", {}).get("corrections", 0) if out.returncode == 0 else -1

    try:
        _webhook(port, 0)
        _wait(lambda: stored() == 1, 30, "first correction stored", log)
        pids = _parts(data)["pids"]
        os.kill(pids["redis"], signal.SIGKILL)
        _webhook(port, 1)  # accepted while Redis is down: spooled, replayed after the restart
        _wait(lambda: _parts(data)["restarts"]["redis"] == 1 and _parts(data)["parts"]["redis"] == "up", 30,
              "redis-server restarted", log)
        _wait(lambda: stored() == 2, 60, "spooled correction stored after the Redis restart", log)
        os.kill(_parts(data)["pids"]["worker"], signal.SIGKILL)
        _wait(lambda: _parts(data)["restarts"]["worker"] == 1, 30, "worker restarted", log)
        assert "worker exited" in log.read_text() and "redis exited" in log.read_text()
        health = requests.get(f"http://127.0.0.1:{port}/health", timeout=5).json()
        assert health["parts"]["redis"] == "up" and health["parts"]["worker"] == "up", health

        second = subprocess.run([sys.executable, "-m", "backend.cli", "serve", "--port", str(free_port())], env=env,
                                cwd=ROOT, capture_output=True, text=True, timeout=60)
        assert second.returncode == 1
        assert second.stderr.strip().splitlines()[-1].startswith("clipseg serve: error: another `clipseg serve`")
        assert f"(pid {proc.pid})" in second.stderr

        children = psutil.Process(proc.pid).children(recursive=True)
        assert len(children) >= 4  # redis-server, worker, scheduler, gunicorn worker
        os.kill(proc.pid, signal.SIGKILL)  # serve alone, not its process group
        proc.wait(10)
        _, alive = psutil.wait_procs(children, timeout=15)
        assert not [p for p in alive if p.status() != psutil.STATUS_ZOMBIE], [p.cmdline()[:3] for p in alive]
    finally:
        if proc.poll() is None:
            _stop(proc)
    proc = _start_serve(port, env, log)  # the dead serve's lock is taken over
    try:
        assert stored() == 2
    finally:
        _stop(proc)
