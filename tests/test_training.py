"""The training core (finetune.training) and the `clipseg train` / `clipseg eval` commands, on tiny models (CPU)."""
from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

from clipseg_model.config import ModelConfig
from clipseg_model.loading import load_model
from clipseg_model.segmenter_base import SegmentationModel
from finetune.samples import ReferringSample, SampleList
from finetune.shapes import ShapesDataset
from finetune.batching import Augmented, collate, mirror_phrase, resize_mask
from finetune.evaluation import evaluate
from finetune.recipe import TRAIN_PRESETS, TrainConfig, lr_factor
from finetune.training import train
from tests.e2e.ls_harness import free_port

ROOT = Path(__file__).resolve().parents[1]


def _samples(n: int, seed: int = 0, size: int = 64) -> SampleList:
    ds = ShapesDataset(n, seed=seed, image_size=size)
    return SampleList([ds[i] for i in range(n)])


def _snapshot(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


# ---- batching ------------------------------------------------------------------------------------------------


def test_collate_shapes_and_mask_resizing(tiny_model_factory):
    model = load_model(tiny_model_factory("tiny-improved"), "cpu")  # input 96, output 96
    data = _samples(3, size=64)
    batch = collate([data[i] for i in range(3)], model)
    assert batch.pixel_values.shape == (3, 3, 96, 96) and batch.pixel_values.dtype == torch.float32
    assert batch.masks.shape == (3, 96, 96) and batch.masks.dtype == torch.float32
    assert batch.phrases == [data[i].phrase for i in range(3)]
    # The resized mask keeps the object's area fraction.
    assert abs(batch.masks[0].mean().item() - data[0].mask.mean()) < 0.01
    # Shrinking averages areas: a one-pixel line survives as a soft value instead of vanishing.
    line = np.zeros((64, 64), bool)
    line[:, 5] = True
    small = resize_mask(line, 16)
    assert small.shape == (16, 16) and small.sum().item() == pytest.approx(16 * 0.25)


def test_collate_scene_groups_encode_each_image_once(tiny_model_factory):
    """Items that are scene groups (several phrases of one image) become one image row each, a mask and phrase per
    phrase, and the image_index that maps phrases to images; plain samples keep image_index None."""
    model = load_model(tiny_model_factory("tiny-pixel"), "cpu")
    groups = ShapesDataset(3, seed=4, image_size=64, phrases_per_scene=2)
    items = [groups[i] for i in range(3)]
    assert all(isinstance(item, list) and len(item) == 2 for item in items)
    batch = collate(items + [_samples(1)[0]], model)
    assert batch.pixel_values.shape == (4, 3, 64, 64) and batch.masks.shape == (7, 64, 64)
    assert batch.image_index.tolist() == [0, 0, 1, 1, 2, 2, 3]
    assert batch.phrases[:2] == [s.phrase for s in items[0]] and len(batch) == 7
    assert collate([_samples(2)[i] for i in range(2)], model).image_index is None
    with pytest.raises(ValueError, match="holds no samples"):
        collate([[]], model)


def test_augmented_flips_a_scene_group_as_one_image():
    """One flip decision per item: every phrase of a group is mirrored with its image, or none is."""
    groups = ShapesDataset(30, seed=3, image_size=32, phrases_per_scene=2,
                           kinds=("position",), min_objects=3)
    plain = [groups[i] for i in range(30)]
    augmented = [Augmented(groups, 0.5, seed=1, epoch=0)[i] for i in range(30)]
    flipped = 0
    for before, after in zip(plain, augmented):
        states = [np.array_equal(b.mask[:, ::-1], a.mask) and not np.array_equal(b.mask, a.mask)
                  for b, a in zip(before, after)]
        assert len(set(states)) == 1, "a group was flipped only in part"
        assert after[0].image is after[1].image or np.array_equal(np.asarray(after[0].image), np.asarray(after[1].image))
        if states[0]:
            flipped += 1
            assert [a.phrase for a in after] == [mirror_phrase(b.phrase) for b in before]
    assert 5 < flipped < 25


def test_train_on_scene_groups(tiny_model_factory, tmp_path):
    """A training set of scene groups trains (phrases per step = the groups' phrases) with the alignment loss."""
    model = load_model(tiny_model_factory("tiny-pixel"), "cpu")
    data = ShapesDataset(8, seed=5, image_size=64, phrases_per_scene=2)
    cfg = TrainConfig(optimizer="adam", lr=3e-3, batch_size=4, steps=4, align_weight=1.0, log_every=1)
    result = train(model, data, _samples(4), cfg, tmp_path / "run", progress=False)
    assert result.steps == 4 and all(math.isfinite(x) for _, x in result.loss_history)
    assert 0.0 <= result.last_metrics["miou"] <= 1.0 and result.last_metrics["n"] == 4


def test_flip_swaps_left_and_right_in_the_phrase():
    for phrase in ("the leftmost circle", "man on the Right", "rightmost"):
        assert mirror_phrase(phrase) != phrase
    for phrase in ("the red circle", "the topmost square", "the bright star"):
        assert mirror_phrase(phrase) == phrase
    assert mirror_phrase("the leftmost circle") == "the rightmost circle"
    assert mirror_phrase("man on the Right, second from left") == "man on the Left, second from right"
    assert mirror_phrase("LEFT guy in the right-hand seat") == "RIGHT guy in the left-hand seat"
    assert mirror_phrase("the bright upright star") == "the bright upright star"


def test_augmented_flip_mirrors_image_mask_and_direction_words():
    mask = np.zeros((8, 8), bool)
    mask[2:4, 0:2] = True  # on the left
    image = Image.fromarray(np.where(mask[..., None], 255, 0).astype(np.uint8).repeat(3, -1))
    data = [ReferringSample(image, "the shape on the left", mask, "test", {})] * 40
    flipped = [s for s in (Augmented(data, 0.5, seed=0, epoch=0)[i] for i in range(40)) if s.mask[2, 7]]
    assert 5 < len(flipped) < 35  # about half of them
    for s in flipped:
        assert s.phrase == "the shape on the right" and not s.mask[2, 0]
        assert np.asarray(s.image)[2, 7, 0] == 255 and np.asarray(s.image)[2, 0, 0] == 0


def test_learning_rate_schedules():
    cfg = TRAIN_PRESETS["improved"].replace(warmup_fraction=0.1, min_lr_ratio=0.0)
    factors = [lr_factor(s, 100, cfg) for s in range(100)]
    assert factors[0] == pytest.approx(0.1) and factors[9] == pytest.approx(1.0)
    assert all(a >= b for a, b in zip(factors[10:], factors[11:])) and factors[-1] < 0.01
    assert all(lr_factor(s, 100, TRAIN_PRESETS["seed"]) == 1.0 for s in range(100))
    assert TRAIN_PRESETS["seed"].optimizer == "adam" and TRAIN_PRESETS["seed"].lr == 1e-3 and TRAIN_PRESETS["seed"].dice_weight == 0
    assert TRAIN_PRESETS["improved"].optimizer == "adamw" and TRAIN_PRESETS["improved"].dice_weight == 1.0


# ---- training ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("preset", ["tiny-improved", "tiny-pixel", "tiny-clipseg"])
def test_overfits_a_fixed_batch_and_changes_only_trainable_weights(tiny_model_factory, tmp_path, preset):
    model = load_model(tiny_model_factory(preset), "cpu")
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    before = _snapshot(model)
    data = _samples(4)
    cfg = TrainConfig(optimizer="adam", lr=3e-3, batch_size=4, steps=25, dice_weight=1.0, log_every=5)
    result = train(model, data, None, cfg, tmp_path / "run", progress=False)
    losses = [loss for _, loss in result.loss_history]
    assert len(losses) == 25 and all(math.isfinite(x) for x in losses)
    assert np.mean(losses[-3:]) < 0.85 * np.mean(losses[:3]), losses
    after = model.state_dict()
    frozen = [k for k in before if k not in trainable]
    assert frozen and all(torch.equal(before[k], after[k]) for k in frozen), "a frozen (CLIP) tensor changed"
    assert any(not torch.equal(before[k], after[k]) for k in trainable)
    assert not model.training


class _Stop(Exception):
    pass


def test_resume_continues_exactly(tiny_model_factory, tmp_path):
    """4 steps in one go == 2 steps, an interruption, and a resume for the other 2 (cosine, warm-up, dropout,
    AdamW, grad clipping, an epoch boundary at step 3)."""
    data = _samples(12)
    cfg = TRAIN_PRESETS["improved"].replace(batch_size=4, steps=4, eval_every=2, warmup_fraction=0.25, log_every=1)
    direct = load_model(tiny_model_factory("tiny-improved"), "cpu")
    train(direct, data, None, cfg, tmp_path / "direct", progress=False)

    resumed = load_model(tiny_model_factory("tiny-improved"), "cpu")

    def interrupt(step: int, total: int, loss: float) -> None:
        if step == 3:  # the state saved at step 2 is the resume point; step 3's update is thrown away
            raise _Stop

    with pytest.raises(_Stop):
        train(resumed, data, None, cfg, tmp_path / "split", progress=False, on_step=interrupt)
    fresh = load_model(tiny_model_factory("tiny-improved"), "cpu")  # a new process would start from scratch
    torch.manual_seed(1234)  # whatever the global RNG holds, resume restores it
    result = train(fresh, data, None, cfg, tmp_path / "split", progress=False, resume=True)
    assert result.steps == 4 and [s for s, _ in result.loss_history] == [3, 4]
    a, b = direct.trainable_state_dict(), fresh.trainable_state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    # The log holds each step once, and the resume state is safetensors + JSON only (no pickle).
    steps = [int(r["step"]) for r in __import__("csv").DictReader(open(tmp_path / "split" / "metrics.csv")) if r["loss"]]
    assert steps == [1, 2, 3, 4]
    state = tmp_path / "split" / "state"
    assert sorted(p.name for p in state.iterdir()) == ["model.safetensors", "optimizer.safetensors", "state.json"]
    assert json.loads((state / "state.json").read_text())["step"] == 4
    assert any(k.startswith("optim.") for k in load_file(str(state / "optimizer.safetensors")))


def test_refuses_to_overwrite_a_run_without_resume(tiny_model_factory, tmp_path):
    from clipseg_model.errors import ClipsegError

    model = load_model(tiny_model_factory("tiny-seed"), "cpu")
    cfg = TrainConfig(batch_size=2, steps=1)
    train(model, _samples(2), None, cfg, tmp_path / "run", progress=False)
    with pytest.raises(ClipsegError, match="resume"):
        train(model, _samples(2), None, cfg, tmp_path / "run", progress=False)


def test_checkpoints_reload_and_reproduce_outputs(tiny_model_factory, tmp_path):
    model = load_model(tiny_model_factory("tiny-improved"), "cpu")
    data, val = _samples(8), _samples(4, seed=1)
    cfg = TrainConfig(batch_size=4, steps=4, eval_every=2)
    result = train(model, data, val, cfg, tmp_path / "run", progress=False, metadata={"version": "v-test"})
    assert result.best_checkpoint == tmp_path / "run" / "best" and 0.0 <= result.best_miou <= 1.0
    assert (tmp_path / "run" / "loss.png").is_file() and (tmp_path / "run" / "metrics.csv").is_file()
    reloaded = load_model(tmp_path / "run" / "last", "cpu")
    assert reloaded.version == "v-test"
    batch = collate([val[i] for i in range(4)], model)
    with torch.no_grad():
        assert torch.allclose(model(batch.pixel_values, batch.phrases), reloaded(batch.pixel_values, batch.phrases), atol=1e-6)
    best = load_model(tmp_path / "run" / "best", "cpu")  # best of the evaluations at steps 2 and 4
    assert best.config == model.config


# ---- evaluation ------------------------------------------------------------------------------------------------


class _LeftHalfModel(SegmentationModel):
    """Answers every phrase with 'the left half of the image' (logits +-10 on an 8 x 8 grid)."""

    def __init__(self) -> None:
        super().__init__()
        self.config = ModelConfig(image_size=8, output_size=8)
        self.dummy = torch.nn.Parameter(torch.zeros(1))

    def backbone_modules(self) -> list[torch.nn.Module]:
        return []

    def forward(self, pixel_values: torch.Tensor, prompts) -> torch.Tensor:
        logits = torch.full((len(prompts), 8, 8), -10.0)
        logits[:, :, :4] = 10.0
        return logits


def test_evaluate_matches_a_hand_computation():
    w, h = 16, 12
    left = np.zeros((h, w), bool)
    left[:, :8] = True
    top = np.zeros((h, w), bool)
    top[:6, :] = True
    image = Image.new("RGB", (w, h), "gray")
    data = SampleList([ReferringSample(image, "left", left, "test"), ReferringSample(image, "top", top, "test")])
    result = evaluate(_LeftHalfModel(), data, batch_size=2, device="cpu", sweep=True, max_rows=1)
    m = result.metrics
    # Sample 1: exact (IoU 1, Dice 1). Sample 2: |P∩G| = 48, |P∪G| = 144 → IoU 1/3; Dice 2*48/(96+96) = 0.5.
    assert m["n"] == 2
    assert m["miou"] == pytest.approx((1 + 1 / 3) / 2) and m["mean_dice"] == pytest.approx(0.75)
    assert m["oiou"] == pytest.approx((96 + 48) / (96 + 144)) and m["pooled_dice"] == pytest.approx(2 * 144 / (192 + 192))
    assert m["prec@0.5"] == 0.5 and m["prec@0.9"] == 0.5
    assert set(result.sweep) == {0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9}
    assert result.sweep[0.5]["miou"] == pytest.approx(m["miou"])
    assert len(result.rows) == 1 and result.rows[0].pred.shape == (h, w) and result.rows[0].note == "IoU 1.00"
    assert [s["iou"] for s in result.per_sample] == pytest.approx([1.0, 1 / 3])
    assert [(s["index"], s["phrase"]) for s in result.per_sample] == [(0, "left"), (1, "top")]


def test_validation_subset_is_spread_over_the_set():
    """max_samples picks samples spread evenly over the set (RefCOCO orders samples by image: the first N would be
    a few images), and every per-sample row carries its dataset index, phrase and the sample's ids."""
    from finetune.evaluation import spread_indices

    assert spread_indices(10, 3) == [0, 3, 6] and spread_indices(4, 0) == [0, 1, 2, 3] and spread_indices(3, 5) == [0, 1, 2]
    image = Image.new("RGB", (8, 8), "gray")
    mask = np.zeros((8, 8), bool)
    mask[:, :4] = True
    data = SampleList([ReferringSample(image, f"phrase {i}", mask, "test", {"ref_id": 100 + i, "sent_id": 200 + i})
                       for i in range(8)])
    result = evaluate(_LeftHalfModel(), data, batch_size=3, device="cpu", max_samples=4)
    assert [(r["index"], r["phrase"], r["ref_id"], r["sent_id"]) for r in result.per_sample] == [
        (i, f"phrase {i}", 100 + i, 200 + i) for i in (0, 2, 4, 6)]


# ---- the commands ------------------------------------------------------------------------------------------------


def _clipseg(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(ROOT)}
    return subprocess.run([sys.executable, "-m", "backend.cli", *args], cwd=cwd, env=env, capture_output=True,
                          text=True, timeout=600)


def test_train_and_eval_commands_end_to_end(tmp_path):
    done = _clipseg("train", "--model-preset", "tiny-seed", "--init-random", "--data", "shapes", "--max-samples", "16",
                    "--max-val-samples", "4", "--steps", "3", "--batch-size", "4", "--out", "run", "--no-progress",
                    cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    run = tmp_path / "run"
    for name in ("metrics.csv", "loss.png", "best/clipseg_config.json", "last/trainable.safetensors", "state/state.json"):
        assert (run / name).is_file(), name
    assert "metrics CSV:" in done.stdout and "loss curve PNG:" in done.stdout and "best checkpoint:" in done.stdout

    again = _clipseg("train", "--model-preset", "tiny-seed", "--init-random", "--steps", "3", "--out", "run", cwd=tmp_path)
    assert again.returncode == 1 and "--resume" in again.stderr and "Traceback" not in again.stderr

    done = _clipseg("eval", "--model", "run/last", "--data", "shapes", "--max-samples", "6", "--rows", "3",
                    "--out", "report", cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    report = tmp_path / "report"
    metrics = json.loads((report / "metrics.json").read_text())
    assert metrics["n"] == 6 and "miou" in metrics and "0.5" in metrics["threshold_sweep"]
    assert "grid.png" in (report / "index.html").read_text()
    assert Image.open(report / "grid.png").size[1] > 3 * 100
    for word in ("Dice", "mIoU", "oIoU", "P@0.5", "P@0.9"):
        assert word in done.stdout


@pytest.mark.parametrize("preset", ["tiny-seed", "tiny-clipseg"])
def test_train_embeddings_trains_patch_and_position_embeddings(tiny_model_factory, preset, tmp_path):
    """With `train_embeddings` (models trained from scratch) the vision embeddings learn and a checkpoint keeps them;
    without, they stay frozen."""
    from clipseg_model.checkpoint import save_checkpoint

    for on in (False, True):
        model = load_model(tiny_model_factory(preset), "cpu")
        model.config = model.config.replace(train_embeddings=on, unfreeze_last=0)
        model.apply_freezing()
        model.train()
        s = model.config.image_size
        model(torch.randn(2, 3, s, s), ["a red circle", "blue"]).sum().backward()
        embeddings = [p for m in model.embedding_modules() for p in m.parameters()]
        assert embeddings
        if on:
            assert all(p.requires_grad and p.grad is not None and p.grad.abs().sum() > 0 for p in embeddings)
        else:
            assert all(not p.requires_grad and p.grad is None for p in embeddings)
        layers = [p for layer in model.unfreezable_layers() for p in layer.parameters()]
        assert all(p.grad is None for p in layers)  # the transformer layers stay frozen (unfreeze_last=0)
    with torch.no_grad():  # `model` is the train_embeddings one: what it learnt must survive a checkpoint
        for p in embeddings:
            p.add_(0.5)
    reloaded = load_model(save_checkpoint(model.eval(), tmp_path / "ckpt", {"version": "emb"}), "cpu")
    assert reloaded.config.train_embeddings
    for ours, theirs in zip(embeddings, (p for m in reloaded.embedding_modules() for p in m.parameters())):
        assert torch.equal(ours, theirs)



def test_alignment_weight_trains_the_alignment_head(tiny_model_factory, tmp_path):
    """`align_weight` adds the text-token alignment loss: the head learns, the total loss falls; a model
    without the head is refused before any step."""
    from clipseg_model.errors import ClipsegError

    model = load_model(tiny_model_factory("tiny-pixel"), "cpu")
    head_before = model.align_head.weight.detach().clone()
    data = _samples(4)
    cfg = TrainConfig(optimizer="adam", lr=3e-3, batch_size=4, steps=25, dice_weight=1.0, align_weight=1.0,
                      log_every=5)
    losses = [loss for _, loss in train(model, data, None, cfg, tmp_path / "run", progress=False).loss_history]
    assert np.mean(losses[-3:]) < 0.85 * np.mean(losses[:3]), losses
    assert not torch.equal(head_before, model.align_head.weight)
    # the total is segmentation + alignment: above the segmentation loss alone on the same batch
    batch = collate([data[i] for i in range(4)], model)
    with torch.no_grad():
        logits, align = model(batch.pixel_values, batch.phrases, batch.masks)
    assert float(align) > 0
    plain = load_model(tiny_model_factory("tiny-improved"), "cpu")
    with pytest.raises(ClipsegError, match="align_weight needs a model built with text_alignment"):
        train(plain, data, None, cfg, tmp_path / "plain", progress=False)
    assert not (tmp_path / "plain").exists()


@pytest.mark.parametrize("align", ["0", "1"])
def test_torchrun_trains_with_two_processes_on_cpu(tmp_path, align):
    """`torchrun --nproc_per_node 2 -m backend.cli train ...` (gloo on the CPU): both ranks step in lockstep, rank 0
    writes one run. With an alignment head that the run does not train (align 0), DDP must be told that some
    parameters get no gradient, or its second step fails."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    done = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(free_port()),
         "-m", "backend.cli", "train", "--model-preset", "tiny-pixel", "--init-random", "--data", "shapes",
         "--max-samples", "16", "--max-val-samples", "4", "--steps", "4", "--batch-size", "2", "--device", "cpu",
         "--align-weight", align, "--out", "run", "--no-progress"],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    rows = (tmp_path / "run" / "metrics.csv").read_text().splitlines()
    at_4 = [row.split(",") for row in rows if row.startswith("4,")]
    # step 4 logged once (by rank 0 only): one loss row and one validation row
    assert sum(bool(r[1]) for r in at_4) == 1 and sum(not r[1] for r in at_4) == 1, rows
    assert load_model(tmp_path / "run" / "last", "cpu").config.text_alignment


def test_cli_reaches_the_cpu_benchmark_model_and_sets_film_decoder_options(tmp_path):
    """`clipseg train --model-preset cpu-scratch --preset cpu-scratch --init-random` builds the benchmark's model
    (same ModelConfig and backbone, word-level vocabulary of the training phrases with --init-vocab data); model
    options come from a JSON file and KEY=VALUE flags."""
    sys.path.insert(0, str(ROOT))
    from benchmarks.learning_cpu import MODEL_PRESET, TRAIN_PRESET, bench_preset
    from clipseg_model.config import PRESETS

    assert (MODEL_PRESET, TRAIN_PRESET) == ("cpu-scratch", "cpu-scratch")
    assert bench_preset() == PRESETS["cpu-scratch"]  # the benchmark's defaults are the preset, nothing else
    assert TRAIN_PRESETS["cpu-scratch"].align_weight > 0 and PRESETS["cpu-scratch"].config.word_attention

    (tmp_path / "decoder.json").write_text(json.dumps({"n_layers": 1, "decoder_positions": False}))
    done = _clipseg("train", "--model-preset", "cpu-scratch", "--preset", "cpu-scratch", "--init-random",
                    "--init-vocab", "data", "--model-config", "decoder.json", "--model-option", "d_model=32",
                    "--model-option", "extract_layers=[4]", "--data", "shapes", "--max-samples", "8",
                    "--max-val-samples", "4", "--steps", "2", "--batch-size", "4", "--threads", "1", "--out", "run",
                    "--no-progress", cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    model = load_model(tmp_path / "run" / "last", "cpu")
    expected = PRESETS["cpu-scratch"].config.replace(n_layers=1, decoder_positions=False, d_model=32, extract_layers=(4,))
    assert model.config.replace(base_model="") == expected.replace(base_model="")
    assert len(model.tokenizer.tokenize("the leftmost purple ellipse")) == 4  # one token per word of the data
    bad = _clipseg("train", "--model-preset", "cpu-scratch", "--init-random", "--model-option", "colour=red",
                   "--steps", "1", "--out", "bad", cwd=tmp_path)
    assert bad.returncode == 1 and "unknown model option(s) colour" in bad.stderr and "Traceback" not in bad.stderr


def test_train_and_the_finetune_job_share_one_step_and_precision_policy(tiny_model_factory, tmp_path):
    """Issue 13 item 4: `clipseg train` (train) and the fine-tune job (train_candidate) run the same step with the
    same recipe: on a batch that any order gives alike, their losses agree step for step."""
    from finetune.jobs import FINETUNE_RECIPE, train_candidate
    from finetune.optimization import precision_policy

    assert precision_policy("cpu").dtype is None  # fp32 on the CPU, for both
    if torch.cuda.is_available():
        assert precision_policy("cuda").dtype in (torch.bfloat16, torch.float16)
    one = _samples(1, seed=4)[0]
    data = SampleList([one] * 4)
    cfg = FINETUNE_RECIPE.replace(lr=3e-3, steps=4, batch_size=4, log_every=1, seed=2)
    by_train = load_model(tiny_model_factory("tiny-clipseg"), "cpu")
    result = train(by_train, data, None, cfg, tmp_path / "run", "cpu", progress=False)
    by_job = load_model(tiny_model_factory("tiny-clipseg"), "cpu")
    losses = train_candidate(by_job, list(data), steps=4, batch_size=4, lr=3e-3, seed=2)
    np.testing.assert_allclose([loss for _, loss in result.loss_history], losses, rtol=1e-5)
    assert losses[-1] < losses[0]


def test_train_cli_hflip_sets_the_flip_probability():
    import argparse
    from types import SimpleNamespace

    from finetune.train_command import _train_config, configure

    parser = argparse.ArgumentParser()
    configure(parser, SimpleNamespace(device="cpu"))
    assert _train_config(parser.parse_args(["--out", "x", "--model", "m"])).hflip == 0.0
    assert _train_config(parser.parse_args(["--out", "x", "--model", "m", "--hflip", "0.5"])).hflip == 0.5


def test_l2sp_anchor_keeps_the_candidate_near_its_parent(tiny_model_factory):
    """Issue 27: FINETUNE_ANCHOR (train_candidate's anchor_weight) pulls the trained weights towards the parent's:
    the same steps move them less far than without it."""
    from finetune.jobs import train_candidate

    data = list(_samples(8, seed=5))
    parent = load_model(tiny_model_factory("tiny-clipseg"), "cpu")
    start = [p.detach().clone() for p in parent.trainable_parameters()]

    def distance(anchor: float) -> float:
        model = load_model(tiny_model_factory("tiny-clipseg"), "cpu")
        train_candidate(model, data, steps=12, batch_size=4, lr=3e-3, seed=1, anchor_weight=anchor)
        return float(sum(((p.detach() - p0) ** 2).sum() for p, p0 in zip(model.trainable_parameters(), start)))

    free, anchored = distance(0.0), distance(10.0)
    assert free > 0 and anchored < 0.5 * free, (free, anchored)
