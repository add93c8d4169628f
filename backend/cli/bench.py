"""`clipseg bench`: inference speed of our CLIPSeg path against transformers' ordinary CLIPSeg call.

Everything runs in one process on one set of random full-size weights (built once under `--work-dir`, nothing is
downloaded): ours (one truncated vision pass per image, caches, bf16) vs `CLIPSegForImageSegmentation` called the
way transformers' docs show (the image repeated once per prompt), the HTTP server (gunicorn, `backend.wsgi:app`)
vs the predictor called directly, the server's peak RSS, the vision pass's GFLOP/s vs a plain sgemm, and per-project
models (row h: memory of 50 projects' decoders over one backbone, cost of switching between two projects).
Each time is the median of `--repeats` runs after a warm-up run. `--tiny` runs the same code on a tiny random
model: for the test suite only, its numbers mean nothing.
"""
from __future__ import annotations

import argparse
import base64
import io
import json
import logging
import os
import platform
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

log = logging.getLogger(__name__)

ROOT = Path(__file__).resolve().parents[1]
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


# ---- helpers ---------------------------------------------------------------------------------------------------
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

    flags: set[str] = set()
    model_name = platform.processor() or "unknown"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name") and model_name in ("unknown", "x86_64", ""):
                model_name = line.split(":", 1)[1].strip()
            elif line.startswith("flags") and not flags:
                flags = set(line.split(":", 1)[1].split())
    except OSError:
        pass
    try:
        mkldnn_bf16 = bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):
        mkldnn_bf16 = None
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
    """`count` distinct RGB images (smooth shapes + noise, so masks are not trivially empty or full)."""
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(seed)
    w, h = size
    yy, xx = np.mgrid[0:h, 0:w]
    out = []
    for _ in range(count):
        canvas = np.zeros((h, w, 3), dtype=np.float32)
        canvas += rng.uniform(0, 255, (1, 1, 3))
        for _shape in range(4):
            cx, cy, r = rng.uniform(0, w), rng.uniform(0, h), rng.uniform(0.1, 0.3) * min(w, h)
            canvas[(xx - cx) ** 2 + (yy - cy) ** 2 < r * r] = rng.uniform(0, 255, 3)
        canvas += rng.normal(0, 12, canvas.shape)
        out.append(Image.fromarray(canvas.clip(0, 255).astype(np.uint8), "RGB"))
    return out


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


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _status_kb(pid: int, key: str) -> int:
    """A `kB` field of /proc/<pid>/status (VmHWM: peak resident set, VmRSS: current)."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1])
    raise KeyError(key)


class ServerProcess:
    """gunicorn serving `backend.wsgi:app` on 127.0.0.1 with one sync worker, configured only by the environment
    given here (a clean one, so the caller's BASIC_AUTH_*, REDIS_URL etc. cannot change what is measured)."""

    def __init__(self, model_dir: Path, scratch: Path, bf16: bool = False):
        self.port = _free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        env = {
            "PATH": os.defpath + ":" + str(Path(sys.executable).parent),
            "PYTHONPATH": str(ROOT),
            "HOME": str(scratch),
            "HF_HOME": str(scratch / "hf"),
            "HF_HUB_OFFLINE": "1",
            "TRANSFORMERS_OFFLINE": "1",
            "TOKENIZERS_PARALLELISM": "false",
            "MODEL": str(model_dir.resolve()),
            "DEVICE": "cpu",
            "THRESHOLD": "0.5",
            "BF16": "1" if bf16 else "0",
            "REDIS_URL": "",
            "DATA_DIR": str(scratch / "data"),
            "LOG_LEVEL": "WARNING",
        }
        self.log_path = scratch / "gunicorn.log"
        self._log = open(self.log_path, "wb")  # noqa: SIM115 - closed in stop()
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "gunicorn", "--bind", f"127.0.0.1:{self.port}", "--workers", "1",
             "--timeout", "600", "--graceful-timeout", "5", "backend.wsgi:app"],
            cwd=str(ROOT), env=env, stdout=self._log, stderr=subprocess.STDOUT,
        )

    def wait_ready(self, timeout: float) -> None:
        import requests

        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"the server exited with {self.proc.returncode}: {self.log_tail()}")
            try:
                health = requests.get(self.url + "/health", timeout=2).json()
                if health.get("ready"):
                    return
                if health.get("error"):
                    raise RuntimeError(f"the server cannot load the model: {health['error']}")
            except requests.RequestException:
                pass
            time.sleep(0.25)
        raise TimeoutError(f"the server was not ready within {timeout:.0f} s: {self.log_tail()}")

    def worker_pid(self) -> int:
        """The gunicorn worker (the process that holds the model), not the master."""
        import psutil

        children = psutil.Process(self.proc.pid).children()
        return children[0].pid if children else self.proc.pid

    def log_tail(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")[-2000:]
        except OSError:
            return ""

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)
        self._log.close()


def label_config(labels: Sequence[str]) -> str:
    """A Label Studio config whose BrushLabels labels are the phrases (each label is segmented as its own prompt)."""
    from xml.sax.saxutils import quoteattr

    items = "".join(f"<Label value={quoteattr(label)}/>" for label in labels)
    return f'<View><Image name="image" value="$image"/><BrushLabels name="tag" toName="image">{items}</BrushLabels></View>'


# ---- the measurements ------------------------------------------------------------------------------------------
def _verdict(ok: bool | None) -> str:
    return "" if ok is None else ("PASS" if ok else "FAIL")


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


def _http_predict(session, url: str, images, config: str, first_id: int = 0,
                  parses: list[tuple[float, int]] | None = None) -> dict:
    """POST /predict for `images` (PIL images, or data: URIs already encoded) and check the answer's shape.

    `parses` (if given) gets (seconds of the client's JSON parse, bytes of the answer) appended.
    """
    uris = [im if isinstance(im, str) else png_data_uri(im) for im in images]
    body = {"tasks": [{"id": first_id + i, "data": {"image": uri}} for i, uri in enumerate(uris)],
            "label_config": config}
    resp = session.post(url + "/predict", json=body, timeout=600)
    resp.raise_for_status()
    started = time.perf_counter()
    out = resp.json()  # the standard library's parser, as Label Studio's requests-based client uses
    if parses is not None:
        parses.append((time.perf_counter() - started, len(resp.content)))
    sizes = [_data_uri_size(u) for u in uris]
    check_predict_answer(out, sizes, _config_labels(config))
    return out


def check_predict_answer(out: Any, sizes: Sequence[tuple[int, int]], labels: Sequence[str]) -> None:
    """Raise RuntimeError unless `out` is a right /predict answer for tasks of images of `sizes` (W, H).

    Right: one result per task, in order; no task answered as failed (an empty result with score 0.0 is how the
    backend answers a task it could not do); every region a brush/polygon item of one of `labels`, at its task's
    image size, with a score in [0, 1]; one model_version for all.
    """
    def fail(why: str) -> None:
        raise RuntimeError(f"wrong /predict answer: {why}: {str(out)[:300]}")

    results = out.get("results") if isinstance(out, dict) else None
    if not isinstance(results, list) or len(results) != len(sizes):
        fail(f"expected {len(sizes)} results")
    versions = {r.get("model_version") for r in results if isinstance(r, dict)}
    if len(versions) != 1 or not all(isinstance(v, str) and v for v in versions):
        fail("model_version missing or not the same for every task")
    for i, (r, (width, height)) in enumerate(zip(results, sizes)):
        score = r.get("score")
        if not isinstance(r.get("result"), list) or not isinstance(score, (int, float)) or not 0.0 <= score <= 1.0:
            fail(f"task {i}: no result list or a score outside [0, 1]")
        if not r["result"] and score == 0.0:
            fail(f"task {i} was answered as failed")
        for item in r["result"]:
            kind = item.get("type")
            value = item.get("value") or {}
            if kind not in ("brushlabels", "polygonlabels") or not set(value.get(kind) or []) <= set(labels):
                fail(f"task {i}: a region of type {kind!r} with labels {value.get(kind)!r}")
            if (item.get("original_width"), item.get("original_height")) != (width, height):
                fail(f"task {i}: a region sized {item.get('original_width')}x{item.get('original_height')}, "
                     f"the image is {width}x{height}")


def _data_uri_size(uri: str) -> tuple[int, int]:
    from PIL import Image

    with Image.open(io.BytesIO(base64.b64decode(uri.split(",", 1)[1]))) as img:
        return img.size


def _config_labels(config: str) -> list[str]:
    from backend.labelstudio.config import parse_label_config

    return [label for control in parse_label_config(config).controls for label in control.labels]


def bench_server(report: Report, model, model_dir: Path, size: tuple[int, int], seed: int, repeats: int) -> None:
    """(d) HTTP /predict vs the predictor called directly, (e) the server's peak RSS, (g) micro-batching."""
    import requests
    from PIL import Image

    from clipseg_model.predictor import Segmenter

    labels = PROMPTS[:HTTP_PROMPTS]
    config = label_config(labels)
    n = 1 + repeats
    images = test_images(n, size, seed + 100)  # distinct images: neither side may hit its feature cache
    encoded = [png_data_uri(im) for im in images]  # the same PNG bytes for both sides
    decoded = [Image.open(io.BytesIO(base64.b64decode(uri.split(",", 1)[1]))) for uri in encoded]
    with tempfile.TemporaryDirectory(prefix="clipseg-bench-") as scratch:
        server = ServerProcess(model_dir, Path(scratch))
        try:
            started = time.perf_counter()
            server.wait_ready(600)
            startup = time.perf_counter() - started
            pid = server.worker_pid()
            session = requests.Session()
            # warm-up: the text cache of both sides holds the labels afterwards, like a server that has been up
            _http_predict(session, server.url, encoded[:1], config)
            seg = Segmenter(model, threshold=0.5)
            seg.predict(decoded[0], labels)
            http_samples, direct_samples, parses = [], [], []
            for i in range(1, n):  # alternating, so load from other processes hits both alike
                t = time.perf_counter()
                # the request carries the PNG the direct side decodes (encoded once, outside the timing: a client
                # holds its image bytes already); the server decodes it, the direct side is given it decoded
                out = _http_predict(session, server.url, encoded[i : i + 1], config, first_id=i, parses=parses)
                http_samples.append(time.perf_counter() - t)
                t = time.perf_counter()
                seg.predict(decoded[i], labels)
                direct_samples.append(time.perf_counter() - t)
            regions = sum(len(r["result"]) for r in out["results"])
            t_http, t_direct = statistics.median(http_samples), statistics.median(direct_samples)
            report.timings["http_k4"], report.timings["direct_k4"] = http_samples, direct_samples
            t_parse = statistics.median(seconds for seconds, _ in parses)
            answer_mb = parses[-1][1] / 1e6
            ratio = t_http / t_direct
            report.add(Row("d", f"HTTP /predict / predictor direct (1 image, {HTTP_PROMPTS} labels)", ratio, "x",
                           "≤ 1.15x", ratio <= 1.15,
                           f"HTTP {t_http * 1e3:.0f} ms, direct {t_direct * 1e3:.0f} ms; {regions} regions in the last "
                           f"answer ({answer_mb:.1f} MB of JSON); server ready after {startup:.1f} s"))
            server_ratio = (t_http - t_parse) / t_direct
            report.add(Row("d.server", "same, without the client's JSON parse of the answer", server_ratio, "x", "", None,
                           f"client json.loads {t_parse * 1e3:.0f} ms of the HTTP time (random weights: salt-and-pepper "
                           f"masks, ~10^5 RLE runs per region; a blob mask is ~10^2)"))

            hwm_single = _status_kb(pid, "VmHWM")  # before the 4-image requests of the micro-batching check
            bench_micro_batching(report, seg, server, session, config, size, seed, repeats)

            hwm, rss = _status_kb(pid, "VmHWM"), _status_kb(pid, "VmRSS")
            file_backed = _status_kb(pid, "RssFile")
            weights = sum(p.numel() * p.element_size() for p in model.parameters())
            report.add(Row("e", "server peak RSS (VmHWM of the gunicorn worker, fp32)", hwm / 1024**2, "GB",
                           "≤ 1.3 GB", hwm / 1024**2 <= 1.3,
                           f"{hwm_single / 1024**2:.2f} GB after the 1-image requests only; now {rss / 1024**2:.2f} GB "
                           f"of which {file_backed / 1024**2:.2f} GB file-backed (mmapped safetensors); "
                           f"fp32 weights {weights / 1e9:.2f} GB"))
        finally:
            server.stop()


def bench_micro_batching(report: Report, seg, server: ServerProcess, session, config: str, size, seed: int,
                         repeats: int) -> None:
    """Would merging concurrent requests pay? CONCURRENT clients each sending one image at once, vs the same images
    in one request (what a merging server would run: one `predict_batch`), vs the predictor in this process."""
    import requests

    labels = PROMPTS[:HTTP_PROMPTS]
    trials = max(1, repeats // 2)
    concurrent_s, merged_s, seq_s, batch_s = [], [], [], []
    for trial in range(trials):
        batch = test_images(3 * CONCURRENT, size, seed + 1000 + trial)
        a, b, c = batch[:CONCURRENT], batch[CONCURRENT : 2 * CONCURRENT], batch[2 * CONCURRENT :]

        def one(i: int, image) -> None:
            with requests.Session() as s:
                _http_predict(s, server.url, [image], config, first_id=10_000 + i)

        threads = [threading.Thread(target=one, args=(i, im)) for i, im in enumerate(a)]
        t = time.perf_counter()
        for th in threads:
            th.start()
        for th in threads:
            th.join()
        concurrent_s.append(time.perf_counter() - t)
        t = time.perf_counter()
        _http_predict(session, server.url, b, config, first_id=20_000)
        merged_s.append(time.perf_counter() - t)
        # in-process: one image per call vs one predict_batch (same prompts, fresh images)
        t = time.perf_counter()
        for im in c:
            seg.predict(im, labels)
        seq_s.append(time.perf_counter() - t)
        fresh = test_images(CONCURRENT, size, seed + 5000 + trial)
        t = time.perf_counter()
        seg.predict_batch(fresh, [labels] * CONCURRENT)
        batch_s.append(time.perf_counter() - t)
    conc, merged = statistics.median(concurrent_s), statistics.median(merged_s)
    seq, bat = statistics.median(seq_s), statistics.median(batch_s)
    report.timings.update(concurrent_http=concurrent_s, merged_http=merged_s, sequential_direct=seq_s, batched_direct=batch_s)
    report.add(Row("g.http", f"micro-batching: {CONCURRENT} concurrent 1-image requests / 1 request with {CONCURRENT} images",
                   conc / merged, "x", "", None,
                   f"all answered after {conc * 1e3:.0f} ms vs {merged * 1e3:.0f} ms (sync worker serves one at a time)"))
    report.add(Row("g.direct", f"micro-batching in-process: {CONCURRENT} x predict / predict_batch({CONCURRENT})",
                   seq / bat, "x", "", None, f"{seq * 1e3:.0f} ms vs {bat * 1e3:.0f} ms"))


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


# ---- output ----------------------------------------------------------------------------------------------------
PROJECTS = 50  # projects whose decoders one server holds in row h


class _ProjectRegistry:
    """The part of `finetune.versions.VersionRegistry` a `ServingModel` reads, in memory: one fine-tuned version per
    project (row h needs no Redis; what is measured is the server's own loading and holding of the states)."""

    def __init__(self, checkpoints: dict[str, Path]):
        from finetune.versions import VersionRecord

        self.records = {f"v-{p}": VersionRecord(f"v-{p}", str(path), project=p) for p, path in checkpoints.items()}
        self.conn = None

    def pointers(self):
        return None, {r.project: (r.version, r.path) for r in self.records.values()}

    def get(self, version: str):
        return self.records[version]

    def lineage(self, version: str):
        return [self.records[version]]

    def materialize(self, version: str, models_dir) -> str:
        return self.records[version].path

    def mark_broken(self, version: str, reason: str) -> None:
        raise RuntimeError(f"version {version} did not load: {reason}")


def bench_projects(report: Report, model_dir: Path, work_dir: Path, image, repeats: int,
                   projects: int = PROJECTS) -> None:
    """(h) per-project models: RSS of a serving process holding `projects` (50) projects' decoders vs 1 (each state
    loaded through `ServingModel` from its own checkpoint), and the cost of switching decoders between requests
    of two projects on a cached image vs a cold request."""
    import gc

    import psutil
    import torch

    from backend.serving.model import ServingModel
    from clipseg_model.checkpoint import save_checkpoint
    from clipseg_model.loading import load_model

    checkpoints: dict[str, Path] = {}
    template = load_model(str(model_dir), "cpu")
    for i in range(projects):
        path = work_dir / f"projects-{model_dir.name}" / f"p{i}"
        if not (path / "clipseg_config.json").is_file():
            with torch.no_grad():
                for param in template.trainable_parameters():
                    param.add_(1e-3 * torch.randn_like(param))
            save_checkpoint(template, path, {"version": f"v-p{i}"}, replace=True)
        checkpoints[f"p{i}"] = path
    del template
    registry = _ProjectRegistry(checkpoints)
    serving = ServingModel(str(model_dir), "cpu", registry_factory=lambda: registry, models_dir=str(work_dir))
    serving._load_backbone()
    if not serving.ready:
        raise RuntimeError(serving.error)
    process = psutil.Process()

    def rss() -> int:
        gc.collect()
        return process.memory_info().rss

    first = serving.for_project("p0")
    first.predict(image, [PROMPTS[0]])  # every weight touched once: resident, as in a serving process
    rss_one = rss()
    started = time.perf_counter()
    views = [serving.for_project(p) for p in checkpoints]
    load_s = (time.perf_counter() - started) / (projects - 1)
    rss_all = rss()
    assert {v.version for v in views} == {f"v-{p}" for p in checkpoints} and first.version == "v-p0"
    state_mb = views[0].state.nbytes / 2**20
    growth_mb = (rss_all - rss_one) / (projects - 1) / 2**20
    # The allocator may place states in memory freed earlier (RSS grows less than what is held): count the larger.
    per_project_mb = max(growth_mb, state_mb)
    report.add(Row("h.rss", f"server RSS per project, {projects} projects' decoders loaded vs 1", per_project_mb, " MB",
                   "≤ 10 MB", per_project_mb <= 10,
                   f"RSS {rss_one / 2**30:.2f} GB with 1, {rss_all / 2**30:.2f} GB with {projects} "
                   f"(+{growth_mb:.1f} MB each); one state holds {state_mb:.1f} MB; loading a state {load_s * 1e3:.0f} ms"))

    segmenter = serving.segmenter
    a, b = serving.for_project("p1"), serving.for_project("p2")
    prompt = [PROMPTS[0]]
    a.predict(image, prompt)  # image features and the phrase cached: what remains is decoding (and switching)

    def cold():
        segmenter.feature_cache.clear()
        return a.predict(image, prompt)

    def same():
        return a.predict(image, prompt)

    def switching():
        b.predict(image, prompt)
        return a.predict(image, prompt)

    got = interleaved({"cold": cold, "same": same, "switch": switching}, max(repeats, 3))
    t_cold, t_same = statistics.median(got["cold"]), statistics.median(got["same"])
    t_switch = statistics.median(got["switch"]) / 2  # two requests, each after a switch
    extra = max(0.0, t_switch - t_same)
    share = extra / t_cold
    report.timings["project_switch"] = got
    report.add(Row("h.switch", "cost of switching two projects' decoders per cached-image request / cold", share * 100,
                   "%", "≤ 5%", share <= 0.05,
                   f"cached request {t_same * 1e3:.1f} ms, after a switch {t_switch * 1e3:.1f} ms, cold {t_cold * 1e3:.0f} ms;"
                   f" {segmenter.state_switches} switches"))
    serving.stop()


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
