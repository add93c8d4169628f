"""Metrics against hand-computed values."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from finetune.metrics import (
    MetricAccumulator,
    ThresholdSweep,
    binarize,
    counts,
    dice,
    iou,
    summarize,
)


def _mask(h: int, w: int, pixels: list[tuple[int, int]]) -> np.ndarray:
    m = np.zeros((h, w), dtype=bool)
    for y, x in pixels:
        m[y, x] = True
    return m


# Four 4x4 cases, worked out by hand:
#   A: gt = 2x2 top-left (4 px), pred = whole top row (4 px): I = 2, U = 6 → IoU 1/3, Dice 4/8 = 0.5
#   B: identical 3-px masks → IoU 1, Dice 1
#   C: both empty → IoU 1, Dice 1 (convention)
#   D: gt 4 px, pred empty: I = 0, U = 4 → IoU 0, Dice 0
GT_A = _mask(4, 4, [(0, 0), (0, 1), (1, 0), (1, 1)])
PR_A = _mask(4, 4, [(0, 0), (0, 1), (0, 2), (0, 3)])
GT_B = _mask(4, 4, [(3, 3), (3, 2), (2, 3)])
GT_D = _mask(4, 4, [(2, 0), (2, 1), (3, 0), (3, 1)])
EMPTY = np.zeros((4, 4), dtype=bool)
PREDS = [PR_A, GT_B.copy(), EMPTY, EMPTY]
GTS = [GT_A, GT_B, EMPTY, GT_D]


def test_single_sample_values() -> None:
    assert iou(PR_A, GT_A) == pytest.approx(1 / 3)
    assert dice(PR_A, GT_A) == pytest.approx(0.5)
    assert counts(PR_A, GT_A).__dict__ == {"intersection": 2, "union": 6, "pred": 4, "gt": 4}
    assert iou(GT_B, GT_B) == 1.0 and dice(GT_B, GT_B) == 1.0
    assert iou(EMPTY, EMPTY) == 1.0 and dice(EMPTY, EMPTY) == 1.0
    assert iou(EMPTY, GT_D) == 0.0 and dice(EMPTY, GT_D) == 0.0
    assert iou(GT_D, EMPTY) == 0.0 and dice(GT_D, EMPTY) == 0.0


def test_dataset_metrics_exact() -> None:
    acc = MetricAccumulator()
    for p, g in zip(PREDS, GTS):
        acc.update(p, g)
    m = acc.compute()
    assert m["n"] == 4
    assert m["miou"] == pytest.approx((1 / 3 + 1 + 1 + 0) / 4)  # 7/12
    assert m["mean_dice"] == pytest.approx((0.5 + 1 + 1 + 0) / 4)  # 0.625
    # Σ I = 2 + 3 + 0 + 0 = 5; Σ U = 6 + 3 + 0 + 4 = 13; Σ(|P| + |G|) = 8 + 6 + 0 + 4 = 18.
    assert m["oiou"] == pytest.approx(5 / 13)
    assert m["pooled_dice"] == pytest.approx(10 / 18)
    for t in (0.5, 0.6, 0.7, 0.8, 0.9):
        assert m[f"prec@{t:.1f}"] == pytest.approx(0.5)  # IoUs 1/3, 1, 1, 0


def test_batched_update_equals_streamed_and_keeps_ids() -> None:
    streamed = MetricAccumulator()
    for p, g in zip(PREDS, GTS):
        streamed.update(p, g)
    batched = MetricAccumulator()
    batched.update(np.stack(PREDS), np.stack(GTS), ids=["a", "b", "c", "d"])
    assert batched.compute() == streamed.compute()
    rows = batched.per_sample()
    assert [r["id"] for r in rows] == ["a", "b", "c", "d"]
    assert rows[0]["iou"] == pytest.approx(1 / 3) and rows[0]["union"] == 6


def test_precision_thresholds_are_inclusive() -> None:
    # gt 10 px, pred = 7 of them → IoU exactly 0.7 (floating 7/10).
    gt = np.zeros((1, 10), bool)
    gt[0, :] = True
    pred = gt.copy()
    pred[0, 7:] = False
    m = summarize([counts(pred, gt)])
    assert m["miou"] == pytest.approx(0.7)
    assert m["prec@0.7"] == 1.0 and m["prec@0.8"] == 0.0 and m["prec@0.5"] == 1.0
    assert m["mean_dice"] == pytest.approx(14 / 17)


def test_binarize_conventions() -> None:
    probs = np.array([[0.2, 0.5, 0.51, 1.0]])
    assert binarize(probs).tolist() == [[False, False, True, True]]  # strictly greater than 0.5
    assert binarize(probs, 0.1).tolist() == [[True, True, True, True]]
    assert binarize(np.array([[0, 255, 1]], np.uint8)).tolist() == [[False, True, True]]
    # Probabilities thresholded by the accumulator give the same as pre-binarised masks.
    acc = MetricAccumulator(threshold=0.3)
    acc.update(np.where(PR_A, 0.9, 0.2), GT_A)
    assert acc.compute()["miou"] == pytest.approx(1 / 3)


def test_torch_inputs() -> None:
    probs = torch.tensor(np.where(PR_A, 0.8, 0.1), dtype=torch.bfloat16)
    assert iou(probs, torch.from_numpy(GT_A)) == pytest.approx(1 / 3)
    acc = MetricAccumulator()
    acc.update(torch.from_numpy(np.stack(PREDS)).float(), torch.from_numpy(np.stack(GTS)))
    assert acc.compute()["oiou"] == pytest.approx(5 / 13)


def test_threshold_sweep_exact() -> None:
    # probs [0.15, 0.35, 0.55, 0.95], gt [F, T, T, T]:
    #   t = 0.1 → pred all → I 3, U 4 → 0.75; t = 0.2, 0.3 → {1,2,3} → 1.0;
    #   t = 0.4, 0.5 → {2,3} → 2/3; t = 0.6 … 0.9 → {3} → 1/3.
    probs = np.array([[0.15, 0.35, 0.55, 0.95]])
    gt = np.array([[False, True, True, True]])
    sweep = ThresholdSweep()
    sweep.update(probs, gt)
    res = sweep.compute()
    assert list(res) == pytest.approx([0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9])
    expected = [0.75, 1.0, 1.0, 2 / 3, 2 / 3, 1 / 3, 1 / 3, 1 / 3, 1 / 3]
    assert [r["miou"] for r in res.values()] == pytest.approx(expected)
    best_t, best = sweep.best("miou")
    assert best_t == pytest.approx(0.3) and best["miou"] == 1.0  # tie 0.2/0.3 → closer to 0.5
    with pytest.raises(TypeError):
        sweep.update(gt, gt)


def test_errors_and_empty() -> None:
    m = MetricAccumulator().compute()
    assert m["n"] == 0 and math.isnan(m["miou"]) and math.isnan(m["prec@0.5"])
    with pytest.raises(ValueError):
        iou(np.zeros((2, 3), bool), np.zeros((3, 2), bool))
    with pytest.raises(ValueError):
        MetricAccumulator().update(np.zeros((2, 2, 2, 2)), np.zeros((2, 2, 2, 2)))
    with pytest.raises(ValueError):
        MetricAccumulator().update(np.stack(PREDS), np.stack(GTS), ids=["only-one"])
