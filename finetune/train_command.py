"""`clipseg train`: train a model on RefCOCO (three formats) or generated shapes.

    clipseg train --model-preset seed --data jxu124 --image-root data/coco/train2014 --out runs/seed
    clipseg train --model-preset tiny-improved --init-random --data shapes --steps 50 --out runs/smoke
    torchrun --nproc_per_node 4 -m backend.cli train --model-preset improved --preset improved ...

The data options are shared with `clipseg eval` (see `add_data_arguments` / `open_dataset`).
"""
from __future__ import annotations

import argparse
import logging
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

DATA_KINDS = ("shapes", "jxu124", "lmms", "refer")
# Generated data: a different stream seed per split, so val/test scenes never repeat training scenes.
SHAPES_SPLIT_SEEDS = {"train": 0, "val": 1, "testA": 2, "testB": 3, "test": 4}
SHAPES_DEFAULT_LENGTH = {"train": 20_000}  # other splits: 500


def add_data_arguments(parser: argparse.ArgumentParser, split: str) -> None:
    """The dataset options of `clipseg train` and `clipseg eval`; `split` is the default --split."""
    group = parser.add_argument_group("data")
    group.add_argument("--data", choices=DATA_KINDS, default="shapes",
                       help="shapes: generated scenes; jxu124: HF jxu124/<dataset> + COCO images; lmms: HF "
                            "lmms-lab/RefCOCO (images embedded, no train split); refer: the refer toolkit's layout, "
                            "<data-path>/<dataset>/refs(<split-by>).p + instances.json")
    group.add_argument("--dataset", choices=("refcoco", "refcoco+", "refcocog"), default="refcoco",
                       help="which RefCOCO (refer, jxu124)")
    group.add_argument("--split-by", choices=("unc", "umd", "google"), default=None,
                       help="refer's split scheme (default: unc; umd for refcocog): refcoco unc|google, "
                            "refcoco+ unc, refcocog umd|google")
    group.add_argument("--data-path", default=None,
                       help="hub id or local path of the dataset (default: jxu124/<dataset>, lmms-lab/RefCOCO; "
                            "for refer: the folder holding <dataset>/refs(<split-by>).p)")
    group.add_argument("--image-root", default=None,
                       help="folder of COCO_train2014_*.jpg, or a folder above it: train2014/, coco/train2014/ and "
                            "images/mscoco/images/train2014/ under it are searched (jxu124, refer; refer default: "
                            "--data-path)")
    group.add_argument("--split", default=split,
                       help=f"train, val, testA, testB, test (refer: every test split, testA + testB for refcoco) "
                            f"(default {split})")
    group.add_argument("--max-samples", type=int, default=0,
                       help="use N samples of --split: train the first N, eval N spread evenly over it (0: all; "
                            "shapes: the generated length)")
    group.add_argument("--shapes-size", type=int, default=0, help="shapes: image side in px (default: the model's input size)")
    group.add_argument("--sentences", choices=("all", "first"), default="all",
                       help="RefCOCO: one sample per sentence (all) or per referred object (first)")
    parser.add_argument("--threads", type=int, default=0,
                        help="torch CPU threads (0: torch's default, one per core; on a busy machine fewer is faster)")


def apply_threads(args: argparse.Namespace) -> int:
    """Set torch's CPU thread count from --threads (0 keeps torch's default); returns the count in use."""
    import torch

    if args.threads < 0:
        from clipseg_model.errors import ClipsegError

        raise ClipsegError(f"--threads must be >= 0, got {args.threads}")
    if args.threads:
        torch.set_num_threads(args.threads)
    return torch.get_num_threads()


def open_dataset(args: argparse.Namespace, split: str, max_samples: int, model_image_size: int, spread: bool = False):
    """The `ReferringDataset` the data options name, for `split`, cut to `max_samples` (0: all): the first ones,
    or with `spread` that many spread evenly over the split (validation subsets)."""
    from clipseg_model.errors import ClipsegError
    from finetune.samples import Subset
    from finetune.evaluation import spread_indices

    try:
        if args.data == "shapes":
            from finetune.shapes import ShapesDataset

            length = max_samples or SHAPES_DEFAULT_LENGTH.get(split, 500)
            if split not in SHAPES_SPLIT_SEEDS:
                raise ClipsegError(f"unknown split {split!r}; choose one of {', '.join(SHAPES_SPLIT_SEEDS)}")
            return ShapesDataset(length, seed=SHAPES_SPLIT_SEEDS[split], image_size=args.shapes_size or model_image_size)
        if args.data == "jxu124":
            from finetune.refcoco import HFRefCOCO

            if not args.image_root:
                raise ClipsegError("--data jxu124 needs --image-root (the COCO train2014 image folder)")
            ds = HFRefCOCO(args.data_path or f"jxu124/{args.dataset}", split=split, image_root=args.image_root,
                           sentences=args.sentences)
        elif args.data == "lmms":
            from finetune.refcoco import LmmsRefCOCO

            ds = LmmsRefCOCO(args.data_path or "lmms-lab/RefCOCO", split=split, sentences=args.sentences)
        else:
            from finetune.refcoco import ReferRefCOCO

            if not args.data_path:
                raise ClipsegError(f"--data refer needs --data-path (the folder holding {args.dataset}/refs(...).p)")
            ds = ReferRefCOCO(args.data_path, dataset=args.dataset, split_by=args.split_by, split=split,
                              image_root=args.image_root, sentences=args.sentences)
    except (OSError, ValueError) as exc:  # missing files, unknown split, offline hub: one line for the user
        raise ClipsegError(f"cannot open {args.data} data (split {split}): {str(exc).splitlines()[0] if str(exc) else exc}") from exc
    if max_samples and max_samples < len(ds):
        return Subset(ds, spread_indices(len(ds), max_samples) if spread else range(max_samples))
    return ds


def group_by_image(dataset, k: int, strict: bool = True):
    """The training set as scene groups of up to `k` phrases of one image (`TrainConfig.phrases_per_image`):
    generated shapes make k phrases per scene, RefCOCO loaders group their samples by image (`ImageGroups`);
    k < 2 leaves `dataset` as it is. A loader that cannot list its images is an error when `strict` (the user asked
    for k), else (k came from a preset) a warning and one phrase per item."""
    from clipseg_model.errors import ClipsegError
    from finetune.samples import ImageGroups
    from finetune.shapes import ShapesDataset

    if k < 2:
        return dataset
    if isinstance(dataset, ShapesDataset):
        return ShapesDataset(len(dataset), seed=dataset.seed, config=dataset.config, phrases_per_scene=k)
    try:
        return ImageGroups(dataset, k)
    except ValueError as exc:
        if not strict:
            log.warning("the recipe trains %d phrases per image, but %s; training one phrase per item "
                        "(--phrases-per-image 0 silences this)", k, exc)
            return dataset
        raise ClipsegError(f"--phrases-per-image {k}: {exc}") from exc


def configure(parser: argparse.ArgumentParser, settings) -> None:
    """Arguments of `clipseg train`; the device default comes from `settings` (DEVICE)."""
    from clipseg_model.config import PRESETS
    from finetune.recipe import TRAIN_PRESETS

    parser.add_argument("--preset", choices=sorted(TRAIN_PRESETS), default="improved",
                        help="training recipe: seed (BCE, Adam 1e-3), improved (AdamW, cosine, Dice+BCE) or "
                             "cpu-scratch (the CPU learning benchmark's: improved, 12 images x 3 phrases, 3,400 "
                             "steps, alignment loss 3; with --model-preset cpu-scratch --init-random)")
    start = parser.add_mutually_exclusive_group(required=True)
    start.add_argument("--model", help="start from this checkpoint directory or hub id")
    start.add_argument("--model-preset", choices=sorted(PRESETS),
                       help="start from a model preset: its pretrained base (e.g. openai/clip-vit-base-patch16 for "
                            "seed) with a fresh decoder, or random weights with --init-random")
    parser.add_argument("--init-random", action="store_true",
                        help="with --model-preset: random weights, built offline in OUT/init (smoke tests, benchmarks)")
    parser.add_argument("--init-seed", type=int, default=0)
    parser.add_argument("--init-vocab", choices=("auto", "data"), default="auto",
                        help="with --init-random: auto = CLIP's BPE when open_clip is installed, else byte-level; "
                             "data = one token per word of the training phrases (other text falls back to bytes), "
                             "what the CPU learning benchmark uses")
    parser.add_argument("--model-option", action="append", default=[], metavar="KEY=VALUE",
                        help="with --model-preset: change one ModelConfig field, e.g. word_attention=true, "
                             "n_layers=3, extract_layers=[2,4] (repeatable; values are JSON, else strings)")
    parser.add_argument("--model-config", type=Path, default=None,
                        help="with --model-preset: a JSON file of ModelConfig fields to change (before --model-option)")
    add_data_arguments(parser, "train")
    parser.add_argument("--val-split", default="val", help="validation split ('none' to skip validation)")
    parser.add_argument("--max-val-samples", type=int, default=500,
                        help="validate on N samples spread evenly over --val-split (0: all)")
    train = parser.add_argument_group("training (defaults: the --preset)")
    train.add_argument("--steps", type=int, default=None, help="optimizer steps (overrides --epochs)")
    train.add_argument("--epochs", type=int, default=None)
    train.add_argument("--batch-size", type=int, default=None, help="per process (per GPU under torchrun)")
    train.add_argument("--lr", type=float, default=None)
    train.add_argument("--eval-every", type=int, default=None, help="steps between validations and resume points")
    train.add_argument("--num-workers", type=int, default=None, help="DataLoader worker processes")
    train.add_argument("--seed", type=int, default=None)
    train.add_argument("--align-weight", type=float, default=None,
                       help="add this x the text-token alignment loss (a model with text_alignment, e.g. tiny-pixel)")
    train.add_argument("--hflip", type=float, default=None,
                       help="probability of a horizontal flip per sample (left/right words in the phrase are swapped)")
    train.add_argument("--phrases-per-image", type=int, default=None,
                       help="k >= 2: train on up to k phrases of one image together (the image encoded once; "
                            "--batch-size then counts images); 0: one phrase per item")
    train.add_argument("--visual-prompt-ratio", type=float, default=None,
                       help="share of phrases conditioned on an example crop of their concept instead of (or mixed "
                            "with) the text, so the model also takes visual prompts (CLIPSeg's recipe; default 0)")
    train.add_argument("--visual-prompt-mix", type=float, default=None,
                       help="share of those mixed with their phrase at a random weight (default 0.5)")
    train.add_argument("--visual-prompt-shots", type=int, default=None,
                       help="up to this many example crops per such phrase, averaged (default 1)")
    train.add_argument("--visual-prompt-hue", type=float, default=None,
                       help="turn a visual-only phrase's image and its crops by a random hue angle up to this many "
                            "degrees, so examples of unnamed colours work (default 0: off)")
    train.add_argument("--no-amp", action="store_true", help="train in fp32 on CUDA too")
    parser.add_argument("--out", type=Path, required=True, help="run directory (checkpoints, metrics.csv, loss.png)")
    parser.add_argument("--resume", action="store_true", help="continue the run in --out exactly where it stopped")
    parser.add_argument("--device", default=settings.device, help=f"auto, cpu, cuda, cuda:N (default: DEVICE or {settings.device})")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")


def _train_config(args: argparse.Namespace):
    from finetune.recipe import train_preset

    cfg = train_preset(args.preset)
    changes: dict[str, Any] = {}
    for name in ("steps", "epochs", "batch_size", "lr", "eval_every", "num_workers", "seed", "align_weight", "hflip",
                 "phrases_per_image", "visual_prompt_ratio", "visual_prompt_mix", "visual_prompt_shots",
                 "visual_prompt_hue"):
        value = getattr(args, name)
        if value is not None:
            changes[name] = value
    if args.epochs is not None and args.steps is None:
        changes["steps"] = 0  # an explicit --epochs wins over a preset's step count
    if args.no_amp:
        changes["amp"] = False
    return cfg.replace(**changes)


def model_config_changes(args: argparse.Namespace) -> dict[str, Any]:
    """ModelConfig fields that --model-config FILE and --model-option KEY=VALUE change (the options win)."""
    import dataclasses
    import json

    from clipseg_model.config import ModelConfig
    from clipseg_model.errors import ClipsegError

    changes: dict[str, Any] = {}
    if args.model_config is not None:
        try:
            changes.update(json.loads(args.model_config.read_text()))
        except (OSError, ValueError) as exc:
            raise ClipsegError(f"--model-config {args.model_config}: {exc}") from exc
    for item in args.model_option:
        key, sep, raw = item.partition("=")
        if not sep:
            raise ClipsegError(f"--model-option {item!r}: expected KEY=VALUE")
        try:
            changes[key.strip()] = json.loads(raw)
        except ValueError:
            changes[key.strip()] = raw  # a plain string (base_model=...)
    fields = {f.name for f in dataclasses.fields(ModelConfig)}
    unknown = sorted(set(changes) - fields)
    if unknown:
        raise ClipsegError(f"unknown model option(s) {', '.join(unknown)}; ModelConfig has: {', '.join(sorted(fields))}")
    if "architecture" in changes:
        raise ClipsegError("the architecture comes from --model-preset; choose another preset instead")
    return changes


def vocabulary_words(dataset, limit: int = 20_000) -> list[str]:
    """The words of a dataset's phrases, most frequent first (at most `limit`): lower-case letter runs, as CLIP's
    tokenizer splits text. RefCOCO loaders list their sentences without loading images; generated shapes list their
    vocabulary; other datasets are read (phrases only matter, but images are decoded too)."""
    import re
    from collections import Counter

    from finetune.shapes import ShapesDataset, phrase_words

    base = getattr(dataset, "dataset", dataset)  # a Subset: its words are the full split's
    if isinstance(base, ShapesDataset):
        return phrase_words(base.config)
    if hasattr(base, "sentence_lists"):
        phrases = (p for sentences in base.sentence_lists for p in sentences)
    else:
        phrases = (base[i].phrase for i in range(min(len(base), limit)))
    counts = Counter(w for p in phrases for w in re.findall(r"[a-z]+", str(p).lower()))
    return [w for w, _ in counts.most_common(limit)]


def _build_start_model(args: argparse.Namespace, device, is_main: bool, barrier):
    """The model training starts from, per --model / --model-preset [--init-random] and the model options."""
    from clipseg_model.config import preset
    from clipseg_model.errors import ClipsegError
    from clipseg_model.loading import build_model, load_model

    changes = model_config_changes(args)
    if args.model:
        if args.init_random or changes:
            raise ClipsegError("--init-random, --model-option and --model-config go with --model-preset, not --model "
                               "(a checkpoint's architecture is fixed)")
        return load_model(args.model, device)
    p = preset(args.model_preset)
    try:
        config = p.config.replace(**changes)
    except (TypeError, ValueError) as exc:
        raise ClipsegError(f"model options {changes}: {exc}") from exc
    if args.init_random:
        from clipseg_model.random_init import init_model

        init_dir = args.out / "init"
        if is_main and not init_dir.exists():  # on --resume the run's random start is reused
            tokenizer = None
            if args.init_vocab == "data":
                from clipseg_model.vocab import word_level_tokenizer

                words = vocabulary_words(open_dataset(args, args.split, args.max_samples, config.image_size))
                log.info("word-level vocabulary of %d words from the training phrases", len(words))
                tokenizer = word_level_tokenizer(words)
            args.out.mkdir(parents=True, exist_ok=True)
            init_model(args.model_preset, init_dir, seed=args.init_seed, config_changes=changes, tokenizer=tokenizer)
        barrier()
        return load_model(init_dir, device)
    if p.backbone is not None:
        raise ClipsegError(f"preset {args.model_preset!r} has a test-sized backbone that exists only with random "
                           "weights: add --init-random")
    return build_model(config, device)


def run(args: argparse.Namespace, settings) -> int:
    """Train, then print where the checkpoints, the CSV and the PNG are."""
    from clipseg_model.errors import ClipsegError
    from clipseg_model.loading import resolve_device
    from finetune.distributed import setup_distributed, teardown_distributed
    from finetune.training import train

    if (args.out / "state").exists() and not args.resume:
        raise ClipsegError(f"{args.out} already holds a training run; add --resume to continue it, or choose another --out")
    cfg = _train_config(args)
    threads = apply_threads(args)
    dist_info, device = setup_distributed(resolve_device(args.device))
    try:
        model = _build_start_model(args, device, dist_info.main, dist_info.barrier)
        size = model.config.image_size
        samples = open_dataset(args, args.split, args.max_samples, size)
        train_data = group_by_image(samples, cfg.phrases_per_image, strict=args.phrases_per_image is not None)
        val_data = None
        if args.val_split.lower() != "none":
            val_data = open_dataset(args, args.val_split, args.max_val_samples, size, spread=True)
        log.info("training on %d %s (%s/%s), validating on %s", len(train_data),
                 "images (scene groups)" if train_data is not samples else "samples", args.data, args.split,
                 len(val_data) if val_data is not None else "none")
        metadata = {"version": args.out.name, "parent": model.version, "data": args.data, "split": args.split,
                    "train_preset": args.preset, "threads": threads}
        if args.data in ("refer", "jxu124"):
            metadata["dataset"] = args.dataset + (f"({args.split_by})" if args.split_by else "")
        result = train(model, train_data, val_data, cfg, args.out, device, progress=not args.no_progress,
                       resume=args.resume, metadata=metadata)
    finally:
        teardown_distributed(dist_info)
    if not dist_info.main:
        return 0
    print(f"trained {result.steps} steps in {result.seconds / 60:.1f} min; final loss {result.final_loss:.4f}")
    if result.last_metrics:
        m = result.last_metrics
        print(f"validation ({m['n']} samples): mIoU {m['miou']:.4f}, oIoU {m['oiou']:.4f}, mean Dice {m['mean_dice']:.4f}; "
              f"best mIoU {result.best_miou:.4f} at step {result.best_step}")
    if result.best_checkpoint:
        print(f"best checkpoint: {result.best_checkpoint}")
    print(f"last checkpoint: {result.last_checkpoint}")
    print(f"metrics CSV:     {result.metrics_csv}")
    print(f"loss curve PNG:  {result.loss_png}")
    print(f"evaluate with:   clipseg eval --model {result.best_checkpoint or result.last_checkpoint} --data {args.data} ...")
    return 0
