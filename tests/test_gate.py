"""The fine-tune gate (finetune.jobs): paired evidence with a confidence bound and a minimum count, the calibrated
threshold, the held-out split that gives small projects enough evidence."""
from __future__ import annotations

import math

import numpy as np
import pytest
from PIL import Image

from finetune.gate import _t_quantile, calibrate_threshold, decide, forgetting, paired_evidence
from finetune.jobs import _held_out, split_corrections
from finetune.evaluation import EvalResult
from finetune.samples import ReferringSample


def _kept(loss: float, n: int = 48, noise: float = 0.03, seed: int = 7):
    """The forgetting measurement of a candidate that lost `loss` mIoU on n base samples (per-sample noise)."""
    rng = np.random.default_rng(seed)
    parent = rng.uniform(0.6, 0.9, n)
    candidate = parent - loss + noise * rng.standard_normal(n)
    return forgetting(parent, candidate, budget=0.02, scale="accuracy", min_n=24)


KEPT = _kept(0.0)


def test_t_quantiles_match_the_table():
    # Student t, one-sided: t(0.95, 3) = 2.353, t(0.95, 10) = 1.812, t(0.9, 5) = 1.476, t(0.9, 30) = 1.310
    for p, df, want in [(0.95, 3, 2.353), (0.95, 10, 1.812), (0.9, 5, 1.476), (0.9, 30, 1.310)]:
        assert _t_quantile(p, df) == pytest.approx(want, rel=0.01)


def test_lucky_on_four_samples_but_not_overall_is_not_promoted():
    """Issue 15: 4 held-out samples where the candidate happens to be better decide nothing; on 24, where it is
    better on those 4 and worse on the rest, it is rejected."""
    lucky_parent, lucky_cand = [0.50, 0.55, 0.60, 0.40], [0.70, 0.72, 0.80, 0.65]
    few = paired_evidence(lucky_parent, lucky_cand, min_n=6)
    assert few.difference > 0  # "strictly higher mIoU" would have promoted it
    status, reason = decide(few, KEPT)
    assert status == "inconclusive" and "not enough evidence" in reason
    rng = np.random.default_rng(0)
    parent = lucky_parent + list(rng.uniform(0.5, 0.8, 20))
    cand = lucky_cand + [p - 0.05 for p in parent[4:]]
    assert np.mean(cand[:4]) > np.mean(parent[:4])
    ev = paired_evidence(parent, cand, min_n=6)
    status, reason = decide(ev, KEPT)
    assert status == "rejected" and "not shown better" in reason and ev.n == 24


def test_noisy_gain_is_not_enough_but_a_clear_one_is_promoted():
    rng = np.random.default_rng(1)
    parent = list(rng.uniform(0.3, 0.7, 10))
    noisy = [p + d for p, d in zip(parent, [0.4, -0.3, 0.35, -0.3, 0.3, -0.25, 0.2, -0.3, 0.1, -0.1])]
    ev = paired_evidence(parent, noisy, min_n=6)
    assert ev.difference > 0 and ev.bound < 0
    assert decide(ev, KEPT)[0] == "rejected"
    clear = [p + 0.2 + 0.02 * rng.standard_normal() for p in parent]
    ev = paired_evidence(parent, clear, min_n=6)
    assert ev.bound > 0.15
    status, reason = decide(ev, _kept(0.005))
    assert status == "promoted" and "n=10" in reason
    # ... unless it forgot the base data
    status, reason = decide(ev, _kept(0.1))
    assert status == "rejected" and "forgot too much" in reason


def test_calibrated_threshold_needs_enough_samples():
    sweep = {t: {"miou": 0.5 + (0.2 if t == 0.3 else 0.0)} for t in (0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9)}
    threshold, info = calibrate_threshold(EvalResult({"n": 8, "miou": 0.5}, sweep), min_samples=6)
    assert threshold == 0.3 and info["calibrated"] and info["miou"] == pytest.approx(0.7)
    threshold, info = calibrate_threshold(EvalResult({"n": 4, "miou": 0.5}, sweep), min_samples=6)
    assert threshold == 0.5 and not info["calibrated"]


def _correction(annotation: int) -> ReferringSample:
    return ReferringSample(Image.new("RGB", (2, 2)), "x", np.zeros((2, 2), bool), "correction", {"annotation": annotation})


def test_held_out_split_is_stable_and_topped_up_to_the_evidence_floor():
    samples = [_correction(a) for a in range(30)]
    train, held = split_corrections(samples, min_held=8)
    assert len(held) == 8 and len(train) == 22
    again_train, again_held = split_corrections(list(reversed(samples)), min_held=8)
    assert {s.meta["annotation"] for s in again_held} == {s.meta["annotation"] for s in held}
    # the stable 20 % stays held out when more corrections arrive
    more = samples + [_correction(a) for a in range(30, 60)]
    _, held_more = split_corrections(more, min_held=8)
    base = {s.meta["annotation"] for s in held if _held_out(s.meta["annotation"])}
    assert base <= {s.meta["annotation"] for s in held_more}
    # never more than half held out
    _, held_small = split_corrections(samples[:6], min_held=8)
    assert len(held_small) == 3
    assert math.isnan(paired_evidence([], [], 6).difference)



def test_better_on_the_new_but_forgetting_0_04_of_the_old_is_not_promoted_and_0_01_is():
    """Issue 27: the forgetting budget is its own bound (lower confidence bound of the paired drop <= 0.02),
    separate from "the new is better"; a candidate far better on the new concept is still rejected when it loses
    0.04 of the old, and promoted when it loses 0.01."""
    rng = np.random.default_rng(3)
    parent_new = list(rng.uniform(0.0, 0.1, 10))
    better = paired_evidence(parent_new, [p + 0.7 + 0.02 * rng.standard_normal() for p in parent_new], min_n=6)
    assert better.better and better.bound > 0.6
    lost = _kept(0.04)
    assert lost.drop == pytest.approx(0.04, abs=0.01) and lost.bound > 0.02
    status, reason = decide(better, lost)
    assert status == "rejected" and "forgot too much" in reason and "budget 0.02" in reason
    small = _kept(0.01)
    assert small.drop == pytest.approx(0.01, abs=0.01) and small.bound <= 0.02
    status, reason = decide(better, small)
    assert status == "promoted" and "old skills kept" in reason
    # the budget's scale is its own: agreement with the parent (self-distillation) gets its own budget
    parent = rng.uniform(0.9, 1.0, 48)
    agreement = forgetting(parent, parent - 0.04 + 0.02 * rng.standard_normal(48), budget=0.10, scale="agreement",
                           min_n=24)
    assert decide(better, agreement)[0] == "promoted"
    # too few base samples to mean anything: inconclusive, not promoted
    few = forgetting(parent[:10], parent[:10] - 0.005, budget=0.02, scale="accuracy", min_n=24)
    status, reason = decide(better, few)
    assert status == "inconclusive" and "not enough base samples" in reason
