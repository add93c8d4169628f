"""`clipseg model init` + `clipseg predict` as a user runs them (subprocesses), and the offline vocabulary."""
from __future__ import annotations

import gzip
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
from PIL import Image

from clipseg_model.vocab import byte_level_tokenizer, bytes_to_unicode, tokenizer_from_bpe

ROOT = Path(__file__).resolve().parents[1]


def clipseg(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    return subprocess.run([sys.executable, "-m", "backend.cli", *args], cwd=cwd, env={**env, "PYTHONPATH": str(ROOT)},
                          capture_output=True, text=True, timeout=300)


def test_model_init_then_predict(tmp_path):
    done = clipseg("model", "init", "--preset", "tiny-clipseg", "--out", str(tmp_path / "m"), cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    assert (tmp_path / "m" / "clipseg_config.json").is_file() and (tmp_path / "m" / "base" / "tokenizer.json").is_file()
    Image.new("RGB", (64, 48), "green").save(tmp_path / "photo.jpg")
    done = clipseg("predict", "photo.jpg", "the red circle", "left square", "--model", "m", "--out", "out", cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    masks = sorted((tmp_path / "out").glob("mask_*.png"))
    assert [m.name for m in masks] == ["mask_00_the-red-circle.png", "mask_01_left-square.png"]
    assert all(Image.open(m).size == (64, 48) for m in masks)
    assert Image.open(tmp_path / "out" / "overlay.png").size == (64, 48)
    assert "score" in done.stdout


def test_init_refuses_existing_dir_and_predict_reports_missing_model(tmp_path):
    (tmp_path / "m").mkdir()
    done = clipseg("model", "init", "--preset", "tiny-seed", "--out", "m", cwd=tmp_path)
    assert done.returncode == 1 and "already exists" in done.stderr
    Image.new("RGB", (8, 8)).save(tmp_path / "x.png")
    done = clipseg("predict", "x.png", "a", "--model", "CIDAS/clipseg-rd64-refined", cwd=tmp_path)
    assert done.returncode == 1
    assert "Traceback" not in done.stderr and "not available" in done.stderr and "CIDAS/clipseg-rd64-refined" in done.stderr


def test_unknown_command_shows_help(tmp_path):
    done = clipseg("frobnicate", cwd=tmp_path)
    assert done.returncode == 2 and "COMMAND" in done.stderr + done.stdout


def test_tokenizer_from_openai_bpe_file(tmp_path):
    """The derivation used for the real vocabulary, on a file in the same format with a handful of merges."""
    merges = ["t h", "th e</w>", "r e", "re d</w>", "c i", "ci r"]
    path = tmp_path / "bpe_simple_vocab_16e6.txt.gz"
    with gzip.open(path, "wt", encoding="utf-8") as fh:
        fh.write("\n".join(["#version: 0.2", *merges, "never used"]) + "\n")
    tok = tokenizer_from_bpe(path, n_merges=len(merges))
    assert len(tok) == 512 + len(merges) + 2
    ids = tok("the red")["input_ids"]
    vocab = tok.get_vocab()
    assert ids == [vocab["<|startoftext|>"], vocab["the</w>"], vocab["red</w>"], vocab["<|endoftext|>"]]


def test_byte_level_tokenizer_handles_any_text():
    tok = byte_level_tokenizer()
    assert len(tok) == 514 and len(bytes_to_unicode()) == 256
    ids = tok("Katze 🐱")["input_ids"]
    assert ids[0] == tok.bos_token_id and ids[-1] == tok.eos_token_id and len(ids) > 8
    assert np.all(np.array(ids) < 514)


def test_predict_with_an_exemplar(tmp_path):
    """`clipseg predict IMAGE --exemplar EXAMPLE MASK`: a mask from the example alone, then mixed with a phrase;
    a missing prompt and an empty example mask are refused with a message."""
    done = clipseg("model", "init", "--preset", "tiny-seed", "--out", str(tmp_path / "m"), cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    Image.new("RGB", (64, 48), "green").save(tmp_path / "photo.png")
    mask = np.zeros((48, 64), dtype=np.uint8)
    mask[10:30, 20:40] = 255
    Image.fromarray(mask, "L").save(tmp_path / "example_mask.png")
    done = clipseg("predict", "photo.png", "--exemplar", "photo.png", "example_mask.png", "--model", "m",
                   "--out", "out", cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    assert [m.name for m in sorted((tmp_path / "out").glob("mask_*.png"))] == ["mask_00_exemplar.png"]
    assert Image.open(tmp_path / "out" / "mask_00_exemplar.png").size == (64, 48)
    done = clipseg("predict", "photo.png", "green thing", "--exemplar", "photo.png", "example_mask.png",
                   "--visual-weight", "0.3", "--model", "m", "--out", "mixed", cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    assert [m.name for m in sorted((tmp_path / "mixed").glob("mask_*.png"))] == ["mask_00_green-thing.png"]
    assert clipseg("predict", "photo.png", "--model", "m", cwd=tmp_path).returncode != 0
    Image.fromarray(np.zeros((48, 64), dtype=np.uint8), "L").save(tmp_path / "empty.png")
    done = clipseg("predict", "photo.png", "--exemplar", "photo.png", "empty.png", "--model", "m", cwd=tmp_path)
    assert done.returncode != 0 and "non-empty" in done.stderr
