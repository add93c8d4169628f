"""VersionRegistry with a real Redis: records, per-project pointers and their pub/sub events, the default, rollback,
artifacts, checksums, and the migration of the previous release's single pointer."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from clipseg_model.checkpoint import file_sha256, read_trainable_state, save_checkpoint, verify_checksum
from clipseg_model.errors import CheckpointMismatchError
from clipseg_model.loading import load_model
from clipseg_model.predictor import Segmenter
from finetune.versions import UnknownVersionError, VersionRecord, VersionRegistry, WrongProjectError


def _probability(model_dir: str) -> np.ndarray:
    image = Image.fromarray(np.tile(np.arange(64, dtype=np.uint8)[:, None, None] * 4, (1, 64, 3)))
    (pred,) = Segmenter(load_model(model_dir, "cpu"), feature_cache_bytes=0).predict(image, ["the red circle"])
    return pred.probability


def test_record_activate_publish_and_rollback_per_project(redis_conn, redis_url):
    registry = VersionRegistry(redis_conn)
    assert registry.active() is None and registry.active("1") is None and registry.list() == []
    pubsub = redis_conn.pubsub(ignore_subscribe_messages=True)
    pubsub.subscribe(registry.channel)
    pubsub.get_message(timeout=1.0)  # the subscribe confirmation
    assert registry.record_base("base-v", "CIDAS/clipseg-rd64-refined")
    assert not registry.record_base("base-v", "elsewhere")  # recorded once
    registry.record(VersionRecord("a1", "/nowhere/a1", "base-v", created=time.time() + 1, metrics={"base_miou": 0.5},
                                  project="A"))
    registry.record(VersionRecord("a2", "/nowhere/a2", "a1", created=time.time() + 2, project="A"))
    registry.record(VersionRecord("b1", "/nowhere/b1", "base-v", created=time.time() + 3, project="B"))
    assert [r.version for r in registry.list()] == ["base-v", "a1", "a2", "b1"]
    assert [r.version for r in registry.list("A")] == ["base-v", "a1", "a2"]  # A's lineage: its own and the base
    assert [r.version for r in registry.list("B")] == ["base-v", "b1"]
    assert registry.get("base-v").status == "base" and registry.get("a1").metrics == {"base_miou": 0.5}
    assert registry.projects() == ["A", "B"]

    registry.activate("a1", "promoted", "better", project="A")
    assert registry.active("A") == ("a1", "/nowhere/a1") and registry.get("a1").status == "promoted"
    assert registry.active("B") is None and registry.active() is None  # B and the default: the base model
    message = pubsub.get_message(timeout=2.0)
    assert json.loads(message["data"]) == {"event": "activated", "project": "A", "version": "a1", "path": "/nowhere/a1"}
    assert registry.set_status("a2", "rejected").status == "rejected" and registry.active("A")[0] == "a1"
    with pytest.raises(WrongProjectError):  # one project's version is never served to another through activate
        registry.activate("a1", project="B")

    registry.activate("b1", project="B")
    registry.rollback("base-v", project="A")
    assert registry.active("A") == ("base-v", "CIDAS/clipseg-rd64-refined") and registry.active("B")[0] == "b1"
    assert registry.get("base-v").status == "base" and "rollback" in registry.get("base-v").reason
    assert [json.loads(pubsub.get_message(timeout=2.0)["data"])["version"] for _ in range(2)] == ["b1", "base-v"]
    registry.rollback("a1")  # without --project: the project it was trained on
    assert registry.active("A")[0] == "a1" and registry.own_active("B")[0] == "b1"

    # the default serves projects without a version of their own; a project's own pointer wins
    registry.set_default("b1")
    assert registry.active() == registry.active("C") == ("b1", "/nowhere/b1") and registry.own_active("C") is None
    assert registry.active("A")[0] == "a1"
    default, pointers = registry.pointers()
    assert default[0] == "b1" and {p: v for p, (v, _) in pointers.items()} == {"A": "a1", "B": "b1"}

    # the same through the CLI, as operators type it
    env = {**os.environ, "REDIS_URL": redis_url, "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    cli = [sys.executable, "-m", "backend.cli"]
    out = subprocess.run([*cli, "versions", "--set-default", "a1"], env=env, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0 and "a1 is now served to projects without" in out.stdout, out.stderr[-2000:]
    assert registry.active("C")[0] == "a1" and registry.active("B")[0] == "b1"
    listing = json.loads(subprocess.run([*cli, "versions", "--json"], env=env, capture_output=True, text=True,
                                        timeout=120).stdout)
    assert listing["default"] == "a1" and listing["projects"] == {"A": "a1", "B": "b1"}
    registry.set_default("b1")

    # a base model is loaded from MODEL (a hub id here), never from an artifact
    assert registry.materialize("base-v", "/nonexistent") == "CIDAS/clipseg-rd64-refined"
    with pytest.raises(UnknownVersionError):
        registry.rollback("v9", project="A")
    # broken marks are kept with the record, and cleared when it is activated again
    registry.mark_broken("a1", "damaged")
    assert registry.get("a1").broken == "damaged" and [r.version for r in registry.lineage("a2")] == ["a2", "a1", "base-v"]
    registry.rollback("a1", project="A")
    assert registry.get("a1").broken == ""
    pubsub.close()


def test_single_lineage_data_of_the_previous_release_becomes_its_projects_lineage(redis_conn):
    """Keys exactly as the previous release wrote them (`ns:active` + records with `project`): after the upgrade the
    active version belongs to the project it was trained on, other projects get the base, and no version is lost."""
    old = {
        "init-0": {"version": "init-0", "path": "/m/base", "parent": None, "created": 1.0, "status": "base",
                   "reason": "the configured base model (MODEL)", "metrics": {}, "samples": {}, "project": None},
        "p7-1": {"version": "p7-1", "path": "/m/p7-1", "parent": "init-0", "created": 2.0, "status": "promoted",
                 "reason": "better", "metrics": {"corrections_miou": 0.4}, "samples": {"corrections": 6}, "project": "7"},
        "p9-1": {"version": "p9-1", "path": "/m/p9-1", "parent": "p7-1", "created": 3.0, "status": "rejected",
                 "reason": "not better", "metrics": {}, "samples": {}, "project": "9"},
        "p7-2": {"version": "p7-2", "path": "/m/p7-2", "parent": "p7-1", "created": 4.0, "status": "promoted",
                 "reason": "better", "metrics": {}, "samples": {}, "project": "7"},
    }
    for version, rec in old.items():
        redis_conn.hset("clipseg:versions", version, json.dumps(rec))
        redis_conn.zadd("clipseg:versions:order", {version: rec["created"]})
        redis_conn.hset(f"clipseg:artifact:{version}", "trainable.safetensors", b"x")
    redis_conn.set("clipseg:active", json.dumps({"version": "p7-2", "path": "/m/p7-2"}))

    registry = VersionRegistry(redis_conn)
    assert registry.active("7") == ("p7-2", "/m/p7-2")  # the first read migrates
    assert registry.active("9") is None and registry.active() is None  # project 9 and new projects: the base
    assert redis_conn.get("clipseg:active") is None
    assert json.loads(redis_conn.get("clipseg:active:legacy"))["version"] == "p7-2"  # kept for the record
    assert [r.version for r in registry.list()] == list(old)  # no version lost
    assert [r.version for r in registry.list("7")] == ["init-0", "p7-1", "p7-2"]
    assert [r.version for r in registry.list("9")] == ["init-0", "p9-1"]
    assert registry.get("p7-1").metrics == {"corrections_miou": 0.4} and registry.get("p7-1").checksum == ""
    assert all(redis_conn.exists(f"clipseg:artifact:{v}") for v in old)
    assert registry.migrate_legacy() is None  # idempotent
    registry.rollback("p7-1", project="7")
    assert registry.active("7")[0] == "p7-1" and registry.active("9") is None

    # a release that had rolled back to the base model: that base becomes the default of every project
    redis_conn.delete("clipseg:active:project", "clipseg:default")
    redis_conn.set("clipseg:active", json.dumps({"version": "init-0", "path": "/m/base"}))
    assert VersionRegistry(redis_conn).migrate_legacy() == "default"
    assert registry.active("7") == registry.active("9") == ("init-0", "/m/base")


def test_checksum_is_recorded_and_damage_is_refused(redis_conn, tiny_model_factory, tmp_path):
    """A truncated weights file and one with a tensor's bytes overwritten (header intact: safetensors cannot tell)
    are both refused by the checksum recorded in the checkpoint and with the version."""
    model = load_model(str(tiny_model_factory("tiny-seed")), "cpu")
    path = save_checkpoint(model, tmp_path / "v1", {"version": "v1"})
    registry = VersionRegistry(redis_conn)
    registry.record(VersionRecord("v1", str(path), project="1"))
    checksum = registry.get("v1").checksum
    assert checksum == file_sha256(path / "trainable.safetensors") == verify_checksum(path)
    assert read_trainable_state(model, path, checksum).version == "v1"

    weights = path / "trainable.safetensors"
    good = weights.read_bytes()
    header = 8 + int.from_bytes(good[:8], "little")
    weights.write_bytes(good[:header] + bytes(b ^ 0xFF for b in good[header:header + 64]) + good[header + 64:])  # one tensor's bytes overwritten
    with pytest.raises(CheckpointMismatchError, match="damaged"):
        load_model(str(path), "cpu")
    weights.write_bytes(good[: len(good) // 3])  # truncated
    with pytest.raises(CheckpointMismatchError, match="damaged"):
        read_trainable_state(model, path, checksum)
    weights.write_bytes(good)
    config = json.loads((path / "clipseg_config.json").read_text())
    config["metadata"].pop("weights_sha256")  # the checkpoint's own record gone: the version's record still checks
    (path / "clipseg_config.json").write_text(json.dumps(config))
    weights.write_bytes(good[:header] + bytes(b ^ 0xFF for b in good[header:header + 64]) + good[header + 64:])
    with pytest.raises(CheckpointMismatchError, match="damaged"):
        read_trainable_state(model, path, checksum)


def test_version_names_come_from_checkpoint_metadata_not_folders(tiny_model_factory, tmp_path):
    model = load_model(str(tiny_model_factory("tiny-seed")), "cpu")
    assert load_model(str(save_checkpoint(model, tmp_path / "runs" / "x" / "last", {"version": "x", "step": 40})),
                      "cpu").version == "x"
    unnamed = load_model(str(save_checkpoint(model, tmp_path / "runs" / "y" / "last", {})), "cpu")
    assert unnamed.version.startswith("film-decoder-") and "last" not in unnamed.version


def test_artifact_materializes_elsewhere_and_loads_identically(redis_conn, tiny_model_factory, tmp_path):
    """A checkpoint written on a 'worker' reaches a 'server' with another DATA_DIR through Redis alone."""
    base = tiny_model_factory("tiny-seed")
    model = load_model(str(base), "cpu")
    with torch.no_grad():
        for p in model.trainable_parameters():
            p.add_(0.05)  # a candidate that differs from its parent
    worker_dir = save_checkpoint(model, tmp_path / "worker" / "models" / "v1", {"version": "v1"})
    registry = VersionRegistry(redis_conn)
    registry.record(VersionRecord("v1", str(worker_dir), "init", project="1"))
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


def test_activations_are_heard_only_in_their_own_database(redis_url):
    """Redis pub/sub ignores the database number: two deployments on one Redis server (databases 13 and 12 here)
    used to hear each other's activations on `clipseg:events` (seen: a browser test's backend set another session's
    project version in its own Label Studio)."""
    import redis

    base = redis_url.rsplit("/", 1)[0]
    mine, other = (redis.Redis.from_url(f"{base}/{db}") for db in (8, 7))
    for conn in (mine, other):
        conn.flushdb()
    try:
        here, there = VersionRegistry(mine), VersionRegistry(other)
        assert here.channel != there.channel and VersionRegistry(redis.Redis.from_url(f"{base}/0")).channel == "clipseg:events"
        pubsub = mine.pubsub(ignore_subscribe_messages=True)
        pubsub.subscribe(here.channel)
        pubsub.get_message(timeout=1.0)
        there.record(VersionRecord("x1", "/nowhere/x1", None, created=time.time(), project="P"))
        there.activate("x1", project="P")
        assert pubsub.get_message(timeout=1.0) is None  # the other database's activation is not heard here
        here.record(VersionRecord("y1", "/nowhere/y1", None, created=time.time(), project="P"))
        here.activate("y1", project="P")
        assert json.loads(pubsub.get_message(timeout=2.0)["data"])["version"] == "y1"
    finally:
        for conn in (mine, other):
            conn.flushdb()
