"""Turning whatever PIL opened into the RGB picture the annotator sees."""
from __future__ import annotations

import hashlib

import numpy as np
from PIL import Image, ImageOps


def to_rgb(img: Image.Image) -> Image.Image:
    """Any Pillow mode → 8-bit RGB. Alpha is composited on white (how the editor shows it on its light canvas);
    16/32-bit integer greyscale is scaled to 8 bits instead of clipped; float is clipped to 0..255."""
    mode = img.mode
    if mode == "RGB":
        return img
    if mode in ("I;16", "I;16L", "I;16B", "I;16N", "I"):
        arr = np.asarray(img, dtype=np.float64)
        # 16-bit data (the usual case for "I" too, as PNG opens 16-bit grey as "I"): scale 0..65535 → 0..255.
        top = 65535.0 if mode.startswith("I;16") or arr.max(initial=0) > 255 else 255.0
        arr = np.clip(arr / top * 255.0 + 0.5, 0, 255).astype(np.uint8)
        return Image.fromarray(arr, mode="L").convert("RGB")
    if mode == "F":
        arr = np.clip(np.asarray(img, dtype=np.float64), 0, 255).astype(np.uint8)
        return Image.fromarray(arr, mode="L").convert("RGB")
    has_alpha = mode in ("RGBA", "LA", "PA", "RGBa", "La") or (mode in ("P", "L", "RGB") and "transparency" in img.info)
    if has_alpha:
        rgba = img.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    return img.convert("RGB")


def to_display_rgb(image: Image.Image) -> Image.Image:
    """EXIF-transpose (as browsers and Label Studio display it) and convert to 8-bit RGB (`to_rgb`).

    Animated images give their first frame.
    """
    if getattr(image, "is_animated", False):
        image.seek(0)
    return to_rgb(ImageOps.exif_transpose(image))


def image_digest(image: Image.Image) -> str:
    """Content hash of an RGB image's pixels and size (the image-feature cache key)."""
    h = hashlib.blake2b(digest_size=16)
    h.update(f"{image.size}{image.mode}".encode())
    h.update(image.tobytes())
    return h.hexdigest()
