"""The predictor: images and phrases in, one probability map, mask and score per phrase out.

All phrases of an image share one vision pass; several images are batched; repeated phrases and re-prompted
images come from bounded caches. The arithmetic is a `Precision` (clipseg_model.precision: fp32, bf16 autocast or
int8 towers on CPU, chosen by measurement); CUDA uses fp16 autocast.
"""
from __future__ import annotations

import logging
import threading
from dataclasses import dataclass
from typing import Sequence

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from clipseg_model.caches import LRUCache
from clipseg_model.image_io import image_digest, to_display_rgb
from clipseg_model.precision import PRECISIONS, Precision, autocast
from clipseg_model.segmenter_base import ImageFeatures, SegmentationModel, TrainableState

log = logging.getLogger(__name__)


@dataclass
class MaskPrediction:
    """One phrase's answer at the image's displayed (EXIF-transposed) size H x W."""

    prompt: str
    probability: np.ndarray  # (H, W) float32 in [0, 1]
    mask: np.ndarray  # (H, W) bool, probability > threshold
    score: float  # mean probability inside the mask (0 when empty): low = uncertain, review first

    @classmethod
    def of(cls, prompt: str, probability: np.ndarray, mask: np.ndarray) -> "MaskPrediction":
        """The prediction of `prompt` for an (H, W) probability map and its (H, W) bool mask, scored by the rule
        above (the one home of the score)."""
        return cls(prompt, probability, mask, float(probability[mask].mean()) if mask.any() else 0.0)


@dataclass
class _Request:
    """One caller's images and phrases waiting for a (possibly shared) model pass."""

    images: list[Image.Image]
    prompts: list[list[str]]
    state: TrainableState | None = None
    result: list[torch.Tensor] | None = None
    error: BaseException | None = None
    done: bool = False


class Segmenter:
    """Thread-safe predictor around a `SegmentationModel`; `swap_model` replaces it between requests.

    One backbone, many versions: a call may name a `TrainableState` (a project's decoder); it is copied into the
    model's trainable tensors before that call's decoder pass (a few MB: ~1 ms), under the same lock as the pass.
    Image features are cached by image alone and shared by every state, unless the states change the vision tower.
    """

    def __init__(
        self,
        model: SegmentationModel,
        threshold: float | None = 0.5,
        bf16: bool = False,
        text_cache_entries: int = 4096,
        feature_cache_bytes: int = 512 * 1024 * 1024,
        max_prompts_per_pass: int | None = None,
        max_images_per_pass: int = 8,
        merge_concurrent: bool | None = None,
        vision_batch: int | None = None,
        precision: Precision | str | None = None,
    ):
        self.threshold = threshold
        # `bf16=True` is the older spelling of precision="bf16"; int8 needs the model through `apply_precision` first
        if precision is None:
            precision = "bf16" if bf16 else "fp32"
        self.precision = PRECISIONS[precision] if isinstance(precision, str) else precision
        self.bf16 = self.precision.towers == "bf16"
        # Prompts per decoder pass (None = auto): 64 on GPUs; 4 on the CPU, where a decoder pass over 8 prompts of
        # CLIPSeg took 95-100 ms at once and 65 ms as two passes of 4 (its activations stay in cache).
        self.max_prompts_per_pass = max_prompts_per_pass
        self.max_images_per_pass = max_images_per_pass
        # Merging concurrent calls pays where a batch is cheaper than its parts (GPUs); on a 2-core CPU one image
        # already fills the cores and `clipseg bench` measured 4 merged calls 12 % slower than 4 in a row.
        self.merge_concurrent = merge_concurrent
        # Images per vision pass: batching pays on GPUs; on the CPU one image fills the cores, and a batch of 4 was
        # 10 % slower and raised the server's peak memory by 0.3 GB (`clipseg bench`), so 1 there (None = auto).
        self.vision_batch = vision_batch
        self._queue: list[_Request] = []
        self._queue_cv = threading.Condition()
        self._model_busy = False
        self.batches_run = 0  # model passes run (concurrent calls merged into one count once)
        self.text_cache: LRUCache[torch.Tensor] = LRUCache(text_cache_entries)
        self.feature_cache: LRUCache[ImageFeatures] = LRUCache(feature_cache_bytes, lambda f: f.nbytes)
        self._lock = threading.RLock()
        self.model = model
        self._own_state: TrainableState | None = None  # the model's own trainable part, once another state is used
        self._live: dict[str, torch.Tensor] | None = None  # the model's trainable tensors, looked up once
        self.state_switches = 0

    # ---- model management ----------------------------------------------------------------------------
    @property
    def version(self) -> str:
        return self._own_state.version if self._own_state is not None else self.model.version

    def swap_model(self, model: SegmentationModel) -> None:
        """Serve `model` from the next call on; caches of the old model are dropped."""
        with self._lock:
            self.model = model.eval()
            self._own_state = self._live = None
            self.text_cache.clear()
            self.feature_cache.clear()
        log.info("now serving model version %s", model.version)

    def for_state(self, state: TrainableState | None) -> "StateSegmenter":
        """A view that predicts with `state` (None: the model's own trainable part) over this backbone."""
        return StateSegmenter(self, state)

    def _use_state(self, state: TrainableState | None) -> None:
        """Make `state` the model's trainable part (call with `_lock` held)."""
        if state is None:
            if self._own_state is None or self.model.version == self._own_state.version:
                return
            state = self._own_state
        elif self._own_state is None:
            if state.version == self.model.version:
                return
            self._own_state = self.model.trainable_state()  # kept, to return to the model's own weights
        if self.model.version != state.version:
            if self._live is None:
                self._live = self.model.trainable_tensors()
            self.model.load_trainable_state(state, self._live)
            self.state_switches += 1

    def _cache_tag(self, depends: bool) -> str:
        """Cache key part for what the model computes: the version when it depends on the trainable state."""
        return self.model.version if depends else (self._own_state.version if self._own_state else self.model.version)

    def _autocast(self, part: str = "towers"):
        return autocast(self.precision, part, self.model.device)

    # ---- building blocks -----------------------------------------------------------------------------
    def _text_embeddings(self, prompts: Sequence[str]) -> torch.Tensor:
        """(P, D) float32 embeddings, encoding only phrases not cached yet (in one batch)."""
        tag = self._cache_tag(self.model.text_depends_on_trainable())
        key = lambda p: (tag, self.precision.name, p)  # noqa: E731
        missing = sorted({p for p in prompts if self.text_cache.get(key(p)) is None})
        if missing:
            with self._autocast():
                fresh = self.model.encode_text(missing).float()
            for prompt, row in zip(missing, fresh):
                self.text_cache.put(key(prompt), row.clone())
        rows = [self.text_cache.get(key(p)) for p in prompts]
        if any(r is None for r in rows):  # evicted in between (tiny cache): compute directly
            with self._autocast():
                return self.model.encode_text(list(prompts)).float()
        return torch.stack(rows)  # type: ignore[arg-type]

    def _image_features(self, images: Sequence[Image.Image]) -> ImageFeatures:
        """Features of every image: vision passes only over the ones not cached, `vision_batch` images at a time."""
        tag = self._cache_tag(self.model.features_depend_on_trainable())
        keys = [(tag, self.precision.name, image_digest(im)) for im in images]
        cached = {k: self.feature_cache.get(k) for k in set(keys)}
        todo = [k for k, v in cached.items() if v is None]
        first = {k: im for k, im in zip(keys, images)}
        step = self.vision_batch or (8 if self.model.device.type == "cuda" else 1)
        for start in range(0, len(todo), step):
            chunk = todo[start:start + step]
            pixels = self.model.preprocess([first[k] for k in chunk]).to(self.model.device)
            with self._autocast():
                features = self.model.encode_images(pixels)
            for k, single in zip(chunk, features.split()):
                single = ImageFeatures([h.clone() for h in single.layers])
                cached[k] = single
                self.feature_cache.put(k, single)
        return ImageFeatures.cat([cached[k] for k in keys])  # type: ignore[misc]

    # ---- public API ----------------------------------------------------------------------------------
    def logits(self, images: Sequence[Image.Image], prompts: Sequence[Sequence[str]],
               state: TrainableState | None = None) -> list[torch.Tensor]:
        """Raw logits at model resolution: for image i, a (P_i, S, S) float32 tensor. Images must be RGB.

        `state`: the trainable part to decode with (None: the model's own); calls with different states are never
        merged into one pass.

        With `merge_concurrent` (default: on CUDA only), concurrent calls (several request threads) are merged:
        while the model is busy, arriving calls queue, and the next free thread runs all queued calls (up to
        `max_images_per_pass` images) as one batch. Nobody waits for a timer; a lone call runs at once.
        """
        if len(images) != len(prompts):
            raise ValueError(f"{len(images)} images but {len(prompts)} prompt lists")
        merge = self.merge_concurrent if self.merge_concurrent is not None else self.model.device.type == "cuda"
        if not merge:
            with self._queue_cv:
                self.batches_run += 1
            return self._logits_now(images, prompts, state)
        request = _Request(list(images), [list(p) for p in prompts], state)
        with self._queue_cv:
            self._queue.append(request)
        while True:
            with self._queue_cv:
                while not request.done and self._model_busy:
                    self._queue_cv.wait()
                if request.done:
                    break
                self._model_busy = True
                batch, taken = [], 0
                batch.append(self._queue.pop(self._queue.index(request)))  # own call first: nobody starves
                taken = len(request.images)
                for other in list(self._queue):
                    if other.state is request.state and taken + len(other.images) <= self.max_images_per_pass:
                        self._queue.remove(other)
                        batch.append(other)
                        taken += len(other.images)
                self.batches_run += 1
            try:
                try:
                    merged = self._logits_now([im for r in batch for im in r.images], [p for r in batch for p in r.prompts],
                                              request.state)
                    for r in batch:
                        r.result, merged = merged[: len(r.images)], merged[len(r.images):]
                except Exception:
                    if len(batch) == 1:
                        raise
                    for r in batch:  # one caller's bad input must not fail the others: run them one by one
                        try:
                            r.result = self._logits_now(r.images, r.prompts, r.state)
                        except Exception as exc:  # noqa: BLE001 - handed to that caller
                            r.error = exc
            except BaseException as exc:
                for r in batch:
                    r.error = r.error or exc
            finally:
                with self._queue_cv:
                    for r in batch:
                        r.done = True
                    self._model_busy = False
                    self._queue_cv.notify_all()
        if request.error is not None:
            raise request.error
        return request.result  # type: ignore[return-value]

    @torch.inference_mode()
    def _logits_now(self, images: Sequence[Image.Image], prompts: Sequence[Sequence[str]],
                    state: TrainableState | None = None) -> list[torch.Tensor]:
        with self._lock:
            self._use_state(state)
            flat = [p for group in prompts for p in group]
            if not flat:
                return [torch.zeros(0, self.model.config.output_size, self.model.config.output_size) for _ in images]
            features = self._image_features(images)
            text = self._text_embeddings(flat)
            index = torch.tensor([i for i, group in enumerate(prompts) for _ in group], device=self.model.device)
            chunks = []
            per_pass = self.max_prompts_per_pass or (64 if self.model.device.type == "cuda" else 4)
            for start in range(0, len(flat), per_pass):
                sl = slice(start, start + per_pass)
                with self._autocast("decoder"):
                    chunks.append(self.model.decode(features, text[sl].to(self.model.device), index[sl]).float())
            out = torch.cat(chunks)
        return list(out.split([len(g) for g in prompts]))

    def predict_batch(self, images: Sequence[Image.Image], prompts: Sequence[Sequence[str]],
                      state: TrainableState | None = None) -> list[list[MaskPrediction]]:
        """For each image its list of `MaskPrediction`s, one per phrase, at the image's displayed size."""
        shown = [to_display_rgb(im) for im in images]
        all_logits = self.logits(shown, prompts, state)
        results = []
        for image, group, logits in zip(shown, prompts, all_logits):
            results.append(self._postprocess(group, logits, image.size, self.threshold_for(state)))
        return results

    def predict(self, image: Image.Image, prompts: Sequence[str], state: TrainableState | None = None) -> list[MaskPrediction]:
        """One image, P phrases → P predictions (an empty list for no phrases)."""
        return self.predict_batch([image], [list(prompts)], state)[0]

    @torch.inference_mode()
    def predict_condition(self, image: Image.Image, condition: torch.Tensor, name: str,
                          state: TrainableState | None = None) -> MaskPrediction:
        """One image decoded for a conditioning embedding (1, D) that is not a phrase (a visual prompt, or a mix of
        one with a phrase), with `state`'s trainable part, under the lock a phrase's pass takes; the image's
        features come from the feature cache. `name` labels the prediction."""
        shown = to_display_rgb(image)
        with self._lock:
            self._use_state(state)
            features = self._image_features([shown])
            dtype = next(self.model.parameters()).dtype
            with self._autocast("decoder"):
                logits = self.model.decode(features, condition.to(self.model.device, dtype=dtype)).float()
        return self._postprocess([name], logits, shown.size, self.threshold_for(state))[0]

    def threshold_for(self, state: TrainableState | None = None) -> float:
        """The mask threshold of a prediction: the one this segmenter was given (THRESHOLD), else the calibrated one
        of the version predicting (`state`, or the backbone's own version), else 0.5."""
        if self.threshold is not None:
            return self.threshold
        calibrated = state.threshold if state is not None else self.model.calibrated_threshold
        return 0.5 if calibrated is None else float(calibrated)

    def _postprocess(self, prompts: Sequence[str], logits: torch.Tensor, size: tuple[int, int],
                     threshold: float) -> list[MaskPrediction]:
        width, height = size
        if not len(prompts):
            return []
        prob = torch.sigmoid(logits).unsqueeze(1)  # (P, 1, S, S)
        prob = F.interpolate(prob, size=(height, width), mode="bilinear", align_corners=False)[:, 0].clamp_(0, 1)
        prob_np = prob.cpu().numpy().astype(np.float32, copy=False)
        out = []
        for prompt, p in zip(prompts, prob_np):
            out.append(MaskPrediction.of(prompt, p, p > threshold))
        return out


class StateSegmenter:
    """A `Segmenter` bound to one trainable state: what a request of one project predicts with."""

    def __init__(self, segmenter: Segmenter, state: TrainableState | None):
        self.segmenter = segmenter
        self.state = state

    @property
    def version(self) -> str:
        return self.state.version if self.state is not None else self.segmenter.version

    @property
    def model(self) -> SegmentationModel:
        """The shared backbone (its trainable tensors hold whichever state ran last: use `version` for names)."""
        return self.segmenter.model

    def predict_batch(self, images: Sequence[Image.Image], prompts: Sequence[Sequence[str]]) -> list[list[MaskPrediction]]:
        return self.segmenter.predict_batch(images, prompts, self.state)

    def predict(self, image: Image.Image, prompts: Sequence[str]) -> list[MaskPrediction]:
        return self.segmenter.predict(image, prompts, self.state)
