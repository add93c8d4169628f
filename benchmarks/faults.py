"""Faults injected into a real `clipseg serve` (embedded redis-server, worker, scheduler, gunicorn), one row each:
fault, webhooks acknowledged (2xx), corrections stored after recovery, time to recover. Target: every
acknowledged correction stored (0 lost) in every row; fine-tuning running again <= 90 s after a worker SIGKILL.

    python benchmarks/faults.py [--rows redis_kill,disk_full,...] [--json out.json]

Disk-full rows mount a small tmpfs (needs root; without it they fall back to Redis maxmemory, which refuses writes
the same way: an error reply that must not reject events). The poison row runs serve in a memory cgroup (v1,
root) so the kernel's OOM killer, not Python, stops the process, as in a container with a memory limit.
Numbers are from one run; the machine's load is printed with them.
"""
from __future__ import annotations

import argparse
import base64
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import numpy as np  # noqa: E402
import psutil  # noqa: E402
import redis  # noqa: E402
import requests  # noqa: E402

from backend.labelstudio.rle import mask_to_rle  # noqa: E402
from finetune.corrections import CorrectionStore  # noqa: E402
from tests.e2e.ls_harness import free_port  # noqa: E402
from tests.fixtures.models import tiny_model_dir  # noqa: E402
from tests.fixtures.webhooks import annotation_event, brush_region, scene  # noqa: E402

CGROUP = Path("/sys/fs/cgroup/memory")


class Serve:
    """`clipseg serve` in its own process group, on a fresh DATA_DIR (or a given one)."""

    def __init__(self, data: Path, model: Path, log: Path, cgroup: Path | None = None, **env: str) -> None:
        self.data, self.log, self.cgroup = data, log, cgroup
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.env = {**{k: v for k, v in os.environ.items() if k != "REDIS_URL"}, "PYTHONPATH": str(ROOT),
                    "HF_HUB_OFFLINE": "1", "MODEL": str(model), "DATA_DIR": str(data), "FINETUNE_EVERY": "1000",
                    **env}
        self.proc: subprocess.Popen | None = None

    def start(self, timeout: float = 120) -> float:
        started = time.monotonic()
        cgroup = self.cgroup

        def enter_cgroup() -> None:
            if cgroup is not None:
                (cgroup / "cgroup.procs").write_text(str(os.getpid()))

        self.proc = subprocess.Popen([sys.executable, "-m", "backend.cli", "serve", "--port", str(self.port)],
                                     env=self.env, cwd=ROOT, stdout=self.log.open("ab"), stderr=subprocess.STDOUT,
                                     start_new_session=True, preexec_fn=enter_cgroup)
        while True:
            try:
                if requests.get(f"{self.url}/health", timeout=2).json().get("ready"):
                    return time.monotonic() - started
            except (requests.RequestException, ValueError):
                pass
            if self.proc.poll() is not None or time.monotonic() - started > timeout:
                raise RuntimeError(f"serve did not start: {self.log.read_text()[-2000:]}")
            time.sleep(0.2)

    def parts(self) -> dict:
        return json.loads((self.data / "run" / "parts.json").read_text())

    def conn(self) -> redis.Redis:
        return redis.Redis(unix_socket_path=str(self.data / "redis" / "redis.sock"), socket_timeout=2,
                           socket_connect_timeout=1)

    def stored(self, project: int) -> int:
        try:
            return CorrectionStore(self.conn()).count(project)
        except redis.RedisError:
            return -1

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGINT)
            try:
                self.proc.wait(60)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait()


_IMAGES: dict[int, tuple[str, np.ndarray]] = {}


def event(i: int, project: int) -> dict:
    if i % 8 not in _IMAGES:
        jpg, mask = scene(64, 48, seed=i % 8)
        _IMAGES[i % 8] = ("data:image/jpeg;base64," + base64.b64encode(jpg).decode(), mask)
    uri, mask = _IMAGES[i % 8]
    return annotation_event([brush_region(mask, "circle", f"r{i}")], annotation_id=100_000 * project + i,
                            task_id=100_000 * project + i, project_id=project, data={"image": uri})


def post(serve: Serve, body: dict | bytes) -> int:
    try:
        if isinstance(body, bytes):
            return requests.post(f"{serve.url}/webhook", data=body, timeout=10,
                                 headers={"Content-Type": "application/json"}).status_code
        return requests.post(f"{serve.url}/webhook", json=body, timeout=10).status_code
    except requests.RequestException:
        return 0


def wait_for(predicate, timeout: float) -> float | None:
    started = time.monotonic()
    while time.monotonic() - started < timeout:
        if predicate():
            return time.monotonic() - started
        time.sleep(0.25)
    return None


def spool_count(data: Path, kind: str = "") -> int:
    return len(list((data / "spool" / kind).glob("*.json"))) if (data / "spool" / kind).exists() else 0


def fill(directory: Path) -> Path:
    """Fill the file system holding `directory` to the last byte; returns the filler file."""
    filler = directory / "filler.bin"
    with open(filler, "wb", buffering=0) as f:
        try:
            while True:
                f.write(b"\0" * (1 << 20))
                f.flush()
        except OSError:
            pass
        try:
            while True:
                f.write(b"\0" * 4096)
                f.flush()
        except OSError:
            pass
    return filler


def mount_tmpfs(path: Path, size: str) -> bool:
    path.mkdir(parents=True, exist_ok=True)
    return subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)],
                          capture_output=True).returncode == 0


def umount(path: Path) -> None:
    subprocess.run(["umount", "-l", str(path)], capture_output=True)


# ---- rows ----------------------------------------------------------------------------------------------------------
def row_redis_kill(base: Path, model: Path) -> dict:
    data = base / "redis_kill"
    serve = Serve(data, model, base / "redis_kill.log")
    serve.start()
    try:
        acked, killed_at = 0, None
        for i in range(60):
            if i == 20:
                os.kill(serve.parts()["pids"]["redis"], signal.SIGKILL)
                killed_at = time.monotonic()
            acked += post(serve, event(i, 1)) == 201
        done = wait_for(lambda: serve.stored(1) == acked and spool_count(data) == 0, 120)
        return {"fault": "redis-server SIGKILLed at webhook 20 of 60", "acknowledged": acked,
                "stored": serve.stored(1), "recover_s": None if done is None else time.monotonic() - killed_at,
                "note": f"restarted by serve ({serve.parts()['restarts']['redis']}x)"}
    finally:
        serve.stop()


def row_disk_full(base: Path, model: Path) -> dict:
    data = base / "disk_full"
    redis_dir = data / "redis"
    mounted = mount_tmpfs(redis_dir, "24m")
    serve = Serve(data, model, base / "disk_full.log")
    serve.start()
    filler = None
    try:
        acked = sum(post(serve, event(i, 2)) == 201 for i in range(10))
        wait_for(lambda: serve.stored(2) == acked, 60)
        if mounted:
            filler = fill(redis_dir)
            how = "tmpfs of 24 MB under DATA_DIR/redis filled to the last byte (MISCONF)"
        else:
            serve.conn().config_set("maxmemory-policy", "noeviction")
            serve.conn().config_set("maxmemory", "1")
            how = "Redis maxmemory 1 byte (OOM; mounting a tmpfs needs root)"
        acked += sum(post(serve, event(i, 2)) == 201 for i in range(10, 40))
        time.sleep(8)  # a few replay rounds against the refusing Redis
        during = {"stored": serve.stored(2), "pending": spool_count(data), "rejected": spool_count(data, "rejected"),
                  "health": requests.get(f"{serve.url}/health", timeout=5).json().get("degraded")}
        freed = time.monotonic()
        if filler is not None:
            filler.unlink()
        else:
            serve.conn().config_set("maxmemory", "0")
        done = wait_for(lambda: serve.stored(2) == acked and spool_count(data) == 0, 180)
        return {"fault": how, "acknowledged": acked, "stored": serve.stored(2),
                "recover_s": None if done is None else time.monotonic() - freed,
                "note": f"while full: {during['stored']} stored, {during['pending']} pending, "
                        f"{during['rejected']} rejected; /health degraded: {during['health']}"}
    finally:
        serve.stop()
        if mounted:
            umount(redis_dir)


def _noise_event(i: int, project: int, size: int = 2400) -> dict:
    mask = np.random.default_rng(i).random((size, size)) > 0.5
    region = {"id": "noise", "type": "brushlabels", "from_name": "tag", "to_name": "image", "original_width": size,
              "original_height": size, "value": {"format": "rle", "rle": mask_to_rle(mask), "brushlabels": ["cat"]}}
    return annotation_event([region], annotation_id=100_000 * project + i, task_id=100_000 * project + i,
                            project_id=project, data={"image": event(0, project)["task"]["data"]["image"]})


def row_poison_webhook(base: Path, model: Path) -> dict:
    data = base / "poison_webhook"
    serve = Serve(data, model, base / "poison_webhook.log")
    serve.start()
    try:
        body = json.dumps(_noise_event(999, 3)).encode()
        started = time.perf_counter()
        status = post(serve, body)
        refused_s = time.perf_counter() - started
        acked = sum(post(serve, event(i, 3)) == 201 for i in range(20))
        t0 = time.monotonic()
        done = wait_for(lambda: serve.stored(3) == acked and spool_count(data) == 0, 60)
        return {"fault": f"poison webhook: {len(body) / 1e6:.0f} MB, 2400x2400 noise brush mask", "acknowledged": acked,
                "stored": serve.stored(3), "recover_s": None if done is None else time.monotonic() - t0,
                "note": f"poison answered {status} in {refused_s * 1000:.0f} ms, not spooled; 20 good ones after it"}
    finally:
        serve.stop()


def row_poison_spooled(base: Path, model: Path, limit_mb: int = 2048) -> dict:
    """A poison event already in the spool (accepted by an older version), serve under a memory limit."""
    data = base / "poison_spooled"
    (data / "spool").mkdir(parents=True)
    from backend.intake.spool import Spool

    spool = Spool(data / "spool")
    spool.append(_noise_event(998, 4))
    good = 10
    for i in range(good):
        spool.append(event(i, 4))
    cgroup = None
    if CGROUP.exists():
        cgroup = CGROUP / f"clipseg-faults-{os.getpid()}"
        cgroup.mkdir(exist_ok=True)
        (cgroup / "memory.limit_in_bytes").write_text(str(limit_mb << 20))
    serve = Serve(data, model, base / "poison_spooled.log", cgroup=cgroup)
    t0 = time.monotonic()
    serve.start()
    try:
        done = wait_for(lambda: serve.stored(4) == good and spool_count(data, "quarantine") == 1, 400)
        kills = serve.log.read_text().count("Perhaps out of memory")
        ok = requests.get(f"{serve.url}/health", timeout=5).status_code
        return {"fault": f"poison event in the spool, serve in a {limit_mb} MB memory cgroup" if cgroup else
                         "poison event in the spool (no memory cgroup: not limited)",
                "acknowledged": good, "stored": serve.stored(4),
                "recover_s": None if done is None else time.monotonic() - t0,
                "note": f"gunicorn worker OOM-killed {kills}x, then the event was quarantined "
                        f"({spool_count(data, 'quarantine')}); /health {ok} afterwards"}
    finally:
        serve.stop()
        if cgroup is not None:
            for _ in range(20):
                try:
                    cgroup.rmdir()
                    break
                except OSError:
                    time.sleep(0.5)


def row_worker_kill(base: Path, model: Path) -> dict:
    from rq import Queue

    data = base / "worker_kill"
    serve = Serve(data, model, base / "worker_kill.log", FINETUNE_STEPS="100000")
    serve.start()
    try:
        acked = sum(post(serve, event(i, 5)) == 201 for i in range(3))
        wait_for(lambda: serve.stored(5) == acked, 60)
        answer = requests.post(f"{serve.url}/webhook", json={"action": "START_TRAINING", "project": {"id": 5}},
                               timeout=10).json()
        registry = Queue("clipseg", connection=serve.conn()).started_job_registry
        wait_for(lambda: registry.get_job_ids(), 90)
        worker = serve.parts()["pids"]["worker"]
        os.kill(worker, signal.SIGKILL)
        killed = time.monotonic()

        def training_again() -> bool:
            ids = registry.get_job_ids()
            return bool(ids) and serve.parts()["pids"]["worker"] != worker and serve.parts()["parts"]["worker"] == "up"

        # the abandoned job is found at once (dead PID), RQ schedules its retry (10 s), the new worker runs it
        again = wait_for(lambda: training_again() and _started_by_live_worker(serve), 180)
        return {"fault": "worker SIGKILLed mid-fine-tune", "acknowledged": acked, "stored": serve.stored(5),
                "recover_s": again, "note": f"START_TRAINING {answer.get('status')}; fine-tuning running again "
                                            f"after {again:.0f} s" if again else "fine-tuning did not resume"}
    finally:
        serve.stop()


def _started_by_live_worker(serve: Serve) -> bool:
    from rq import Queue
    from rq.job import Job

    conn = serve.conn()
    for job_id in Queue("clipseg", connection=conn).started_job_registry.get_job_ids():
        job = Job.fetch(job_id, connection=conn)
        if job.worker_name and str(serve.parts()["pids"]["worker"]) in job.worker_name:
            return True
    return False


def row_serve_kill(base: Path, model: Path) -> dict:
    data = base / "serve_kill"
    serve = Serve(data, model, base / "serve_kill.log")
    serve.start()
    acked = sum(post(serve, event(i, 6)) == 201 for i in range(30))
    children = psutil.Process(serve.proc.pid).children(recursive=True)
    os.kill(serve.proc.pid, signal.SIGKILL)  # serve alone: its children must follow it
    serve.proc.wait()
    _, alive = psutil.wait_procs(children, timeout=15)
    orphans = [p for p in alive if p.is_running() and p.status() != psutil.STATUS_ZOMBIE]
    again = Serve(data, model, base / "serve_kill.log")
    t0 = time.monotonic()
    again.start()
    try:
        done = wait_for(lambda: again.stored(6) == acked and spool_count(data) == 0, 120)
        return {"fault": "clipseg serve SIGKILLed right after 30 webhooks, then restarted", "acknowledged": acked,
                "stored": again.stored(6), "recover_s": None if done is None else time.monotonic() - t0,
                "note": f"{len(orphans)} orphaned children of {len(children)}; stale lock taken over"}
    finally:
        again.stop()


def row_spool_full(base: Path, model: Path) -> dict:
    data = base / "spool_full"
    spool_dir = data / "spool"
    mounted = mount_tmpfs(spool_dir, "2m")
    serve = Serve(data, model, base / "spool_full.log")
    serve.start()
    try:
        if not mounted:
            return {"fault": "spool disk full", "acknowledged": 0, "stored": 0, "recover_s": None,
                    "note": "skipped: mounting a tmpfs needs root"}
        filler = fill(spool_dir)
        codes = [post(serve, event(i, 7)) for i in range(10)]
        health = requests.get(f"{serve.url}/health", timeout=5).json()
        filler.unlink()
        t0 = time.monotonic()
        codes += [post(serve, event(i, 7)) for i in range(10, 20)]
        acked = codes.count(201)
        done = wait_for(lambda: serve.stored(7) == acked, 60)
        return {"fault": "spool on a full disk (tmpfs 2 MB filled), then space freed", "acknowledged": acked,
                "stored": serve.stored(7), "recover_s": None if done is None else time.monotonic() - t0,
                "note": f"while full: {codes[:10].count(503)}/10 answered 503 (not acknowledged), /health: "
                        f"{health.get('parts', {}).get('spool', '')[:60]}"}
    finally:
        serve.stop()
        umount(spool_dir)


def row_two_serves(base: Path, model: Path) -> dict:
    data = base / "two_serves"
    serve = Serve(data, model, base / "two_serves.log")
    serve.start()
    try:
        acked = sum(post(serve, event(i, 8)) == 201 for i in range(5))
        t0 = time.monotonic()
        second = subprocess.run([sys.executable, "-m", "backend.cli", "serve", "--port", str(free_port())],
                                env=serve.env, cwd=ROOT, capture_output=True, text=True, timeout=60)
        refused = time.monotonic() - t0
        wait_for(lambda: serve.stored(8) == acked, 30)
        return {"fault": "a second clipseg serve on the same DATA_DIR", "acknowledged": acked,
                "stored": serve.stored(8), "recover_s": 0.0,
                "note": f"refused (exit {second.returncode}) in {refused:.1f} s: "
                        f"{second.stderr.strip().splitlines()[-1][:90]}"}
    finally:
        serve.stop()


ROWS = {"redis_kill": row_redis_kill, "disk_full": row_disk_full, "poison_webhook": row_poison_webhook,
        "poison_spooled": row_poison_spooled, "worker_kill": row_worker_kill, "serve_kill": row_serve_kill,
        "spool_full": row_spool_full, "two_serves": row_two_serves}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", default=",".join(ROWS))
    parser.add_argument("--json", default="")
    args = parser.parse_args()
    base = Path(tempfile.mkdtemp(prefix="faults-", dir="/tmp"))
    model = tiny_model_dir("tiny-clipseg", base / "models")
    results = []
    for name in args.rows.split(","):
        started = time.monotonic()
        try:
            row = ROWS[name](base, model)
        except Exception as exc:  # noqa: BLE001 - a row that breaks is reported, the others still run
            row = {"fault": name, "acknowledged": None, "stored": None, "recover_s": None, "note": f"ERROR {exc!r}"}
        row["row"], row["wall_s"] = name, round(time.monotonic() - started, 1)
        results.append(row)
        print(json.dumps(row), flush=True)
    print(f"\nload average: {os.getloadavg()}")
    print("| Fault | Acknowledged | Stored after recovery | Lost | Time to recover | Notes |")
    print("|---|---|---|---|---|---|")
    for r in results:
        lost = None if r["acknowledged"] is None or r["stored"] is None else r["acknowledged"] - r["stored"]
        rec = "-" if r["recover_s"] is None else f"{r['recover_s']:.1f} s"
        print(f"| {r['fault']} | {r['acknowledged']} | {r['stored']} | {lost} | {rec} | {r['note']} |")
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2))
    shutil.rmtree(base, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
