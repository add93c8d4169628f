"""Rows d, e and g of `clipseg bench`: the HTTP server (gunicorn, `backend.wsgi:app`) against the predictor called
directly, the server's peak RSS, and whether merging concurrent requests would pay."""
from __future__ import annotations

import base64
import io
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any, Sequence

import backend
from benchmarks.inference.common import CONCURRENT, HTTP_PROMPTS, PROMPTS, Report, Row, png_data_uri, test_images

# The folder holding the `backend` package (a checkout, or site-packages when installed): the server imports the same
# code as this process, wherever it is run from.
_BACKEND_HOME = Path(backend.__file__).resolve().parents[1]


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
            "PYTHONPATH": str(_BACKEND_HOME),
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
            cwd=str(scratch), env=env, stdout=self._log, stderr=subprocess.STDOUT,
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

