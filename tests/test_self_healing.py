"""Self-healing at the HTTP surface (issue 18): oversized masks refused before they are spooled, a spool that
cannot be written answers 503 (never 2xx for an event that was not kept), an outage answers 503 with its reason,
and /health names the degraded parts. Real Redis, real tiny model, Flask's test client."""
from __future__ import annotations

import json
import os
import shutil

import numpy as np
import pytest

from backend.http.app import create_app
from backend.labelstudio.rle import mask_to_rle
from backend.settings import Settings
from tests.fixtures.webhooks import annotation_event, brush_region, scene

DEAD_REDIS = "redis://127.0.0.1:1/4"


@pytest.fixture(scope="module")
def model_dir(tiny_model_factory):
    return tiny_model_factory("tiny-clipseg")


def _client(model_dir, tmp_path, redis_url, **overrides):
    """The app with its inbox thread not started, so accepted events stay visible in the spool."""
    app = create_app(Settings(model=str(model_dir), data_dir=tmp_path, redis_url=redis_url, **overrides), start=False)
    return app.test_client(), app.extensions["clipseg_runtime"]


def _noise_region(h: int, w: int, seed: int = 0) -> dict:
    mask = np.random.default_rng(seed).random((h, w)) > 0.5
    return {"id": "noise", "type": "brushlabels", "from_name": "tag", "to_name": "image", "original_width": w,
            "original_height": h, "value": {"format": "rle", "rle": mask_to_rle(mask), "brushlabels": ["cat"]}}


def test_oversized_and_inconsistent_masks_are_refused_before_spooling(model_dir, tmp_path, redis_url):
    client, runtime = _client(model_dir, tmp_path, redis_url, max_image_pixels=1_000_000)
    spool = tmp_path / "spool"
    # a noise mask whose RLE is over the per-region budget (the 23 MB webhook of the issue, smaller)
    noisy = annotation_event([_noise_region(1000, 1000)], annotation_id=1)
    resp = client.post("/webhook", json=noisy)
    assert resp.status_code == 413 and "budget" in resp.get_json()["error"]
    # a region larger than MAX_IMAGE_PIXELS
    _, mask = scene(64, 48)
    big = brush_region(mask)
    big["original_width"], big["original_height"] = 2000, 1000
    resp = client.post("/webhook", json=annotation_event([big], annotation_id=2))
    assert resp.status_code == 413 and "MAX_IMAGE_PIXELS" in resp.get_json()["error"]
    # an RLE that decodes to more pixels than the image it was drawn on
    lying = brush_region(mask)
    lying["original_width"], lying["original_height"] = 32, 24
    resp = client.post("/webhook", json=annotation_event([lying], annotation_id=3))
    assert resp.status_code == 422 and "64x48" not in resp.get_json()["error"] and "32x24" in resp.get_json()["error"]
    # a body too large for any drawn mask: refused from its Content-Length, before it is read or parsed
    resp = client.post("/webhook", data=b" " * (9 << 20), content_type="application/json")
    assert resp.status_code == 413 and "over 8,388,608 bytes" in resp.get_json()["error"]
    assert not list(spool.glob("*.json"))
    ok = client.post("/webhook", json=annotation_event([brush_region(mask)], annotation_id=4))
    assert ok.status_code == 201 and len(list(spool.glob("*.json"))) == 1
    # the event is kept byte for byte as Label Studio sent it
    assert json.loads(next(spool.glob("*.json")).read_bytes())["annotation"]["id"] == 4
    runtime.stop()


def test_spool_that_cannot_be_written_answers_503_and_shows_in_health(model_dir, tmp_path, redis_url, redis_conn):
    client, runtime = _client(model_dir, tmp_path, redis_url)
    _, mask = scene(64, 48)
    event = annotation_event([brush_region(mask)], annotation_id=5)
    spool = tmp_path / "spool"
    shutil.rmtree(spool)
    spool.write_text("not a directory")  # every write into it fails (as a full or read-only disk would)
    resp = client.post("/webhook", json=event)
    assert resp.status_code == 503
    assert "event not accepted" in resp.get_json()["error"] and str(spool) in resp.get_json()["error"]
    health = client.get("/health").get_json()
    assert health["status"] == "DEGRADED" and health["parts"]["spool"].startswith("failing (cannot write")
    assert b"clipseg_spool_write_failing 1.0" in client.get("/metrics").data
    spool.unlink()
    spool.mkdir()  # fixed: the next event is accepted and the spool part is healthy again
    assert client.post("/webhook", json=event).status_code == 201
    health = client.get("/health").get_json()
    assert health["parts"]["spool"] == "ok" and health["parts"]["redis"] == "up" and health["status"] == "UP"
    runtime.stop()


def test_outage_answers_503_with_the_reason_and_health_names_it(model_dir, tmp_path):
    client, runtime = _client(model_dir, tmp_path, DEAD_REDIS)
    resp = client.post("/webhook", json={"action": "START_TRAINING", "project": {"id": 1}})
    assert resp.status_code == 503 and "ConnectionError" in resp.get_json()["error"]
    health = client.get("/health").get_json()
    assert health["status"] == "DEGRADED" and health["parts"]["redis"].startswith("down (ConnectionError")
    assert any(d.startswith("redis: down") for d in health["degraded"])
    runtime.stop()


def test_health_reports_parts_of_a_live_serve(model_dir, tmp_path, redis_url):
    """What the supervisor of `clipseg serve` writes is reported; a file left by a dead serve is ignored."""
    client, runtime = _client(model_dir, tmp_path, redis_url)
    run = tmp_path / "run"
    run.mkdir()
    (run / "parts.json").write_text(json.dumps({"pid": os.getpid(), "parts": {"redis": "up",
                                                "worker": "restarting (exit -9)", "scheduler": "up"}}))
    health = client.get("/health").get_json()
    assert health["degraded"] == ["worker: restarting (exit -9)"] and health["parts"]["scheduler"] == "up"
    (run / "parts.json").write_text(json.dumps({"pid": 2**22 + 1, "parts": {"worker": "restarting"}}))
    assert "worker" not in client.get("/health").get_json()["parts"]
    runtime.stop()
