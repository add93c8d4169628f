"""What every row of `clipseg bench` shares: the result table's types, timing, the machine, test images and the
random-weight model (built once under `--work-dir`)."""
from __future__ import annotations

import base64
import io
import json
import os
import platform
import statistics
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

PROMPTS = ["a red car", "the person on the left", "a dog", "the sky", "a wooden table", "the big window",
           "a green tree", "the cup on the right"]
K_VALUES = (1, 4, 8)
HTTP_PROMPTS = 4  # labels in the /predict config: K of the HTTP rows
CONCURRENT = 4  # requests in the micro-batching check


@dataclass
class Row:
    """One line of the result table. `ok` is None for rows without a target (information only)."""

    key: str
    what: str
    value: float
    unit: str
    target: str = ""
    ok: bool | None = None
    detail: str = ""


@dataclass
class Report:
    machine: dict[str, Any]
    model: dict[str, Any]
    rows: list[Row] = field(default_factory=list)
    timings: dict[str, Any] = field(default_factory=dict)

    def add(self, row: Row) -> Row:
        self.rows.append(row)
        return row


def median_time(fn: Callable[[], Any], repeats: int, warmup: int = 1) -> tuple[float, list[float]]:
    """Median wall time of `fn()` over `repeats` runs, after `warmup` untimed runs. Returns (median, samples)."""
    for _ in range(warmup):
        fn()
    samples = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        samples.append(time.perf_counter() - start)
    return statistics.median(samples), samples


def interleaved(fns: dict[str, Callable[[], Any]], repeats: int, warmup: int = 1) -> dict[str, list[float]]:
    """Wall times of several functions run round-robin (a, b, a, b, ...), so load from other processes hits all of
    them alike; `warmup` untimed rounds first. Returns name -> samples."""
    for _ in range(warmup):
        for fn in fns.values():
            fn()
    samples: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            start = time.perf_counter()
            fn()
            samples[name].append(time.perf_counter() - start)
    return samples


def machine_info() -> dict[str, Any]:
    """CPU model, cores, bf16 support and torch threading of this machine."""
    import torch

    from clipseg_model.precision import cpu_flags, mkldnn_bf16_supported

    model_name, flags = cpu_flags()
    mkldnn_bf16 = mkldnn_bf16_supported()
    return {
        "cpu": model_name,
        "logical_cpus": os.cpu_count(),
        "usable_cpus": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count(),
        "torch": torch.__version__,
        "torch_threads": torch.get_num_threads(),
        "torch_interop_threads": torch.get_num_interop_threads(),
        "cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "mkldnn": torch.backends.mkldnn.is_available(),
        "mkldnn_bf16_supported": mkldnn_bf16,
        # native bf16 dot products (AVX512-BF16 on Zen4/Cooper Lake+, AMX on Sapphire Rapids+): without them bf16
        # autocast is emulated and usually slower than fp32
        "avx512_bf16": "avx512_bf16" in flags,
        "amx_bf16": "amx_bf16" in flags,
        "python": platform.python_version(),
        "load_average_1min": os.getloadavg()[0] if hasattr(os, "getloadavg") else None,
    }


def test_images(count: int, size: tuple[int, int], seed: int):
    """`count` distinct RGB images (smooth shapes + noise, so masks are not trivially empty or full): the same
    generator as the precision probe's (`clipseg_model.precision.probe_images`)."""
    from clipseg_model.precision import probe_images

    return probe_images(count, size, seed)


def png_data_uri(image) -> str:
    buf = io.BytesIO()
    image.save(buf, "PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


def mask_iou(a, b) -> float:
    union = (a | b).sum()
    return 1.0 if union == 0 else float((a & b).sum() / union)


def build_or_reuse(preset_name: str, work_dir: Path, seed: int, vocab: Path | None = None) -> Path:
    """The random-weight model directory `work_dir/<preset>-seed<seed>`, built on first use."""
    from clipseg_model.checkpoint import is_checkpoint
    from clipseg_model.random_init import init_model

    out = work_dir / f"{preset_name}-seed{seed}"
    if is_checkpoint(str(out)):
        return out
    work_dir.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    print(f"building {preset_name} with random weights in {out} (once) ...", flush=True)
    init_model(preset_name, out, seed=seed, bpe_path=vocab)
    print(f"built in {time.perf_counter() - started:.0f} s", flush=True)
    return out


def _vocabulary(model_dir: Path) -> str:
    try:
        meta = json.loads((model_dir / "clipseg_config.json").read_text())
        return str(meta.get("metadata", {}).get("vocabulary", "unknown"))
    except (OSError, ValueError):
        return "unknown"

