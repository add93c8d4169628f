"""The fine-tune gate: is the candidate better on what the corrections teach, and did it keep what it knew?

Two questions, two bounds, judged separately:

- **The new is better** (`Evidence`): candidate IoU minus parent IoU per held-out correction; promoted only when
  there are at least `min_evidence` of them and the one-sided lower confidence bound (t interval) of the mean is
  above 0.
- **The old is kept** (`Forgetting`, the forgetting budget): parent score minus candidate score per sample of the
  replay source's held-out part; the lower confidence bound of the mean drop must not exceed the budget, measured
  on at least `min_base_evidence` samples. The score has the scale of its source: mIoU against ground truth
  ("accuracy": RefCOCO, the fetched subset, generated shapes) or IoU against the parent's own answer
  ("agreement": self-distillation, where the parent scores 1 by definition and every change of a mask counts, so
  its drops run several times larger than the accuracy it stands for). Each scale has its own budget.
"""
from __future__ import annotations

import math
import statistics
from dataclasses import dataclass
from typing import Sequence

import numpy as np

from finetune.evaluation import EvalResult

DEFAULT_THRESHOLD = 0.5
ACCURACY, AGREEMENT = "accuracy", "agreement"


def _t_quantile(p: float, df: int) -> float:
    """Student-t quantile (Cornish-Fisher expansion of the normal one; within 1 % for df >= 3)."""
    z = statistics.NormalDist().inv_cdf(p)
    g1 = (z**3 + z) / 4
    g2 = (5 * z**5 + 16 * z**3 + 3 * z) / 96
    g3 = (3 * z**7 + 19 * z**5 + 17 * z**3 - 15 * z) / 384
    g4 = (79 * z**9 + 776 * z**7 + 1482 * z**5 - 1920 * z**3 - 945 * z) / 92160
    return z + g1 / df + g2 / df**2 + g3 / df**3 + g4 / df**4


def _mean_and_lower_bound(values: np.ndarray, confidence: float) -> tuple[float, float]:
    """(mean, one-sided lower confidence bound of the mean; NaN below 2 values)."""
    if values.size == 0:
        return math.nan, math.nan
    mean = float(values.mean())
    if values.size < 2:
        return mean, math.nan
    se = float(values.std(ddof=1)) / math.sqrt(values.size)
    return mean, mean - _t_quantile(confidence, int(values.size) - 1) * se


@dataclass
class Evidence:
    """The gate's paired comparison on held-out corrections: candidate IoU minus parent IoU per sample."""

    n: int
    difference: float  # mean of the per-sample differences
    bound: float  # one-sided lower confidence bound of that mean (NaN below 2 samples)
    confidence: float
    min_n: int

    @property
    def enough(self) -> bool:
        return self.n >= self.min_n

    @property
    def better(self) -> bool:
        return self.enough and self.bound > 0


def paired_evidence(parent_iou: Sequence[float], candidate_iou: Sequence[float], min_n: int,
                    confidence: float = 0.9) -> Evidence:
    """Mean paired difference and its lower confidence bound (t interval) over samples both were scored on."""
    diffs = np.asarray(candidate_iou, dtype=np.float64) - np.asarray(parent_iou, dtype=np.float64)
    mean, bound = _mean_and_lower_bound(diffs, confidence)
    return Evidence(int(diffs.size), mean, bound, confidence, min_n)


@dataclass
class Forgetting:
    """The forgetting budget's measurement: parent score minus candidate score per base-validation sample.

    `drop` > 0 means the candidate lost that much of the old skill on average; `bound` is the one-sided lower
    confidence bound of that mean: the candidate is within budget when bound <= budget. n = 0: nothing measured
    (replay off).
    """

    n: int
    drop: float
    bound: float
    budget: float
    scale: str  # ACCURACY (score against ground truth) or AGREEMENT (against the parent's own answers)
    confidence: float
    min_n: int
    parent_score: float = math.nan
    candidate_score: float = math.nan

    @property
    def measured(self) -> bool:
        return self.n > 0

    @property
    def enough(self) -> bool:
        return self.n >= self.min_n

    @property
    def within_budget(self) -> bool:
        return self.enough and self.bound <= self.budget

    def describe(self) -> str:
        return (f"old-skill drop {self.drop:+.3f} ({self.scale}, n={self.n}, {self.confidence:.0%} lower bound "
                f"{self.bound:+.3f}, budget {self.budget:g})")


def forgetting(parent_scores: Sequence[float], candidate_scores: Sequence[float], budget: float, scale: str,
               min_n: int, confidence: float = 0.9) -> Forgetting:
    """The paired drop of the base score (parent minus candidate per sample) and its lower confidence bound."""
    parent = np.asarray(parent_scores, dtype=np.float64)
    candidate = np.asarray(candidate_scores, dtype=np.float64)
    drop, bound = _mean_and_lower_bound(parent - candidate, confidence)
    return Forgetting(int(parent.size), drop, bound, budget, scale, confidence, min_n,
                      float(parent.mean()) if parent.size else math.nan,
                      float(candidate.mean()) if candidate.size else math.nan)


def decide(evidence: Evidence, kept: Forgetting) -> tuple[str, str]:
    """(status, reason): "promoted", "rejected" or "inconclusive" (not enough evidence either way).

    Promoted only when the candidate is shown better on the held-out corrections AND its old-skill drop is within
    the forgetting budget; either question with too few samples makes the version inconclusive.
    """
    shown = (f"held-out mIoU {evidence.difference:+.3f} (n={evidence.n}, {evidence.confidence:.0%} lower bound "
             f"{evidence.bound:+.3f})")
    if not evidence.enough:
        return "inconclusive", f"not enough evidence: {evidence.n} held-out corrections < {evidence.min_n}"
    if not evidence.better:
        return "rejected", f"not shown better: {shown}"
    if kept.measured and not kept.enough:
        return "inconclusive", (f"better: {shown}; but not enough base samples to measure forgetting: "
                                f"{kept.n} < {kept.min_n}")
    if kept.measured and not kept.within_budget:
        return "rejected", f"forgot too much: {kept.describe()} exceeds the budget; {shown}"
    old = kept.describe() if kept.measured else "old skills not measured (replay off)"
    return "promoted", f"better: {shown}; old skills kept: {old}"


def calibrate_threshold(result: EvalResult, min_samples: int) -> tuple[float, dict[str, float]]:
    """(threshold, info): the sweep's best held-out mIoU, or 0.5 below `min_samples` (too few to choose on)."""
    n = int(result.metrics.get("n", 0))
    at_default = float(result.sweep[DEFAULT_THRESHOLD]["miou"]) if result.sweep else math.nan
    if result.sweep is None or n < min_samples:
        return DEFAULT_THRESHOLD, {"n": n, "miou": at_default, "miou_at_0.5": at_default, "calibrated": False}
    threshold, metrics = max(result.sweep.items(), key=lambda kv: (kv[1]["miou"], -abs(kv[0] - 0.5)))
    return float(threshold), {"n": n, "miou": float(metrics["miou"]), "miou_at_0.5": at_default, "calibrated": True}
