"""Replay sources of the fine-tune (finetune.replay) on generated miniatures, offline: local RefCOCO in the three
formats, the subset `clipseg data fetch-replay` stores, generated shapes, self-distillation; and the real job
recording which source it used."""
from __future__ import annotations

import io
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from clipseg_model.feature_cache import FrozenInputs
from clipseg_model.image_io import image_digest
from clipseg_model.loading import load_model
from finetune.replay import (
    SOFT_TARGET, ReplaySource, choose_source, dataset_replay, distillation_replay, held_out, refcoco_format, shapes_replay,
)
from finetune.jobs import training_target
from finetune.spec import FinetuneSpec
from tests.test_refcoco import coco_images, jxu124_dir, lmms_dir, refer_root  # noqa: F401 - fixtures

ROOT = Path(__file__).resolve().parents[1]


def test_local_refcoco_in_each_format(refer_root, jxu124_dir, lmms_dir, coco_images, tmp_path):  # noqa: F811
    # jxu124 rows name images as coco/train2014/...: a user's folder holds both
    jxu = tmp_path / "jxu"
    jxu.mkdir()
    (jxu / "data").symlink_to(jxu124_dir / "data")
    (jxu / "coco").symlink_to(coco_images / "coco")
    cache = str(tmp_path / "hf")
    for path, kind in [(refer_root, "refer"), (jxu, "jxu124"), (lmms_dir, "lmms")]:
        assert refcoco_format(path)[0] == kind
        source = choose_source(FinetuneSpec("1", refcoco_dir=str(path)), tmp_path / "data")
        assert source == ReplaySource("refcoco", str(path), kind)
        replay, val = dataset_replay(source, n_replay=5, seed=0, cache_dir=cache)
        if kind == "lmms":  # one split, divided stably: two sentences of ann 11
            assert sorted(s.phrase for s in replay + val) == ["left box", "the small square"]
        else:  # replay from train, base score on val
            assert [s.phrase for s in replay] == ["train sentence"]
            assert [s.phrase for s in val] == ["left box", "the small square", "two parts thing"]
        assert all(s.mask.any() for s in replay + val)
    with pytest.raises(ValueError, match="no RefCOCO"):
        refcoco_format(tmp_path)


def test_fetch_replay_command_stores_a_subset_the_job_then_replays(lmms_dir, tmp_path):  # noqa: F811
    """`clipseg data fetch-replay` from a folder in lmms-lab/RefCOCO's exact layout (no network)."""
    data = tmp_path / "data"
    spec = FinetuneSpec("1")
    assert choose_source(spec, data).kind == "distill"  # nothing fetched, no RefCOCO, no REPLAY_SHAPES
    env = {**os.environ, "PYTHONPATH": str(ROOT), "DATA_DIR": str(data), "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}
    proc = subprocess.run([sys.executable, "-m", "backend.cli", "data", "fetch-replay", "--source", str(lmms_dir),
                           "--split", "testB", "--rows", "5"], env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "the fetched RefCOCO subset" in proc.stdout
    stored = data / "replay" / "refcoco-lmms"
    assert json.loads((stored / "source.json").read_text())["rows"] == 1
    source = choose_source(spec, data)
    assert source.kind == "fetched"
    replay, val = dataset_replay(source, 4, 0, cache_dir=str(tmp_path / "hf"))
    got = replay + val
    assert sorted(s.phrase for s in got) == ["compressed one", "second"] and got[0].mask.sum() == 60
    # an explicit choice wins over what is there
    assert choose_source(spec.replace(replay="distill"), data).kind == "distill"


def test_shapes_only_when_asked_for(tmp_path):
    options = json.dumps({"image_size": 48, "kinds": ["color"], "exclude_words": ["green"]})
    assert choose_source(FinetuneSpec("1", replay_shapes=options), tmp_path).kind == "shapes"
    replay, val = shapes_replay(options, 7, seed=1)
    assert len(replay) == 7 and len(val) == 48
    assert all("green" not in s.phrase for s in replay + val) and replay[0].image.size == (48, 48)


def test_self_distillation_targets_are_the_parents_predictions(tiny_model_factory):
    parent = load_model(tiny_model_factory("tiny-clipseg"), "cpu").eval()
    rng = np.random.default_rng(0)
    images = [Image.fromarray(rng.integers(0, 255, (40, 56, 3), dtype=np.uint8)) for _ in range(12)]
    frozen = FrozenInputs(parent)

    def soft(ims, phrases):
        with torch.no_grad():
            return torch.sigmoid(frozen.logits(ims, phrases, parent))

    replay, val = distillation_replay(images, ["a cat"], ["a cat", "a dog", "the sky"], soft, 10, 0, image_digest)
    assert len(replay) == 10 and val
    assert {s.phrase for s in replay + val} <= {"a dog", "the sky"}  # the corrected phrase is what corrections teach
    val_images = {image_digest(s.image) for s in val}
    assert all(held_out(d) for d in val_images) or len(val_images) == 1
    assert not val_images & {image_digest(s.image) for s in replay}  # forgetting is measured on unseen images
    s = replay[0]
    with torch.no_grad():
        want = torch.sigmoid(parent(parent.preprocess([s.image]), [s.phrase]))[0].numpy()
    soft = s.meta[SOFT_TARGET]
    assert soft.dtype == np.float32 and soft.shape == want.shape
    np.testing.assert_allclose(soft, want, atol=1e-4)
    assert s.mask.shape == (40, 56) and s.mask.dtype == bool  # what the base score is measured against
    np.testing.assert_allclose(training_target(s, 64).numpy(), want, atol=1e-4)  # what training fits


def test_job_records_its_replay_source_and_evidence(redis_conn, redis_url, tiny_model_factory, tmp_path):
    """The real job, inline: self-distillation replay by default; the record says so, with the gate's evidence and
    the calibrated threshold, and the checkpoint carries the threshold the server will use."""
    from finetune.corrections import CorrectionStore, Region
    from finetune.jobs import finetune_project
    from finetune.worker import WorkerContext
    from finetune.versions import VersionRegistry
    from tests.fixtures.webhooks import scene

    store = CorrectionStore(redis_conn)
    for i in range(12):
        jpeg, mask = scene(96, 64, seed=i)
        store.put_annotation(3, i + 1, 500 + i, [Region("cat", mask, "cat")], jpeg)
    WorkerContext.install(tmp_path / "data", "cpu")
    spec = FinetuneSpec("3", base_model=str(tiny_model_factory("tiny-clipseg")), steps=20, lr=3e-3, min_evidence=3,
                        min_base_evidence=3, threshold_min_samples=3, promote_epsilon=1.0)
    summary = finetune_project("3", spec.to_dict(), redis_url=redis_url)
    rec = VersionRegistry(redis_conn).get(summary["version"])
    assert rec.metrics["replay_source"] == "distill" and summary["replay_source"] == "distill"
    assert rec.samples["replay"] == rec.samples["corrections"] > 0
    ev = rec.metrics["evidence"]
    assert ev["n"] == rec.samples["held_out"] >= 3 and ev["min_n"] == 3
    assert rec.status in ("promoted", "rejected") and summary["status"] == rec.status
    assert 0.1 <= rec.metrics["threshold"] <= 0.9
    assert load_model(rec.path, "cpu").calibrated_threshold == rec.metrics["threshold"]
    # the features of the project's images are on disk for the next fine-tune
    assert list((tmp_path / "data" / "features").glob("*/*.safetensors"))


def test_serve_says_at_start_which_replay_a_fine_tune_uses(tmp_path, caplog):
    from backend.cli.serve import _log_replay_source
    from backend.settings import Settings

    with caplog.at_level("INFO", logger="clipseg.serve"):
        _log_replay_source(Settings.from_env({"DATA_DIR": str(tmp_path)}))
    assert "self-distillation" in caplog.text and "clipseg data fetch-replay" in caplog.text
    caplog.clear()
    (tmp_path / "replay" / "refcoco-lmms" / "data").mkdir(parents=True)
    with caplog.at_level("INFO", logger="clipseg.serve"):
        _log_replay_source(Settings.from_env({"DATA_DIR": str(tmp_path)}))
    assert "the fetched RefCOCO subset" in caplog.text and "fetch-replay" not in caplog.text
