"""Cheap size checks of a correction webhook, made before it is spooled, so one event cannot cost unbounded memory.

A brush region's RLE starts with the number of RGBA values it decodes to (32 bits, big-endian); reading it costs
nothing, while decoding a 2400 x 2400 noise mask (5.2 MB of RLE, a 23 MB webhook) took the SDK's decoder 55 s and
2.7 GB, and still takes ours (flat memory) ~38 s on a busy 2-core machine: its cost grows with the number of runs.
So a region is refused at the webhook (4xx, Label Studio shows it; nothing is acknowledged and lost) when its size
is over MAX_IMAGE_PIXELS, when its RLE decodes to more (or fewer) pixels than the image it was drawn on, or when its
RLE is longer than `MAX_RLE_BYTES` (a tenth of that noise mask; a hand-drawn mask on a 12 Mpx photo is ~100 KB).
"""
from __future__ import annotations

from typing import Any, Mapping

MAX_RLE_BYTES = 512 * 1024
# A correction body larger than this is refused from its Content-Length, before it is read and parsed (parsing a
# 23 MB body alone takes ~0.6 s on a busy 2-core machine; Label Studio gives a webhook 1 s). A region at the RLE
# budget is ~2 MB of JSON, so this leaves room for four of them.
MAX_WEBHOOK_BYTES = 8 * 1024 * 1024
_BRUSH = ("brushlabels", "brush")
_SHAPED = (*_BRUSH, "polygonlabels", "polygon")


class EventTooLarge(ValueError):
    """The event is refused before it is spooled; `status` is the HTTP status to answer (413 or 422)."""

    def __init__(self, message: str, status: int = 413) -> None:
        super().__init__(message)
        self.status = status


def check_body_size(content_length: int | None, max_bytes: int = MAX_WEBHOOK_BYTES) -> None:
    """Raise EventTooLarge (413) for a webhook body over `max_bytes`, known from its Content-Length header."""
    if content_length is not None and content_length > max_bytes:
        raise EventTooLarge(f"webhook body of {content_length:,} bytes is over {max_bytes:,} bytes; a correction "
                            f"this large cannot be a drawn mask (brush RLE budget {MAX_RLE_BYTES:,} bytes per region)")


def check_correction_size(payload: Mapping[str, Any], max_pixels: int, max_rle_bytes: int = MAX_RLE_BYTES) -> None:
    """Raise EventTooLarge when a region of the event's annotation is over the limits; other shapes pass (the
    store validates them in full later)."""
    annotation = payload.get("annotation")
    result = annotation.get("result") if isinstance(annotation, Mapping) else None
    if not isinstance(result, list):
        return
    for item in result:
        if not isinstance(item, Mapping) or item.get("type") not in _SHAPED:
            continue
        try:
            h, w = int(item["original_height"]), int(item["original_width"])
        except (KeyError, TypeError, ValueError, OverflowError):
            continue  # the store skips regions without a size
        region = item.get("id", "?")
        if h * w > max_pixels:
            raise EventTooLarge(f"region {region}: {w}x{h} is over MAX_IMAGE_PIXELS={max_pixels}")
        value = item.get("value")
        rle = value.get("rle") if isinstance(value, Mapping) and item.get("type") in _BRUSH else None
        if not isinstance(rle, list) or len(rle) < 4:
            continue
        if len(rle) > max_rle_bytes:
            raise EventTooLarge(f"region {region}: brush RLE of {len(rle):,} bytes is over the {max_rle_bytes:,}-byte "
                                "budget per region (a mask this fragmented is noise, not a drawing)")
        try:
            count = int.from_bytes(bytes(rle[:4]), "big")
        except (TypeError, ValueError):
            raise EventTooLarge(f"region {region}: brush RLE must hold byte values", 422) from None
        if count != h * w * 4:
            raise EventTooLarge(f"region {region}: brush RLE holds {count // 4:,} pixels, its image is {w}x{h}", 422)
