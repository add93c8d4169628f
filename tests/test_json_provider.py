"""The backend's JSON: orjson speed for answers, the standard library's exactness where orjson differs."""
from __future__ import annotations

import json

import numpy as np

from backend.http.json_provider import dumps_bytes, loads


def test_answers_round_trip_including_numpy_and_big_integers():
    value = {"rle": list(range(300)), "score": 0.25, "text": "ünïcode ✓", "nested": [{"a": None, "b": True}]}
    assert json.loads(dumps_bytes(value)) == value
    assert json.loads(dumps_bytes({"m": np.arange(4, dtype=np.uint8), "s": np.float32(0.5)})) == {"m": [0, 1, 2, 3], "s": 0.5}
    big = {"id": 10**30, "neg": -(2**63) - 1}  # beyond 64 bits: orjson refuses, the fallback writes them exactly
    assert json.loads(dumps_bytes(big)) == big


def test_parsing_keeps_big_integers_exact():
    assert loads(b'{"id": 123456789012345678901234567890}') == {"id": 123456789012345678901234567890}
    assert loads(memoryview(b"[1, 2]")) == [1, 2]
