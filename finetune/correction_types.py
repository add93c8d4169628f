"""Plain types of the corrections store (`finetune.corrections`): the regions it is handed, the samples and
annotations it returns, and the PNG mask codec it stores masks with."""
from __future__ import annotations

import io
from dataclasses import dataclass, field
from typing import Any, Callable, Mapping

import numpy as np

from finetune import metrics

# ---------------------------------------------------------------------------------------------------------------
# Masks


def mask_to_png(mask: np.ndarray) -> bytes:
    """Encode a (H, W) mask (bool or 0/255 uint8) as a 1-bit PNG."""
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(np.ascontiguousarray(mask, dtype=bool)).save(buf, format="PNG", optimize=True)
    return buf.getvalue()


def png_to_mask(data: bytes) -> np.ndarray:
    """Decode PNG bytes to a (H, W) np.bool_ mask (any non-zero pixel is in the mask)."""
    from PIL import Image

    with Image.open(io.BytesIO(data)) as img:
        if img.mode == "1":
            return np.array(img, dtype=bool)
        return np.array(img.convert("L")) > 0


def _as_mask(mask: np.ndarray | bytes) -> np.ndarray:
    if isinstance(mask, np.ndarray):
        return mask.astype(bool)
    return png_to_mask(bytes(mask))


def mask_iou(a: np.ndarray, b: np.ndarray) -> float:
    """IoU of two boolean masks; b is resized (nearest) to a's (H, W) if they differ; 1.0 when both are empty."""
    if a.shape != b.shape:
        import cv2

        b = cv2.resize(b.astype(np.uint8), (a.shape[1], a.shape[0]), interpolation=cv2.INTER_NEAREST).astype(bool)
    return metrics.iou(a, b)


# ---------------------------------------------------------------------------------------------------------------
# Types


@dataclass(frozen=True)
class Region:
    """One region of an annotation turned into a training target: prompt and (H, W) np.bool_ mask.

    `source` says where the prompt came from and `key` names the region in its annotation; both are opaque to the
    store (the caller that resolves prompts uses them to re-resolve stored prompts after a settings change).
    """

    prompt: str
    mask: np.ndarray
    label: str | None = None
    kind: str = "brush"
    source: str | None = None
    key: str | None = None


@dataclass(frozen=True)
class CorrectionSample:
    """One (prompt, mask, image) training sample: one region of one stored annotation.

    `mask` is (H, W) np.bool_; `load_image()` returns the image bytes (from Redis, by `image_sha256`).
    `iou` compares our recorded prediction for (task, label) with the annotator's final mask of that label.
    """

    project: str
    task_id: int
    annotation_id: int
    region: int
    prompt: str
    label: str | None
    mask: np.ndarray = field(repr=False, compare=False)
    image_sha256: str
    created: float
    updated: float
    seq: int
    iou: float | None
    model_version: str | None
    load_image: Callable[[], bytes] = field(repr=False, compare=False)


@dataclass(frozen=True)
class PutResult:
    """What `put_annotation` did: status "stored", "replaced" or "stale"; the correction's sequence number; and the
    review IoU per label (our recorded prediction vs the final mask)."""

    status: str
    seq: int
    ious: Mapping[str, float] = field(default_factory=dict)


@dataclass(frozen=True)
class StoredAnnotation:
    """One stored annotation as `CorrectionStore.annotations` lists it (masks not decoded).

    `regions` are dicts with prompt, label, kind, shape [H, W], area (mask pixels), source and key; `context` is
    what the caller stored with it (e.g. the task data the prompts were resolved from).
    """

    project: str
    task_id: int
    annotation_id: int
    seq: int
    image_sha256: str
    updated: float
    regions: list[dict[str, Any]]
    context: dict[str, Any]
