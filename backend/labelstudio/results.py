"""Masks ↔ Label Studio result items (brush RLE and polygons).

A mask here is always at the image's original size (`original_height` x `original_width`), HxW, any dtype,
non-zero = foreground. Polygon points are percentages (0–100) of the image size, as Label Studio stores them.
"""
from __future__ import annotations

import logging
import secrets
from typing import Any, Mapping

import cv2
import numpy as np

from backend.labelstudio.rle import mask_to_rle, rle_to_mask

logger = logging.getLogger(__name__)

BRUSH = "brushlabels"
POLYGON = "polygonlabels"
_SUBPIXEL_SHIFT = 4  # cv2.fillPoly fixed-point bits: polygon vertices keep 1/16 px precision


def region_id() -> str:
    """A fresh region id: 10 url-safe characters, like the ids Label Studio's editor makes."""
    return secrets.token_urlsafe(8)[:10]


def _as_bool(mask: np.ndarray) -> np.ndarray:
    """HxW any dtype → HxW bool (non-zero = foreground); `mask_to_rle` writes a bool mask as the 0/255 LS expects."""
    mask = np.asarray(mask)
    if mask.ndim != 2:
        raise ValueError(f"mask must be 2-D (H, W), got shape {mask.shape}")
    return mask if mask.dtype == np.bool_ else mask != 0


def mask_to_brush(
    mask: np.ndarray,
    *,
    from_name: str,
    to_name: str,
    label: str,
    score: float | None = None,
    id: str | None = None,
) -> dict[str, Any] | None:
    """One `brushlabels` result item for `mask` (HxW, non-zero = foreground), or None for an empty mask.

    The RLE is the bytes `label_studio_sdk.converter.brush.mask2rle` writes for the uint8 0/255 mask (made by
    `backend.labelstudio.rle.mask_to_rle` straight from the bool mask, 10x+ faster): Label Studio decodes it as RGBA and reads the alpha channel, so
    `result_to_mask` reverses it exactly.
    """
    m = _as_bool(mask)
    if not m.any():
        return None  # an empty RLE region would be an invisible, undeletable-looking annotation
    height, width = m.shape
    item: dict[str, Any] = {
        "id": id or region_id(),
        "from_name": from_name,
        "to_name": to_name,
        "type": BRUSH,
        "original_width": int(width),
        "original_height": int(height),
        "image_rotation": 0,
        "value": {"format": "rle", "rle": mask_to_rle(m), "brushlabels": [label]},
    }
    if score is not None:
        item["score"] = float(score)
    return item


def mask_to_polygons(
    mask: np.ndarray,
    *,
    from_name: str,
    to_name: str,
    label: str,
    score: float | None = None,
    tolerance: float = 1.0,
    min_area: float = 16.0,
) -> list[dict[str, Any]]:
    """`polygonlabels` result items, one per connected component (outer contour) of `mask`.

    Args:
        mask: HxW, non-zero = foreground, at the original image size.
        tolerance: `cv2.approxPolyDP` epsilon in pixels (0 keeps every contour vertex).
        min_area: components whose contour area is below this many pixels are dropped (speckle).
    Returns:
        Items with `value.points` as [[x%, y%], ...] (0–100); holes are not representable and are filled.
    """
    m = _as_bool(mask)
    height, width = m.shape
    if not m.any():
        return []
    contours, _ = cv2.findContours(np.ascontiguousarray(m, dtype=np.uint8), cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_SIMPLE)
    items = []
    for contour in contours:
        # The contour runs through boundary pixel centres, so its area misses half the boundary pixels
        # (a 1-px line has none): Pick's theorem gives the pixel count, exact for rectangles.
        area = cv2.contourArea(contour) + cv2.arcLength(contour, True) / 2 + 1
        if area < min_area:
            continue
        approx = cv2.approxPolyDP(contour, tolerance, True) if tolerance > 0 else contour
        if len(approx) < 3:
            approx = contour  # simplification collapsed a small component: keep its exact outline
        pts = approx.reshape(-1, 2).astype(np.float64)
        if len(pts) < 3:
            continue  # one pixel wide or a single pixel: no area as a polygon
        # Pixel (i, j) covers [i, i+1): its centre is i + 0.5 in Label Studio's continuous coordinates.
        xs = np.clip((pts[:, 0] + 0.5) / width * 100.0, 0.0, 100.0)
        ys = np.clip((pts[:, 1] + 0.5) / height * 100.0, 0.0, 100.0)
        item: dict[str, Any] = {
            "id": region_id(),
            "from_name": from_name,
            "to_name": to_name,
            "type": POLYGON,
            "original_width": int(width),
            "original_height": int(height),
            "image_rotation": 0,
            "value": {
                "points": [[round(float(x), 4), round(float(y), 4)] for x, y in zip(xs, ys)],
                "closed": True,
                "polygonlabels": [label],
            },
        }
        if score is not None:
            item["score"] = float(score)
        items.append(item)
    return items


def mask_to_results(
    mask: np.ndarray,
    *,
    kind: str,
    from_name: str,
    to_name: str,
    label: str,
    score: float | None = None,
    tolerance: float = 1.0,
    min_area: float = 16.0,
) -> list[dict[str, Any]]:
    """Result items for one mask: `kind` is "brush"/"brushlabels" (0 or 1 item) or "polygon"/"polygonlabels"."""
    if kind in ("brush", BRUSH):
        item = mask_to_brush(mask, from_name=from_name, to_name=to_name, label=label, score=score)
        return [item] if item else []
    if kind in ("polygon", POLYGON):
        return mask_to_polygons(
            mask, from_name=from_name, to_name=to_name, label=label, score=score, tolerance=tolerance, min_area=min_area
        )
    raise ValueError(f"unknown result kind {kind!r}: expected brush or polygon")


def result_to_mask(result_item: Mapping[str, Any], width: int, height: int) -> np.ndarray:
    """Rasterise a brush (RLE) or polygon result item to an HxW bool mask (H=`height`, W=`width`).

    Brush RLE encodes its own size (`original_width/height` of the annotated image); it must match
    `width`x`height`. Polygon percentages are scaled to `width`x`height`, so any size works.

    Raises:
        ValueError: unsupported type, or an RLE that does not hold width*height RGBA pixels.
    """
    value = result_item.get("value") or {}
    if not isinstance(value, Mapping):
        raise ValueError(f"a result's value must be an object, got {type(value).__name__}")
    rtype = result_item.get("type", "")
    if "rle" in value or rtype in ("brushlabels", "brush"):
        # The checked decoder: garbage RLE raises ValueError instead of OverflowError or a 4 GB allocation.
        if value.get("format", "rle") != "rle":
            raise ValueError(f"unsupported brush format {value.get('format')!r}")
        return rle_to_mask(value.get("rle"), height, width)
    if "points" in value or rtype in ("polygonlabels", "polygon"):
        mask = np.zeros((height, width), dtype=np.uint8)
        pts = np.asarray(value.get("points") or [], dtype=np.float64).reshape(-1, 2)
        if len(pts) >= 3:
            # Inverse of mask_to_polygons: percent → continuous coords → pixel-centre coords.
            px = np.stack([pts[:, 0] / 100.0 * width - 0.5, pts[:, 1] / 100.0 * height - 0.5], axis=1)
            fixed = np.round(px * (1 << _SUBPIXEL_SHIFT)).astype(np.int32)
            cv2.fillPoly(mask, [fixed], 1, lineType=cv2.LINE_8, shift=_SUBPIXEL_SHIFT)
        return mask.astype(bool)
    raise ValueError(f"cannot rasterise a result of type {rtype!r}: expected brushlabels or polygonlabels")
