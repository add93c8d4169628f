"""The fine-tune gate (finetune.jobs): paired evidence with a confidence bound and a minimum count, the calibrated
threshold, the held-out split that gives small projects enough evidence."""
from __future__ import annotations

import math

import numpy as np
import pytest
from PIL import Image

from finetune.jobs import (
    _held_out, _t_quantile, calibrate_threshold, decide, paired_evidence, split_corrections,
)
from finetune.samples import ReferringSample
from finetune.evaluation import EvalResult


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
    status, reason = decide(few, 0.8, 0.8, 0.01)
    assert status == "inconclusive" and "not enough evidence" in reason
    rng = np.random.default_rng(0)
    parent = lucky_parent + list(rng.uniform(0.5, 0.8, 20))
    cand = lucky_cand + [p - 0.05 for p in parent[4:]]
    assert np.mean(cand[:4]) > np.mean(parent[:4])
    ev = paired_evidence(parent, cand, min_n=6)
    status, reason = decide(ev, 0.8, 0.8, 0.01)
    assert status == "rejected" and "not shown better" in reason and ev.n == 24


def test_noisy_gain_is_not_enough_but_a_clear_one_is_promoted():
    rng = np.random.default_rng(1)
    parent = list(rng.uniform(0.3, 0.7, 10))
    noisy = [p + d for p, d in zip(parent, [0.4, -0.3, 0.35, -0.3, 0.3, -0.25, 0.2, -0.3, 0.1, -0.1])]
    ev = paired_evidence(parent, noisy, min_n=6)
    assert ev.difference > 0 and ev.bound < 0
    assert decide(ev, 0.8, 0.8, 0.01)[0] == "rejected"
    clear = [p + 0.2 + 0.02 * rng.standard_normal() for p in parent]
    ev = paired_evidence(parent, clear, min_n=6)
    assert ev.bound > 0.15
    status, reason = decide(ev, 0.8, 0.795, 0.01)
    assert status == "promoted" and "n=10" in reason
    # ... unless it forgot the base data
    status, reason = decide(ev, 0.8, 0.7, 0.01)
    assert status == "rejected" and "base mIoU dropped" in reason


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

