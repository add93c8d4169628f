"""Training with visual prompts mixed in (CLIPSeg's recipe, issue 28 build 4): for a share of a batch's phrases the
decoder is conditioned on the embedding of an engineered crop (`visual_prompt.engineer_prompt`) of another instance
of the same concept — an object of the same colour in another scene of the batch, say — instead of, or mixed with,
the phrase, so the decoder learns to read the vision tower's embedding of an example as it reads a phrase's.

Which samples show the same concept: `sample.meta["concept"]` (generated shapes set it, `shapes.visual_concept`);
None means no example crop stands for the phrase ("the leftmost circle"), so it keeps its text; a sample without
the key (RefCOCO, corrections) is its own example (the crop of its target, what an annotator's box on the object
gives at inference). The draws are a pure function of (seed, epoch, index), like `Augmented`'s flips, so a
resumed run sees the same prompts.

Hue jitter (`visual_prompt_hue`): a phrase conditioned on examples alone (w = 1) may have its image AND its example
crops rotated by one random hue angle, so the concept becomes "this example's colour" on a continuum of unnamed
colours instead of the few named ones. Without it the vision tower learns to sort crops into the named colours and
embeds a colour it never saw near a known one (measured: a green crop's embedding at cosine 0.87 to blue's, one-shot
0.20), see docs/visual_prompts.md. Only single-phrase items are rotated: a scene group's other phrases are text.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, Sequence

import numpy as np
import torch
from PIL import Image

from clipseg_model.segmenter_base import SegmentationModel
from clipseg_model.visual_prompt import ENGINEERING, VisualPrompts, engineer_prompt
from finetune.recipe import TrainConfig
from finetune.samples import ReferringDataset, ReferringSample, SceneGroup

DRAW_KEY = "visual_prompt_draw"  # meta entry `VisualPromptDraws` adds to a sample: this sample's draw
SOURCE_KEY = "visual_prompt_source"  # meta entry of a hue-turned sample: its image as the scene showed it
_OWN = object()  # a sample without meta["concept"]: its own target is its example


@dataclass(frozen=True)
class VisualPromptRecipe:
    """How a batch mixes visual prompts in (from a `TrainConfig`'s visual_prompt_* fields)."""

    ratio: float  # share of phrases conditioned on example crops
    mix: float  # share of those mixed with their phrase at a random weight w ~ U(0, 1); the rest use w = 1
    shots: int  # each such phrase gets k ~ U{1..shots} crops, averaged (a k-shot prototype)
    mode: str  # the crops' engineering (`visual_prompt.ENGINEERING`)
    hue: float = 0.0  # max hue rotation (degrees) of a visual-only phrase's image and its crops, U(-hue, hue); 0: off

    def __post_init__(self) -> None:
        if not 0.0 <= self.ratio <= 1.0 or not 0.0 <= self.mix <= 1.0:
            raise ValueError(f"visual_prompt_ratio and visual_prompt_mix must be in [0, 1], got {self.ratio}, {self.mix}")
        if self.shots < 1:
            raise ValueError(f"visual_prompt_shots must be >= 1, got {self.shots}")
        if self.mode not in ENGINEERING:
            raise ValueError(f"unknown visual-prompt engineering {self.mode!r}; one of {ENGINEERING}")
        if not 0.0 <= self.hue <= 180.0:
            raise ValueError(f"visual_prompt_hue must be in [0, 180] degrees, got {self.hue}")

    @classmethod
    def from_config(cls, cfg: TrainConfig) -> "VisualPromptRecipe | None":
        """The recipe `cfg` asks for, or None when it trains on phrases only (visual_prompt_ratio 0)."""
        if cfg.visual_prompt_ratio <= 0:
            return None
        return cls(cfg.visual_prompt_ratio, cfg.visual_prompt_mix, cfg.visual_prompt_shots, cfg.visual_prompt_mode,
                   cfg.visual_prompt_hue)


class VisualPromptDraws:
    """A training view of `dataset` whose samples carry their visual-prompt draw in `meta[DRAW_KEY]`: whether the
    phrase is conditioned on examples, its visual weight, how many examples and which (uniforms the batch's
    collate turns into picks among the samples of the same concept). Deterministic per (seed, epoch, index)."""

    def __init__(self, dataset: ReferringDataset, recipe: VisualPromptRecipe, seed: int, epoch: int) -> None:
        self.dataset, self.recipe, self.seed, self.epoch = dataset, recipe, seed, epoch

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index: int) -> ReferringSample | SceneGroup:
        item = self.dataset[index]
        rng = np.random.default_rng([self.seed, self.epoch, index, 28])
        if isinstance(item, (list, tuple)):
            if len(item) == 1:
                return [self._mark(item[0], rng, rotate=True)]
            return [self._mark(sample, rng, rotate=False) for sample in item]
        return self._mark(item, rng, rotate=True)

    def _mark(self, sample: ReferringSample, rng: np.random.Generator, rotate: bool) -> ReferringSample:
        r = self.recipe
        use, mixed, weight = rng.random() < r.ratio, rng.random() < r.mix, float(rng.random())
        k = int(rng.integers(1, r.shots + 1))
        angle = float(rng.uniform(-r.hue, r.hue)) if r.hue > 0 else 0.0
        draw: dict[str, Any] = {"use": bool(use), "weight": weight if mixed else 1.0, "picks": rng.random(k).tolist(),
                                "hue": 0.0}
        meta = {**sample.meta, DRAW_KEY: draw}
        if use and not mixed and rotate and angle:
            draw["hue"] = angle  # its own image turns; its example crops turn alike in `visual_prompts`
            meta[SOURCE_KEY] = sample.image
            sample = dataclasses.replace(sample, image=rotate_hue(sample.image, angle))
        return dataclasses.replace(sample, meta=meta)


def rotate_hue(image: Image.Image, degrees: float) -> Image.Image:
    """`image` (RGB) with every pixel's hue turned by `degrees` (saturation and value kept, 8-bit HSV)."""
    h, s, v = image.convert("RGB").convert("HSV").split()
    shift = int(round(degrees / 360.0 * 256)) % 256
    h = h.point(lambda x: (x + shift) % 256)
    return Image.merge("HSV", (h, s, v)).convert("RGB")


def visual_prompts(samples: Sequence[ReferringSample], model: SegmentationModel,
                   recipe: VisualPromptRecipe) -> VisualPrompts | None:
    """The visual prompts of a batch's P samples (in batch order, as `Batch.phrases`): for each sample drawn to
    use one, k crops of other samples of its concept on other images (picked by its draw; repeats allowed), or of
    itself where the batch has none; None when no sample is drawn."""
    crops: list[Image.Image] = []
    index: list[int] = []
    weight: list[float] = []
    concepts = [s.meta.get("concept", _OWN) for s in samples]
    for p, sample in enumerate(samples):
        draw = sample.meta.get(DRAW_KEY)
        if not draw or not draw["use"] or concepts[p] is None or not sample.mask.any():
            continue
        pool = [] if concepts[p] is _OWN else [
            q for q, concept in zip(samples, concepts)
            if concept == concepts[p] and q.image is not sample.image and q.mask.any()]
        chosen = [pool[min(int(u * len(pool)), len(pool) - 1)] for u in draw["picks"]] if pool else [sample]
        for example in chosen:
            # the example as its own scene showed it, turned by this phrase's hue angle (its image's turn)
            source = example.meta.get(SOURCE_KEY, example.image)
            if draw.get("hue"):
                source = rotate_hue(source, draw["hue"])
            crop = engineer_prompt(np.asarray(source), example.mask, recipe.mode)
            crops.append(Image.fromarray(crop))
            index.append(p)
            weight.append(float(draw["weight"]))
    if not crops:
        return None
    return VisualPrompts(model.preprocess(crops), torch.tensor(index, dtype=torch.long),
                         torch.tensor(weight, dtype=torch.float32))
