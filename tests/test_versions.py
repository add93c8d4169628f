"""VersionRegistry with a real Redis: records, the active pointer and its pub/sub event, artifacts, rollback."""
from __future__ import annotations

import json
import shutil
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from clipseg_model.checkpoint import save_checkpoint
from clipseg_model.loading import load_model
from clipseg_model.predictor import Segmenter
from finetune.versions import UnknownVersionError, VersionRecord, VersionRegistry


def _probability(model_dir: str) -> np.ndarray:
    image = Image.fromarray(np.tile(np.arange(64, dtype=np.uint8)[:, None, None] * 4, (1, 64, 3)))
    (pred,) = Segmenter(load_model(model_dir, "cpu"), feature_cache_bytes=0).predict(image, ["the red circle"])
    return pred.probability


def test_record_activate_publish_and_rollback(redis_conn):
    registry = VersionRegistry(redis_conn)
    assert registry.active() is None and registry.list() == []
    pubsub = redis_conn.pubsub(ignore_subscribe_messages=True)
    pubsub.subscribe(registry.channel)
    pubsub.get_message(timeout=1.0)  # the subscribe confirmation
    assert registry.record_base("base-v", "CIDAS/clipseg-rd64-refined")
    assert not registry.record_base("base-v", "elsewhere")  # recorded once
    registry.record(VersionRecord("v1", "/nowhere/v1", "base-v", created=time.time() + 1, metrics={"base_miou": 0.5}))
    registry.record(VersionRecord("v2", "/nowhere/v2", "v1", created=time.time() + 2))
    assert [r.version for r in registry.list()] == ["base-v", "v1", "v2"]
    assert registry.get("base-v").status == "base" and registry.get("v1").metrics == {"base_miou": 0.5}

    registry.activate("v1", "promoted", "better")
    assert registry.active() == ("v1", "/nowhere/v1") and registry.get("v1").status == "promoted"
    message = pubsub.get_message(timeout=2.0)
    assert json.loads(message["data"]) == {"event": "activated", "version": "v1", "path": "/nowhere/v1"}
    assert registry.set_status("v2", "rejected").status == "rejected" and registry.active()[0] == "v1"

    registry.rollback("base-v")
    assert registry.active() == ("base-v", "CIDAS/clipseg-rd64-refined")
    assert registry.get("base-v").status == "base" and "rollback" in registry.get("base-v").reason
    assert json.loads(pubsub.get_message(timeout=2.0)["data"])["version"] == "base-v"
    # a base model is loaded from MODEL (a hub id here), never from an artifact
    assert registry.materialize("base-v", "/nonexistent") == "CIDAS/clipseg-rd64-refined"
    with pytest.raises(UnknownVersionError):
        registry.rollback("v9")
    pubsub.close()


def test_artifact_materializes_elsewhere_and_loads_identically(redis_conn, tiny_model_factory, tmp_path):
    """A checkpoint written on a 'worker' reaches a 'server' with another DATA_DIR through Redis alone."""
    base = tiny_model_factory("tiny-seed")
    model = load_model(str(base), "cpu")
    with torch.no_grad():
        for p in model.trainable_parameters():
            p.add_(0.05)  # a candidate that differs from its parent
    worker_dir = save_checkpoint(model, tmp_path / "worker" / "models" / "v1", {"version": "v1"})
    registry = VersionRegistry(redis_conn)
    registry.record(VersionRecord("v1", str(worker_dir), "init"))
    stored = registry.store_artifact("v1", worker_dir)
    assert stored == sum(p.stat().st_size for p in worker_dir.iterdir() if p.is_file())
    expected = _probability(str(worker_dir))

    # on this machine the recorded path is used as is
    assert registry.materialize("v1", tmp_path / "server" / "models") == str(worker_dir)
    moved = shutil.move(str(worker_dir), str(tmp_path / "gone"))  # the 'server' cannot see the worker's disk
    local = registry.materialize("v1", tmp_path / "server" / "models")
    assert local == str(tmp_path / "server" / "models" / "v1")
    assert sorted(p.name for p in (tmp_path / "server" / "models" / "v1").iterdir()) == sorted(
        p.name for p in Path(moved).iterdir() if p.is_file())
    assert not list((tmp_path / "server" / "models").glob(".*tmp*"))  # written atomically, no temp dir left
    assert registry.materialize("v1", tmp_path / "server" / "models") == local  # second call: already there
    np.testing.assert_array_equal(_probability(local), expected)
    assert not np.allclose(_probability(str(base)), expected)

    registry.record(VersionRecord("v2", str(tmp_path / "missing"), "v1"))
    with pytest.raises(UnknownVersionError, match="Redis has no copy"):
        registry.materialize("v2", tmp_path / "server" / "models")
