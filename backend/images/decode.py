"""Image bytes → RGB `PIL.Image`, refusing what should not be decoded: HTML/JSON pages served with status 200,
decompression bombs (checked from the header, before any pixel is decoded), corrupt or truncated files."""
from __future__ import annotations

import base64
import binascii
import io
from urllib.parse import unquote, unquote_to_bytes

from PIL import Image, UnidentifiedImageError

from backend.images.errors import ImageFetchError
from clipseg_model.image_io import to_display_rgb


class ImageDecoderMixin:
    """Decoding for the fetcher (its `max_bytes` and `max_image_pixels` limits)."""


    def _decode_data_uri(self, ref: str) -> bytes:
        header, sep, payload = ref.partition(",")
        if not sep:
            raise ImageFetchError("malformed data: URI (no comma)", 400)
        # Base64 is 4/3 of the bytes: refuse before decoding a huge payload.
        if len(payload) * 3 // 4 > self.max_bytes:
            raise ImageFetchError(f"data: URI is over the {self.max_bytes}-byte limit", 413)
        try:
            if header.lower().endswith(";base64"):
                data = base64.b64decode(unquote(payload).replace(" ", "+"), validate=False)
            else:
                data = unquote_to_bytes(payload)
        except (binascii.Error, ValueError) as exc:
            raise ImageFetchError(f"malformed base64 in data: URI: {exc}", 400) from exc
        self._check_header(data)
        return data

    def _check_header(self, data: bytes) -> None:
        """Cheap checks before caching: non-empty, not HTML/JSON, and a size PIL can read within the limit."""
        if not data:
            raise ImageFetchError("empty image body", 415)
        # Login pages and error JSON often come with status 200; SVG is markup too and Pillow can't rasterise it.
        if data[:512].lstrip().startswith((b"<", b"{", b"[")):
            raise ImageFetchError("got an HTML/XML/JSON page instead of a raster image", 415)
        self._open(data)  # raises for undecodable or oversized images, reading only the header

    def _open(self, data: bytes) -> Image.Image:
        try:
            img = Image.open(io.BytesIO(data))
        except Image.DecompressionBombError as exc:
            raise ImageFetchError(f"image too large: {exc}", 413) from exc
        except UnidentifiedImageError as exc:
            raise ImageFetchError("the bytes are not an image format Pillow can read", 415) from exc
        except (OSError, ValueError, SyntaxError) as exc:
            raise ImageFetchError(f"corrupt image: {exc}", 422) from exc
        width, height = img.size
        # Image.open reads only the header: refusing here means a bomb is never decompressed.
        if width <= 0 or height <= 0:
            raise ImageFetchError(f"image has an empty size {width}x{height}", 422)
        if width * height > self.max_image_pixels:
            raise ImageFetchError(
                f"image is {width}x{height} = {width * height} pixels, over the {self.max_image_pixels} limit", 413
            )
        return img

    def decode(self, data: bytes) -> tuple[Image.Image, int, int]:
        """Bytes → (RGB image, width, height): EXIF-transposed, alpha composited on white, 16-bit scaled."""
        img = self._open(data)
        try:
            img.load()
            rgb = to_display_rgb(img)
        except Image.DecompressionBombError as exc:
            raise ImageFetchError(f"image too large: {exc}", 413) from exc
        except (OSError, ValueError, SyntaxError) as exc:
            raise ImageFetchError(f"corrupt or truncated image: {exc}", 422) from exc
        return rgb, rgb.width, rgb.height

