"""/predict with a visual prompt: the region an annotator drew with a smart tool is the example of what to segment.

Label Studio sends the region (a RectangleLabels box, KeyPointLabels clicks, a smart brush stroke) in /predict's
`params.context` (`backend.labelstudio.interactive.context_regions` reads it). The example's engineered crop is
embedded like a phrase (`clipseg_model.exemplar_segmenter`), mixed with the phrase typed in the TextArea when there
is one, and decoded over the whole image. Then the scope:

- by default **that object**: the mask's connected components that touch a positive example (a box also clips them
  to the box), minus the components a negative click touches;
- with a tool marked `similar="true"` in the labeling config, **every object like the example**: the whole mask,
  minus the components a negative click touches.
"""
from __future__ import annotations

import weakref
from typing import Sequence

import cv2
import numpy as np

from backend.labelstudio.interactive import ContextRegion
from clipseg_model.exemplar_segmenter import ExemplarSegmenter
from clipseg_model.predictor import MaskPrediction, Segmenter, StateSegmenter

# Weight of the example against a typed phrase when both are given: (1 - w) * phrase + w * example (CLIPSeg's
# interpolation; an even mix, since neither is known to be the better description of what the annotator means).
VISUAL_WEIGHT = 0.5


def scope_mask(mask: np.ndarray, positives: Sequence[ContextRegion], negatives: Sequence[ContextRegion],
               similar: bool) -> np.ndarray:
    """The part of `mask` ((H, W) bool) the examples ask for: see the module docstring. Returns (H, W) bool."""
    mask = np.asarray(mask, dtype=bool)
    if not mask.any():
        return mask
    count, labels = cv2.connectedComponents(mask.astype(np.uint8), connectivity=8)

    def touched(regions: Sequence[ContextRegion]) -> set[int]:
        ids: set[int] = set()
        for region in regions:
            ids.update(int(v) for v in np.unique(labels[region.mask]) if v)
        return ids

    drop = touched(negatives)
    if similar:
        keep = set(range(1, count)) - drop
        return np.isin(labels, list(keep)) if keep else np.zeros_like(mask)
    out = np.zeros_like(mask)
    for region in positives:
        part = np.isin(labels, list(touched([region]) - drop))
        if region.kind == "rectanglelabels":
            part &= region.mask  # the object is inside the box the annotator drew
        out |= part
    return out


class VisualPrompts:
    """Answers visual prompts with an `ExemplarSegmenter` per served `Segmenter` (its example cache lives as long as
    that segmenter: a promotion brings a new one)."""

    def __init__(self) -> None:
        self._by_segmenter: weakref.WeakKeyDictionary[Segmenter, ExemplarSegmenter] = weakref.WeakKeyDictionary()

    def exemplar(self, segmenter: Segmenter) -> ExemplarSegmenter:
        found = self._by_segmenter.get(segmenter)
        if found is None:
            found = self._by_segmenter[segmenter] = ExemplarSegmenter(segmenter)
        return found

    def predict(self, segmenter: Segmenter | StateSegmenter, image, regions: Sequence[ContextRegion],
                text: str | None, similar: bool, examples: Sequence[tuple[object, np.ndarray]] = ()) -> MaskPrediction:
        """The mask for the positive `regions` of `image` (a PIL image at the size the regions' masks have), mixed
        with the phrase `text` when given, scoped as the module docstring says; a `StateSegmenter` (a project's
        version) decodes with its state. `examples` ((PIL image, (H, W) bool mask) pairs, e.g. a stored exemplar
        from another task) are used as well as, or instead of, the regions."""
        positives = [r for r in regions if r.positive]
        negatives = [r for r in regions if not r.positive]
        shown = [(image, r.mask) for r in positives] + list(examples)
        if not shown:
            raise ValueError("a visual prompt needs at least one positive example region")
        state = segmenter.state if isinstance(segmenter, StateSegmenter) else None
        backbone = segmenter.segmenter if isinstance(segmenter, StateSegmenter) else segmenter
        pred = self.exemplar(backbone).predict(image, shown, text=text, visual_weight=VISUAL_WEIGHT, state=state)
        return MaskPrediction.of(pred.prompt, pred.probability,
                                 scope_mask(pred.mask, positives, negatives, similar or not positives))
