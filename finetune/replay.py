"""What a fine-tune replays so the model keeps what it knows, and what the gate's base score is measured on.

Sources, in the order `replay="auto"` tries them:

1. `refcoco`: a local RefCOCO (REFCOCO_DIR) in any of the three formats of `finetune.refcoco` — the refer layout
   (refs pickle + instances.json + COCO images), `jxu124/refcoco` parquet (+ COCO images under the folder) or
   `lmms-lab/RefCOCO` parquet (images embedded). Replay from train, base score on val (lmms: a stable 80/20 split).
2. `fetched`: the subset `clipseg data fetch-replay` stored once under DATA_DIR/replay (lmms-lab/RefCOCO rows with
   their images embedded; no COCO download needed). Stable 80/20 split into replay and held-out.
3. `shapes`: generated shapes, only when REPLAY_SHAPES says the model was trained on them (its generator options).
4. `distill`: self-distillation (learning without forgetting): the parent model's own soft predictions for
   general phrases on the images the project has already sent, as targets. Needs no data; its held-out images
   give the base score (agreement with the parent).

Every source is split the same way every time, so base scores of versions are comparable.
"""
from __future__ import annotations

import hashlib
import json
import logging
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

import numpy as np

from finetune.samples import ReferringSample
from finetune.spec import FinetuneSpec

log = logging.getLogger(__name__)

BASE_VAL_SAMPLES = 48
HELD_OUT_PERCENT = 20
FETCHED_DIR = "replay/refcoco-lmms"
SOFT_TARGET = "soft_target"  # meta key of a sample's soft training target (S_out, S_out) float32
GET_REFCOCO = ("for RefCOCO replay run `clipseg data fetch-replay` once (a few hundred lmms-lab/RefCOCO rows with "
               "their images, into DATA_DIR/replay), or set REFCOCO_DIR to a local RefCOCO")
# General phrases a pretrained CLIPSeg knows (COCO's most frequent categories): what self-distillation asks about.
DEFAULT_DISTILL_PHRASES = (
    "a person", "a car", "a chair", "a book", "a bottle", "a cup", "a dining table", "a bowl", "a traffic light",
    "a handbag", "an umbrella", "a bird", "a boat", "a truck", "a bench", "a sheep", "a banana", "a kite",
    "a motorcycle", "a backpack", "a potted plant", "a cow", "a dog", "a cat", "the sky", "a tree", "a window",
)


@dataclass(frozen=True)
class ReplaySource:
    """Which replay a fine-tune uses. `kind`: refcoco, fetched, shapes, distill or none; `path` for the data ones."""

    kind: str
    path: str = ""
    detail: str = ""

    def describe(self) -> str:
        text = {"refcoco": f"local RefCOCO at {self.path} ({self.detail})",
                "fetched": f"the fetched RefCOCO subset at {self.path}",
                "shapes": "generated shapes (REPLAY_SHAPES)",
                "distill": "self-distillation: the parent model's own predictions on the project's images",
                "none": "nothing (replay off)"}[self.kind]
        return text


def held_out(key: str) -> bool:
    """Stable membership of the held-out part, by a key's hash (the same item is always on the same side)."""
    return int(hashlib.sha1(key.encode()).hexdigest(), 16) % 100 < HELD_OUT_PERCENT


def refcoco_format(path: str | Path) -> tuple[str, dict]:
    """Which of the three formats a local RefCOCO folder holds: ("refer" | "jxu124" | "lmms", loader options)."""
    root = Path(path)
    for refs in sorted(root.glob("*/refs(*).p")):
        return "refer", {"dataset": refs.parent.name, "split_by": refs.name[len("refs("):-len(").p")]}
    parquet = sorted([*root.glob("*.parquet"), *root.glob("*/*.parquet")])
    if parquet:
        import pyarrow.parquet as pq

        names = set(pq.read_schema(parquet[0]).names)
        if "raw_anns" in names:
            images = next((p for p in (root / "train2014", root / "images" / "train2014", root) if p.is_dir()), root)
            return "jxu124", {"image_root": str(images)}
        if {"image", "segmentation", "answer"} <= names:
            return "lmms", {}
    raise ValueError(f"{root} holds no RefCOCO in a known format (refer layout, jxu124/refcoco or lmms-lab/RefCOCO "
                     "parquet)")


def choose_source(spec: FinetuneSpec, data_dir: str | Path) -> ReplaySource:
    """The replay source a fine-tune with `spec` uses on a worker whose DATA_DIR is `data_dir` (reads no data)."""
    fetched = Path(data_dir) / FETCHED_DIR
    wanted = spec.replay
    if wanted in ("auto", "refcoco") and spec.refcoco_dir:
        kind, _ = refcoco_format(spec.refcoco_dir)
        return ReplaySource("refcoco", spec.refcoco_dir, kind)
    if wanted == "refcoco":
        raise ValueError("replay=refcoco needs REFCOCO_DIR")
    if wanted in ("auto", "fetched") and (fetched / "data").is_dir():
        return ReplaySource("fetched", str(fetched), "lmms")
    if wanted == "fetched":
        raise ValueError(f"replay=fetched but nothing was fetched into {fetched}: {GET_REFCOCO}")
    if wanted in ("auto", "shapes") and spec.replay_shapes:
        return ReplaySource("shapes")
    if wanted == "shapes":
        return ReplaySource("shapes")  # the generator's defaults
    if wanted == "none":
        return ReplaySource("none")
    return ReplaySource("distill")


def _open_refcoco(kind: str, path: str, options: dict, split: str, cache_dir: str | None):
    from finetune.refcoco import HFRefCOCO, LmmsRefCOCO, ReferRefCOCO

    if kind == "refer":
        return ReferRefCOCO(path, split=split, **options)
    if kind == "jxu124":
        return HFRefCOCO(path, split=split, cache_dir=cache_dir, **options)
    return LmmsRefCOCO(path, split=split, cache_dir=cache_dir, data_files={split: f"data/{split}-*"})


def dataset_replay(source: ReplaySource, n_replay: int, seed: int,
                   cache_dir: str | None = None) -> tuple[list[ReferringSample], list[ReferringSample]]:
    """(replay, base validation) samples of a data source (refcoco, fetched or shapes; see the module docstring)."""
    if source.kind == "none":
        return [], []
    if source.kind == "shapes":
        raise ValueError("use shapes_replay for generated shapes")
    kind, options = refcoco_format(source.path)
    rng = random.Random(seed)
    if kind == "lmms":  # no train split: one split, stably divided
        rows = _open_refcoco(kind, source.path, options, "val", cache_dir)
        keys = [f"{r}:{s}" for r, s in rows.index]
        pool = [i for i, k in enumerate(keys) if not held_out(k)]
        val_idx = [i for i, k in enumerate(keys) if held_out(k)][:BASE_VAL_SAMPLES]
        replay_idx = rng.sample(pool, min(n_replay, len(pool)))
        return [rows[i] for i in replay_idx], [rows[i] for i in val_idx]
    train = _open_refcoco(kind, source.path, options, "train", cache_dir)
    val = _open_refcoco(kind, source.path, options, "val", cache_dir)
    replay_idx = rng.sample(range(len(train)), min(n_replay, len(train)))
    return [train[i] for i in replay_idx], [val[i] for i in range(min(BASE_VAL_SAMPLES, len(val)))]


def shapes_replay(options_json: str, n_replay: int, seed: int) -> tuple[list[ReferringSample], list[ReferringSample]]:
    """Generated shapes with the generator options the model was trained with (REPLAY_SHAPES, JSON)."""
    from finetune.shapes import ShapesDataset

    try:
        options = json.loads(options_json) if options_json else {}
    except ValueError as exc:
        raise ValueError(f"REPLAY_SHAPES is not JSON: {exc}") from None
    replay = ShapesDataset(n_replay, seed=seed, **options)
    val = ShapesDataset(BASE_VAL_SAMPLES, seed=10_000, **options)  # fixed: scores comparable across versions
    return [replay[i] for i in range(len(replay))], [val[i] for i in range(len(val))]


def distillation_replay(images: Sequence, corrected_phrases: Sequence[str], phrases: Sequence[str],
                        soft_targets: Callable[[list, list[str]], "torch.Tensor"], n_replay: int, seed: int,
                        digest: Callable[[object], str]) -> tuple[list[ReferringSample], list[ReferringSample]]:
    """Self-distillation samples: (image, general phrase) pairs with the parent's probabilities as soft targets.

    Args:
        images: the project's distinct images (PIL).
        corrected_phrases: the corrections' phrases; general phrases equal to one of them are left out (their
            targets are what the corrections teach).
        phrases: the general phrases to ask about (DEFAULT_DISTILL_PHRASES unless the spec names others).
        soft_targets: (images, phrases) → the parent's probabilities (B, S_out, S_out) in [0, 1].
        digest: image → content hash; images whose hash falls in the held-out part give the base validation pairs.
    Returns:
        (replay, base validation): each sample's mask is the parent's answer (probability > 0.5, at the image's
        size: what metrics read) and `meta[SOFT_TARGET]` its (S_out, S_out) float32 probabilities (what training
        fits: the soft targets of learning without forgetting).
    """
    corrected = {p.strip().lower() for p in corrected_phrases}
    pool = [p for p in phrases if p.strip().lower() not in corrected]
    if not images or not pool:
        return [], []
    rng = random.Random(seed)
    train_images = [im for im in images if not held_out(digest(im))]
    val_images = [im for im in images if held_out(digest(im))]
    if not val_images and len(train_images) > 1:  # keep something to measure forgetting on
        val_images.append(train_images.pop())
    train_pairs = [(im, rng.choice(pool)) for im in (train_images[i % len(train_images)] for i in range(n_replay))] \
        if train_images else []
    val_pairs = [(im, p) for im in val_images for p in rng.sample(pool, min(len(pool), 4))][:BASE_VAL_SAMPLES]

    def build(pairs: list, split: str) -> list[ReferringSample]:
        import torch
        import torch.nn.functional as F

        out = []
        for start in range(0, len(pairs), 8):
            chunk = pairs[start:start + 8]
            probs = soft_targets([im for im, _ in chunk], [p for _, p in chunk]).float().cpu()  # (B, S_out, S_out)
            for (im, phrase), prob in zip(chunk, probs):
                w, h = im.size
                # the mask metrics read: the parent's answer at the image's size, as the predictor resizes it
                full = F.interpolate(prob[None, None], size=(h, w), mode="bilinear", align_corners=False)[0, 0]
                out.append(ReferringSample(im, phrase, (full > 0.5).numpy(), "distill",
                                           {"split": split, SOFT_TARGET: np.ascontiguousarray(prob.numpy())}))
        return out

    return build(train_pairs, "replay"), build(val_pairs, "val")


def fetch_replay(source: str, data_dir: str | Path, split: str = "val", rows: int = 500, seed: int = 0,
                 cache_dir: str | None = None) -> Path:
    """Store a replay subset of `lmms-lab/RefCOCO` (or a local copy in its format) under DATA_DIR/replay, once.

    Rows keep their embedded images, so replay needs no COCO download. Returns the folder written.
    """
    import datasets

    from clipseg_model.atomic import atomic_directory

    target = Path(data_dir) / FETCHED_DIR
    table = datasets.load_dataset(source, split=split, data_files={split: f"data/{split}-*"}, cache_dir=cache_dir)
    missing = {"image", "segmentation", "answer"} - set(table.column_names)
    if missing:
        raise ValueError(f"{source} split {split} lacks the lmms-lab/RefCOCO columns {sorted(missing)}")
    order = list(range(len(table)))
    random.Random(seed).shuffle(order)
    subset = table.select(sorted(order[:rows]))
    with atomic_directory(target, replace=True) as tmp:
        (tmp / "data").mkdir()
        # Named as the val split: the replay loader reads it back as lmms-lab/RefCOCO's val.
        subset.to_parquet(str(tmp / "data" / "val-00000-of-00001.parquet"))
        (tmp / "source.json").write_text(json.dumps({"source": source, "split": split, "rows": len(subset),
                                                     "seed": seed}, indent=2))
    log.info("fetched %d rows of %s (%s) into %s", len(subset), source, split, target)
    return target
