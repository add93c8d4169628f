"""Measuring the precisions of clipseg_model.precision on the probe and choosing one, cached per machine and model
(apart from precision.py because it runs the predictor, which itself runs in a `Precision`)."""
from __future__ import annotations

import copy
import hashlib
import json
import logging
import os
import statistics
import time
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
from PIL import Image

from clipseg_model.fingerprint import frozen_fingerprint
from clipseg_model.precision import (MIN_GAIN, MIN_IOU, MODES, PRECISIONS, PROBE_PROMPTS, Choice, Precision,
                                     apply_precision, cpu_support, mask_agreement, pick, probe_images)
from clipseg_model.predictor import Segmenter
from clipseg_model.segmenter_base import SegmentationModel

log = logging.getLogger(__name__)

Candidate = tuple[Precision, Callable[[SegmentationModel], SegmentationModel]]  # precision, model -> prepared model


def candidates(model: SegmentationModel, mode: str, support: dict[str, object]) -> tuple[list[Candidate], list[str]]:
    """The candidates `mode` allows on this CPU (fp32 is the reference, not among them) and why others were left out."""
    out: list[Candidate] = []
    skipped = []
    native_bf16 = bool(support["avx512_bf16"] or support["amx_bf16"])
    if mode in ("auto", "bf16"):
        if native_bf16 or mode == "bf16":
            out.append((PRECISIONS["bf16"], lambda m: m))
        else:
            skipped.append("bf16: no native bf16 (avx512_bf16/amx) on this CPU")
    if mode in ("auto", "int8"):
        if support["int8_engine"]:
            quantised: dict[int, SegmentationModel] = {}

            def int8(m: SegmentationModel) -> SegmentationModel:
                # int8 and int8+bf16 differ only in the decoder's autocast: one quantised copy serves both (two
                # deep copies of a full-size CLIPSeg raised the server's peak memory to 2.1 GB)
                if id(m) not in quantised:
                    quantised[id(m)] = apply_precision(copy.deepcopy(m), PRECISIONS["int8"])
                return quantised[id(m)]

            out.append((PRECISIONS["int8"], int8))
            if native_bf16:
                out.append((PRECISIONS["int8+bf16"], int8))
        else:
            skipped.append("int8: torch has no x86/fbgemm quantised engine")
    return out, skipped


def measure(model: SegmentationModel, options: Sequence[Candidate], threshold: float = 0.5, repeats: int = 2,
            images: Sequence[Image.Image] | None = None) -> dict[str, dict[str, float]]:
    """Each option's speed-up over fp32 (medians of cold probe runs, interleaved with fp32) and its smallest mask IoU
    with fp32 over the probe (PROBE_IMAGES images x PROBE_PROMPTS)."""
    images = list(images or probe_images())
    segmenters = {"fp32": Segmenter(model, threshold=threshold)}
    for precision, prepare in options:
        segmenters[precision.name] = Segmenter(prepare(model), threshold=threshold, precision=precision)
    maps: dict[str, list[np.ndarray]] = {name: [] for name in segmenters}
    times: dict[str, list[float]] = {name: [] for name in segmenters}
    for round_ in range(1 + repeats):  # round 0 warms up (and gives the masks)
        for name, seg in segmenters.items():
            seg.feature_cache.clear()
            seg.text_cache.clear()
            started = time.perf_counter()
            for image in images:
                got = seg.predict(image, list(PROBE_PROMPTS))
                if round_ == 0:
                    maps[name] += [p.probability for p in got]
            if round_:
                times[name].append(time.perf_counter() - started)
    base = statistics.median(times["fp32"])
    return {name: {"speedup": base / statistics.median(times[name]), "min_iou": mask_agreement(maps["fp32"], maps[name], threshold),
                   "seconds": statistics.median(times[name])}
            for name in segmenters if name != "fp32"} | {"fp32": {"speedup": 1.0, "min_iou": 1.0, "seconds": base}}


def cache_key(model: SegmentationModel, mode: str, threshold: float, support: dict[str, object]) -> str:
    """Machine (CPU, threads, torch) + model (frozen weights, config) + mode + threshold."""
    h = hashlib.blake2b(digest_size=12)
    h.update(json.dumps(support, sort_keys=True, default=str).encode())
    h.update(f"{frozen_fingerprint(model)}|{model.config.to_json()}|{mode}|{threshold}".encode())
    return h.hexdigest()


def choose_precision(model: SegmentationModel, mode: str = "auto", cache_dir: str | os.PathLike | None = None,
                     threshold: float = 0.5, options: Sequence[Candidate] | None = None, name: str = "") -> Choice:
    """The precision to serve `model` with under PRECISION=`mode` (auto, fp32, bf16, int8, int8+bf16).

    fp32, bf16 and int8+bf16 are taken as set; auto and int8 measure their candidates (int8: with the decoder in fp32 or bf16)
    on the probe, or read the choice cached under `cache_dir` for this machine and model. `options` replaces the
    candidates (tests inject a bad one). `name` (MODEL as configured) is recorded with a cached choice, so that
    `cached_choices` can say which model it is for."""
    if mode not in MODES:
        raise ValueError(f"PRECISION must be one of {', '.join(MODES)}, not {mode!r}")
    if model.device.type == "cuda":
        return Choice(PRECISIONS["fp16"], "CUDA: fp16 autocast (not measured)")
    if mode in ("fp32", "bf16", "int8+bf16"):
        return Choice(PRECISIONS[mode], f"PRECISION={mode}")
    support = cpu_support()
    path = None
    if cache_dir is not None and options is None:
        path = Path(cache_dir) / f"{cache_key(model, mode, threshold, support)}.json"
        try:
            data = json.loads(path.read_text())
            return Choice(PRECISIONS[data["precision"]], data["reason"], data["measured"], support, cached=True)
        except (OSError, ValueError, KeyError):
            pass
    found, skipped = candidates(model, mode, support) if options is None else (list(options), [])
    started = time.perf_counter()
    measured = measure(model, found, threshold)
    picked, reason = pick(measured)
    if mode == "int8" and picked == "fp32":
        reason = "PRECISION=int8 but " + reason
    if skipped:
        reason += "; skipped " + "; ".join(skipped)
    choice = Choice(PRECISIONS[picked], reason, measured, support)
    log.info("precision %s (measured in %.1f s): %s", picked, time.perf_counter() - started, reason)
    if path is not None:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(f".{os.getpid()}.tmp")
        tmp.write_text(json.dumps({"precision": picked, "reason": reason, "measured": measured, "cpu": support,
                                   "model": name, "mode": mode,
                                   "at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}, indent=1))
        os.replace(tmp, path)
    return choice


def cached_choices(cache_dir: str | os.PathLike) -> list[dict[str, object]]:
    """The choices measured and cached under `cache_dir`, newest first: dicts with precision, reason, model, mode,
    at (UTC) and file; [] when there is none. Unreadable entries are skipped (`choose_precision` measures again)."""
    out = []
    for path in Path(cache_dir).glob("*.json"):
        try:
            data = json.loads(path.read_text())
            out.append({"precision": data["precision"], "reason": data["reason"], "model": data.get("model", ""),
                        "mode": data.get("mode", ""), "at": data.get("at", ""), "file": str(path)})
        except (OSError, ValueError, KeyError, TypeError):
            continue
    return sorted(out, key=lambda c: str(c["at"]), reverse=True)


__all__ = ["MIN_GAIN", "MIN_IOU", "cache_key", "cached_choices", "candidates", "choose_precision", "measure"]
