"""Regions in the interactive-annotating context Label Studio sends with /predict (formats only, no torch).

Shapes as label-studio-ml-backend's SAM examples read them: `context.result` items with `type` "rectanglelabels",
"keypointlabels" or "brushlabels", `value.x/y/width/height` in percent of the image, `original_width/height` in
pixels, `is_positive` on clicks, `value.rle` on brush strokes. Each becomes an (H, W) bool mask of the example
region (a click: a disc of `click_radius` x min(H, W) around it), which is what a visual prompt is built from.
Negative clicks are returned apart, so a caller can subtract them.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Mapping

import numpy as np

from backend.labelstudio.rle import check_mask_size, rle_to_mask

CONTEXT_TYPES = ("rectanglelabels", "keypointlabels", "brushlabels")


@dataclass(frozen=True)
class ContextRegion:
    """One region of the context: its type, label (or None), positive flag, (H, W) bool mask and the smart
    control it was drawn with (`from_name`)."""

    kind: str
    label: str | None
    positive: bool
    mask: np.ndarray
    from_name: str | None = None


def _percent_box(value: Mapping[str, Any], width: int, height: int) -> tuple[int, int, int, int]:
    x0 = float(value["x"]) * width / 100.0
    y0 = float(value["y"]) * height / 100.0
    x1 = x0 + float(value.get("width", 0.0)) * width / 100.0
    y1 = y0 + float(value.get("height", 0.0)) * height / 100.0
    clip = lambda v, hi: int(min(max(round(v), 0), hi))  # noqa: E731
    return clip(x0, width), clip(y0, height), clip(x1, width), clip(y1, height)


def context_regions(context: Mapping[str, Any] | None, width: int, height: int, *,
                    click_radius: float = 0.03) -> list[ContextRegion]:
    """Every usable region of an interactive context as masks of a `width` x `height` image.

    Items of other types, or without coordinates, are skipped; an empty or missing context gives [].
    """
    out: list[ContextRegion] = []
    items = context.get("result") if isinstance(context, Mapping) else None
    for item in items if isinstance(items, list) else []:
        # client input: anything malformed is skipped, never an error
        if not isinstance(item, Mapping) or not isinstance(item.get("type"), str) or item["type"] not in CONTEXT_TYPES:
            continue
        try:
            region = _region(item, width, height, click_radius)
        except (TypeError, ValueError, KeyError, OverflowError):
            continue
        if region is not None:
            out.append(region)
    return out


def _region(item: Mapping[str, Any], width: int, height: int, click_radius: float) -> ContextRegion | None:
    """One context item as a ContextRegion, None when it marks nothing; raises on malformed values."""
    kind = item["type"]
    value = item.get("value") or {}
    if not isinstance(value, Mapping):
        return None
    labels = value.get(kind) or []
    labels = labels if isinstance(labels, list) else [labels]
    label = str(labels[0]) if labels and isinstance(labels[0], (str, int, float)) else None
    positive = bool(item.get("is_positive", True))
    mask = np.zeros((height, width), dtype=bool)
    if kind == "brushlabels":
        if not value.get("rle"):
            return None
        h, w = check_mask_size(item.get("original_height") or height, item.get("original_width") or width)
        stroke = rle_to_mask(value["rle"], h, w)
        if (h, w) != (height, width):
            ys = (np.arange(height) * h // height)[:, None]
            xs = (np.arange(width) * w // width)[None, :]
            stroke = stroke[ys, xs]
        mask = stroke.astype(bool)
    elif "x" in value and "y" in value:
        if kind == "rectanglelabels":
            x0, y0, x1, y1 = _percent_box(value, width, height)
            mask[y0:y1, x0:x1] = True
        else:
            cx, cy = float(value["x"]) * width / 100.0, float(value["y"]) * height / 100.0
            r = max(click_radius * min(width, height), 1.0)
            ys, xs = np.ogrid[:height, :width]
            mask = (xs + 0.5 - cx) ** 2 + (ys + 0.5 - cy) ** 2 <= r * r
    if not mask.any():
        return None
    from_name = item.get("from_name")
    return ContextRegion(kind, label, positive, mask, from_name if isinstance(from_name, str) else None)
