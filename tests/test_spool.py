"""Spool: events survive Redis being down (dead port, then a real redis-server killed and restarted)."""
from __future__ import annotations

import json
import socket
import subprocess
import time

import numpy as np
import pytest
import redis

from finetune.corrections import CorrectionStore
from backend.intake.spool import Spool, accept_event
from tests.fixtures.webhooks import annotation_event, brush_region, deleted_event, ingester, scene

DEAD_URL = "redis://127.0.0.1:1/13"  # nothing listens on port 1


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _events(n: int, image_seed: int = 0) -> tuple[bytes, list[dict]]:
    image, mask = scene(seed=image_seed)
    return image, [annotation_event([brush_region(mask)], annotation_id=100 + i, task_id=i) for i in range(n)]


def _factory(url: str):
    return lambda: ingester(CorrectionStore(redis.Redis.from_url(url, socket_connect_timeout=0.5, socket_timeout=1)))


def test_append_is_atomic_and_ordered(tmp_path):
    spool = Spool(tmp_path / "spool")
    paths = [spool.append({"action": "ANNOTATION_CREATED", "i": i}) for i in range(50)]
    assert spool.pending() == paths
    assert [json.loads(p.read_text())["i"] for p in spool.pending()] == list(range(50))
    assert not list((tmp_path / "spool").glob(".tmp-*"))


def test_redis_down_spools_then_replays(tmp_path, redis_url):
    spool = Spool(tmp_path / "spool")
    image, events = _events(5)
    loader = lambda ref, task_id: image  # noqa: E731
    assert [accept_event(e, _factory(DEAD_URL), spool, loader) for e in events] == ["spooled"] * 5
    assert len(spool) == 5
    assert accept_event(deleted_event(101), _factory(DEAD_URL), spool, loader) == "spooled"
    # Redis is back: the next event replays the spool first, in order, then is stored itself
    _, mask = scene(seed=1)
    late = annotation_event([brush_region(mask)], annotation_id=200, task_id=50)
    assert accept_event(late, _factory(redis_url), spool, loader) == "stored"
    assert len(spool) == 0
    store = _factory(redis_url)().store
    assert sorted(s.annotation_id for s in store.samples(1)) == [100, 102, 103, 104, 200]
    assert store.count(1) == 5


def test_pending_events_keep_order_while_replay_cannot_finish(tmp_path, redis_url):
    spool = Spool(tmp_path / "spool")
    image, mask = scene(seed=2)
    _, mask2 = scene(seed=3)
    created = annotation_event([brush_region(mask)], annotation_id=7)
    assert accept_event(created, _factory(DEAD_URL), spool, lambda ref, task_id: image) == "spooled"

    def flaky_loader(ref, task_id):  # Label Studio down during replay: the spooled event stays, the new one queues behind
        raise OSError("LS unreachable")

    updated = annotation_event([brush_region(mask2)], annotation_id=7, action="ANNOTATION_UPDATED",
                               updated_at="2026-11-26T21:00:00Z")
    assert accept_event(updated, _factory(redis_url), spool, flaky_loader) == "spooled"
    assert len(spool) == 2
    result = spool.replay(_factory(redis_url)(), lambda ref, task_id: image)
    assert (result.replayed, result.pending, result.error) == (2, 0, None)
    [s] = _factory(redis_url)().store.samples(1)
    assert np.array_equal(s.mask, mask2)  # the update won, as in Label Studio


def test_malformed_file_is_set_aside(tmp_path, redis_url):
    spool = Spool(tmp_path / "spool")
    image, events = _events(2)
    spool.append(events[0])
    (spool.dir / f"{time.time_ns():020d}-0-000000.json").write_text("{not json")
    spool.append({"action": "ANNOTATION_CREATED", "annotation": {}})  # no id
    spool.append(events[1])
    result = spool.replay(_factory(redis_url)(), lambda ref, task_id: image)
    assert (result.replayed, result.rejected, result.pending) == (2, 2, 0)
    rejected = spool.set_aside("rejected")
    assert len(rejected) == 2
    assert "JSONDecodeError" in spool.reason(rejected[0]) and "KeyError" in spool.reason(rejected[1])
    assert spool.replay_rejected() == 2 and len(spool) == 2 and not spool.set_aside("rejected")


@pytest.mark.slow
def test_real_redis_restart_loses_nothing(tmp_path):
    """A redis-server of our own is killed mid-stream and restarted on the same port with its data."""
    port = _free_port()
    data = tmp_path / "redis"
    data.mkdir()
    from backend.cli.embedded_redis import redis_server_binary

    cmd = [redis_server_binary(), "--port", str(port), "--bind", "127.0.0.1", "--dir", str(data),
           "--appendonly", "yes", "--appendfsync", "always", "--save", ""]

    def start():
        proc = subprocess.Popen(cmd, stdout=(tmp_path / "redis.log").open("ab"), stderr=subprocess.STDOUT)
        url = f"redis://127.0.0.1:{port}/0"
        for _ in range(100):
            try:
                redis.Redis.from_url(url).ping()
                return proc, url
            except redis.ConnectionError:
                time.sleep(0.05)
        raise RuntimeError("redis-server did not start")

    proc, url = start()
    spool = Spool(tmp_path / "spool")
    image, events = _events(30, image_seed=4)
    outcomes = []
    try:
        for i, event in enumerate(events):
            if i == 10:
                proc.kill()
                proc.wait()
            if i == 20:
                proc, url = start()
            outcomes.append(accept_event(event, _factory(url), spool, lambda ref, task_id: image))
        assert outcomes[:10] == ["stored"] * 10 and outcomes[10:20] == ["spooled"] * 10, (
            outcomes, (tmp_path / "redis.log").read_text()[-1500:])
        assert outcomes[20:] == ["stored"] * 10  # the first event after the restart replayed the spool
        store = _factory(url)().store
        assert sorted(s.annotation_id for s in store.samples()) == [100 + i for i in range(30)]
        assert len(spool) == 0
    finally:
        proc.kill()
        proc.wait()


# ---- retry vs reject by the kind of error (real redis-server refusing writes) ------------------------------------
class _OwnRedis:
    """A redis-server of the test's own (unix socket), so it can be made to refuse writes."""

    def __init__(self, directory):
        from backend.cli.embedded_redis import EmbeddedRedis

        self.server = EmbeddedRedis(directory).start()
        self.url = self.server.url
        self.conn = redis.Redis.from_url(self.url)

    def stop(self) -> None:
        self.server.stop()


def test_misconf_and_oom_keep_events_pending_never_rejected(tmp_path):
    """A full disk (MISCONF after a failed save) and maxmemory (OOM) are the server's state, not the event's:
    the events stay pending, nothing goes to rejected/, and all are stored once Redis can write again."""
    own = _OwnRedis(tmp_path / "redis")
    try:
        spool = Spool(tmp_path / "spool")
        image, events = _events(4)
        for event in events:
            spool.append(event)
        # OOM: no memory for writes
        own.conn.config_set("maxmemory-policy", "noeviction")
        own.conn.config_set("maxmemory", "1")
        result = spool.replay(_factory(own.url)(), lambda ref, task_id: image)
        assert (result.replayed, result.rejected, result.quarantined, result.pending) == (0, 0, 0, 4)
        assert result.transient and "maxmemory" in result.error
        own.conn.config_set("maxmemory", "0")
        # MISCONF: a snapshot fails (its directory is gone), so Redis refuses writes
        gone = tmp_path / "gone"
        gone.mkdir()
        own.conn.config_set("dir", str(gone))
        own.conn.config_set("stop-writes-on-bgsave-error", "yes")
        own.conn.config_set("save", "3600 1")  # Redis refuses writes after a failed save only with save points
        gone.rmdir()
        own.conn.bgsave()
        deadline = time.monotonic() + 10
        while own.conn.info("persistence")["rdb_last_bgsave_status"] == "ok":
            assert time.monotonic() < deadline
            time.sleep(0.05)
        result = spool.replay(_factory(own.url)(), lambda ref, task_id: image)
        assert (result.replayed, result.rejected, result.pending) == (0, 0, 4) and "MISCONF" in result.error
        assert not spool.set_aside("rejected") and not spool.set_aside("quarantine")
        gone.mkdir()  # space is back: the next save succeeds and writes are allowed again
        own.conn.config_set("dir", str(gone))  # Redis' working directory was the removed one
        own.conn.bgsave()
        deadline = time.monotonic() + 10
        while own.conn.info("persistence")["rdb_last_bgsave_status"] != "ok":
            assert time.monotonic() < deadline
            time.sleep(0.05)
        result = spool.replay(_factory(own.url)(), lambda ref, task_id: image)
        assert (result.replayed, result.pending, result.error) == (4, 0, None)
        assert _factory(own.url)().store.count(1) == 4
        own.conn.config_set("save", "")
    finally:
        own.stop()


class _FailingStore:
    """The real store, except that ingesting annotation `bad` raises `exc` (a fault injected into one event)."""

    def __init__(self, store, bad: int, exc: BaseException):
        self.store, self.bad, self.exc = store, bad, exc

    def ingest_event(self, payload, image_loader=None):
        if (payload.get("annotation") or {}).get("id") == self.bad:
            raise self.exc
        return self.store.ingest_event(payload, image_loader)


def test_event_failing_n_times_is_quarantined_and_does_not_block_the_rest(tmp_path, redis_url):
    spool = Spool(tmp_path / "spool")
    image, events = _events(3)
    for event in events:
        spool.append(event)
    store = _FailingStore(_factory(redis_url)(), bad=100, exc=MemoryError())
    results = [spool.replay(store, lambda ref, task_id: image) for _ in range(3)]
    assert [r.replayed for r in results] == [0, 0, 2]  # two more tries, then set aside and the others go on
    assert results[2].quarantined == 1 and len(spool) == 0
    [held] = spool.set_aside("quarantine")
    assert "failed 3 times: MemoryError" in spool.reason(held)
    assert spool.replay_rejected() == 1
    assert spool.replay(_factory(redis_url)(), lambda ref, task_id: image).replayed == 1  # replayable once fixed
    assert _factory(redis_url)().store.count(1) == 3


_CRASHING_REPLAY = """
import os, signal, sys, redis
from backend.intake.spool import Spool
from finetune.corrections import CorrectionStore
from tests.fixtures.webhooks import ingester, scene

image, _ = scene()
def loader(ref, task_id):
    if task_id == 0:  # the poison event: the process dies while ingesting it, as under the OOM killer
        os.kill(os.getpid(), signal.SIGKILL)
    return image
r = Spool(sys.argv[1]).replay(ingester(CorrectionStore(redis.Redis.from_url(sys.argv[2]))), loader)
print(r.replayed, r.quarantined)
"""


def test_event_that_kills_the_process_is_quarantined_after_n_crashes(tmp_path, redis_url):
    """The attempt is counted before the ingest, so a crash-loop ends: after MAX_ATTEMPTS deaths the event is
    quarantined and the events behind it are stored."""
    import os
    import sys

    spool = Spool(tmp_path / "spool")
    _, events = _events(3)
    for event in events:
        spool.append(event)
    env = {**os.environ, "PYTHONPATH": str(__import__("pathlib").Path(__file__).resolve().parents[1])}
    codes = [subprocess.run([sys.executable, "-c", _CRASHING_REPLAY, str(spool.dir), redis_url], env=env,
                            capture_output=True, text=True, timeout=120) for _ in range(4)]
    assert [c.returncode for c in codes[:3]] == [-9, -9, -9]
    assert codes[3].returncode == 0 and codes[3].stdout.split() == ["2", "1"], codes[3].stderr
    assert len(spool.set_aside("quarantine")) == 1
    assert _factory(redis_url)().store.count(1) == 2
