"""What image fetching hands back: the decoded image, or an error with the HTTP status it maps to."""
from __future__ import annotations

from dataclasses import dataclass
from urllib.parse import parse_qs, urlsplit

from PIL import Image


class ImageFetchError(Exception):
    """An image could not be fetched or decoded; `status` is the HTTP-like code the caller may report.

    400 bad reference, 401/403 auth or policy refusal, 404 missing, 413 too large, 415 not an image,
    422 undecodable image, 502 upstream failure, 504 timeout.
    """

    def __init__(self, message: str, status: int = 502):
        super().__init__(message)
        self.message = message
        self.status = status

    def __str__(self) -> str:
        return f"{self.message} (status {self.status})"



@dataclass(frozen=True)
class FetchedImage:
    """A decoded image: `image` is RGB, EXIF-transposed; `width`/`height` are its size after that transpose,
    which is what Label Studio's editor reports as `original_width`/`original_height`."""

    image: Image.Image
    width: int
    height: int
    source: str  # the reference, redacted for logs (no query string, no data: payload)



def redact(url: str) -> str:
    """A reference safe to log: no data: payload, no query string (signed URLs carry credentials there)."""
    if url.startswith("data:"):
        return f"data:...({len(url)} chars)"
    parts = urlsplit(url)
    query = parse_qs(parts.query)
    keep = f"?d={query['d'][0]}" if "d" in query else ""  # the local-files path is not a secret and helps debugging
    return f"{parts.scheme + '://' if parts.scheme else ''}{parts.netloc}{parts.path}{keep}"


