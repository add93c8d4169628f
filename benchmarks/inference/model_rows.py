"""Rows a, b, c and f of `clipseg bench`: our predictor against transformers' CLIPSeg call, a cached re-prompt,
precisions (bf16, int8, the automatic choice) against fp32, and the vision pass's GFLOP/s against a plain sgemm."""
from __future__ import annotations

import statistics
import time

from benchmarks.inference.common import K_VALUES, PROMPTS, Report, Row, interleaved, mask_iou, median_time

def bench_prompts_vs_hf(report: Report, model, image, repeats: int) -> None:
    """(a) ours, 1 image + K prompts, cold caches, vs the ordinary HF call (image repeated K times)."""
    import torch
    from transformers import CLIPSegProcessor, ViTImageProcessorPil

    from clipseg_model.predictor import Segmenter

    seg = Segmenter(model)
    size = model.config.image_size
    image_processor = ViTImageProcessorPil(do_resize=True, size={"height": size, "width": size},
                                           image_mean=list(model.config.image_mean), image_std=list(model.config.image_std))
    processor = CLIPSegProcessor(image_processor=image_processor, tokenizer=model.tokenizer)
    max_length = model.hf.config.text_config.max_position_embeddings

    def ours(k: int):
        seg.feature_cache.clear()
        seg.text_cache.clear()
        return seg.predict(image, PROMPTS[:k])

    def hf_call(k: int):
        # as in transformers' CLIPSeg docs: one copy of the image per prompt, padding="max_length"
        inputs = processor(text=PROMPTS[:k], images=[image] * k, padding="max_length", max_length=max_length,
                           return_tensors="pt")
        with torch.inference_mode():
            return torch.sigmoid(model.hf(**inputs).logits)

    t_ours, t_hf = {}, {}
    for k in K_VALUES:
        got = interleaved({"ours": lambda: ours(k), "hf": lambda: hf_call(k)}, repeats)
        s_ours, s_hf = got["ours"], got["hf"]
        t_ours[k], t_hf[k] = statistics.median(s_ours), statistics.median(s_hf)
        report.timings[f"ours_k{k}"], report.timings[f"hf_k{k}"] = s_ours, s_hf
        speedup = t_hf[k] / t_ours[k]
        target, ok = ("≥ 7x", speedup >= 7.0) if k == 8 else ("", None)
        report.add(Row(f"a.k{k}", f"K={k}: HF call / ours (1 image + {k} prompts)", speedup, "x", target, ok,
                       f"ours {t_ours[k] * 1e3:.0f} ms, HF {t_hf[k] * 1e3:.0f} ms"))
    ratio = t_ours[8] / t_ours[1]
    report.add(Row("a.8v1", "ours K=8 / ours K=1", ratio, "x", "≤ 1.4x", ratio <= 1.4,
                   f"{t_ours[8] * 1e3:.0f} ms vs {t_ours[1] * 1e3:.0f} ms"))


def bench_reprompt(report: Report, model, image, repeats: int) -> None:
    """(b) same image, a new phrase: feature cache hit, text cache miss; vs the same call with cold caches."""
    from clipseg_model.predictor import Segmenter

    seg = Segmenter(model)
    counter = iter(range(10**9))

    def cold():
        seg.feature_cache.clear()
        seg.text_cache.clear()
        return seg.predict(image, [f"{PROMPTS[0]} number {next(counter)}"])

    cached_seg = Segmenter(model)
    cached_seg.predict(image, ["warm the feature cache"])
    hits = cached_seg.feature_cache.hits

    def reprompt():
        return cached_seg.predict(image, [f"{PROMPTS[1]} number {next(counter)}"])  # never seen: text encoder runs

    got = interleaved({"cold": cold, "reprompt": reprompt}, repeats)
    s_cold, s_warm = got["cold"], got["reprompt"]
    t_cold, t_warm = statistics.median(s_cold), statistics.median(s_warm)
    if cached_seg.feature_cache.hits <= hits:
        raise RuntimeError("the re-prompt did not hit the feature cache")
    report.timings["cold_k1"], report.timings["reprompt_k1"] = s_cold, s_warm
    share = t_warm / t_cold
    report.add(Row("b", "cached re-prompt / cold (1 new phrase)", share * 100, "%", "≤ 15%", share <= 0.15,
                   f"re-prompt {t_warm * 1e3:.0f} ms, cold {t_cold * 1e3:.0f} ms"))


def bench_bf16(report: Report, model, images, repeats: int) -> None:
    """(c) bf16 autocast vs fp32 on CPU: speed (1 image + 1 prompt, cold) and mask IoU at threshold 0.5."""
    import numpy as np

    from clipseg_model.predictor import Segmenter

    fp32, bf16 = Segmenter(model, threshold=0.5), Segmenter(model, threshold=0.5, bf16=True)

    def cold(seg):
        seg.feature_cache.clear()
        seg.text_cache.clear()
        return seg.predict(images[0], PROMPTS[:1])

    got = interleaved({"fp32": lambda: cold(fp32), "bf16": lambda: cold(bf16)}, repeats)
    s32, s16 = got["fp32"], got["bf16"]
    t32, t16 = statistics.median(s32), statistics.median(s16)
    report.timings["fp32_k1"], report.timings["bf16_k1"] = s32, s16
    ious, diffs, fractions = [], [], []
    for image in images[:2]:
        for a, b in zip(fp32.predict(image, PROMPTS), bf16.predict(image, PROMPTS)):
            ious.append(mask_iou(a.mask, b.mask))
            diffs.append(float(np.abs(a.probability - b.probability).max()))
            fractions.append(float(a.mask.mean()))
    speed = t32 / t16
    worst = min(ious)
    report.add(Row("c.speed", "bf16 speed-up over fp32 (CPU autocast)", speed, "x", "≥ 1.6x", speed >= 1.6,
                   f"fp32 {t32 * 1e3:.0f} ms, bf16 {t16 * 1e3:.0f} ms"))
    report.add(Row("c.iou", f"bf16 vs fp32 mask IoU (min of {len(ious)} masks)", worst, "", "≥ 0.99", worst >= 0.99,
                   f"mean {statistics.mean(ious):.4f}; max |Δp| {max(diffs):.3f}; "
                   f"fp32 mask covers {min(fractions):.0%}–{max(fractions):.0%} of the image"))


def vision_flops(model) -> tuple[float, int]:
    """FLOPs (multiply-add = 2) of one truncated vision pass at the model's input size, counted analytically:
    patch embedding + per layer QKV/output projections, attention scores and weighted sum, MLP. LayerNorm,
    softmax and activations (< 1%) are left out. Returns (flops, layers run)."""
    vc = model.hf.config.vision_config
    c, inter, patch = vc.hidden_size, vc.intermediate_size, vc.patch_size
    grid = model.config.image_size // patch
    n = grid * grid + 1  # CLS + patches
    depth = max(model.read_layers)
    per_layer = 2 * n * c * (4 * c) + 2 * 2 * n * n * c + 2 * 2 * n * c * inter
    embed = 2 * (n - 1) * c * 3 * patch * patch
    return float(embed + depth * per_layer), depth


def bench_gflops(report: Report, model, repeats: int, tiny: bool) -> None:
    """(f) achieved GFLOP/s of the vision pass (fp32) vs a plain fp32 sgemm on this machine."""
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    size = model.config.image_size
    pixels = torch.randn(1, 3, size, size)
    flops, depth = vision_flops(model)
    with torch.inference_mode():
        counter = FlopCounterMode(display=False)
        with counter:
            model.encode_images(pixels)
        counted = counter.get_total_flops()
        t_vision, s_vision = median_time(lambda: model.encode_images(pixels), repeats)
    n = 256 if tiny else 2048
    a, b = torch.randn(n, n), torch.randn(n, n)
    t_mm, s_mm = median_time(lambda: torch.mm(a, b), max(repeats, 5))
    report.timings["vision_fp32"], report.timings["sgemm"] = s_vision, s_mm
    vision_gflops, mm_gflops = flops / t_vision / 1e9, 2 * n**3 / t_mm / 1e9
    report.add(Row("f", f"vision GFLOP/s / sgemm GFLOP/s (fp32, {depth} layers at {size} px)", vision_gflops / mm_gflops,
                   "", "", None,
                   f"vision {flops / 1e9:.1f} GFLOP in {t_vision * 1e3:.0f} ms = {vision_gflops:.0f} GFLOP/s "
                   f"(torch flop counter: {counted / 1e9:.1f} GFLOP); sgemm {n}x{n}: {mm_gflops:.0f} GFLOP/s"))



def bench_precisions(report: Report, model, images, repeats: int, cache_dir) -> None:
    """(c.auto, c.int8) PRECISION=auto's choice (clipseg_model.precision, measured here in one run, not read from a
    cache) and int8 towers, each vs fp32: speed of 1 image + 1 prompt, cold, and min mask IoU over 2 images x 8
    phrases at threshold 0.5."""
    import copy

    from clipseg_model.precision import PRECISIONS, apply_precision
    from clipseg_model.precision_choice import choose_precision
    from clipseg_model.predictor import Segmenter

    started = time.perf_counter()
    choice = choose_precision(model, "auto", None)
    choose_s = time.perf_counter() - started
    report.model["precision_choice"] = choice.as_dict()
    fp32 = Segmenter(model, threshold=0.5)
    int8_model = apply_precision(copy.deepcopy(model), PRECISIONS["int8"])
    chosen_model = int8_model if choice.precision.towers == "int8" else model
    segs = {"fp32": fp32, "auto": Segmenter(chosen_model, threshold=0.5, precision=choice.precision),
            "int8": Segmenter(int8_model, threshold=0.5, precision=PRECISIONS["int8"])}

    def cold(seg):
        seg.feature_cache.clear()
        seg.text_cache.clear()
        return seg.predict(images[0], PROMPTS[:1])

    got = interleaved({name: (lambda s=seg: cold(s)) for name, seg in segs.items()}, repeats)
    t = {name: statistics.median(s) for name, s in got.items()}
    report.timings.update(auto_k1=got["auto"], int8_k1=got["int8"])
    ious = {"auto": [], "int8": []}
    for image in images[:2]:
        reference = fp32.predict(image, PROMPTS)
        for name in ious:
            ious[name] += [mask_iou(a.mask, b.mask) for a, b in zip(reference, segs[name].predict(image, PROMPTS))]
    speed, worst = t["fp32"] / t["auto"], min(ious["auto"])
    report.add(Row("c.auto", f"PRECISION=auto ({choice.precision.name}) speed-up over fp32, IoU {worst:.4f}", speed, "x",
                   "≥ 1.5x", speed >= 1.5 and worst >= 0.99,
                   f"fp32 {t['fp32'] * 1e3:.0f} ms, auto {t['auto'] * 1e3:.0f} ms; min IoU {worst:.4f} over "
                   f"{len(ious['auto'])} masks; chosen in {choose_s:.0f} s: {choice.reason}"))
    speed8, worst8 = t["fp32"] / t["int8"], min(ious["int8"])
    report.add(Row("c.int8", f"int8 towers (dynamic quantisation) speed-up over fp32, IoU {worst8:.4f}", speed8, "x",
                   "", None, f"int8 {t['int8'] * 1e3:.0f} ms; min IoU {worst8:.4f}, mean "
                   f"{statistics.mean(ious['int8']):.4f} over {len(ious['int8'])} masks"))
