"""Our numpy brush-RLE encoder writes exactly the bytes of label-studio-sdk's mask2rle."""
from __future__ import annotations

import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays
from label_studio_sdk.converter.brush import decode_rle, mask2rle

from backend.labelstudio.rle import decode_rle_fast, mask_to_rle


@settings(max_examples=200, deadline=None)
@given(arrays(np.uint8, st.tuples(st.integers(1, 40), st.integers(1, 40)), elements=st.sampled_from([0, 255])))
def test_same_bytes_as_the_sdk(mask):
    assert mask_to_rle(mask) == list(mask2rle(mask))


def test_long_runs_and_byte_alignment():
    """Runs over 2**16 values are split as the SDK splits them; aligned streams get the SDK's extra zero byte."""
    for shape in [(2000, 2000), (1, 16384), (1, 16385), (300, 219)]:
        for fill in (0, 255):
            mask = np.full(shape, fill, np.uint8)
            mask[shape[0] // 2:, : shape[1] // 3] = 255 - fill
            rle = mask_to_rle(mask)
            assert rle == list(mask2rle(mask))
            assert np.array_equal(decode_rle(rle).reshape(*shape, 4)[:, :, 3], mask)


def test_fragmented_full_size_masks():
    """Salt-and-pepper masks (what random weights give): ~10^5 runs, every field width, several codes per 32-bit word."""
    rng = np.random.default_rng(3)
    for density in (0.05, 0.6):
        mask = ((rng.random((480, 640)) < density) * 255).astype(np.uint8)
        rle = mask_to_rle(mask)
        assert rle == list(mask2rle(mask))
        assert np.array_equal(decode_rle(rle).reshape(480, 640, 4)[:, :, 3], mask)
    grey = rng.integers(0, 256, size=(37, 53), dtype=np.uint8)  # any byte value, not just 0/255
    assert mask_to_rle(grey) == list(mask2rle(grey))


@settings(max_examples=100, deadline=None)
@given(arrays(np.bool_, st.tuples(st.integers(1, 40), st.integers(1, 40))))
def test_bool_masks_are_written_as_0_255(mask):
    """The serving path hands bool masks over unconverted; the bytes are the SDK's for mask * 255."""
    assert mask_to_rle(mask) == list(mask2rle(mask.astype(np.uint8) * 255))


@settings(max_examples=60, deadline=None)
@given(arrays(np.uint8, st.tuples(st.integers(1, 40), st.integers(1, 40)), elements=st.sampled_from([0, 255])))
def test_fast_decoder_equals_the_sdks(mask):
    rle = mask2rle(mask)
    assert np.array_equal(decode_rle_fast(rle), decode_rle(rle))
