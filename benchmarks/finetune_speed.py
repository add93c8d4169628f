"""Fine-tune speed: today's path (the whole model forward on every step and evaluation) vs frozen features cached.

    .venv/bin/python benchmarks/finetune_speed.py [--steps 200] [--reference-steps 10] [--cached-steps 0]
    .venv/bin/python benchmarks/finetune_speed.py --tiny --steps 4 --reference-steps 2 --corrections 8  # seconds

One run, one process, full-size `clipseg-rd64` with random weights (built once, as `clipseg bench` does), 30
corrections (640 x 480 generated scenes), the default replay (self-distillation, one replayed sample per training
correction) and the job's gate evaluations. Both paths do the same work as the job: distillation targets,
parent scores, training, candidate scores. Today's path is timed over `--reference-steps` training steps and its
training time extrapolated linearly to `--steps` (every step costs the same: a full forward and backward of a batch
of 4); `--cached-steps` does the same for the cached path (0: all steps run); everything else is timed in full.
Both use a constant learning rate so that the first reference steps are the same computation on both paths: their
losses are compared (same seed, same batches). A later fine-tune that finds the features on disk ("warm") differs
only in the features phase, which is timed again on its own. Numbers: docs/loop.md, "The job".
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from benchmarks.inference import build_or_reuse  # noqa: E402
from clipseg_model.feature_cache import FeatureCache, FrozenInputs  # noqa: E402
from clipseg_model.image_io import image_digest  # noqa: E402
from clipseg_model.loading import load_model  # noqa: E402
from clipseg_model.numerics import flush_denormals  # noqa: E402
from finetune.jobs import FINETUNE_RECIPE, evaluate_on, split_corrections, train_candidate  # noqa: E402
from finetune.replay import DEFAULT_DISTILL_PHRASES, distillation_replay  # noqa: E402
from finetune.samples import ReferringSample  # noqa: E402


def corrections(n: int, size: tuple[int, int] = (640, 480)) -> list[ReferringSample]:
    """`n` generated scenes of `size` (W, H) as corrections of "the object"."""
    import io

    from PIL import Image

    from tests.fixtures.webhooks import scene

    out = []
    for i in range(n):
        jpeg, mask = scene(*size, seed=i)
        out.append(ReferringSample(Image.open(io.BytesIO(jpeg)).convert("RGB"), "the object", mask, "correction",
                                   {"annotation": 1000 + i}))
    return out


def run(model_dir: Path, samples: list[ReferringSample], steps: int, cache_dir: Path | None, seed: int = 0) -> dict:
    """The job's work on one path: cache_dir None = today's path (full forward everywhere)."""
    timings: dict[str, float] = {}
    t = time.perf_counter()
    train, held = split_corrections(samples, 6)
    parent = load_model(model_dir, "cpu")
    frozen = FrozenInputs(parent, FeatureCache(cache_dir)) if cache_dir is not None else None
    if frozen is not None:
        frozen.prepare([s.image for s in samples], [s.phrase for s in samples])
    timings["features"] = time.perf_counter() - t

    t = time.perf_counter()

    @torch.no_grad()
    def soft(images, phrases):
        if frozen is not None:
            return torch.sigmoid(frozen.logits(images, phrases, parent))
        return torch.sigmoid(parent(parent.preprocess(images), phrases))

    images = list({image_digest(s.image): s.image for s in train}.values())
    replay, base_val = distillation_replay(images, [s.phrase for s in train], DEFAULT_DISTILL_PHRASES, soft,
                                           len(train), seed, image_digest)
    timings["replay_targets"] = time.perf_counter() - t
    t = time.perf_counter()
    evaluate_on(parent, held, frozen, 0.5)
    evaluate_on(parent, base_val, frozen, 0.5)
    timings["parent_eval"] = time.perf_counter() - t
    parent = None  # free its weights before the candidate loads (`soft` is not called again)
    candidate = load_model(model_dir, "cpu")
    t = time.perf_counter()
    # a constant learning rate, so that runs of different lengths take the same first steps (the time is the same)
    recipe = FINETUNE_RECIPE.replace(schedule="constant")
    losses = train_candidate(candidate, train + replay, steps, 4, 1e-4, seed=seed, frozen=frozen, recipe=recipe)
    timings["train"] = time.perf_counter() - t
    t = time.perf_counter()
    evaluate_on(candidate, held, frozen, 0.5, sweep=True)
    evaluate_on(candidate, base_val, frozen, 0.5)
    timings["candidate_eval"] = time.perf_counter() - t
    return {"timings": {k: round(v, 2) for k, v in timings.items()}, "losses": losses,
            "samples": {"train": len(train), "held": len(held), "replay": len(replay), "base_val": len(base_val)},
            "features_computed": frozen.computed_images if frozen else None,
            "feature_bytes": frozen.nbytes if frozen else None}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--reference-steps", type=int, default=10, help="training steps timed on today's path")
    parser.add_argument("--cached-steps", type=int, default=0,
                        help="training steps timed on the cached path (0: all --steps; else extrapolated like today's)")
    parser.add_argument("--corrections", type=int, default=30)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--work-dir", type=Path, default=ROOT / ".cache" / "bench")
    parser.add_argument("--out", type=Path, default=None, help="write the result as JSON here")
    parser.add_argument("--tiny", action="store_true",
                        help="the tests' tiny-clipseg and 160 x 120 scenes: a seconds-long run that checks the script")
    args = parser.parse_args(argv)
    flush_denormals()
    torch.set_num_threads(args.threads)
    preset = "tiny-clipseg" if args.tiny else "clipseg-rd64"
    model_dir = build_or_reuse(preset, args.work_dir, 0)
    samples = corrections(args.corrections, (160, 120) if args.tiny else (640, 480))
    load_before = os.getloadavg()
    with tempfile.TemporaryDirectory(prefix="features-") as cache:
        print("cached path ...", file=sys.stderr, flush=True)
        cached_steps = args.cached_steps or args.steps
        cached = run(model_dir, samples, cached_steps, Path(cache))
        print(f"cached: {cached['timings']}", file=sys.stderr, flush=True)
        t = time.perf_counter()
        again = FrozenInputs(load_model(model_dir, "cpu"), FeatureCache(Path(cache)))
        again.prepare([s.image for s in samples], [s.phrase for s in samples])
        warm_features = time.perf_counter() - t - 0.0
        assert again.computed_images == 0
    print(f"warm features: {warm_features:.1f} s; today's path ...", file=sys.stderr, flush=True)
    today = run(model_dir, samples, args.reference_steps, None)
    print(f"today: {today['timings']}", file=sys.stderr, flush=True)
    k = args.reference_steps
    per_step_today = today["timings"]["train"] / k
    today_total = sum(v for n, v in today["timings"].items() if n != "train") + per_step_today * args.steps
    per_step_cached = cached["timings"]["train"] / cached_steps
    cold_total = sum(v for n, v in cached["timings"].items() if n != "train") + per_step_cached * args.steps
    warm_total = cold_total - cached["timings"]["features"] + warm_features
    diff = float(np.max(np.abs(np.array(cached["losses"][:k]) - np.array(today["losses"]))))
    result = {
        "preset": preset, "steps": args.steps, "corrections": args.corrections, "samples": cached["samples"],
        "today": {**today["timings"], "per_step": round(per_step_today, 2), "total_extrapolated": round(today_total, 1)},
        "cached_cold": {**cached["timings"], "per_step": round(per_step_cached, 3), "steps_timed": cached_steps,
                        "total": round(cold_total, 1)},
        "cached_warm": {"features_incl_model_load": round(warm_features, 2), "total": round(warm_total, 1)},
        "speedup_cold": round(today_total / cold_total, 1), "speedup_warm": round(today_total / warm_total, 1),
        "max_loss_difference_first_steps": diff, "losses_today": today["losses"],
        "losses_cached": cached["losses"][:k], "feature_bytes": cached["feature_bytes"],
        "load_before": [round(x, 2) for x in load_before], "load_after": [round(x, 2) for x in os.getloadavg()],
        "threads": args.threads,
    }
    print(json.dumps(result, indent=2))
    print(f"fine-tune of {args.corrections} corrections, {args.steps} steps, {preset}: today's path "
          f"{today_total:.0f} s (extrapolated from {k} steps at {per_step_today:.2f} s), cached {cold_total:.0f} s cold "
          f"/ {warm_total:.0f} s warm: {result['speedup_cold']}x / {result['speedup_warm']}x; losses of the first {k} "
          f"steps differ by at most {diff:.2e}; load {result['load_before']} -> {result['load_after']}")
    if args.out:
        args.out.write_text(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
