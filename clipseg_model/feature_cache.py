"""Frozen features for training: what a fine-tune computes once per image and once per phrase.

A fine-tune trains the decoder (and maybe the last few vision layers); everything below the frozen boundary
(`SegmentationModel.encode_frozen`) gives the same activations on every step. Computing them once per image turns
a step from "the whole backbone" into "the trained part only" (measured with full-size `clipseg-rd64`, 2 cores:
see docs/loop.md, "The job").

    cache = FeatureCache(data_dir / "features", max_bytes=4 << 30)
    frozen = FrozenInputs(model, cache)
    frozen.prepare(images, phrases)            # one vision pass per image not cached yet, one text pass per phrase
    logits = frozen.logits(images, phrases)    # (B, S, S): the same as model(pixels, phrases), trained part only

Disk, not memory, holds the cache between jobs: a full-size image costs 4.5 MB (3 layers x 485 tokens x 768
floats), reading it back takes milliseconds against 0.3-0.6 s for the vision pass on a CPU, and it survives a
worker restart or a spawned work horse. Each job also keeps what it uses in memory (`FrozenInputs`). Keys are the
image's content hash and a fingerprint of the frozen weights, boundary and input size, so a later fine-tune of a
descendant version (same frozen part) reuses them and a different base model never does.
"""
from __future__ import annotations

import contextlib
import logging
import os
import threading
import uuid
from pathlib import Path
from typing import Callable, ContextManager, Sequence

import torch
from PIL import Image
from safetensors.torch import load_file, save_file

from clipseg_model.fingerprint import frozen_fingerprint
from clipseg_model.image_io import image_digest
from clipseg_model.precision import PRECISIONS, Precision
from clipseg_model.precision import autocast as precision_autocast
from clipseg_model.segmenter_base import ImageFeatures, SegmentationModel

log = logging.getLogger(__name__)


class FeatureCache:
    """Byte-bounded on-disk cache of frozen image features: one safetensors file per (fingerprint, image).

    Least recently used files go first when the total passes `max_bytes` (a read refreshes the file's mtime).
    Writes go to a temp file and are renamed into place, so a reader never sees half a file.
    """

    def __init__(self, directory: str | os.PathLike, max_bytes: int = 4 * 1024**3):
        self.directory = Path(directory)
        self.max_bytes = int(max_bytes)
        self._lock = threading.Lock()
        self.hits = 0
        self.misses = 0

    def _path(self, fingerprint: str, digest: str) -> Path:
        return self.directory / fingerprint / f"{digest}.safetensors"

    def get(self, fingerprint: str, digest: str) -> ImageFeatures | None:
        path = self._path(fingerprint, digest)
        try:
            tensors = load_file(str(path))
            os.utime(path)
        except (FileNotFoundError, OSError, ValueError):  # absent, or evicted/corrupted under us
            self.misses += 1
            return None
        self.hits += 1
        return ImageFeatures([tensors[f"layer.{i}"] for i in range(len(tensors))])

    def put(self, fingerprint: str, digest: str, features: ImageFeatures) -> None:
        """Store one image's features (batch dimension 1); evicts old files beyond the byte bound."""
        if features.nbytes > self.max_bytes:
            return
        path = self._path(fingerprint, digest)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex[:8]}.tmp")
        save_file({f"layer.{i}": h.detach().cpu().contiguous() for i, h in enumerate(features.layers)}, str(tmp))
        os.replace(tmp, path)
        self.evict()

    def files(self) -> list[Path]:
        return [p for p in self.directory.glob("*/*.safetensors")] if self.directory.exists() else []

    @property
    def total_bytes(self) -> int:
        total = 0
        for p in self.files():
            with contextlib.suppress(FileNotFoundError):
                total += p.stat().st_size
        return total

    def evict(self) -> int:
        """Remove least recently used files until the total fits `max_bytes`; returns how many went."""
        with self._lock:
            entries = []
            for p in self.files():
                with contextlib.suppress(FileNotFoundError):
                    st = p.stat()
                    entries.append((st.st_mtime, st.st_size, p))
            total = sum(size for _, size, _ in entries)
            removed = 0
            for _, size, p in sorted(entries, key=lambda e: e[0]):
                if total <= self.max_bytes:
                    break
                with contextlib.suppress(FileNotFoundError):
                    p.unlink()
                    removed += 1
                total -= size
            return removed


class FrozenInputs:
    """A job's view of the frozen part of `model`: features per image and embeddings per phrase, each computed
    once (or read from `cache`), then fed to the trained part on every step and evaluation.

    Holds what it computed in memory for the job's lifetime; `autocast` is the context the vision and text passes
    run under (the training precision policy, so the features equal those of the full forward pass).
    `precision` (the inference choice of clipseg_model.precision; bf16 towers on the CPU) replaces that context for
    the vision and text passes, and is part of the cache key.
    """

    def __init__(self, model: SegmentationModel, cache: FeatureCache | None = None,
                 autocast: Callable[[], ContextManager] = contextlib.nullcontext, vision_batch: int = 4,
                 precision: Precision | None = None):
        self.model = model
        self.cache = cache
        self.precision = precision or PRECISIONS["fp32"]
        if precision is not None and precision.towers == "bf16":
            autocast = lambda: precision_autocast(self.precision, "towers", model.device)  # noqa: E731
        self.autocast = autocast
        self.vision_batch = vision_batch
        self.fingerprint = frozen_fingerprint(model, self.precision.name)
        self._digests: dict[int, tuple[Image.Image, str]] = {}  # id(image) -> (image, digest): hash each once
        self._images: dict[str, ImageFeatures] = {}
        self._texts: dict[str, torch.Tensor] = {}
        self.computed_images = 0
        self.text_frozen = not model.config.train_text

    def digest(self, image: Image.Image) -> str:
        entry = self._digests.get(id(image))
        if entry is None or entry[0] is not image:
            entry = (image, image_digest(image))
            self._digests[id(image)] = entry
        return entry[1]

    @torch.no_grad()
    def prepare(self, images: Sequence[Image.Image], phrases: Sequence[str] = ()) -> None:
        """Compute (or load) the features of every image and the embedding of every phrase not known yet."""
        todo: dict[str, Image.Image] = {}
        for image in images:
            d = self.digest(image)
            if d in self._images or d in todo:
                continue
            cached = self.cache.get(self.fingerprint, d) if self.cache is not None else None
            if cached is not None:
                self._images[d] = cached.to(self.model.device)
            else:
                todo[d] = image
        keys = list(todo)
        for start in range(0, len(keys), self.vision_batch):
            chunk = keys[start:start + self.vision_batch]
            pixels = self.model.preprocess([todo[k] for k in chunk]).to(self.model.device)
            with self.autocast():
                features = self.model.encode_frozen(pixels)
            for k, single in zip(chunk, features.split()):
                single = ImageFeatures([h.clone() for h in single.layers])
                self._images[k] = single
                self.computed_images += 1
                if self.cache is not None:
                    self.cache.put(self.fingerprint, k, single)
        if self.text_frozen:
            missing = sorted({p for p in phrases if p not in self._texts})
            if missing:
                with self.autocast():
                    rows = self.model.encode_text(missing)
                for p, row in zip(missing, rows):
                    self._texts[p] = row.clone()

    def features(self, images: Sequence[Image.Image]) -> ImageFeatures:
        """The frozen features of `images` (prepared before), concatenated: layers of shape (B, ...)."""
        missing = [im for im in images if self.digest(im) not in self._images]
        if missing:
            self.prepare(missing)
        return ImageFeatures.cat([self._images[self.digest(im)] for im in images])

    def text(self, phrases: Sequence[str], model: SegmentationModel | None = None) -> torch.Tensor:
        """(P, D) embeddings: from the table when the text tower is frozen, else computed by `model` (it trains)."""
        if not self.text_frozen:
            return (model or self.model).encode_text(list(phrases))
        missing = [p for p in phrases if p not in self._texts]
        if missing:
            self.prepare((), missing)
        return torch.stack([self._texts[p] for p in phrases])

    def logits(self, images: Sequence[Image.Image], phrases: Sequence[str],
               model: SegmentationModel | None = None) -> torch.Tensor:
        """B images and B phrases (one each) → logits (B, S_out, S_out): `model(pixels, phrases)` on the frozen
        features (the trained part only runs, with autograd where it trains).

        `model` defaults to the one the features came from; any model with the same frozen part (the parent and
        its fine-tuned candidate) may use them."""
        if len(images) != len(phrases):
            raise ValueError(f"{len(images)} images but {len(phrases)} phrases")
        model = model or self.model
        features = model.encode_from_frozen(self.features(images))
        return model.decode(features, self.text(phrases, model))

    @property
    def nbytes(self) -> int:
        return sum(f.nbytes for f in self._images.values())
