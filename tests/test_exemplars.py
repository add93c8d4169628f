"""Stored exemplars (issue 28): put/get/list/delete against a real Redis, and what survives a SIGKILLed
append-only redis-server (as corrections do)."""
from __future__ import annotations

import io

import numpy as np
import pytest
from PIL import Image

from finetune.exemplars import ExemplarStore
from tests.e2e.ls_harness import free_port
from tests.test_faults import RedisServer


def png(width: int = 32, height: int = 24) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (width, height), (200, 30, 30)).save(buf, "PNG")
    return buf.getvalue()


def test_put_get_list_delete(redis_conn):
    store = ExemplarStore(redis_conn)
    mask = np.zeros((24, 32), bool)
    mask[4:10, 5:20] = True
    stored = store.put("3", "task7-r1", png(), mask, "defect", "task 7 region r1 (annotation 2)")
    got = store.get("3", "task7-r1")
    assert (got.label, got.origin, got.created) == ("defect", stored.origin, stored.created)
    assert np.array_equal(got.mask, mask) and got.image.size == (32, 24)
    store.put("3", "task8-r2", png(), mask, "scratch")
    assert [e["name"] for e in store.list("3")] == ["task7-r1", "task8-r2"]
    assert store.list("3")[0]["area"] == 90 and store.list("4") == []
    assert store.delete("3", "task7-r1") and not store.delete("3", "task7-r1")
    with pytest.raises(KeyError):
        store.get("3", "task7-r1")
    with pytest.raises(ValueError):
        store.put("3", "empty", png(), np.zeros((24, 32), bool), "x")


def test_exemplars_survive_a_killed_redis(tmp_path):
    server = RedisServer(tmp_path / "redis", free_port()).start()
    try:
        mask = np.ones((24, 32), bool)
        ExemplarStore(server.conn()).put("1", "task1-a", png(), mask, "part 17")
        server.kill()
        server.start()
        got = ExemplarStore(server.conn()).get("1", "task1-a")
        assert got.label == "part 17" and got.mask.all() and got.image_bytes == png()
    finally:
        server.kill()
