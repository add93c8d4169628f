"""CPU learning benchmark: train a small film-decoder FROM SCRATCH on generated shapes, report held-out mIoU.

Everything is random-initialised (vision tower, text tower, decoder): the vision tower and decoder learn, the text
tower stays a fixed random encoder (the model family never trains it), so phrases are told apart only through its
random — but deterministic — embeddings. The held-out set is generated data with the same phrase kinds and a
different seed, so no held-out scene or phrase instance was seen in training.

    .venv/bin/python benchmarks/learning_cpu.py            # the measured configuration (docs/training.md)
    .venv/bin/python benchmarks/learning_cpu.py --steps 200 --kinds color_shape   # a quick look

Target: held-out mIoU >= 0.85 in under 10 minutes on 2 CPU cores.
"""
from __future__ import annotations

import argparse
import json
import logging
import shutil
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from clipseg_model.checkpoint import save_checkpoint  # noqa: E402
from clipseg_model.config import ModelConfig, Preset, TinyBackbone, PRESETS  # noqa: E402
from clipseg_model.loading import build_model  # noqa: E402
from clipseg_model.random_init import write_backbone  # noqa: E402
from clipseg_model.vocab import build_tokenizer  # noqa: E402
from finetune.shapes import KINDS, ShapesDataset  # noqa: E402
from finetune.training import TRAIN_PRESETS, evaluate, train  # noqa: E402

log = logging.getLogger("learning_cpu")

# Benchmark models, defined here (not in clipseg_model.config) because they exist only for this benchmark.
BENCH_PRESETS: dict[str, Preset] = {
    "small-film": PRESETS["small-film"],
}


def build_random(preset: Preset, out: Path, seed: int) -> Path:
    """Random backbone + fresh decoder for `preset`, saved as a checkpoint directory (like `init_model`)."""
    tokenizer, _ = build_tokenizer(None)
    base = out.parent / f".{out.name}-base"
    shutil.rmtree(base, ignore_errors=True)
    base.mkdir(parents=True)
    write_backbone(preset, base, tokenizer, seed)
    torch.manual_seed(seed + 1)
    model = build_model(preset.config.replace(base_model=str(base)), "cpu")
    save_checkpoint(model, out, {"version": "bench-init", "random_weights": True}, base_dir=base, move_base=True)
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="small-film", choices=sorted(BENCH_PRESETS))
    parser.add_argument("--steps", type=int, default=1500)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--lr", type=float, default=2e-3)
    parser.add_argument("--kinds", default=",".join(KINDS), help=f"phrase kinds, comma-separated (of {','.join(KINDS)})")
    parser.add_argument("--train-samples", type=int, default=200_000, help="length of the generated training stream")
    parser.add_argument("--val-samples", type=int, default=500)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--eval-every", type=int, default=0, help="validate on 200 held-out samples every N steps")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=None, help="keep the run here (default: a temp dir)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    torch.set_num_threads(args.threads)

    preset = BENCH_PRESETS[args.model]
    size = preset.config.image_size
    kinds = tuple(k.strip() for k in args.kinds.split(",") if k.strip())
    # Same generator options for both; only the seed differs (held-out scenes, same phrase distribution).
    train_data = ShapesDataset(args.train_samples, seed=1000 + args.seed, image_size=size, kinds=kinds)
    val_data = ShapesDataset(args.val_samples, seed=2000 + args.seed, image_size=size, kinds=kinds)
    cfg = TRAIN_PRESETS["improved"].replace(lr=args.lr, batch_size=args.batch_size, steps=args.steps,
                                            warmup_fraction=0.03, eval_every=args.eval_every, log_every=25,
                                            max_eval_samples=200, seed=args.seed)
    work = Path(args.out) if args.out else Path(tempfile.mkdtemp(prefix="learning-cpu-"))
    started, cpu_started = time.time(), time.process_time()
    model_dir = build_random(preset, work / "init", args.seed)
    from clipseg_model.loading import load_model

    model = load_model(model_dir, "cpu")
    result = train(model, train_data, val_data if args.eval_every else None, cfg, work / "run", "cpu", progress=sys.stderr.isatty())
    trained = time.time()
    metrics = evaluate(model, val_data, batch_size=64).metrics
    total = time.time() - started
    # CPU seconds / threads is the wall time an otherwise idle machine needs (the 2 cores may be shared).
    cpu = time.process_time() - cpu_started
    summary = {"model": args.model, "kinds": list(kinds), "steps": args.steps, "batch_size": args.batch_size,
               "lr": args.lr, "final_loss": result.final_loss, "heldout": metrics,
               "train_seconds": round(trained - started, 1), "total_seconds": round(total, 1),
               "cpu_seconds": round(cpu, 1), "out": str(work)}
    print(json.dumps(summary, indent=2))
    print(f"held-out mIoU {metrics['miou']:.4f} (mean Dice {metrics['mean_dice']:.4f}, n={metrics['n']}) "
          f"in {total / 60:.1f} min wall time ({cpu / 60:.1f} CPU-min on {args.threads} threads)")
    if not args.out:
        shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
