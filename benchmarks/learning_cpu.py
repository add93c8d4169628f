"""CPU learning benchmark: train a small film-decoder FROM SCRATCH on generated shapes, report held-out mIoU per kind.

Everything is random-initialised and trained: vision tower (patch/position embeddings included, `train_embeddings`),
text tower (`train_text`) and decoder. The model and the recipe are the presets `cpu-scratch` (`clipseg train
--model-preset cpu-scratch --preset cpu-scratch --init-random` builds the same): a small random CLIP at 64 px (8 x 8
patch grid), the film-decoder's pixel branch (stride 2, pixel tokens with 2 patch-grid convolutions, pixel
coordinates), word attention, decoder positions, relative-position bias and the text-token alignment head trained
alongside the masks (`--align-weight 3`); batches of 12 scenes with 3 phrases each (`phrases_per_image`: one
encoding per scene), 3,400 steps. Phrases are tokenised by a word-level CLIP-compatible BPE vocabulary built from
the shapes vocabulary (each word one token). The held-out set is generated with the same `ShapesConfig` as the
training stream and a different seed (training 1000 + seed, held-out 2000 + seed), so no held-out scene was seen in
training; it has all five phrase kinds (colour + shape, colour, shape, position, size), a fifth each. Half of the
training stream comes from a second generator (seed 3000 + seed) that only makes `--boost-kind` phrases (shape,
position, size). The configuration is printed with the result, and a table of mIoU per phrase kind.

    .venv/bin/python benchmarks/learning_cpu.py            # the measured configuration (docs/training.md, "CPU learning benchmark")
    .venv/bin/python benchmarks/learning_cpu.py --steps 300 --eval-every 100   # a quick look

Target: held-out mIoU >= 0.85 and every kind >= 0.75 in under 10 minutes on 2 CPU cores (measured in
docs/training.md: 8.6 minutes with 2 threads on an AMD EPYC 2-vCPU machine; the same step cost took 10.2-11.4
minutes on a shared Intel Xeon machine).
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import shutil
import sys
import tempfile
import time
from pathlib import Path

import torch
from torch.utils.data import ConcatDataset

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from transformers import CLIPTokenizer  # noqa: E402

from clipseg_model.checkpoint import save_checkpoint  # noqa: E402
from clipseg_model.config import PRESETS, Preset  # noqa: E402
from clipseg_model.loading import build_model, load_model  # noqa: E402
from clipseg_model.numerics import flush_denormals  # noqa: E402
from clipseg_model.random_init import write_backbone  # noqa: E402
from clipseg_model.vocab import build_tokenizer, word_level_tokenizer  # noqa: E402
from finetune.shapes import KINDS, ShapesConfig, ShapesDataset, phrase_words  # noqa: E402
from finetune.evaluation import evaluate  # noqa: E402
from finetune.metrics import iou  # noqa: E402
from finetune.recipe import TRAIN_PRESETS  # noqa: E402
from finetune.training import train  # noqa: E402

log = logging.getLogger("learning_cpu")

MODEL_PRESET = TRAIN_PRESET = "cpu-scratch"  # the benchmark's model and recipe, also reachable from `clipseg train`


def bench_preset(hidden: int | None = None, **changes) -> Preset:
    """The benchmark model: preset `cpu-scratch` with `changes` to its ModelConfig (a flag given on the command line)
    and `hidden` as the width of both random towers; no changes reproduce the preset exactly."""
    base = PRESETS[MODEL_PRESET]
    config = base.config.replace(**{k: v for k, v in changes.items() if v is not None})  # checks d_model etc.
    if config.image_size != config.output_size:
        config = config.replace(output_size=config.image_size)
    width = hidden or base.backbone.hidden
    backbone = dataclasses.replace(base.backbone, image=config.image_size, hidden=width, projection=width)
    same = config == base.config and backbone == base.backbone
    return Preset(config, base.description if same else f"{base.description}; benchmark variant", backbone)


def build_random(preset: Preset, out: Path, seed: int, tokenizer: CLIPTokenizer) -> Path:
    """Random backbone + fresh decoder for `preset`, saved as a checkpoint directory (like `init_model`)."""
    base = out.parent / f".{out.name}-base"
    shutil.rmtree(base, ignore_errors=True)
    base.mkdir(parents=True)
    write_backbone(preset, base, tokenizer, seed)
    torch.manual_seed(seed + 1)
    model = build_model(preset.config.replace(base_model=str(base)), "cpu")
    save_checkpoint(model, out, {"version": "bench-init", "random_weights": True}, base_dir=base, move_base=True)
    return out


def breakdown(evaluation, val_data: ShapesDataset) -> dict[str, float]:
    """mIoU per phrase kind, the share of samples with IoU < 0.3 (wrong object / missed) and the mIoU of the rest
    (how good the masks of found objects are)."""
    ious = [float(row["iou"]) for row in evaluation.per_sample]
    kinds = [row["kind"] for row in evaluation.per_sample]
    out: dict[str, float] = {}
    for kind in sorted(set(kinds)):
        values = [v for v, k in zip(ious, kinds) if k == kind]
        out[f"miou_{kind}"] = round(sum(values) / len(values), 4)
    found = [v for v in ious if v >= 0.3]
    out["share_iou_below_0.3"] = round(1 - len(found) / max(1, len(ious)), 4)
    out["miou_of_found"] = round(sum(found) / max(1, len(found)), 4)
    return out


def one_shot_breakdown(model, val_data: ShapesDataset) -> dict[str, float]:
    """One-shot mIoU per phrase kind through the serving path (`ExemplarSegmenter`): each held-out sample whose
    target has a visual concept (`meta["concept"]`) is prompted by the next held-out sample of that concept (another
    scene's object) instead of its phrase; samples whose concept has no other instance are left out (`n` counts
    the rest)."""
    from clipseg_model.exemplar_segmenter import ExemplarSegmenter
    from clipseg_model.predictor import Segmenter

    samples = [val_data[i] for i in range(len(val_data))]
    by_concept: dict[str, list[int]] = {}
    for i, s in enumerate(samples):
        if s.meta.get("concept"):
            by_concept.setdefault(s.meta["concept"], []).append(i)
    seg = ExemplarSegmenter(Segmenter(model, threshold=0.5))
    per_kind: dict[str, list[float]] = {}
    for indices in by_concept.values():
        for j, i in enumerate(indices[:-1] if len(indices) > 1 else []):
            target, example = samples[i], samples[indices[j + 1]]
            mask = seg.predict(target.image, [(example.image, example.mask)]).mask
            per_kind.setdefault(target.meta["kind"], []).append(iou(mask, target.mask))
    values = [v for vs in per_kind.values() for v in vs]
    out = {f"miou_{kind}": round(sum(vs) / len(vs), 4) for kind, vs in sorted(per_kind.items())}
    return {**out, "miou": round(sum(values) / max(1, len(values)), 4), "n": len(values)}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    recipe = TRAIN_PRESETS[TRAIN_PRESET]
    model_cfg = PRESETS[MODEL_PRESET].config
    parser.add_argument("--steps", type=int, default=recipe.steps)
    parser.add_argument("--batch-size", type=int, default=recipe.batch_size)
    parser.add_argument("--lr", type=float, default=recipe.lr)
    parser.add_argument("--warmup", type=float, default=recipe.warmup_fraction, help="warm-up share of the steps")
    parser.add_argument("--dice-weight", type=float, default=recipe.dice_weight)
    parser.add_argument("--align-weight", type=float, default=recipe.align_weight,
                        help="weight of the text-token alignment loss (0: off, and no alignment head)")
    parser.add_argument("--tokenizer", default="word", choices=("word", "byte"),
                        help="word: one token per shapes word (built from concept_vocabulary); byte: byte-level")
    model = parser.add_argument_group(f"model (defaults: preset {MODEL_PRESET})")
    model.add_argument("--image-size", type=int, default=None, help=f"default {model_cfg.image_size}")
    model.add_argument("--hidden", type=int, default=None, help="vision/text tower width")
    model.add_argument("--d-model", type=int, default=None, help=f"decoder width (default {model_cfg.d_model})")
    model.add_argument("--n-layers", type=int, default=None, help=f"decoder layers (default {model_cfg.n_layers})")
    model.add_argument("--dropout", type=float, default=None, help="decoder dropout")
    model.add_argument("--pixel-channels", type=int, default=None, help="width of the pixel branch (0: off)")
    model.add_argument("--pixel-token-layers", type=int, default=None,
                       help=f"3x3 convolutions at the patch grid in the pixel tokens (default {model_cfg.pixel_token_layers})")
    model.add_argument("--pixel-stride", type=int, default=None, choices=(1, 2),
                       help=f"2: the pixel branch works at half the side (default {model_cfg.pixel_stride})")
    flags = {"train_embeddings": "train the vision patch/position embeddings too",
             "pixel_tokens": "the pixel branch also adds strided-conv features to the decoder's image tokens",
             "word_attention": "decoder layers cross-attend to the phrase's token states",
             "decoder_positions": "add (x, y) position features to the decoder's image tokens",
             "relative_positions": "a learned per-head self-attention bias from each token pair's (dx, dy)",
             "alignment_trains_text": "the alignment loss's gradient reaches the text tower too",
             "pixel_coordinates": "the pixel branch's phrase FiLM also sees each pixel's (x, y)"}
    for name, text in flags.items():
        model.add_argument(f"--{name.replace('_', '-')}", action=argparse.BooleanOptionalAction, default=None,
                           help=f"{text} (default {'on' if getattr(model_cfg, name) else 'off'})")
    parser.add_argument("--kinds", default=",".join(KINDS),
                        help=f"phrase kinds, comma-separated (of {','.join(KINDS)})")
    parser.add_argument("--boost-kind", default="shape,position,size",
                        help="phrase kinds (comma-separated) to over-sample in TRAINING (held-out unchanged)")
    parser.add_argument("--boost-share", type=float, default=0.5,
                        help="share of the training stream drawn from a stream of only --boost-kind phrases")
    parser.add_argument("--min-radius", type=float, default=0.12, help="object radius, fraction of the image side")
    parser.add_argument("--max-radius", type=float, default=0.25)
    parser.add_argument("--min-objects", type=int, default=2)
    parser.add_argument("--max-objects", type=int, default=4)
    parser.add_argument("--train-samples", type=int, default=200_000, help="length of the generated training stream")
    parser.add_argument("--phrases-per-scene", type=int, default=recipe.phrases_per_image,
                        help="k >= 1: each training item is one scene with up to k phrases about different objects "
                             "(the image encoded once; --batch-size counts scenes); 0: one phrase per scene")
    parser.add_argument("--val-samples", type=int, default=500)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--num-workers", type=int, default=recipe.num_workers,
                        help="DataLoader worker processes generating scenes while the model trains")
    parser.add_argument("--eval-every", type=int, default=0,
                        help=f"also validate on {recipe.max_eval_samples} held-out samples every N steps (default 0: "
                             "only the final evaluation, which is what the 10-minute budget counts)")
    parser.add_argument("--visual-prompt-ratio", type=float, default=recipe.visual_prompt_ratio,
                        help="share of phrases conditioned on an example crop instead (TrainConfig.visual_prompt_ratio); "
                             "> 0 adds a one-shot column (each held-out scene prompted by another scene's object of "
                             "its target's concept) and needs --no-word-attention (a crop has no word states)")
    parser.add_argument("--visual-prompt-hue", type=float, default=recipe.visual_prompt_hue,
                        help="hue jitter (degrees) of visual-only phrases (TrainConfig.visual_prompt_hue)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=None, help="keep the run here (default: a temp dir)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    flush_denormals()  # before torch starts threads: subnormals made trained steps 2.7x slower
    torch.set_num_threads(args.threads)

    preset = bench_preset(args.hidden, image_size=args.image_size, d_model=args.d_model, n_layers=args.n_layers,
                          dropout=args.dropout, pixel_channels=args.pixel_channels, pixel_stride=args.pixel_stride,
                          pixel_token_layers=args.pixel_token_layers,
                          text_alignment=args.align_weight > 0,
                          **{name: getattr(args, name) for name in flags})
    if args.visual_prompt_ratio > 0 and preset.config.word_attention:
        parser.error("--visual-prompt-ratio > 0 needs --no-word-attention: a visual prompt has no word states")
    image_size = preset.config.image_size
    kinds = tuple(k.strip() for k in args.kinds.split(",") if k.strip())
    boost = tuple(k.strip() for k in args.boost_kind.split(",") if k.strip())
    if boost and (not set(boost) <= set(kinds) or not 0 <= args.boost_share < 1):
        parser.error(f"--boost-kind must be some of --kinds ({', '.join(kinds)}) and --boost-share in [0, 1)")
    # One generator configuration for both sets; only the seed differs (held-out scenes, same distribution).
    shapes = ShapesConfig(image_size=image_size, kinds=kinds, min_radius=args.min_radius,
                          max_radius=args.max_radius, min_objects=args.min_objects, max_objects=args.max_objects)
    train_data = ShapesDataset(args.train_samples, seed=1000 + args.seed, config=shapes,
                               phrases_per_scene=args.phrases_per_scene)
    if boost and args.boost_share > 0:
        # A second stream (its own seed) of only the boosted kind; the sampler shuffles the two together.
        boosted = round(args.train_samples * args.boost_share / (1 - args.boost_share))
        train_data = ConcatDataset([train_data, ShapesDataset(boosted, seed=3000 + args.seed,
                                                              config=dataclasses.replace(shapes, kinds=boost),
                                                              phrases_per_scene=args.phrases_per_scene)])
    val_data = ShapesDataset(args.val_samples, seed=2000 + args.seed, config=shapes)
    cfg = recipe.replace(lr=args.lr, batch_size=args.batch_size, steps=args.steps, warmup_fraction=args.warmup,
                         dice_weight=args.dice_weight, eval_every=args.eval_every, align_weight=args.align_weight,
                         seed=args.seed, num_workers=args.num_workers, phrases_per_image=args.phrases_per_scene,
                         visual_prompt_ratio=args.visual_prompt_ratio, visual_prompt_hue=args.visual_prompt_hue)
    tokenizer = word_level_tokenizer(phrase_words()) if args.tokenizer == "word" else build_tokenizer(None)[0]
    work = Path(args.out) if args.out else Path(tempfile.mkdtemp(prefix="learning-cpu-"))
    started, cpu_started = time.time(), time.process_time()
    model = load_model(build_random(preset, work / "init", args.seed, tokenizer), "cpu")
    result = train(model, train_data, val_data if args.eval_every else None, cfg, work / "run", "cpu",
                   progress=sys.stderr.isatty())
    trained = time.time()
    evaluation = evaluate(model, val_data, batch_size=64)
    metrics = evaluation.metrics
    one_shot = one_shot_breakdown(model, val_data) if args.visual_prompt_ratio > 0 else {}
    total = time.time() - started
    # CPU seconds / threads is the wall time an otherwise idle machine needs (the 2 cores may be shared).
    cpu = time.process_time() - cpu_started
    with open("/proc/loadavg") as f:
        load = f.read().split()[:3]
    shapes_desc = {k: (list(v) if isinstance(v, (tuple, frozenset)) else v)
                   for k, v in dataclasses.asdict(shapes).items() if not isinstance(v, frozenset) or v}
    summary = {"model": dataclasses.asdict(preset.config) | {"backbone": dataclasses.asdict(preset.backbone)},
               "tokenizer": args.tokenizer, "shapes": shapes_desc, "train": cfg.to_dict(),
               "boost": {"kind": args.boost_kind, "share": args.boost_share, "train_stream_length": len(train_data)},
               "final_loss": result.final_loss, "heldout": metrics, "breakdown": breakdown(evaluation, val_data),
               "one_shot": one_shot, "train_seconds": round(trained - started, 1),
               "total_seconds": round(total, 1), "cpu_seconds": round(cpu, 1),
               "idle_estimate_seconds": round(cpu / args.threads, 1), "load_average": load, "out": str(work)}
    print(json.dumps(summary, indent=2))
    print(f"held-out mIoU {metrics['miou']:.4f} (mean Dice {metrics['mean_dice']:.4f}, n={metrics['n']}) "
          f"in {total / 60:.1f} min wall time ({cpu / 60:.1f} CPU-min on {args.threads} threads, "
          f"~{cpu / args.threads / 60:.1f} min on an idle machine; load average {' '.join(load)})")
    table = breakdown(evaluation, val_data)
    if one_shot:  # the visual-prompt column: the same held-out targets, prompted by an example instead of words
        print("| phrase kind | held-out mIoU | one-shot mIoU |\n|---|---|---|")
        for kind in kinds:
            print(f"| {kind} | {table.get(f'miou_{kind}', float('nan')):.3f} | "
                  f"{one_shot.get(f'miou_{kind}', float('nan')):.3f} |")
        print(f"| all | {metrics['miou']:.3f} | {one_shot['miou']:.3f} (n={one_shot['n']}) |")
    else:
        print("| phrase kind | held-out mIoU |\n|---|---|")
        for kind in kinds:
            print(f"| {kind} | {table.get(f'miou_{kind}', float('nan')):.3f} |")
        print(f"| all | {metrics['miou']:.3f} |")
    if not args.out:
        shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
