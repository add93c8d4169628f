"""Turning whatever PIL opened into the RGB picture the annotator sees."""
from __future__ import annotations

import hashlib

import numpy as np
from PIL import Image, ImageOps


def to_display_rgb(image: Image.Image) -> Image.Image:
    """EXIF-transpose (as browsers and Label Studio display it) and convert to 8-bit RGB.

    16-bit and float greyscale are scaled to 0-255 rather than clipped; transparent pixels are composited on white;
    animated images give their first frame.
    """
    if getattr(image, "is_animated", False):
        image.seek(0)
    image = ImageOps.exif_transpose(image)
    mode = image.mode
    if mode in ("I;16", "I;16B", "I;16L", "I", "F"):
        arr = np.asarray(image, dtype=np.float64)
        top = 65535.0 if mode.startswith("I;16") or arr.max() > 255 else 255.0
        arr = np.clip(arr / top * 255.0, 0, 255).astype(np.uint8)
        return Image.fromarray(arr, "L").convert("RGB")
    if mode == "P" and "transparency" in image.info:
        image = image.convert("RGBA")
    if image.mode in ("RGBA", "LA", "PA"):
        rgba = image.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    return image.convert("RGB") if image.mode != "RGB" else image


def image_digest(image: Image.Image) -> str:
    """Content hash of an RGB image's pixels and size (the image-feature cache key)."""
    h = hashlib.blake2b(digest_size=16)
    h.update(f"{image.size}{image.mode}".encode())
    h.update(image.tobytes())
    return h.hexdigest()
