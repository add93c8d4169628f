"""Pre-label throughput through a real Label Studio vs the predictor alone, on the same images.

    .venv/bin/python benchmarks/prelabel_throughput.py               # full-size CLIPSeg (random weights), 48 images
    .venv/bin/python benchmarks/prelabel_throughput.py --tiny -n 300 # the e2e tests' tiny model

1. The predictor alone: `Segmenter.predict_batch` on the images already decoded in memory, batches of 8 (32 on CUDA),
   the project's two labels as prompts.
2. The pre-label run: a real Label Studio 1.23 (tests/e2e/ls_harness.py; its venv is built on first use), a project
   whose tasks are the same images in a local-files storage, `queue_prelabel` and the real RQ jobs run in this
   process by a SimpleWorker (the model is loaded before timing, as a worker keeps it between jobs): task listing,
   image downloads (prefetch threads), inference, RLE, and the predictions imported through the API.

Both are measured twice in one run, in fp32 (today's release before PRECISION) and under PRECISION=auto (the
choice cached under the run's DATA_DIR, as a server and its workers share it), each pre-label run into its own
project over the same images. Prints images/s, the speed-up of auto over fp32 (target >= 1.8 on this CPU) and the
ratio of each pre-label run to the predictor alone in the same precision (target >= 0.8; the predictor is measured
before and after the runs and the ratio uses the mean, since the load of a shared machine moves), and the load average.
"""
from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from clipseg_model.numerics import flush_denormals  # noqa: E402

LABEL_CONFIG = ('<View><Image name="image" value="$image"/><BrushLabels name="tag" toName="image">'
                '<Label value="circle"/><Label value="square"/></BrushLabels></View>')


def write_images(folder: Path, n: int, size: tuple[int, int]) -> list[bytes]:
    from PIL import Image, ImageDraw

    folder.mkdir(parents=True, exist_ok=True)
    out = []
    w, h = size
    for i in range(n):
        image = Image.new("RGB", (w, h), (235, 235, 235))
        draw = ImageDraw.Draw(image)
        x = (i * 7) % (w // 2)
        draw.ellipse((x, 2, x + w // 3, 2 + h // 3), fill=(220, 20, 20))
        draw.rectangle((w // 2, h // 2, w // 2 + w // 4, h // 2 + h // 4), fill=(20, 20, 220))
        buf = io.BytesIO()
        image.save(buf, "PNG")
        (folder / f"img{i:05d}.png").write_bytes(buf.getvalue())
        out.append(buf.getvalue())
    return out


def predictor_alone(model_dir: Path, images: list[bytes], device: str, precision: str, data_dir: Path,
                    repeats: int = 1) -> tuple[float, str]:
    """(images/s of Segmenter.predict_batch on pre-decoded images, best of `repeats`; the precision used) under
    PRECISION=`precision`, chosen (or read from the cache under `data_dir`) as a server does."""
    from PIL import Image

    from clipseg_model.loading import load_model
    from clipseg_model.precision import apply_precision
    from clipseg_model.precision_choice import choose_precision
    from clipseg_model.predictor import Segmenter

    model = load_model(str(model_dir), device)
    choice = choose_precision(model, precision, data_dir / "precision")
    seg = Segmenter(apply_precision(model, choice.precision), threshold=0.5, precision=choice.precision)
    decoded = [Image.open(io.BytesIO(b)).convert("RGB") for b in images]
    batch = 32 if device.startswith("cuda") else 8
    seg.predict_batch(decoded[:2], [["circle", "square"]] * 2)  # warm-up
    best = 0.0
    for _ in range(repeats):
        seg.clear_caches() if hasattr(seg, "clear_caches") else None
        t0 = time.perf_counter()
        for i in range(0, len(decoded), batch):
            part = decoded[i:i + batch]
            seg.predict_batch(part, [["circle", "square"]] * len(part))
        best = max(best, len(decoded) / (time.perf_counter() - t0))
    return best, choice.precision.name


def prelabel_through_label_studio(model_dir: Path, folder: Path, n: int, redis_url: str, device: str,
                                  chunk: int, precisions: tuple[str, ...]) -> dict[str, tuple[float, dict]]:
    """{precision: (images/s of a pre-label run of all `n` images under PRECISION=precision, its run summary)}, one
    Label Studio, one project per precision."""
    import redis
    from rq import Queue
    from rq.worker import SimpleWorker

    from backend.prelabel import PrelabelRuns, PrelabelSpec, WorkerContext, queue_prelabel
    from backend.settings import Settings
    from finetune.triggers import PRELABEL_QUEUE
    from tests.e2e.ls_harness import LabelStudioServer

    conn = redis.Redis.from_url(redis_url)
    conn.flushdb()
    out = {}
    with LabelStudioServer("legacy", local_files_root=folder.parent) as ls:
        for precision in precisions:
            project = ls.client.create_project(f"prelabel bench {precision}", LABEL_CONFIG)
            ls.client.add_local_files_storage(project, folder, regex_filter=r".*\.png")
            os.environ.update({"MODEL": str(model_dir), "DEVICE": device, "REDIS_URL": redis_url,
                               "LABEL_STUDIO_URL": ls.url, "LABEL_STUDIO_API_KEY": ls.legacy_token,
                               "DATA_DIR": str(folder.parent / "data"), "PRECISION": precision})
            settings = Settings.from_env()
            spec = PrelabelSpec.from_settings(settings, project, chunk_size=chunk)
            WorkerContext.install(settings).segmenter(conn, spec)  # a worker keeps its model between jobs: load it first
            ls_cpu = label_studio_cpu_seconds(ls)
            t0 = time.perf_counter()
            run_id, _ = queue_prelabel(conn, spec)
            SimpleWorker([Queue(PRELABEL_QUEUE, connection=conn)], connection=conn).work(burst=True)
            elapsed = time.perf_counter() - t0
            ls_cpu = label_studio_cpu_seconds(ls) - ls_cpu
            summary = PrelabelRuns(conn).summary(run_id)
            stored = ls.client.predictions(project)
            assert summary["state"] == "done" and summary["written"] == n == len(stored), (summary, len(stored))
            payload = sum(len(json.dumps(p.get("result"))) for p in stored) / n
            out[precision] = (n / elapsed, {**summary, "seconds": elapsed, "label_studio_cpu_s": ls_cpu,
                                            "result_bytes_per_task": payload})
    conn.flushdb()
    return out


def label_studio_cpu_seconds(ls) -> float:
    """CPU seconds (user + system) Label Studio's server processes have used so far: on a machine that runs both,
    what it spends importing predictions is taken from inference."""
    import psutil

    root = psutil.Process(ls.process.proc.pid)
    total = 0.0
    for proc in [root, *root.children(recursive=True)]:
        with contextlib.suppress(psutil.Error):
            t = proc.cpu_times()
            total += t.user + t.system
    return total


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("-n", "--images", type=int, default=48)
    parser.add_argument("--size", default="320x240", help="image size WxH")
    parser.add_argument("--tiny", action="store_true", help="the tests' tiny-clipseg instead of full-size CLIPSeg")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--chunk", type=int, default=100)
    parser.add_argument("--redis-url", default=os.environ.get("BENCH_REDIS_URL", ""),
                        help="a scratch Redis database (flushed); default: a private embedded Redis")
    parser.add_argument("--work-dir", type=Path, default=Path(tempfile.gettempdir()) / "clipseg-bench")
    args = parser.parse_args(argv)
    flush_denormals()
    import logging

    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(name)s %(message)s")
    logging.getLogger("backend.prelabel").setLevel(logging.INFO)  # the per-chunk time split
    from benchmarks.inference import build_or_reuse

    preset = "tiny-clipseg" if args.tiny else "clipseg-rd64"
    model_dir = build_or_reuse(preset, args.work_dir, 0, None)
    w, h = (int(v) for v in args.size.split("x"))
    with tempfile.TemporaryDirectory(prefix="prelabel-bench-") as tmp, contextlib.ExitStack() as stack:
        if not args.redis_url:
            from backend.cli.embedded_redis import EmbeddedRedis

            args.redis_url = stack.enter_context(EmbeddedRedis(Path(tmp) / "redis")).url
        folder = Path(tmp) / "files" / "images"
        images = write_images(folder, args.images, (w, h))
        data_dir = folder.parent / "data"  # the precision choice's cache, shared with the pre-label workers
        precisions = ("fp32", "auto")
        # The predictor alone before and after the runs: on a shared machine the load moves; the ratio uses the mean.
        before = {p: predictor_alone(model_dir, images, args.device, p, data_dir) for p in precisions}
        load_before = os.getloadavg()
        runs = prelabel_through_label_studio(model_dir, folder, args.images, args.redis_url, args.device, args.chunk,
                                             precisions)
        load_after = os.getloadavg()
        after = {p: predictor_alone(model_dir, images, args.device, p, data_dir) for p in precisions}
    report: dict = {"preset": preset, "images": args.images, "size": args.size, "device": args.device,
                    "cpus": os.cpu_count(), "load_1m_before_after": [round(load_before[0], 2), round(load_after[0], 2)]}
    for p in precisions:
        alone = (before[p][0] + after[p][0]) / 2
        through, summary = runs[p]
        report[p] = {"precision": before[p][1], "predictor_images_per_s": round(alone, 2),
                     "predictor_before_after": [round(before[p][0], 2), round(after[p][0], 2)],
                     "prelabel_images_per_s": round(through, 2), "ratio_to_predictor": round(through / alone, 3),
                     "written": summary["written"], "chunks": summary["chunks"],
                     # Label Studio's share of the machine during the run (it runs on the same cores here).
                     "label_studio_cpu_share": round(summary["label_studio_cpu_s"] / (summary["seconds"] * (os.cpu_count() or 1)), 3),
                     "result_kb_per_task": round(summary["result_bytes_per_task"] / 1024, 1)}
    speedup = runs["auto"][0] / runs["fp32"][0]
    report["auto_over_fp32"] = {"prelabel_speedup": round(speedup, 3), "target": 1.8}
    checks = {"auto >= 1.8x fp32 (pre-label images/s)": speedup >= 1.8,
              "auto pre-label / predictor >= 0.8": report["auto"]["ratio_to_predictor"] >= 0.8,
              "fp32 pre-label / predictor >= 0.8": report["fp32"]["ratio_to_predictor"] >= 0.8}
    report["checks"] = {name: "PASS" if ok else "FAIL" for name, ok in checks.items()}
    print(json.dumps(report, indent=2))
    return 0 if all(checks.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
