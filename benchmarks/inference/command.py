"""`clipseg bench`'s arguments, the order of its rows and the printed table (`run` is what the command calls)."""
from __future__ import annotations

import argparse
import json
import os
import time
from dataclasses import asdict
from pathlib import Path

from benchmarks.inference.common import PROMPTS, Report, build_or_reuse, machine_info, test_images, _vocabulary
from benchmarks.inference.model_rows import (bench_bf16, bench_gflops, bench_precisions, bench_prompts_vs_hf,
                                             bench_reprompt)
from benchmarks.inference.projects import PROJECTS, bench_projects
from benchmarks.inference.server import bench_server

def configure(parser: argparse.ArgumentParser, settings) -> None:
    parser.add_argument("--repeats", type=int, default=5, help="timed runs per measurement (median; default 5)")
    parser.add_argument("--quick", action="store_true", help="2 repeats instead of --repeats")
    parser.add_argument("--tiny", action="store_true", help="tiny random model: for tests, the numbers mean nothing")
    parser.add_argument("--json", type=Path, default=None, help="also write the results to this file")
    parser.add_argument("--work-dir", type=Path, default=Path(".cache/bench"),
                        help="where the random-weight model is built once and reused (default .cache/bench)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the random weights and the test images")
    parser.add_argument("--image-size", default="640x480", help="WxH of the test images (default 640x480)")
    parser.add_argument("--vocab", type=Path, default=None,
                        help="OpenAI bpe_simple_vocab_16e6.txt.gz for the real CLIP vocabulary when the model is built "
                             "(default: from an installed open_clip, else byte-level, which makes phrases ~3x more "
                             "tokens and the text encoder slower than the real one)")



def _verdict(ok: bool | None) -> str:
    return "" if ok is None else ("PASS" if ok else "FAIL")


def format_table(report: Report) -> str:
    m = report.machine
    lines = [
        f"machine: {m['cpu']}, {m['usable_cpus']} usable CPUs; torch {m['torch']} ({m['torch_threads']} threads, "
        f"{m['cpu_capability']}); bf16: avx512_bf16={m['avx512_bf16']} amx_bf16={m['amx_bf16']} "
        f"mkldnn_bf16={m['mkldnn_bf16_supported']}; load average {m['load_average_1min']:.1f} at start, "
        f"{report.model.get('load_average_end', float('nan')):.1f} at end"
        + ("  (WARNING: other processes competed for the CPUs; timings are noisy)"
           if max(m["load_average_1min"], report.model.get("load_average_end", 0)) > (m["usable_cpus"] or 1) + 0.5 else ""),
        f"model: {report.model['preset']} with random weights, {report.model['parameters'] / 1e6:.1f}M parameters, "
        f"{report.model['image_size']} px input, {report.model['vocabulary']} vocabulary "
        f"({min(report.model['tokens_per_prompt'])}-{max(report.model['tokens_per_prompt'])} tokens per phrase); "
        f"test images {report.model['test_image']}; "
        f"median of {report.model['repeats']} after 1 warm-up",
        "",
        f"{'row':<9} {'measurement':<72} {'value':>9}  {'target':<9} {'result':<6} details",
    ]
    for r in sorted(report.rows, key=lambda r: r.key[0]):  # stable: a.k1 a.k4 a.k8 a.8v1 b c d e f g
        value = f"{r.value:.2f}{r.unit}" if r.unit != "%" else f"{r.value:.1f}%"
        if r.key == "c.iou":
            value = f"{r.value:.4f}"
        if r.unit == "GB":
            value = f"{r.value:.2f} GB"
        lines.append(f"{r.key:<9} {r.what:<72} {value:>9}  {r.target:<9} {_verdict(r.ok):<6} {r.detail}")
    return "\n".join(lines)


def run(args: argparse.Namespace, settings) -> int:
    import torch

    from clipseg_model.loading import load_model

    repeats = 2 if args.quick else max(1, args.repeats)
    width, height = (int(v) for v in args.image_size.lower().split("x"))
    preset_name = "tiny-clipseg" if args.tiny else "clipseg-rd64"
    torch.manual_seed(args.seed)
    model_dir = build_or_reuse(preset_name, args.work_dir, args.seed, args.vocab)
    model = load_model(str(model_dir), "cpu")
    report = Report(machine_info(), {
        "preset": preset_name, "dir": str(model_dir), "parameters": sum(p.numel() for p in model.parameters()),
        "image_size": model.config.image_size, "read_layers": list(model.read_layers),
        "vision_layers": model.hf.config.vision_config.num_hidden_layers, "test_image": f"{width}x{height}",
        "repeats": repeats, "tiny": bool(args.tiny), "vocabulary": _vocabulary(model_dir),
        "tokens_per_prompt": [len(model.tokenizer(p)["input_ids"]) for p in PROMPTS],
    })
    if args.tiny:
        print("--tiny: a tiny random model; these numbers say nothing about real speed", flush=True)
    images = test_images(2, (width, height), args.seed)
    steps = [
        ("a", lambda: bench_prompts_vs_hf(report, model, images[0], repeats)),
        ("b", lambda: bench_reprompt(report, model, images[0], repeats)),
        ("c", lambda: bench_bf16(report, model, images, repeats)),
        ("c.auto/c.int8", lambda: bench_precisions(report, model, images, repeats, None)),
        ("d/e/g", lambda: bench_server(report, model, model_dir, (width, height), args.seed, repeats)),
        ("f", lambda: bench_gflops(report, model, repeats, args.tiny)),
        ("h", lambda: bench_projects(report, model_dir, args.work_dir, images[0], repeats,
                                     5 if args.tiny else PROJECTS)),  # --tiny: the row runs, its numbers mean nothing
    ]
    for name, step in steps:
        started = time.perf_counter()
        step()
        print(f"[{name} done in {time.perf_counter() - started:.0f} s]", flush=True)
    if hasattr(os, "getloadavg"):
        report.model["load_average_end"] = os.getloadavg()[0]
    print()
    print(format_table(report))
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps({"machine": report.machine, "model": report.model,
                                         "rows": [asdict(r) for r in report.rows], "timings": report.timings}, indent=2))
        print(f"\nresults -> {args.json}")
    return 0
