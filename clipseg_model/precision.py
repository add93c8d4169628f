"""The inference precision: the fastest one whose masks equal fp32's, chosen per machine and model.

    choice = choose_precision(model, "auto", cache_dir=data_dir / "precision")   # clipseg_model.precision_choice
    model = apply_precision(model, choice.precision)     # int8: the frozen CLIP linears become dynamic int8
    segmenter = Segmenter(model, precision=choice.precision)

Candidates (CPU): fp32; bf16 autocast everywhere (only where the CPU has native bf16 dot products: AVX512-BF16 or
AMX, else it is emulated and slower); int8 dynamic quantisation (`torch.ao.quantization.quantize_dynamic`, VNNI
GEMMs) of the frozen CLIP towers' linear layers with the decoder in fp32 or in bf16 autocast. Each runs a fixed
probe (synthetic images x phrases, cold caches) interleaved with fp32; the fastest whose every probe mask has
IoU >= 0.99 with fp32's (and that beats fp32 by `MIN_GAIN`) wins, else fp32. The choice is cached as JSON per machine
and model. CUDA keeps its fp16 autocast (not measured; untested here).
"""
from __future__ import annotations

import logging
import platform
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
from PIL import Image

from clipseg_model.segmenter_base import SegmentationModel

log = logging.getLogger(__name__)

MIN_IOU = 0.99  # every probe mask must agree with fp32's at least this much
MIN_GAIN = 1.05  # a candidate must be this much faster than fp32 (below: noise, not a reason to change numerics)
PROBE_PROMPTS = ("a red car", "the person on the left", "a dog")
PROBE_IMAGES = 2
MODES = ("auto", "fp32", "bf16", "int8", "int8+bf16")  # int8+bf16: as set (what a measured choice travels as)


@dataclass(frozen=True)
class Precision:
    """How inference runs: `towers` is the CLIP vision/text towers' arithmetic (fp32, bf16 autocast, int8 dynamic
    quantisation), `decoder` the decoder's (fp32 or bf16 autocast); on CUDA everything runs under fp16 autocast."""

    name: str
    towers: str = "fp32"
    decoder: str = "fp32"


PRECISIONS = {
    "fp32": Precision("fp32"),
    "bf16": Precision("bf16", "bf16", "bf16"),
    "int8": Precision("int8", "int8", "fp32"),
    "int8+bf16": Precision("int8+bf16", "int8", "bf16"),
    "fp16": Precision("fp16", "fp16", "fp16"),  # CUDA
}


@dataclass
class Choice:
    """What was chosen and why (for /health and `clipseg status`); `measured`: name -> {speedup, min_iou}."""

    precision: Precision
    reason: str
    measured: dict[str, dict[str, float]] = field(default_factory=dict)
    cpu: dict[str, object] = field(default_factory=dict)
    cached: bool = False

    def as_dict(self) -> dict[str, object]:
        return {"precision": self.precision.name, "reason": self.reason, "measured": self.measured, "cpu": self.cpu,
                "cached": self.cached}


def cpu_flags() -> tuple[str, set[str]]:
    """(CPU model name, its /proc/cpuinfo flags); ("unknown" or the platform's name, set()) where there is none."""
    flags: set[str] = set()
    model_name = platform.processor() or "unknown"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model_name = line.split(":", 1)[1].strip()
            elif line.startswith("flags") and not flags:
                flags = set(line.split(":", 1)[1].split())
    except OSError:
        pass
    return model_name, flags


def mkldnn_bf16_supported() -> bool | None:
    """torch's own answer whether oneDNN runs bf16 natively here; None where torch cannot say."""
    try:
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):
        return None


def cpu_support() -> dict[str, object]:
    """What this CPU offers: native bf16 (AVX512-BF16, AMX), int8 dot products (VNNI) and torch's quantised engine."""
    model_name, flags = cpu_flags()
    mkldnn_bf16 = bool(mkldnn_bf16_supported())
    engines = list(torch.backends.quantized.supported_engines)
    return {
        "cpu": model_name,
        "threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "capability": torch.backends.cpu.get_cpu_capability(),
        "avx512_bf16": "avx512_bf16" in flags,
        "amx_bf16": "amx_bf16" in flags,
        "amx_int8": "amx_int8" in flags,
        "vnni": bool({"avx512_vnni", "avx_vnni"} & flags),
        "mkldnn_bf16": mkldnn_bf16,
        "int8_engine": next((e for e in ("x86", "fbgemm", "onednn") if e in engines), None),
    }


def autocast(precision: Precision, part: str, device: torch.device):
    """The autocast context of `part` ("towers" or "decoder") under `precision` on `device`."""
    if device.type == "cuda":
        return torch.autocast("cuda", dtype=torch.float16)
    mode = precision.towers if part == "towers" else precision.decoder
    return torch.autocast("cpu", dtype=torch.bfloat16, enabled=mode == "bf16")


def apply_precision(model: SegmentationModel, precision: Precision) -> SegmentationModel:
    """`model` ready for `precision`: with int8 towers its frozen CLIP linear layers are replaced, in place, by
    dynamically quantised ones (weights int8, activations quantised per call; the fp32 weights are freed).
    Trainable layers (the decoder, unfrozen vision layers) keep fp32, so per-project states still load."""
    if precision.towers != "int8" or model.device.type != "cpu":
        return model
    from torch.ao.quantization import default_dynamic_qconfig, quantize_dynamic

    for module in model.backbone_modules():
        names = {name for name, m in module.named_modules()
                 if isinstance(m, torch.nn.Linear) and not any(p.requires_grad for p in m.parameters())}
        if names:
            quantize_dynamic(module, {n: default_dynamic_qconfig for n in names}, dtype=torch.qint8, inplace=True)
    return model


# ---- the probe ---------------------------------------------------------------------------------------------------
def probe_images(count: int = PROBE_IMAGES, size: tuple[int, int] = (320, 240), seed: int = 0) -> list[Image.Image]:
    """`count` fixed RGB images (smooth discs over a colour + noise): masks that are neither empty nor full."""
    rng = np.random.default_rng(seed)
    w, h = size
    yy, xx = np.mgrid[0:h, 0:w]
    out = []
    for _ in range(count):
        canvas = np.zeros((h, w, 3), dtype=np.float32) + rng.uniform(0, 255, (1, 1, 3))
        for _shape in range(4):
            cx, cy, r = rng.uniform(0, w), rng.uniform(0, h), rng.uniform(0.1, 0.3) * min(w, h)
            canvas[(xx - cx) ** 2 + (yy - cy) ** 2 < r * r] = rng.uniform(0, 255, 3)
        canvas += rng.normal(0, 12, canvas.shape)
        out.append(Image.fromarray(canvas.clip(0, 255).astype(np.uint8), "RGB"))
    return out


def mask_agreement(reference: Sequence[np.ndarray], other: Sequence[np.ndarray], threshold: float) -> float:
    """Smallest IoU over probe masks: (H, W) probability maps thresholded at `threshold`; where fp32's mask is
    (nearly) empty or full there, at fp32's median instead, so a trivial mask cannot agree by default."""
    worst = 1.0
    for ref, got in zip(reference, other):
        t = threshold
        cover = float((ref > t).mean())
        if cover < 0.01 or cover > 0.99:
            t = float(np.median(ref))
        a, b = ref > t, got > t
        union = int((a | b).sum())
        worst = min(worst, 1.0 if union == 0 else float((a & b).sum() / union))
    return worst


def pick(measured: dict[str, dict[str, float]]) -> tuple[str, str]:
    """(name, reason): the fastest candidate whose masks agree and that beats fp32 by MIN_GAIN, else fp32."""
    agree = {n: m for n, m in measured.items() if n != "fp32" and m["min_iou"] >= MIN_IOU and m["speedup"] >= MIN_GAIN}
    rejected = [f"{n} (IoU {m['min_iou']:.4f}, {m['speedup']:.2f}x)" for n, m in measured.items()
                if n != "fp32" and n not in agree]
    why_not = f"; rejected: {', '.join(rejected)}" if rejected else ""
    if not agree:
        return "fp32", f"no candidate is faster with masks IoU >= {MIN_IOU} to fp32{why_not}"
    best = max(agree, key=lambda n: agree[n]["speedup"])
    m = agree[best]
    return best, f"fastest with every probe mask IoU >= {MIN_IOU}: {m['speedup']:.2f}x fp32 at IoU {m['min_iou']:.4f}{why_not}"


__all__ = ["Precision", "PRECISIONS", "apply_precision", "autocast", "cpu_support", "mask_agreement", "pick",
           "probe_images"]
