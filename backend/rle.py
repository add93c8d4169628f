"""Label Studio brush RLE, encoded with numpy.

`label_studio_sdk.converter.brush.mask2rle` builds the bit stream as a Python string, one run at a time: 15 ms for a
640x480 blob and ~100 ms for a fragmented mask, per region. This encoder writes the same bytes (tests compare them
with the SDK's on random masks) with array operations.

The format (thi.ng rle-pack): a 32-bit value count, 5 bits word size - 1 (8 → 7), four 4-bit run-length field
sizes - 1 (3, 4, 8, 16), then per run: 1 bit "series", 2 bits field index, the length - 1 in that many bits, and the
8-bit value. The SDK pads to whole bytes with a full zero byte when already aligned; so do we.
"""
from __future__ import annotations

import numpy as np

_FIELD_BITS = np.array([3, 4, 8, 16])
_HEADER_SIZES = (3, 4, 8, 16)
_MAX_RUN = 2**16


def mask_to_rle(mask: np.ndarray) -> list[int]:
    """(H, W) uint8 mask (Label Studio expects 0/255) → brush RLE bytes, identical to the SDK's `mask2rle`."""
    flat = np.ascontiguousarray(mask, dtype=np.uint8).ravel()
    n = flat.size * 4  # Label Studio decodes RGBA: every pixel value repeated four times
    if flat.size == 0:
        raise ValueError("empty mask")
    change = np.flatnonzero(flat[1:] != flat[:-1]) + 1
    starts = np.concatenate(([0], change))
    lengths = np.diff(np.concatenate((starts, [flat.size]))) * 4  # runs of the RGBA stream: always >= 4
    values = flat[starts].astype(np.int64)

    # Runs longer than 2**16 are cut into full 2**16 pieces (the SDK writes 2**16 - 1 and subtracts 2**16) + a rest.
    pieces = np.where(lengths > _MAX_RUN, (lengths - 1) // _MAX_RUN + 1, 1)
    run_values = np.repeat(values, pieces)
    run_lengths = np.repeat(lengths, pieces)
    first = np.repeat(np.cumsum(pieces) - pieces, pieces)
    k = np.arange(run_lengths.size) - first  # piece index within its run
    is_last = k == np.repeat(pieces - 1, pieces)
    run_lengths = np.where(is_last, run_lengths - _MAX_RUN * k, _MAX_RUN)

    index = np.select([run_lengths <= 8, run_lengths <= 16, run_lengths <= 256], [0, 1, 2], 3)
    field = _FIELD_BITS[index]
    # code = 1 | index (2 bits) | length - 1 (field bits) | value (8 bits)
    code = (((1 << 2 | index) << field) | (run_lengths - 1)) << 8 | run_values
    nbits = 1 + 2 + field + 8

    header = (n << 21) | (7 << 16) | sum((s - 1) << (12 - 4 * i) for i, s in enumerate(_HEADER_SIZES))
    codes = np.concatenate(([header], code)).astype(np.int64)
    widths = np.concatenate(([53], nbits))
    offsets = np.concatenate(([0], np.cumsum(widths)[:-1]))
    total = int(widths.sum())
    bits = np.zeros(total + 8 - total % 8, dtype=np.uint8)  # the SDK always pads, a whole byte when aligned
    for b in range(int(widths.max())):  # bit b (from the most significant) of every code at once
        has = widths > b
        bits[offsets[has] + b] = (codes[has] >> (widths[has] - 1 - b)) & 1
    return np.packbits(bits).tolist()
