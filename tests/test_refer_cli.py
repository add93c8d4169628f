"""`clipseg train` + `clipseg eval` on refer-layout miniatures of refcoco+ (unc) and refcocog (umd, google), and the
one-line errors for wrong data paths (real subprocesses, tiny random model)."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from tests.test_refcoco import FILES, LAYOUTS, REFS, SIZES, write_refer

ROOT = Path(__file__).resolve().parents[1]


def _clipseg(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(ROOT)}
    return subprocess.run([sys.executable, "-m", "backend.cli", *args], cwd=cwd, env=env, capture_output=True,
                          text=True, timeout=600)


@pytest.fixture(scope="module")
def refer_root(tmp_path_factory) -> Path:
    """refcoco+(unc), refcocog(umd), refcocog(google) miniatures; COCO images in <root>/coco/train2014."""
    root = tmp_path_factory.mktemp("refer_cli")
    folder = root / "coco" / "train2014"
    folder.mkdir(parents=True)
    rng = np.random.default_rng(0)
    for i, (w, h) in SIZES.items():
        Image.fromarray(rng.integers(0, 255, (h, w, 3), dtype=np.uint8)).save(folder / FILES[i], quality=90)
    for dataset, split_by in (("refcoco+", "unc"), ("refcocog", "umd"), ("refcocog", "google")):
        write_refer(root / "refer", dataset, split_by)
    return root


@pytest.mark.slow
@pytest.mark.parametrize("dataset,split_by,eval_split", [("refcoco+", "unc", "testB"), ("refcocog", "umd", "test"),
                                                          ("refcocog", "google", "val")])
def test_train_and_eval_on_refer_layouts(refer_root, tmp_path, dataset, split_by, eval_split):
    data = ["--data", "refer", "--data-path", str(refer_root / "refer"), "--dataset", dataset, "--split-by", split_by,
            "--image-root", str(refer_root), "--threads", "1"]
    done = _clipseg("train", "--model-preset", "tiny-seed", "--init-random", *data, "--steps", "2", "--batch-size",
                    "2", "--out", "run", "--no-progress", cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    meta = json.loads((tmp_path / "run" / "last" / "clipseg_config.json").read_text())["metadata"]
    assert meta["dataset"] == f"{dataset}({split_by})" and meta["threads"] == 1

    done = _clipseg("eval", "--model", "run/last", *data, "--split", eval_split, "--out", "report", cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    metrics = json.loads((tmp_path / "report" / "metrics.json").read_text())
    assert metrics["run"]["threads"] == 1 and metrics["run"]["dataset"] == f"{dataset}({split_by})"
    rows = json.loads((tmp_path / "report" / "per_sample.json").read_text())["samples"]
    expected = [(ref, text) for ref, (_, _, texts) in REFS.items() if LAYOUTS[(dataset, split_by)][ref] == eval_split
                for text in texts]
    assert [(r["ref_id"], r["phrase"]) for r in rows] == expected and metrics["n"] == len(expected)
    assert all(isinstance(r["sent_id"], int) and "iou" in r for r in rows)
    assert len({r["sent_id"] for r in rows}) == len(rows)


def test_wrong_data_paths_are_one_line_errors(refer_root, tmp_path):
    base = ["train", "--model-preset", "tiny-seed", "--init-random", "--data", "refer", "--steps", "1", "--no-progress"]
    cases = {
        "image root": (["--data-path", str(refer_root / "refer"), "--dataset", "refcoco+", "--image-root",
                        str(tmp_path)], "not found under --image-root"),
        "data path": (["--data-path", str(tmp_path / "nowhere"), "--dataset", "refcocog"], "refs(umd).p does not exist"),
        "split scheme": (["--data-path", str(refer_root / "refer"), "--dataset", "refcoco+", "--split-by", "umd"],
                         "refcoco+ has no 'umd' split"),
    }
    for name, (extra, message) in cases.items():
        done = _clipseg(*base, *extra, "--out", f"run-{name.replace(' ', '-')}", cwd=tmp_path)
        assert done.returncode == 1, (name, done.stderr)
        assert message in done.stderr and "Traceback" not in done.stderr, (name, done.stderr)
        assert len([line for line in done.stderr.splitlines() if "error" in line]) == 1, (name, done.stderr)


def test_train_groups_an_images_phrases_with_phrases_per_image(refer_root, tmp_path):
    """--phrases-per-image 2 on refer data: the run trains on scene groups (the log says images) and records the
    setting in its recipe."""
    data = ["--data", "refer", "--data-path", str(refer_root / "refer"), "--dataset", "refcocog", "--split-by", "umd",
            "--image-root", str(refer_root), "--threads", "1"]
    done = _clipseg("train", "--model-preset", "tiny-pixel", "--init-random", *data, "--phrases-per-image", "2",
                    "--steps", "2", "--batch-size", "2", "--align-weight", "1", "--out", "run", "--no-progress",
                    cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    assert "images (scene groups)" in done.stderr
    meta = json.loads((tmp_path / "run" / "last" / "clipseg_config.json").read_text())["metadata"]
    assert meta["train_config"]["phrases_per_image"] == 2
