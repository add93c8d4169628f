"""Subnormal floats are flushed to zero in every torch thread when `flush_denormals` runs before the thread pool."""
from __future__ import annotations

import subprocess
import sys

# 4M elements: torch splits the multiplication over both threads; 1e-39 is subnormal in float32.
_PROBE = """
import sys, torch
from clipseg_model.numerics import flush_denormals
mode = sys.argv[1]
if mode == "early":
    flush_denormals()
torch.set_num_threads(2)
x = torch.full((1 << 22,), 1e-39)
warm = x * 1.0  # starts the intra-op pool
if mode == "late":
    flush_denormals()
print(int(((x * 1.0) != 0).sum()))
"""


def _nonzero(mode: str) -> int:
    out = subprocess.run([sys.executable, "-c", _PROBE, mode], capture_output=True, text=True, timeout=120, check=True)
    return int(out.stdout.strip())


def test_flush_before_the_pool_covers_every_thread():
    total = 1 << 22
    assert _nonzero("off") == total  # subnormals survive by default
    assert _nonzero("early") == 0  # every pool thread inherited the flag


def test_flush_after_the_pool_started_misses_its_threads():
    """Why the CLI flushes before running a command: a pool thread started earlier keeps subnormals."""
    assert 0 < _nonzero("late") < 1 << 22


def test_no_numpy_subnormal_warning_after_flushing():
    """numpy's float limits, first computed with subnormals flushed, used to warn twice on every command's start."""
    code = ("from clipseg_model.numerics import flush_denormals; flush_denormals(); import numpy as np; "
            "np.finfo(np.float32); np.finfo(np.float64); import transformers, torch.nn.functional")
    out = subprocess.run([sys.executable, "-W", "error::UserWarning", "-c", code], capture_output=True, text=True,
                         timeout=120)
    assert out.returncode == 0 and "subnormal" not in out.stderr, out.stderr[-500:]
