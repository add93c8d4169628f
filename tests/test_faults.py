"""Faults with real processes: Redis killed while webhooks arrive, Redis restarted from its append-only file, a
corrupt checkpoint activated, image hosts that hang or refuse connections.

The backend runs as a real `clipseg serve` (gunicorn) process against a redis-server of the test's own (append-only,
fsync always, a free port); Redis is SIGKILLed, not shut down politely. Images travel as data: URIs or come from a
local HTTP server on 127.0.0.1, so no Label Studio is needed.
"""
from __future__ import annotations

import concurrent.futures
import logging
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import redis
import requests

from backend.http.app import create_app
from backend.cli.embedded_redis import redis_server_binary
from backend.settings import Settings
from finetune.corrections import CorrectionStore
from finetune.versions import VersionRecord, VersionRegistry
from tests.e2e.ls_harness import ManagedProcess, free_port
from tests.fixtures.bad_images import ImageHost, data_uri, png
from tests.fixtures.webhooks import annotation_event, brush_region, deleted_event, scene

CONFIG = """<View>
  <Image name="image" value="$image"/>
  <BrushLabels name="tag" toName="image"><Label value="cat"/><Label value="dog"/></BrushLabels>
</View>"""
WEBHOOK_BUDGET_S = 1.0  # Label Studio gives up on a webhook after 1 s and never resends it


class RedisServer:
    """A redis-server of the test's own on 127.0.0.1:`port`, append-only with fsync on every write."""

    def __init__(self, directory: Path, port: int):
        self.dir, self.port = directory, port
        self.dir.mkdir(parents=True, exist_ok=True)
        self.proc: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> "RedisServer":
        cmd = [redis_server_binary(), "--port", str(self.port), "--bind", "127.0.0.1", "--dir", str(self.dir),
               "--appendonly", "yes", "--appendfsync", "always", "--save", "", "--logfile", str(self.dir / "log")]
        self.proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            try:
                redis.Redis.from_url(self.url).ping()
                return self
            except redis.exceptions.BusyLoadingError:
                time.sleep(0.05)
            except redis.ConnectionError:
                time.sleep(0.05)
        raise RuntimeError(f"redis-server on {self.port} did not start: {(self.dir / 'log').read_text()[-500:]}")

    def kill(self) -> None:
        """SIGKILL: no shutdown save, only what the append-only file already holds survives."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()

    def conn(self) -> redis.Redis:
        return redis.Redis.from_url(self.url)


@pytest.fixture
def redis_server(tmp_path):
    server = RedisServer(tmp_path / "redis", free_port()).start()
    yield server
    server.kill()


def _serve(tmp_path: Path, model: Path, redis_url: str, **env) -> ManagedProcess:
    port = free_port()
    proc = ManagedProcess(
        [sys.executable, "-m", "backend.cli", "serve", "--host", "127.0.0.1", "--port", str(port),
         "--no-worker", "--no-scheduler", "--threads", "4"],
        env={"MODEL": str(model), "DATA_DIR": str(tmp_path / "data"), "REDIS_URL": redis_url, "DEVICE": "cpu",
             "FINETUNE_EVERY": "100000", "HF_HUB_OFFLINE": "1", "LOG_LEVEL": "INFO", **env},
        cwd=Path(__file__).resolve().parents[1], log_path=tmp_path / "serve.log",
        health_url=f"http://127.0.0.1:{port}/health", startup_timeout=90, name="clipseg-serve",
    )
    proc.start()
    deadline = time.monotonic() + 60
    while not requests.get(f"{proc.base_url}/health", timeout=5).json()["ready"]:
        assert time.monotonic() < deadline, proc.log_tail()
        time.sleep(0.2)
    return proc


def _events(first: int, n: int, image: bytes, mask: np.ndarray) -> list[dict]:
    uri = data_uri(image, "image/jpeg")
    return [annotation_event([brush_region(mask)], annotation_id=first + i, task_id=first + i, data={"image": uri})
            for i in range(n)]


def _wait(predicate, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            if predicate():
                return True
        except redis.ConnectionError:
            pass
        time.sleep(0.1)
    return predicate()


@pytest.mark.slow
def test_redis_killed_while_webhooks_arrive_loses_nothing(tmp_path, redis_server, tiny_model_factory):
    """20 corrections, Redis SIGKILLed, 20 more + a deletion (answered fast, spooled to disk), Redis restarted from
    its append-only file: all 39 remaining corrections arrive, in order, and the version record survived."""
    registry = VersionRegistry(redis_server.conn())
    registry.record(VersionRecord("v-before-crash", str(tiny_model_factory("tiny-improved")), status="promoted"))
    registry.activate("v-before-crash")
    server = _serve(tmp_path, tiny_model_factory("tiny-clipseg"), redis_server.url)
    try:
        url = server.base_url
        setup = requests.post(f"{url}/setup", json={"project": "1.1", "schema": CONFIG}, timeout=10)
        assert setup.json()["model_version"] == "v-before-crash"
        image, mask = scene(160, 120)
        before, during = _events(1000, 20, image, mask), _events(2000, 20, image, mask)
        for event in before:
            assert requests.post(f"{url}/webhook", json=event, timeout=5).status_code == 201
        store = CorrectionStore(redis_server.conn())
        assert _wait(lambda: store.count("1") == 20, 30), server.log_tail()

        redis_server.kill()
        latencies = []
        for event in [*during, deleted_event(1000)]:
            started = time.perf_counter()
            response = requests.post(f"{url}/webhook", json=event, timeout=5)
            latencies.append(time.perf_counter() - started)
            assert response.status_code == 201, response.text
        assert max(latencies) < WEBHOOK_BUDGET_S, latencies
        spool = tmp_path / "data" / "spool"
        assert len(list(spool.glob("*.json"))) == 21  # all on disk while Redis is gone
        # Predictions go on without Redis (the active version is already loaded).
        predict = requests.post(f"{url}/predict", timeout=30, json={
            "tasks": [{"id": 1, "data": {"image": data_uri(png())}}], "label_config": CONFIG})
        assert predict.status_code == 200 and predict.json()["model_version"] == "v-before-crash"

        redis_server.start()  # same port, same directory: the AOF is replayed
        store = CorrectionStore(redis_server.conn())
        assert _wait(lambda: store.count("1") == 39 and not list(spool.glob("*.json")), 30), server.log_tail()
        ids = [s.annotation_id for s in store.samples("1")]
        assert sorted(ids) == list(range(1001, 1020)) + list(range(2000, 2020))
        assert ids == sorted(ids)  # ingest order kept: the 20 survivors first, then the spooled ones in order
        assert not (spool / "rejected").exists()
        assert VersionRegistry(redis_server.conn()).active() == ("v-before-crash", str(tiny_model_factory("tiny-improved")))
        setup = requests.post(f"{url}/setup", json={"project": "1.1", "schema": CONFIG}, timeout=10)
        assert setup.json()["model_version"] == "v-before-crash"
        logging.getLogger(__name__).info("webhook latency while Redis was down: max %.3f s", max(latencies))
    finally:
        server.stop()


def _corrupt_copy(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    weights = dst / "trainable.safetensors"
    weights.write_bytes(weights.read_bytes()[: len(weights.read_bytes()) // 3])  # a truncated write
    return dst


@pytest.mark.slow
def test_corrupt_checkpoint_is_refused_and_the_old_version_keeps_serving(tmp_path, redis_url, redis_conn,
                                                                         tiny_model_factory, caplog):
    good = tiny_model_factory("tiny-improved")
    bad = _corrupt_copy(good, tmp_path / "v-corrupt")
    registry = VersionRegistry(redis_conn)
    registry.record(VersionRecord("v-good", str(good), status="promoted"))
    registry.activate("v-good")
    app = create_app(Settings(model=str(tiny_model_factory("tiny-clipseg")), device="cpu", data_dir=tmp_path / "d",
                              redis_url=redis_url))
    runtime = app.extensions["clipseg_runtime"]
    try:
        client = app.test_client()
        assert _wait(lambda: client.post("/setup", json={"schema": CONFIG}).get_json().get("model_version") == "v-good", 30)
        registry.record(VersionRecord("v-corrupt", str(bad), parent="v-good"))  # falls back to its parent
        with caplog.at_level(logging.ERROR, logger="backend.serving.model"):
            registry.activate("v-corrupt")
            assert _wait(lambda: client.get("/health").get_json()["error"], 15)
            for _ in range(15):  # requests keep coming; each checks for updates at most once a second
                setup = client.post("/setup", json={"schema": CONFIG})
                assert setup.status_code == 200 and setup.get_json()["model_version"] == "v-good"
                predict = client.post("/predict", json={"tasks": [{"id": 1, "data": {"image": data_uri(png())}}],
                                                        "label_config": CONFIG})
                assert predict.status_code == 200 and predict.get_json()["model_version"] == "v-good"
                time.sleep(0.2)
        health = client.get("/health").get_json()
        assert health["model_version"] == "v-good" and health["ready"]
        assert "v-corrupt" in health["error"] and "unreadable" in health["error"]
        attempts = [r for r in caplog.records if "cannot load model" in r.getMessage()]
        assert len(attempts) == 1, f"the corrupt version was loaded {len(attempts)} times, not once"

        registry.rollback("v-good")  # an operator fixes it: the error clears, nothing reloads needlessly
        assert _wait(lambda: client.post("/setup", json={"schema": CONFIG}).status_code == 200
                     and client.get("/health").get_json()["error"] is None, 10)
        assert client.get("/health").get_json()["model_version"] == "v-good"
    finally:
        runtime.stop()


@pytest.mark.slow
def test_slow_and_unreachable_image_hosts_are_bounded(tmp_path, redis_server, tiny_model_factory):
    """IMAGE_TIMEOUT=1: hung and refusing hosts give an empty result for their task within the timeout + margin;
    8 such requests at once do not hang the server (it still answers /health and good tasks right after)."""
    with ImageHost() as host:
        dead_port = free_port()  # nothing listens here: connection refused
        slow = host.add_slow("/slow.png", 30.0, png())
        good = host.add("/good.png", png(), "image/png")
        server = _serve(tmp_path, tiny_model_factory("tiny-clipseg"), redis_server.url, IMAGE_TIMEOUT="1",
                        ALLOWED_IMAGE_HOSTS=f"127.0.0.1:{host.port},127.0.0.1:{dead_port}",
                        ALLOW_PRIVATE_NETWORKS="true", THRESHOLD="0")
        try:
            url = server.base_url
            tasks = [{"id": 1, "data": {"image": slow}}, {"id": 2, "data": {"image": f"http://127.0.0.1:{dead_port}/x.png"}},
                     {"id": 3, "data": {"image": good}}]

            def predict() -> tuple[float, dict]:
                started = time.perf_counter()
                response = requests.post(f"{url}/predict", json={"tasks": tasks, "label_config": CONFIG}, timeout=60)
                assert response.status_code == 200, response.text
                return time.perf_counter() - started, response.json()

            elapsed, body = predict()
            assert elapsed < 1.0 + 2.0, elapsed  # IMAGE_TIMEOUT + margin
            assert [bool(r["result"]) for r in body["results"]] == [False, False, True]
            with concurrent.futures.ThreadPoolExecutor(8) as pool:
                results = list(pool.map(lambda _: predict(), range(8)))
            assert max(e for e, _ in results) < 8.0, [e for e, _ in results]  # 4 threads, 2 rounds of ~1 s each
            assert all([bool(r["result"]) for r in b["results"]] == [False, False, True] for _, b in results)
            started = time.perf_counter()
            assert requests.get(f"{url}/health", timeout=5).status_code == 200
            assert time.perf_counter() - started < 1.0
        finally:
            server.stop()
