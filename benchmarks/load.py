"""Load test: N concurrent clients for M minutes against a real `clipseg serve` process on 127.0.0.1.

    .venv/bin/python benchmarks/load.py --clients 4 --minutes 2 [--model DIR] [--out load.json]

Starts `clipseg serve` (gunicorn, embedded append-only Redis, no worker/scheduler) with a tiny random model
(built with `clipseg_model.random_init` unless --model is given), warms it up, then runs the clients. Each client
loops: /predict with one task (a data: URI image from a small rotating set, sizes 64..640 px, so both caches and
decoding are exercised), and every 10th request also a correction webhook. Reports throughput, p50/p90/p99
latency, errors by kind (target 0) and the server's memory: RSS of the serving processes (gunicorn workers) after
warm-up vs at the end, sampled every 10 s (target: bounded, no steady growth).

Bounded by design: clients only talk to 127.0.0.1, and the run stops after --minutes.
"""
from __future__ import annotations

import argparse
import base64
import io
import json
import logging
import os
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np
import psutil
import requests

log = logging.getLogger("clipseg.load")
ROOT = Path(__file__).resolve().parents[1]
CONFIG = """<View>
  <Image name="image" value="$image"/>
  <BrushLabels name="tag" toName="image"><Label value="cat"/><Label value="dog"/></BrushLabels>
  <TextArea name="prompt" toName="image"/>
</View>"""


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _images(n: int = 12, seed: int = 0) -> list[str]:
    """JPEG data: URIs of `n` noisy pictures of different sizes (64..640 px)."""
    from PIL import Image

    rng = np.random.default_rng(seed)
    out = []
    for i in range(n):
        w, h = int(rng.integers(64, 641)), int(rng.integers(64, 481))
        arr = rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
        buf = io.BytesIO()
        Image.fromarray(arr).save(buf, "JPEG", quality=80)
        out.append("data:image/jpeg;base64," + base64.b64encode(buf.getvalue()).decode())
    return out


def _webhook(uri: str, ann_id: int) -> dict:
    """An ANNOTATION_CREATED body with one brush region covering the image's top-left quarter."""
    from PIL import Image
    from label_studio_sdk.converter.brush import mask2rle

    raw = base64.b64decode(uri.split(",", 1)[1])
    w, h = Image.open(io.BytesIO(raw)).size
    mask = np.zeros((h, w), np.uint8)
    mask[: h // 2, : w // 2] = 255
    region = {"id": "r1", "type": "brushlabels", "from_name": "tag", "to_name": "image", "original_width": w,
              "original_height": h, "value": {"format": "rle", "rle": mask2rle(mask), "brushlabels": ["cat"]}}
    return {"action": "ANNOTATION_CREATED", "project": {"id": 1, "label_config": CONFIG},
            "annotation": {"id": ann_id, "task": ann_id, "project": 1, "result": [region],
                           "updated_at": "2026-11-26T18:35:14Z"},
            "task": {"id": ann_id, "project": 1, "data": {"image": uri}}}


class Server:
    """`clipseg serve` in its own process group; `rss()` sums the RSS of its gunicorn workers."""

    def __init__(self, model: str, data_dir: Path, threads: int, workers: int):
        self.port = _free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        data_dir.mkdir(parents=True, exist_ok=True)
        self.log_path = data_dir / "serve.log"
        env = {**os.environ, "MODEL": model, "DATA_DIR": str(data_dir), "DEVICE": "cpu", "HF_HUB_OFFLINE": "1",
               "REDIS_URL": "", "FINETUNE_EVERY": "1000000", "LOG_LEVEL": "WARNING"}
        cmd = [sys.executable, "-m", "backend.cli", "serve", "--host", "127.0.0.1", "--port", str(self.port),
               "--threads", str(threads), "--workers", str(workers), "--no-worker", "--no-scheduler"]
        self._log = open(self.log_path, "ab")
        self.proc = subprocess.Popen(cmd, env=env, cwd=ROOT, stdout=self._log, stderr=subprocess.STDOUT,
                                     start_new_session=True)

    def wait_ready(self, timeout: float = 120) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"clipseg serve exited: {self.log_path.read_text()[-2000:]}")
            try:
                if requests.get(f"{self.url}/health", timeout=2).json().get("ready"):
                    return
            except (requests.RequestException, ValueError):
                pass
            time.sleep(0.25)
        raise RuntimeError(f"clipseg serve not ready after {timeout} s")

    def serving_processes(self) -> list[psutil.Process]:
        """The gunicorn workers (the processes that hold the model and answer requests)."""
        # `clipseg serve` is the gunicorn arbiter itself; its children are the workers and the embedded Redis.
        procs = []
        for child in psutil.Process(self.proc.pid).children():
            try:
                if "redis" not in child.name():
                    procs.append(child)
            except psutil.NoSuchProcess:
                pass
        if not procs:
            raise RuntimeError("no gunicorn worker found under clipseg serve")
        return procs

    def rss(self) -> int:
        total = 0
        for p in self.serving_processes():
            try:
                total += p.memory_info().rss
            except psutil.NoSuchProcess:
                pass
        return total

    def stop(self) -> None:
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait()
        self._log.close()


def run_load(url: str, clients: int, seconds: float, images: list[str], rss, sample_every: float = 10.0) -> dict:
    """Run `clients` threads against `url` for `seconds`; returns the measurements (see the module docstring)."""
    latencies: list[float] = []
    errors: dict[str, int] = {}
    webhooks = {"sent": 0, "accepted": 0}
    lock = threading.Lock()
    stop_at = time.monotonic() + seconds
    rss_samples: list[tuple[float, int]] = [(0.0, rss())]
    started = time.monotonic()

    def client(index: int) -> None:
        session = requests.Session()
        n = 0
        while time.monotonic() < stop_at:
            uri = images[(index * 7 + n) % len(images)]
            body = {"tasks": [{"id": index * 1_000_000 + n, "data": {"image": uri}}], "label_config": CONFIG,
                    "project": "1.1", "params": {"context": {"result": [
                        {"from_name": "prompt", "to_name": "image", "type": "textarea",
                         "value": {"text": [["the cat", "a dog", "the red thing"][n % 3]]}}]}}}
            t0 = time.perf_counter()
            try:
                r = session.post(f"{url}/predict", json=body, timeout=60)
                elapsed = time.perf_counter() - t0
                ok = r.status_code == 200 and len(r.json()["results"]) == 1
                kind = None if ok else f"predict HTTP {r.status_code}"
            except (requests.RequestException, ValueError, KeyError) as exc:
                elapsed, kind = time.perf_counter() - t0, f"predict {type(exc).__name__}"
            with lock:
                latencies.append(elapsed)
                if kind:
                    errors[kind] = errors.get(kind, 0) + 1
            if n % 10 == 0:
                try:
                    r = session.post(f"{url}/webhook", json=_webhook(uri, index * 1_000_000 + n), timeout=5)
                    kind = None if r.status_code == 201 else f"webhook HTTP {r.status_code}"
                except requests.RequestException as exc:
                    kind = f"webhook {type(exc).__name__}"
                with lock:
                    webhooks["sent"] += 1
                    webhooks["accepted"] += kind is None
                    if kind:
                        errors[kind] = errors.get(kind, 0) + 1
            n += 1

    threads = [threading.Thread(target=client, args=(i,), daemon=True) for i in range(clients)]
    for t in threads:
        t.start()
    while any(t.is_alive() for t in threads):
        time.sleep(min(sample_every, max(0.1, stop_at - time.monotonic() + 0.1)))
        rss_samples.append((round(time.monotonic() - started, 1), rss()))
    duration = time.monotonic() - started
    lat = sorted(latencies)

    def pct(p: float) -> float:
        return round(lat[min(len(lat) - 1, int(p / 100 * len(lat)))] * 1000, 1) if lat else float("nan")

    return {
        "clients": clients, "seconds": round(duration, 1), "requests": len(lat),
        "throughput_rps": round(len(lat) / duration, 2),
        "latency_ms": {"p50": pct(50), "p90": pct(90), "p99": pct(99), "max": round(lat[-1] * 1000, 1) if lat else None,
                       "mean": round(statistics.fmean(lat) * 1000, 1) if lat else None},
        "errors": errors, "error_count": sum(errors.values()), "webhooks": webhooks,
        "rss_mb": {"start": round(rss_samples[0][1] / 2**20, 1), "end": round(rss_samples[-1][1] / 2**20, 1),
                   "max": round(max(r for _, r in rss_samples) / 2**20, 1),
                   "samples": [(t, round(r / 2**20, 1)) for t, r in rss_samples]},
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--clients", type=int, default=4)
    parser.add_argument("--minutes", type=float, default=1.0)
    parser.add_argument("--model", default="", help="model directory (default: a tiny random tiny-clipseg)")
    parser.add_argument("--threads", type=int, default=4, help="gunicorn threads per worker")
    parser.add_argument("--workers", type=int, default=1, help="gunicorn worker processes")
    parser.add_argument("--warmup", type=float, default=10.0, help="seconds of load before measuring")
    parser.add_argument("--out", default="", help="also write the JSON result here")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    sys.path.insert(0, str(ROOT))

    with tempfile.TemporaryDirectory(prefix="clipseg-load-") as tmp:
        model = args.model
        if not model:
            from clipseg_model.random_init import init_model

            model = str(init_model("tiny-clipseg", Path(tmp) / "model", seed=0))
        server = Server(model, Path(tmp) / "data", args.threads, args.workers)
        try:
            server.wait_ready()
            images = _images()
            log.info("warming up for %.0f s", args.warmup)
            run_load(server.url, args.clients, args.warmup, images, server.rss)
            log.info("%d clients for %.1f min against %s", args.clients, args.minutes, server.url)
            result = run_load(server.url, args.clients, args.minutes * 60, images, server.rss)
            health = requests.get(f"{server.url}/health", timeout=5).json()
            spool = Path(tmp) / "data" / "spool"
            result["spool_pending_at_end"] = len(list(spool.glob("*.json"))) if spool.exists() else 0
            result["model"] = args.model or "tiny-clipseg (random)"
            result["server"] = {"workers": args.workers, "threads": args.threads, "ready": health.get("ready"),
                                "error": health.get("error")}
            result["cpu_count"] = os.cpu_count()
        finally:
            server.stop()
    text = json.dumps(result, indent=2)
    log.info("result:\n%s", text)
    if args.out:
        Path(args.out).write_text(text + "\n")
    return 0 if result["error_count"] == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
