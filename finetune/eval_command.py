"""`clipseg eval`: evaluate a model on RefCOCO or generated shapes.

Writes `OUT/metrics.json` (metrics at the threshold, the threshold sweep, the run's settings),
`OUT/per_sample.json`, and `OUT/index.html` with a PNG grid (referring text | image | prediction | ground truth);
prints Dice (mean and pooled), mIoU, oIoU and Prec@0.5..0.9.

    clipseg eval --model runs/seed/best --data jxu124 --image-root data/coco/train2014 --split val --out eval/seed
"""
from __future__ import annotations

import argparse
import logging
from pathlib import Path

from finetune.train_command import add_data_arguments, apply_threads, open_dataset

log = logging.getLogger(__name__)


def configure(parser: argparse.ArgumentParser, settings) -> None:
    """Arguments of `clipseg eval`; model, threshold and device defaults come from `settings`."""
    parser.add_argument("--model", default=settings.model, help=f"checkpoint directory or hub id (default: MODEL or {settings.model})")
    add_data_arguments(parser, "val")
    parser.add_argument("--out", type=Path, required=True, help="report directory (metrics.json, index.html, grid.png)")
    parser.add_argument("--threshold", type=float, default=settings.mask_threshold, help="binarisation threshold of the probabilities")
    parser.add_argument("--no-sweep", action="store_true", help="skip the threshold sweep 0.1..0.9")
    parser.add_argument("--rows", type=int, default=16, help="examples in the HTML grid")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--num-workers", type=int, default=0, help="DataLoader worker processes")
    parser.add_argument("--device", default=settings.device)


def format_metrics(m: dict) -> str:
    """The metrics a paper table reports, as printed lines."""
    precs = "  ".join(f"P@{t}: {m[f'prec@{t}'] * 100:.2f}" for t in ("0.5", "0.6", "0.7", "0.8", "0.9"))
    return (f"samples:      {m['n']}\n"
            f"Dice:         mean {m['mean_dice'] * 100:.2f}%   pooled {m['pooled_dice'] * 100:.2f}%\n"
            f"IoU:          mIoU {m['miou'] * 100:.2f}%   oIoU {m['oiou'] * 100:.2f}%\n"
            f"Prec@X (%):   {precs}")


def run(args: argparse.Namespace, settings) -> int:
    """Evaluate, write the report and print the metrics."""
    import time

    from clipseg_model.errors import ClipsegError
    from clipseg_model.loading import load_model
    from finetune.report import write_html_report, write_metrics_json
    from finetune.evaluation import evaluate

    threads = apply_threads(args)
    model = load_model(args.model, args.device)
    dataset = open_dataset(args, args.split, args.max_samples, model.config.image_size, spread=True)
    if len(dataset) == 0:
        raise ClipsegError(f"no samples in {args.data} split {args.split}")
    started = time.time()
    result = evaluate(model, dataset, batch_size=args.batch_size, threshold=args.threshold, sweep=not args.no_sweep,
                      max_rows=args.rows, num_workers=args.num_workers)
    seconds = time.time() - started
    info = {"model": str(args.model), "model_version": model.version, "data": args.data, "data_path": args.data_path,
            "split": args.split, "seconds": round(seconds, 2), "threads": threads}
    if args.data in ("refer", "jxu124"):
        info["dataset"] = args.dataset + (f"({args.split_by})" if args.split_by else "")
    best = None
    if result.sweep:
        best_t, best_m = max(result.sweep.items(), key=lambda kv: (kv[1]["miou"], -abs(kv[0] - 0.5)))
        best = {"threshold": best_t, "miou": best_m["miou"], "mean_dice": best_m["mean_dice"]}
    metrics = {**result.metrics, "run": info, **({"best_threshold": best} if best else {})}
    args.out.mkdir(parents=True, exist_ok=True)
    index = write_html_report(args.out, metrics, result.rows, title=f"{model.version} on {args.data} {args.split}",
                              sweep=result.sweep)
    write_metrics_json(args.out / "per_sample.json", {"samples": result.per_sample})
    print(f"model {model.version} on {args.data}/{args.split} ({seconds:.1f} s)")
    print(format_metrics(result.metrics))
    if best:
        print(f"best threshold {best['threshold']:.1f}: mIoU {best['miou'] * 100:.2f}%, mean Dice {best['mean_dice'] * 100:.2f}%")
    print(f"metrics JSON: {args.out / 'metrics.json'}")
    print(f"HTML report:  {index}")
    return 0
