"""Visual prompts: an example region (image + mask or box) embedded by CLIP's vision tower into the space the
decoder is conditioned on, as CLIPSeg does (`conditional_pixel_values`); text and visual embeddings mix by a
weighted sum.

Prompt engineering (CLIPSeg paper, Table 6: crop + background blur + darken is the best single-shot variant): the
example is cropped to its box (with a margin) and everything outside the mask is blurred and darkened, so the
vision tower sees the object, not the scene around it. `ENGINEERING` names the variants; which one works on this
project's data is not measured yet (issue 28).

Both families expose the projected CLIP under `.hf.clip` (clipseg-rd64) or `.clip` (film-decoder); their
`get_image_features` lands in the same projection_dim space as `get_text_features`, which is what the decoder reads.
"""
from __future__ import annotations

import hashlib
from dataclasses import dataclass
from typing import Sequence

import numpy as np
import torch
from PIL import Image, ImageFilter

ENGINEERING: tuple[str, ...] = ("none", "crop", "crop_blur_darken")


def box_to_mask(shape: tuple[int, int], box: Sequence[float]) -> np.ndarray:
    """(H, W) np.bool_ mask of the pixel box (x0, y0, x1, y1), x1/y1 exclusive, clipped to the image."""
    h, w = shape
    x0, y0, x1, y1 = (int(round(v)) for v in box)
    mask = np.zeros((h, w), dtype=bool)
    mask[max(y0, 0):min(y1, h), max(x0, 0):min(x1, w)] = True
    return mask


def engineer_prompt(image: np.ndarray, mask: np.ndarray, mode: str = "crop_blur_darken", *, margin: float = 0.1,
                    darken: float = 0.5, blur_radius: float = 4.0) -> np.ndarray:
    """The image the vision tower sees for one example.

    Args:
        image: (H, W, 3) uint8 RGB.
        mask: (H, W) bool, the example region (a box becomes a mask with `box_to_mask`).
        mode: one of `ENGINEERING`.
        margin: crop margin, as a fraction of the box's larger side.
        darken: factor applied to the blurred background (1 keeps its brightness).
    Returns:
        (h, w, 3) uint8 RGB, h, w <= H, W.
    Raises:
        ValueError: on an unknown mode, mismatched shapes or an empty mask.
    """
    if mode not in ENGINEERING:
        raise ValueError(f"unknown visual-prompt engineering {mode!r}; one of {ENGINEERING}")
    if image.shape[:2] != mask.shape:
        raise ValueError(f"mask {mask.shape} does not match image {image.shape[:2]}")
    ys, xs = np.nonzero(mask)
    if len(xs) == 0:
        raise ValueError("empty example region")
    if mode == "none":
        return image
    h, w = mask.shape
    pad = int(round(margin * max(xs.max() - xs.min() + 1, ys.max() - ys.min() + 1)))
    x0, y0 = max(int(xs.min()) - pad, 0), max(int(ys.min()) - pad, 0)
    x1, y1 = min(int(xs.max()) + 1 + pad, w), min(int(ys.max()) + 1 + pad, h)
    crop, inside = image[y0:y1, x0:x1], mask[y0:y1, x0:x1]
    if mode == "crop":
        return np.ascontiguousarray(crop)
    background = np.asarray(Image.fromarray(crop).filter(ImageFilter.GaussianBlur(blur_radius)), dtype=np.float32)
    out = np.where(inside[..., None], crop.astype(np.float32), background * darken)
    return np.clip(out, 0, 255).astype(np.uint8)


def prompt_key(image: np.ndarray, mask: np.ndarray, mode: str) -> str:
    """Content key of one visual prompt (sha256 of image, mask and mode): the cache key of its embedding."""
    digest = hashlib.sha256(mode.encode())
    for array in (np.ascontiguousarray(image, dtype=np.uint8), np.ascontiguousarray(mask, dtype=bool)):
        digest.update(str(array.shape).encode())
        digest.update(array.tobytes())
    return digest.hexdigest()


def _projected_clip(model: torch.nn.Module) -> torch.nn.Module:
    hf = getattr(model, "hf", None)
    clip = hf.clip if hf is not None else getattr(model, "clip", None)
    if clip is None or not hasattr(clip, "get_image_features"):
        raise TypeError(f"{type(model).__name__} has no projected CLIP to embed visual prompts with")
    return clip


def encode_visual(model: torch.nn.Module, pixel_values: torch.Tensor, grad: bool = False) -> torch.Tensor:
    """V preprocessed example images (V, 3, S, S) → (V, projection_dim) embeddings in the text-embedding space
    (one full vision pass each). Under no_grad unless `grad` (training a model whose vision tower trains: the
    gradient of a visual-prompt row then reaches the tower, as a phrase's reaches a trained text tower)."""
    clip = _projected_clip(model)
    with torch.set_grad_enabled(grad and torch.is_grad_enabled()):
        out = clip.get_image_features(pixel_values=pixel_values)
    return out if isinstance(out, torch.Tensor) else out.pooler_output


def mix(text: torch.Tensor | None, visual: torch.Tensor, visual_weight: float = 1.0) -> torch.Tensor:
    """Weighted sum (1 - w) * text + w * mean(visual): CLIPSeg's text/visual interpolation.

    Args:
        text: (projection_dim,) or (1, projection_dim) pooled phrase embedding, or None (visual alone).
        visual: (V, projection_dim) embeddings of V examples (averaged: a few-shot prototype).
        visual_weight: w in [0, 1].
    Returns:
        (1, projection_dim) float tensor.
    """
    if not 0.0 <= visual_weight <= 1.0:
        raise ValueError(f"visual_weight must be in [0, 1], got {visual_weight}")
    prototype = visual.float().mean(dim=0, keepdim=True)
    if text is None:
        return prototype
    return (1.0 - visual_weight) * text.float().reshape(1, -1) + visual_weight * prototype


@dataclass
class VisualPrompts:
    """The visual prompts of a training batch: V engineered example crops, each conditioning one of its P phrases
    (several crops for one phrase average into a k-shot prototype, as `mix` does at inference).

    Attributes:
        pixel_values: (V, 3, S, S) float32, the crops through `model.preprocess`.
        index: (V,) long, the phrase each crop conditions.
        weight: (V,) float32 in [0, 1], the visual weight w of its phrase (every crop of one phrase has the same):
            the condition is (1 - w) * text + w * mean of the phrase's crops.
    """

    pixel_values: torch.Tensor
    index: torch.Tensor
    weight: torch.Tensor

    def __len__(self) -> int:
        return int(self.index.shape[0])


def condition_with(model: torch.nn.Module, text: torch.Tensor, prompts: VisualPrompts) -> torch.Tensor:
    """(P, D) phrase embeddings → (P, D) conditions with `prompts` mixed into the phrases they name (the others
    unchanged). The crops go through the vision tower with autograd when it trains (`model.vision_grad()`)."""
    if text.dim() != 2:
        raise ValueError("visual prompts need pooled (P, D) phrase embeddings (not word_attention's packed ones)")
    device = text.device
    visual = encode_visual(model, prompts.pixel_values.to(device), grad=model.vision_grad()).to(text.dtype)  # (V, D)
    index = prompts.index.to(device)
    sums = torch.zeros_like(text).index_add(0, index, visual)  # (P, D)
    counts = torch.zeros(text.shape[0], device=device, dtype=text.dtype).index_add(
        0, index, torch.ones_like(index, dtype=text.dtype))
    weight = torch.zeros(text.shape[0], device=device, dtype=text.dtype)
    weight[index] = prompts.weight.to(device, text.dtype)
    prototype = sums / counts.clamp(min=1)[:, None]
    return (1 - weight[:, None]) * text + weight[:, None] * prototype
