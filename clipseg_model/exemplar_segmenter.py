"""Segment "things like this example" with a `Segmenter`: the example's embedding costs one extra vision pass of
the engineered crop, cached by content (image, mask, mode, model version), and the target image's features come
from the segmenter's own feature cache, so encode-once holds for text and visual prompts alike."""
from __future__ import annotations

from typing import Sequence

import numpy as np
import torch
from PIL import Image

from clipseg_model.caches import LRUCache
from clipseg_model.predictor import MaskPrediction, Segmenter
from clipseg_model.segmenter_base import TrainableState
from clipseg_model.visual_prompt import encode_visual, engineer_prompt, mix, prompt_key


class ExemplarSegmenter:
    """Visual prompts on top of a `Segmenter` (which it shares, caches included).

    Args:
        segmenter: the text-prompt segmenter whose model and caches are used.
        mode: visual-prompt engineering (`visual_prompt.ENGINEERING`).
        cache_entries: embeddings of examples kept (each (projection_dim,) float32).
    """

    def __init__(self, segmenter: Segmenter, mode: str = "crop_blur_darken", cache_entries: int = 1024) -> None:
        self.segmenter = segmenter
        self.mode = mode
        self.cache: LRUCache[torch.Tensor] = LRUCache(cache_entries)
        self.vision_passes = 0  # example crops encoded (cache misses), for tests and metrics

    def embed(self, image: Image.Image, mask: np.ndarray) -> torch.Tensor:
        """One example (RGB image, (H, W) bool mask) → (projection_dim,) float32 embedding, cached by content."""
        rgb = np.asarray(image.convert("RGB"))
        model = self.segmenter.model
        key = (model.version, prompt_key(rgb, mask, self.mode))
        hit = self.cache.get(key)
        if hit is not None:
            return hit
        crop = Image.fromarray(engineer_prompt(rgb, np.asarray(mask, dtype=bool), self.mode))
        pixels = model.preprocess([crop]).to(model.device)
        row = encode_visual(model, pixels)[0].float().cpu()
        self.vision_passes += 1
        self.cache.put(key, row)
        return row

    def embed_examples(self, examples: Sequence[tuple[Image.Image, np.ndarray]],
                       state: TrainableState | None = None) -> torch.Tensor:
        """(V, projection_dim) float32 embeddings of V examples (RGB image, (H, W) bool mask) with `state`'s
        trainable part (None: the model's own), each cached by content."""
        with self.segmenter._lock:  # the vision passes see one state of the model
            self.segmenter._use_state(state)
            return torch.stack([self.embed(im, m) for im, m in examples])

    def predict(self, image: Image.Image, examples: Sequence[tuple[Image.Image, np.ndarray]],
                text: str | None = None, visual_weight: float = 1.0, name: str = "exemplar",
                state: TrainableState | None = None) -> MaskPrediction:
        """Mask of `image` for the concept shown by `examples` (k-shot: their embeddings are averaged), mixed with
        the phrase `text` when given ((1 - w) * text + w * visual), decoded with `state`'s trainable part (None:
        the model's own). The MaskPrediction's probability and mask are (H, W)."""
        if not examples:
            raise ValueError("at least one example is needed")
        self._check_model()
        return self.predict_embedding(image, self.embed_examples(examples, state), text, visual_weight, name, state)

    def predict_embedding(self, image: Image.Image, visual: torch.Tensor, text: str | None = None,
                          visual_weight: float = 1.0, name: str = "exemplar",
                          state: TrainableState | None = None) -> MaskPrediction:
        """Like `predict` for examples already embedded: `visual` (V, projection_dim) (e.g. a label's prototype,
        (1, D)). Without `text` the condition is the examples alone; with it (1 - w) * text + w * mean(visual)."""
        self._check_model()
        seg = self.segmenter
        with seg._lock:  # the phrase's embedding and the decode see one state of the model
            seg._use_state(state)
            text_row = seg._text_embeddings([text])[0] if text else None
        condition = mix(text_row, visual.float().reshape(len(visual), -1), visual_weight if text else 1.0)  # (1, D)
        return seg.predict_condition(image, condition, text or name, state)

    def _check_model(self) -> None:
        if getattr(self.segmenter.model.config, "word_attention", False):
            raise NotImplementedError("visual prompts with word_attention models are not supported yet")
