"""Referring-segmentation metrics: Dice, IoU, mIoU, oIoU, Prec@X and a threshold sweep.

Conventions (shared by every function here):
- A prediction is binarised as: bool → as is; integer → nonzero; float (probabilities) → `> threshold`.
- Per-sample IoU = |P ∩ G| / |P ∪ G| and Dice = 2|P ∩ G| / (|P| + |G|). When prediction and ground
  truth are BOTH empty the sample is a perfect answer: IoU = Dice = 1. When exactly one is empty the
  formulas give 0, which is what they should.
- mIoU and mean Dice average the per-sample values (every sample weighs the same).
- oIoU ("overall IoU", as in LAVT/CRIS papers) = Σ intersections / Σ unions over the whole set; pooled
  Dice = 2 Σ intersections / (Σ |P| + Σ |G|). Large objects weigh more. An all-empty set gives 1.
- Prec@X is the fraction of samples with IoU >= X (X in 0.5, 0.6, 0.7, 0.8, 0.9).
- An empty accumulator reports n = 0 and NaN for every metric (there is nothing to average).

Arrays may be numpy arrays or torch tensors (moved to CPU); shapes are (H, W) or batched (B, H, W).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Iterable, Sequence

import numpy as np

PREC_THRESHOLDS: tuple[float, ...] = (0.5, 0.6, 0.7, 0.8, 0.9)
SWEEP_THRESHOLDS: tuple[float, ...] = (0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9)


def _to_numpy(x: Any) -> np.ndarray:
    """numpy view of an array-like; torch tensors are detached and moved to CPU first."""
    if hasattr(x, "detach"):  # torch.Tensor, without importing torch here
        x = x.detach().cpu()
        if str(x.dtype) == "torch.bfloat16":  # numpy has no bfloat16
            x = x.float()
        x = x.numpy()
    return np.asarray(x)


def binarize(pred: Any, threshold: float = 0.5) -> np.ndarray:
    """Bool mask of the same shape as `pred` (bool as is, integer nonzero, float `> threshold`)."""
    arr = _to_numpy(pred)
    if arr.dtype == bool:
        return arr
    if np.issubdtype(arr.dtype, np.integer):
        return arr != 0
    return arr > threshold


@dataclass(frozen=True)
class Counts:
    """Pixel counts of one sample: intersection, union, |prediction|, |ground truth|."""

    intersection: int
    union: int
    pred: int
    gt: int

    @property
    def iou(self) -> float:
        return 1.0 if self.union == 0 else self.intersection / self.union

    @property
    def dice(self) -> float:
        denom = self.pred + self.gt
        return 1.0 if denom == 0 else 2.0 * self.intersection / denom


def counts(pred: Any, gt: Any, threshold: float = 0.5) -> Counts:
    """Pixel counts of one (H, W) prediction against its (H, W) ground truth."""
    p, g = binarize(pred, threshold), binarize(gt)
    if p.shape != g.shape:
        raise ValueError(f"prediction shape {p.shape} != ground-truth shape {g.shape}")
    inter = int(np.count_nonzero(p & g))
    ps, gs = int(np.count_nonzero(p)), int(np.count_nonzero(g))
    return Counts(inter, ps + gs - inter, ps, gs)


def iou(pred: Any, gt: Any, threshold: float = 0.5) -> float:
    """IoU of one (H, W) prediction; 1.0 when both masks are empty."""
    return counts(pred, gt, threshold).iou


def dice(pred: Any, gt: Any, threshold: float = 0.5) -> float:
    """Dice of one (H, W) prediction; 1.0 when both masks are empty."""
    return counts(pred, gt, threshold).dice


def summarize(items: Sequence[Counts], prec_thresholds: Sequence[float] = PREC_THRESHOLDS) -> dict[str, float]:
    """Dataset metrics from per-sample counts.

    Returns:
        dict with n, mean_dice, pooled_dice, miou, oiou and prec@X for each X (floats; NaN if n == 0).
    """
    n = len(items)
    out: dict[str, float] = {"n": n}
    if n == 0:
        for key in ("mean_dice", "pooled_dice", "miou", "oiou"):
            out[key] = math.nan
        for t in prec_thresholds:
            out[_prec_key(t)] = math.nan
        return out
    ious = np.array([c.iou for c in items], dtype=np.float64)
    dices = np.array([c.dice for c in items], dtype=np.float64)
    inter = sum(c.intersection for c in items)
    union = sum(c.union for c in items)
    size = sum(c.pred + c.gt for c in items)
    out["mean_dice"] = float(dices.mean())
    out["pooled_dice"] = 1.0 if size == 0 else 2.0 * inter / size
    out["miou"] = float(ious.mean())
    out["oiou"] = 1.0 if union == 0 else inter / union
    for t in prec_thresholds:
        # Small epsilon: an IoU of exactly 0.7 computed as 0.69999999 must still count for Prec@0.7.
        out[_prec_key(t)] = float(np.mean(ious >= t - 1e-9))
    return out


def _prec_key(t: float) -> str:
    return f"prec@{t:.1f}"


def _as_batch(x: Any) -> np.ndarray:
    arr = _to_numpy(x)
    if arr.ndim == 2:
        return arr[None]
    if arr.ndim == 3:
        return arr
    raise ValueError(f"expected (H, W) or (B, H, W), got shape {arr.shape}")


class MetricAccumulator:
    """Streams predictions and reports dataset metrics at one binarisation threshold.

    Example:
        acc = MetricAccumulator()
        for probs, gt in batches:  # probs float (B, H, W) in [0, 1], gt bool (B, H, W)
            acc.update(probs, gt)
        acc.compute()  # {"n": ..., "miou": ..., "oiou": ..., "prec@0.5": ..., ...}
    """

    def __init__(self, threshold: float = 0.5, prec_thresholds: Sequence[float] = PREC_THRESHOLDS) -> None:
        self.threshold = float(threshold)
        self.prec_thresholds = tuple(prec_thresholds)
        self.items: list[Counts] = []
        self.ids: list[Any] = []

    def __len__(self) -> int:
        return len(self.items)

    def update(self, pred: Any, gt: Any, ids: Iterable[Any] | None = None) -> list[Counts]:
        """Add one (H, W) or a batch (B, H, W) of predictions; returns their per-sample counts."""
        p, g = _as_batch(pred), _as_batch(gt)
        if p.shape != g.shape:
            raise ValueError(f"prediction shape {p.shape} != ground-truth shape {g.shape}")
        new = [counts(pi, gi, self.threshold) for pi, gi in zip(p, g)]
        id_list = list(ids) if ids is not None else [None] * len(new)
        if len(id_list) != len(new):
            raise ValueError(f"{len(id_list)} ids for {len(new)} samples")
        self.items.extend(new)
        self.ids.extend(id_list)
        return new

    def compute(self) -> dict[str, float]:
        """Metrics over everything added so far (see module docstring for conventions)."""
        return summarize(self.items, self.prec_thresholds)

    def per_sample(self) -> list[dict[str, Any]]:
        """One dict per sample: id, iou, dice and the raw pixel counts."""
        return [
            {"id": i, "iou": c.iou, "dice": c.dice, "intersection": c.intersection, "union": c.union,
             "pred": c.pred, "gt": c.gt}
            for i, c in zip(self.ids, self.items)
        ]

    def reset(self) -> None:
        self.items.clear()
        self.ids.clear()


class ThresholdSweep:
    """Metrics of probability maps at several binarisation thresholds at once (default 0.1 … 0.9)."""

    def __init__(self, thresholds: Sequence[float] = SWEEP_THRESHOLDS, prec_thresholds: Sequence[float] = PREC_THRESHOLDS) -> None:
        self.accumulators = {float(t): MetricAccumulator(t, prec_thresholds) for t in thresholds}

    def update(self, probs: Any, gt: Any, ids: Iterable[Any] | None = None) -> None:
        """Add float probabilities (H, W) or (B, H, W) and their bool ground truth."""
        p = _to_numpy(probs)
        if p.dtype == bool or np.issubdtype(p.dtype, np.integer):
            raise TypeError("a threshold sweep needs float probability maps, not binary masks")
        g = binarize(gt)  # binarise the ground truth once, not once per threshold
        id_list = list(ids) if ids is not None else None
        for acc in self.accumulators.values():
            acc.update(p, g, id_list)

    def compute(self) -> dict[float, dict[str, float]]:
        """{threshold: metrics dict} in ascending threshold order."""
        return {t: acc.compute() for t, acc in sorted(self.accumulators.items())}

    def best(self, key: str = "miou") -> tuple[float, dict[str, float]]:
        """(threshold, metrics) maximising `key`; ties go to the threshold closest to 0.5."""
        results = self.compute()
        return max(results.items(), key=lambda kv: (kv[1][key], -abs(kv[0] - 0.5)))
