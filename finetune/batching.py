"""Batching for training: samples and scene groups → `Batch` (images preprocessed once, masks at the model's output
size), horizontal-flip augmentation that keeps direction phrases true, and the DataLoader `train` reads.
"""
from __future__ import annotations

import dataclasses
import functools
import re
from dataclasses import dataclass
from typing import Sequence

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch.utils.data import DataLoader

from clipseg_model.segmenter_base import SegmentationModel
from clipseg_model.visual_prompt import VisualPrompts
from finetune.samples import ReferringDataset, ReferringSample, SceneGroup
from finetune.visual_training import VisualPromptRecipe, visual_prompts

# Words whose meaning a horizontal flip inverts ("left", "leftmost", "right-hand", ...: whole words that start with
# left/right, so "bright" and "upright" are not). A flipped image with an unchanged "the leftmost circle" would teach
# the model to point at the rightmost one: a flip swaps them instead (`mirror_phrase`).
_MIRRORED_WORDS = re.compile(r"\b(left|right)", re.IGNORECASE)


@dataclass
class Batch:
    """A training batch.

    Attributes:
        pixel_values: (B, 3, S, S) float32, normalised (S = model.config.image_size).
        phrases: P referring phrases.
        masks: (P, S_out, S_out) float32 in [0, 1] (S_out = model.config.output_size); area-resized, so
            boundary pixels carry the covered fraction (a soft target BCE handles).
        image_index: (P,) long, the image each phrase refers to, where some image has several phrases (items
            that are scene groups); None when P == B, phrase p on image p.
        visual: with a visual-prompt recipe, the crops that condition some of the P phrases (None: text only).
    """

    pixel_values: torch.Tensor
    phrases: list[str]
    masks: torch.Tensor
    image_index: torch.Tensor | None = None
    visual: VisualPrompts | None = None  # example crops conditioning some phrases (`finetune.visual_training`)

    def __len__(self) -> int:
        return len(self.phrases)


def resize_mask(mask: np.ndarray, size: int) -> torch.Tensor:
    """Bool (H, W) → float32 (size, size) with area averaging (nearest when enlarging).

    Area keeps thin objects that nearest-neighbour sampling can skip entirely when shrinking.
    """
    t = torch.from_numpy(np.ascontiguousarray(mask, dtype=np.float32))[None, None]
    h, w = t.shape[-2:]
    if h >= size and w >= size:
        out = F.interpolate(t, size=(size, size), mode="area")
    else:
        out = F.interpolate(t, size=(size, size), mode="nearest")
    return out[0, 0]


def collate(items: Sequence[ReferringSample | SceneGroup], model: SegmentationModel,
            visual: VisualPromptRecipe | None = None) -> Batch:
    """Samples or scene groups (several phrases of one image) → `Batch`: each image once through
    `model.preprocess`, masks at the model's output size, `image_index` where a group has more than one phrase,
    and with a `visual` recipe the example crops of the samples drawn for one (`visual_training.visual_prompts`)."""
    size = model.config.output_size
    groups = [list(item) if isinstance(item, (list, tuple)) else [item] for item in items]
    if any(not group for group in groups):
        raise ValueError("a scene group holds no samples")
    samples = [s for group in groups for s in group]
    pixel_values = model.preprocess([group[0].image for group in groups])
    masks = torch.stack([resize_mask(s.mask, size) for s in samples]) if samples else torch.zeros(0, size, size)
    image_index = None
    if len(samples) != len(groups):
        image_index = torch.tensor([i for i, group in enumerate(groups) for _ in group], dtype=torch.long)
    prompts = visual_prompts(samples, model, visual) if visual is not None else None
    return Batch(pixel_values, [s.phrase for s in samples], masks, image_index, prompts)


def mirror_phrase(phrase: str) -> str:
    """What `phrase` says of the horizontally flipped image: left and right swapped, case kept
    ("the leftmost circle" → "the rightmost circle", "man on the Right" → "man on the Left")."""
    def swap(match: re.Match) -> str:
        word = match.group(0)
        other = "right" if word.lower() == "left" else "left"
        if word.isupper():
            return other.upper()
        return other.capitalize() if word[0].isupper() else other
    return _MIRRORED_WORDS.sub(swap, phrase)


class Augmented:
    """Random horizontal flips, deterministic per (seed, epoch, index) so resumed runs see the same data.

    A flipped sample's phrase has left and right swapped (`mirror_phrase`), so direction phrases stay true and are
    augmented too (referring data is full of them: "man on the left", "second from right").
    """

    def __init__(self, dataset: ReferringDataset, hflip: float, seed: int, epoch: int) -> None:
        self.dataset, self.hflip, self.seed, self.epoch = dataset, hflip, seed, epoch

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index: int) -> ReferringSample | SceneGroup:
        item = self.dataset[index]
        if self.hflip <= 0 or np.random.default_rng([self.seed, self.epoch, index]).random() >= self.hflip:
            return item
        if isinstance(item, (list, tuple)):  # a scene group: one image, so one decision for all its phrases
            return [self.flip(sample) for sample in item]
        return self.flip(item)

    @staticmethod
    def flip(sample: ReferringSample) -> ReferringSample:
        return dataclasses.replace(sample, image=sample.image.transpose(Image.FLIP_LEFT_RIGHT),
                                   mask=np.ascontiguousarray(sample.mask[:, ::-1]), phrase=mirror_phrase(sample.phrase))


def make_loader(dataset: ReferringDataset, model: SegmentationModel, batch_size: int, indices: Sequence[int],
                num_workers: int = 0, seed: int = 0, visual: VisualPromptRecipe | None = None) -> DataLoader:
    """A DataLoader over `dataset[indices]` in that order, yielding `Batch`es (with `visual`: their visual prompts,
    from samples that carry `visual_training.VisualPromptDraws`' draws).

    The collate function holds the model only for `preprocess` (CPU work); with worker processes it is shared by
    fork, not copied. `generator` is fixed so creating the loader draws nothing from torch's global RNG (which
    dropout uses, and which resume restores).
    """
    return DataLoader(
        dataset, batch_size=batch_size, sampler=list(indices), num_workers=num_workers,
        collate_fn=functools.partial(collate, model=model, visual=visual), generator=torch.Generator().manual_seed(seed),
        persistent_workers=False, pin_memory=False,
    )
