"""CPU learning benchmark: train a small film-decoder FROM SCRATCH on generated shapes, report held-out mIoU.

Everything is random-initialised and trained: vision tower (patch/position embeddings included, `train_embeddings`),
text tower (`train_text`) and decoder. The model is `small-film` at 64 px (8 x 8 patch grid) with decoder dropout
off, the film-decoder's pixel branch on (`pixel_channels` 16, `pixel_tokens`) and its text-token alignment head
trained alongside the masks (`text_alignment`, `--align-weight 3`: every image token is pulled towards its
phrase's embedding where the target covers it and away elsewhere); phrases are tokenised by a
word-level CLIP-compatible BPE vocabulary built from the shapes vocabulary (each word one token). The held-out set is
generated with the same `ShapesConfig` as the training stream and a different seed (training 1000 + seed, held-out
2000 + seed), so no held-out scene was seen in training. Training over-samples the hardest phrase kind: half of the
training stream comes from a second generator (seed 3000 + seed) that only makes `--boost-kind` phrases (shape-only,
"the star"); the held-out set keeps the plain mix (a third of each kind). The configuration is printed with the
result.

    .venv/bin/python benchmarks/learning_cpu.py            # the measured configuration (docs/training.md, "CPU learning benchmark")
    .venv/bin/python benchmarks/learning_cpu.py --steps 300 --eval-every 100   # a quick look

Target: held-out mIoU >= 0.85 in under 10 minutes on 2 CPU cores. --steps leaves room in that budget on this
project's 2-vCPU machines (0.13-0.19 s per step of 32 with 2 threads, by CPU).
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
from clipseg_model.vocab import BOS, EOS, build_tokenizer, bytes_to_unicode  # noqa: E402
from finetune.shapes import KINDS, ShapesConfig, ShapesDataset, concept_vocabulary  # noqa: E402
from finetune.training import TRAIN_PRESETS, evaluate, train  # noqa: E402

log = logging.getLogger("learning_cpu")

FILLER_WORDS = ("the", "on", "at")  # words of phrase templates that are not concepts


def word_level_tokenizer(words: list[str]) -> CLIPTokenizer:
    """A CLIP-compatible BPE tokenizer whose merges make each of `words` ONE token (other text falls back to bytes).

    Merges are added word by word: a word that does not yet come out as a single token gets merges that join
    the tokens it currently splits into. New merges rank after all earlier ones, so they cannot change how an
    already single-token word is split; the loop ends when every word is one token.
    """
    chars = list(bytes_to_unicode().values())
    base = chars + [c + "</w>" for c in chars]
    merges: list[tuple[str, str]] = []

    def make() -> CLIPTokenizer:
        vocab = list(dict.fromkeys(base + [a + b for a, b in merges] + [BOS, EOS]))
        return CLIPTokenizer(vocab={t: i for i, t in enumerate(vocab)}, merges=list(merges))

    tokenizer = make()
    for _ in range(len(words) + 1):
        split = [tokenizer.tokenize(w) for w in sorted(set(words))]
        split = [t for t in split if len(t) > 1]
        if not split:
            return tokenizer
        for tokens in split:
            current = tokens[0]
            for nxt in tokens[1:]:
                if (current, nxt) not in merges:
                    merges.append((current, nxt))
                current += nxt
        tokenizer = make()
    raise RuntimeError("word-level merges did not converge")


def shapes_words() -> list[str]:
    """Every word a ShapesDataset phrase can contain."""
    return [w for group in concept_vocabulary().values() for w in group] + list(FILLER_WORDS)


def bench_preset(image_size: int, hidden: int, d_model: int, train_embeddings: bool, dropout: float,
                 pixel_channels: int = 0, pixel_tokens: bool = False, text_alignment: bool = False,
                 word_attention: bool = False, decoder_positions: bool = False, n_layers: int = 2) -> Preset:
    """The benchmark model: `small-film` at `image_size` px with the given widths, decoder dropout, embeddings
    training and pixel branch (image_size 96, widths 64, dropout 0.1, no train_embeddings and no pixel branch
    reproduce `small-film` itself)."""
    base = PRESETS["small-film"]
    config = base.config.replace(image_size=image_size, output_size=image_size, d_model=d_model,
                                 train_embeddings=train_embeddings, dropout=dropout,
                                 pixel_channels=pixel_channels, pixel_tokens=pixel_tokens,
                                 text_alignment=text_alignment, word_attention=word_attention,
                                 decoder_positions=decoder_positions, n_layers=n_layers)  # checks d_model
    backbone = dataclasses.replace(base.backbone, image=image_size, hidden=hidden, projection=hidden)
    return Preset(config, f"{base.description}; benchmark variant at {image_size} px", backbone)


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
    kinds = [val_data[i].meta["kind"] for i in range(len(ious))]
    out: dict[str, float] = {}
    for kind in sorted(set(kinds)):
        values = [v for v, k in zip(ious, kinds) if k == kind]
        out[f"miou_{kind}"] = round(sum(values) / len(values), 4)
    found = [v for v in ious if v >= 0.3]
    out["share_iou_below_0.3"] = round(1 - len(found) / max(1, len(ious)), 4)
    out["miou_of_found"] = round(sum(found) / max(1, len(found)), 4)
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=2500)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--warmup", type=float, default=0.03, help="warm-up share of the steps")
    parser.add_argument("--dice-weight", type=float, default=1.0)
    parser.add_argument("--tokenizer", default="word", choices=("word", "byte"),
                        help="word: one token per shapes word (built from concept_vocabulary); byte: byte-level")
    parser.add_argument("--image-size", type=int, default=64)
    parser.add_argument("--hidden", type=int, default=64, help="vision/text tower width")
    parser.add_argument("--d-model", type=int, default=64, help="decoder width")
    parser.add_argument("--train-embeddings", action=argparse.BooleanOptionalAction, default=True,
                        help="train the vision patch/position embeddings too")
    parser.add_argument("--dropout", type=float, default=0.0, help="decoder dropout")
    parser.add_argument("--pixel-channels", type=int, default=16, help="width of the full-resolution pixel branch (0: off)")
    parser.add_argument("--pixel-tokens", action=argparse.BooleanOptionalAction, default=True,
                        help="the pixel branch also adds strided-conv features to the decoder's image tokens")
    parser.add_argument("--align-weight", type=float, default=3.0,
                        help="weight of the text-token alignment loss (0: off; >0 also builds the alignment head)")
    parser.add_argument("--word-attention", action=argparse.BooleanOptionalAction, default=False,
                        help="decoder layers cross-attend to the phrase's token states")
    parser.add_argument("--decoder-positions", action=argparse.BooleanOptionalAction, default=False,
                        help="add (x, y) position features to the decoder's image tokens")
    parser.add_argument("--n-layers", type=int, default=2, help="decoder layers")
    parser.add_argument("--kinds", default=",".join(KINDS),
                        help=f"phrase kinds, comma-separated (of {','.join(KINDS)})")
    parser.add_argument("--boost-kind", default="shape",
                        help="phrase kinds (comma-separated) to over-sample in TRAINING (held-out unchanged)")
    parser.add_argument("--boost-share", type=float, default=0.5,
                        help="share of the training stream drawn from a stream of only --boost-kind phrases")
    parser.add_argument("--min-radius", type=float, default=0.12, help="object radius, fraction of the image side")
    parser.add_argument("--max-radius", type=float, default=0.25)
    parser.add_argument("--min-objects", type=int, default=2)
    parser.add_argument("--max-objects", type=int, default=4)
    parser.add_argument("--train-samples", type=int, default=200_000, help="length of the generated training stream")
    parser.add_argument("--val-samples", type=int, default=500)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--eval-every", type=int, default=500, help="validate on 200 held-out samples every N steps")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=None, help="keep the run here (default: a temp dir)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    flush_denormals()  # before torch starts threads: subnormals made trained steps 2.7x slower
    torch.set_num_threads(args.threads)

    preset = bench_preset(args.image_size, args.hidden, args.d_model, args.train_embeddings, args.dropout,
                          args.pixel_channels, args.pixel_tokens, args.align_weight > 0, args.word_attention,
                          args.decoder_positions, args.n_layers)
    kinds = tuple(k.strip() for k in args.kinds.split(",") if k.strip())
    boost = tuple(k.strip() for k in args.boost_kind.split(",") if k.strip())
    if boost and (not set(boost) <= set(kinds) or not 0 <= args.boost_share < 1):
        parser.error(f"--boost-kind must be some of --kinds ({', '.join(kinds)}) and --boost-share in [0, 1)")
    # One generator configuration for both sets; only the seed differs (held-out scenes, same distribution).
    shapes = ShapesConfig(image_size=args.image_size, kinds=kinds, min_radius=args.min_radius,
                          max_radius=args.max_radius, min_objects=args.min_objects, max_objects=args.max_objects)
    train_data = ShapesDataset(args.train_samples, seed=1000 + args.seed, config=shapes)
    if boost and args.boost_share > 0:
        # A second stream (its own seed) of only the boosted kind; the sampler shuffles the two together.
        boosted = round(args.train_samples * args.boost_share / (1 - args.boost_share))
        train_data = ConcatDataset([train_data, ShapesDataset(boosted, seed=3000 + args.seed,
                                                              config=dataclasses.replace(shapes, kinds=boost))])
    val_data = ShapesDataset(args.val_samples, seed=2000 + args.seed, config=shapes)
    cfg = TRAIN_PRESETS["improved"].replace(lr=args.lr, batch_size=args.batch_size, steps=args.steps,
                                            warmup_fraction=args.warmup, dice_weight=args.dice_weight,
                                            eval_every=args.eval_every, align_weight=args.align_weight, log_every=25, max_eval_samples=200,
                                            seed=args.seed)
    tokenizer = word_level_tokenizer(shapes_words()) if args.tokenizer == "word" else build_tokenizer(None)[0]
    work = Path(args.out) if args.out else Path(tempfile.mkdtemp(prefix="learning-cpu-"))
    started, cpu_started = time.time(), time.process_time()
    model = load_model(build_random(preset, work / "init", args.seed, tokenizer), "cpu")
    result = train(model, train_data, val_data if args.eval_every else None, cfg, work / "run", "cpu",
                   progress=sys.stderr.isatty())
    trained = time.time()
    evaluation = evaluate(model, val_data, batch_size=64)
    metrics = evaluation.metrics
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
               "final_loss": result.final_loss, "heldout": metrics, "breakdown": breakdown(evaluation, val_data), "train_seconds": round(trained - started, 1),
               "total_seconds": round(total, 1), "cpu_seconds": round(cpu, 1),
               "idle_estimate_seconds": round(cpu / args.threads, 1), "load_average": load, "out": str(work)}
    print(json.dumps(summary, indent=2))
    print(f"held-out mIoU {metrics['miou']:.4f} (mean Dice {metrics['mean_dice']:.4f}, n={metrics['n']}) "
          f"in {total / 60:.1f} min wall time ({cpu / 60:.1f} CPU-min on {args.threads} threads, "
          f"~{cpu / args.threads / 60:.1f} min on an idle machine; load average {' '.join(load)})")
    table = breakdown(evaluation, val_data)
    print("| phrase kind | held-out mIoU |\n|---|---|")
    for kind in kinds:
        print(f"| {kind} | {table.get(f'miou_{kind}', float('nan')):.3f} |")
    print(f"| all | {metrics['miou']:.3f} |")
    if not args.out:
        shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
