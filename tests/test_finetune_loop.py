"""The fine-tune loop end to end, with a real Redis, real `clipseg serve` / `clipseg worker` processes and the
real job (`finetune.jobs.finetune_project`): webhooks → corrections → trigger → job → gate → version → hot reload.

The served model is `tiny-seed` (a film decoder on a tiny random CLIP). With FINETUNE_LR=3e-3 it measurably learns
one object in 15 steps (held-out IoU 0.11 → 0.3 and up), which makes the promotion in the first test deterministic;
the corrections all show the same scene, so the held-out correction is one the candidate can learn.
"""
from __future__ import annotations

import base64
import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import requests
from rq import Queue
from rq.job import Job, JobStatus
from rq.registry import StartedJobRegistry

from finetune.corrections import CorrectionStore
from finetune.jobs import _held_out
from finetune.spec import FinetuneSpec
from finetune.triggers import lock_key, maybe_enqueue_finetune
from finetune.versions import VersionRegistry
from tests.e2e.ls_harness import ManagedProcess, free_port
from tests.fixtures.webhooks import LABEL_CONFIG, annotation_event, brush_region, ingester, scene

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[1]
PRESET = "tiny-seed"
BASE_VERSION = f"init-{PRESET}-0"  # the version `clipseg model init` writes into a fresh model
EVERY = 6
TIMEOUT = 300  # seconds for one job on 2 busy cores


def _env(redis_url: str, model: Path, data_dir: Path, **extra: Any) -> dict[str, str]:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])),
           "REDIS_URL": redis_url, "MODEL": str(model), "DATA_DIR": str(data_dir), "DEVICE": "cpu",
           "HF_HUB_OFFLINE": "1", "FINETUNE_EVERY": str(EVERY), "FINETUNE_STEPS": "15", "FINETUNE_LR": "3e-3",
           "REPLAY_RATIO": "0", "PROMOTE_EPSILON": "1.0", "MIN_EVIDENCE": "2", "LOG_LEVEL": "INFO", "OMP_NUM_THREADS": "2"}
    env.update({k: str(v) for k, v in extra.items()})
    return env


def clipseg(env: dict[str, str], *args: str, check: bool = True, timeout: float = TIMEOUT) -> subprocess.CompletedProcess:
    proc = subprocess.run([sys.executable, "-m", "backend.cli", *args], env=env, cwd=ROOT, capture_output=True,
                          text=True, timeout=timeout)
    if check:
        assert proc.returncode == 0, f"clipseg {' '.join(args)}: {proc.returncode}\n{proc.stdout}\n{proc.stderr[-4000:]}"
    return proc


def data_uri(jpeg: bytes) -> str:
    return "data:image/jpeg;base64," + base64.b64encode(jpeg).decode()


class Server:
    """A real `clipseg serve --no-worker --no-scheduler` process (gunicorn) on a free port."""

    def __init__(self, env: dict[str, str], log_path: Path):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.proc = ManagedProcess([sys.executable, "-m", "backend.cli", "serve", "--no-worker", "--no-scheduler",
                                    "--port", str(self.port), "--threads", "4"],
                                   env=env, base_env={}, cwd=ROOT, log_path=log_path, health_url=f"{self.url}/health",
                                   startup_timeout=120, name="clipseg-serve")

    def __enter__(self) -> "Server":
        self.proc.start()
        deadline = time.monotonic() + 120
        while not requests.get(f"{self.url}/health", timeout=5).json()["ready"]:
            assert time.monotonic() < deadline, self.proc.log_tail()
            time.sleep(0.2)
        return self

    def __exit__(self, *exc: Any) -> None:
        self.proc.stop()

    def setup(self, project: int = 7) -> str:
        r = requests.post(f"{self.url}/setup", json={"project": f"{project}.1764182400", "schema": LABEL_CONFIG,
                                                     "hostname": "http://localhost:8080", "access_token": "x"}, timeout=10)
        assert r.status_code == 200, r.text
        return r.json()["model_version"]

    def predict(self, tasks: list[dict], project: int = 7) -> dict:
        r = requests.post(f"{self.url}/predict", json={"tasks": tasks, "project": f"{project}.1764182400",
                                                       "label_config": LABEL_CONFIG, "params": {"context": None}},
                          timeout=120)
        assert r.status_code == 200, r.text
        return r.json()

    def webhook(self, body: dict) -> requests.Response:
        return requests.post(f"{self.url}/webhook", json=body, timeout=5)


def wait_for(predicate, timeout: float, what: str, interval: float = 0.1):
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(interval)


def without_region_ids(answer: dict) -> dict:
    """A /predict answer with each region's random `id` left out."""
    return {**answer, "results": [{**r, "result": [{k: v for k, v in item.items() if k != "id"} for item in r["result"]]}
                                  for r in answer["results"]]}


def fine_tune_jobs(conn) -> list[Job]:
    return Queue("clipseg", connection=conn).get_jobs()


def correction(task_id: int, mask: np.ndarray, image: str, *, annotation_id: int | None = None, project: int = 7,
               action: str = "ANNOTATION_CREATED", updated_at: str = "2026-11-26T18:35:14.123456Z") -> dict:
    return annotation_event([brush_region(mask, "cat")], action=action, annotation_id=annotation_id or 100 + task_id,
                            task_id=task_id, project_id=project, data={"image": image}, updated_at=updated_at)


# ---------------------------------------------------------------------------------------------------------------


def test_corrections_train_promote_hot_reload_review_and_rollback(redis_conn, redis_url, tiny_model_factory, tmp_path):
    """Issue 4, must show: N webhooks → one job (real trigger) → `clipseg worker --burst` trains and promotes →
    the running server serves the new version without a restart; review signal; Redis artifacts on another
    server; `clipseg rollback` swaps the running server back; `clipseg versions` lists both with metrics.

    Issue 14, must show: all of it happens in project 7 (A) only: project 8 (B), served by the same process, answers
    /setup with the same version and byte-identical predictions before the promotion, after it, and after A's
    rollback; a second server on another DATA_DIR follows both projects."""
    model = tiny_model_factory(PRESET)
    env = _env(redis_url, model, tmp_path / "data1")
    jpeg, mask = scene(128, 96, seed=0)
    image = data_uri(jpeg)
    blank = data_uri(scene(128, 96, seed=1)[0])
    b_tasks = [{"id": 50, "data": {"image": image}}, {"id": 51, "data": {"image": blank}}]
    with Server(env, tmp_path / "serve1.log") as server:
        assert server.setup() == BASE_VERSION
        assert server.setup(8) == BASE_VERSION
        b_before = without_region_ids(server.predict(b_tasks, project=8))
        assert b_before["model_version"] == BASE_VERSION and b_before["results"][0]["result"]

        def b_unchanged(srv: Server) -> None:
            assert srv.setup(8) == BASE_VERSION
            # the same version, the same RLE masks and scores, byte for byte (region ids are random per answer)
            assert without_region_ids(srv.predict(b_tasks, project=8)) == b_before

        # /predict: every result carries the version; the task score is its least certain region's score
        answer = server.predict([{"id": 1, "data": {"image": image}}, {"id": 99, "data": {"image": blank}}])
        assert answer["model_version"] == BASE_VERSION
        for result in answer["results"]:
            assert result["model_version"] == BASE_VERSION
            assert {r["value"]["brushlabels"][0] for r in result["result"]} <= {"cat", "dog"}
            assert result["score"] == pytest.approx(min(r["score"] for r in result["result"]))
        ranked = sorted(answer["results"], key=lambda r: r["score"])  # Label Studio's "sort by prediction score"
        assert ranked[0]["score"] <= ranked[1]["score"]
        assert min(r["score"] for r in ranked[0]["result"]) == min(r["score"] for a in answer["results"] for r in a["result"])

        # N - 1 corrections queue nothing; the N-th queues exactly one fine-tune (task 1 first: it gets a review IoU)
        for task_id in range(1, EVERY):
            assert server.webhook(correction(task_id, mask, image)).status_code == 201
        store = CorrectionStore(redis_conn)
        wait_for(lambda: store.count(7) == EVERY - 1, 60, "the inbox to store the corrections")
        assert fine_tune_jobs(redis_conn) == []
        assert server.webhook(correction(EVERY, mask, image)).status_code == 201
        # No sleep to let the N-1 triggers run: the inbox thread stores and triggers one drain after the other, so
        # any of them runs before the N-th correction's trigger; one that had queued a job would be this one (or a
        # second job), with fewer new corrections or another reason.
        [job] = wait_for(lambda: fine_tune_jobs(redis_conn), 60, "the trigger to enqueue a job")
        assert job.func_name == "finetune.jobs.finetune_project" and job.args == ("7",)
        assert job.meta["reason"] == "correction" and job.meta["new_corrections"] == EVERY

        # the review signal of the base model: our prediction for task 1 vs the annotator's mask
        review = store.review_stats()
        assert review[BASE_VERSION]["n"] == 1 and 0.0 <= review[BASE_VERSION]["mean_iou"] <= 1.0
        metrics = requests.get(f"{server.url}/metrics", timeout=5).text
        assert f'clipseg_review_iou{{project="7",version="{BASE_VERSION}"}}' in metrics
        assert re.search(r'clipseg_corrections\{project="7"\} 6(\.0)?\n', metrics), metrics

        # START_TRAINING and `clipseg finetune --now` see the queued job: still exactly one
        r = server.webhook({"action": "START_TRAINING", "project": {"id": 7}})
        assert r.status_code == 200 and r.json() == {"status": "active", "job_id": job.id}
        out = clipseg(env, "finetune", "--project", "7", "--now").stdout
        assert out.startswith("not queued: active") and job.id in out
        assert [j.id for j in fine_tune_jobs(redis_conn)] == [job.id]

        # the real worker runs it; progress shows up in the job's meta while it runs
        started = time.monotonic()
        worker = subprocess.Popen([sys.executable, "-m", "backend.cli", "worker", "--burst"], env=env, cwd=ROOT,
                                  stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        stages = set()
        while worker.poll() is None:
            meta = job.get_meta(refresh=True)
            stages.add(meta.get("stage"))
            stages.update(meta.get("stages", []))  # the stages it went through: one may last under a poll
            if meta.get("stage") == "training" and meta.get("step"):
                assert meta["total_steps"] == 15 and 0.2 < meta["progress"] <= 0.8 and meta["loss"] > 0
                assert meta["message"].startswith("step ")
            assert time.monotonic() - started < TIMEOUT, "fine-tune took too long"
            time.sleep(0.05)
        log = worker.stdout.read()
        assert worker.returncode == 0, log[-4000:]
        stages.update(job.get_meta(refresh=True).get("stages", []))
        assert {"training", "evaluating"} <= stages, stages
        summary = job.latest_result().return_value
        assert summary["promoted"], summary
        version = summary["version"]
        assert summary["metrics"]["corrections_miou"] > summary["metrics"]["parent_corrections_miou"]
        assert job.get_meta(refresh=True)["stage"] == "done" and redis_conn.get(lock_key(7)) is None

        # the running server reports the new version on its next /setup, and predicts with it; project 8 does not
        assert server.setup() == version
        answer = server.predict([{"id": 1, "data": {"image": image}}])
        assert answer["results"][0]["model_version"] == version == answer["model_version"]
        b_unchanged(server)
        record = VersionRegistry(redis_conn).get(version)
        assert record.project == "7" and len(record.checksum) == 64 and VersionRegistry(redis_conn).active("8") is None

        # review signal of the new version: the annotator updates task 1 after our new prediction
        assert server.webhook(correction(1, mask, image, action="ANNOTATION_UPDATED",
                                         updated_at="2026-11-26T19:00:00.000000Z")).status_code == 201
        wait_for(lambda: version in store.review_stats(), 30, "the review IoU of the new version")
        assert store.review_stats()[version]["n"] == 1
        metrics = requests.get(f"{server.url}/metrics", timeout=5).text
        assert f'clipseg_review_iou{{project="7",version="{version}"}}' in metrics
        assert f'clipseg_active_version{{project="7",version="{version}"}}' in metrics

        listing = json.loads(clipseg(env, "versions", "--json", "--project", "7").stdout)
        assert listing["active"] == version and listing["projects"] == {"7": version}
        records = {v["version"]: v for v in listing["versions"]}
        assert records[BASE_VERSION]["status"] == "base" and records[version]["status"] == "promoted"
        assert records[version]["parent"] == BASE_VERSION and records[version]["review"]["n"] == 1
        assert set(records[version]["metrics"]) >= {"corrections_miou", "base_miou", "parent_corrections_miou"}
        text = clipseg(env, "versions").stdout
        assert f"* {version}" in text and "review IoU" in text and "corrections mIoU" in text
        assert f"project 7: active {version}" in text
        status = json.loads(clipseg(env, "status", "--json").stdout)["projects"]
        assert status["7"]["active_version"] == version and status["7"]["own_version"]
        assert clipseg(env, "versions", "--json", "--project", "8").stdout.count(version) == 0  # not B's lineage

        # another server with another DATA_DIR (and no access to this one's disk) gets the checkpoint from Redis,
        # and from then on follows both projects, like the first
        own_dir = Path(env["DATA_DIR"]) / "models" / version
        hidden = own_dir.with_name("hidden")
        own_dir.rename(hidden)
        env2 = _env(redis_url, model, tmp_path / "data2")
        try:
            with Server(env2, tmp_path / "serve2.log") as other:
                assert other.setup() == version and other.setup(8) == BASE_VERSION
                assert other.predict([{"id": 1, "data": {"image": image}}])["model_version"] == version
                b_unchanged(other)
                assert (tmp_path / "data2" / "models" / version / "trainable.safetensors").is_file()
                hidden.rename(own_dir)

                # rollback of project 7: both running servers swap it back without a restart; project 8 untouched
                out = clipseg(env, "rollback", "--project", "7", BASE_VERSION).stdout
                assert f"version {BASE_VERSION} is active again for project 7" in out
                for srv in (server, other):
                    wait_for(lambda: srv.setup() == BASE_VERSION, 10, "the server to swap back")
                    assert srv.predict([{"id": 1, "data": {"image": image}}])["model_version"] == BASE_VERSION
                    b_unchanged(srv)
                # and forward again: a version of project 7 cannot be given to project 8
                assert clipseg(env, "rollback", "--project", "8", version, check=False).returncode == 1
                clipseg(env, "rollback", "--project", "7", version)
                for srv in (server, other):
                    wait_for(lambda: srv.setup() == version, 10, "the server to follow the rollback")
                    b_unchanged(srv)
        finally:
            if hidden.exists():
                hidden.rename(own_dir)
        assert VersionRegistry(redis_conn).active("7")[0] == version
        assert clipseg(env, "rollback", "--project", "7", "no-such-version", check=False).returncode == 1


def test_worse_candidate_is_rejected(redis_conn, redis_url, tiny_model_factory, tmp_path):
    """Corrections whose training masks are wrong (a corner of the background instead of the object) make a
    candidate that is worse on the held-out corrections (which are right): it is recorded as rejected, and the
    active model stays."""
    model = tiny_model_factory(PRESET)
    env = _env(redis_url, model, tmp_path / "data")
    jpeg, mask = scene(128, 96, seed=0)
    store = CorrectionStore(redis_conn)
    ids = [a for a in range(500, 600) if not _held_out(a)][:5] + [a for a in range(500, 600) if _held_out(a)][:2]
    wrong = np.zeros_like(mask)
    wrong[:12, :12] = True  # the object is never there: scene() centres it in the middle half
    assert not (wrong & mask).any()
    for task_id, ann in enumerate(ids, start=1):
        target = mask if _held_out(ann) else wrong
        ingester(store).ingest_event(correction(task_id, target, data_uri(jpeg), annotation_id=ann, project=8), image_bytes=jpeg)
    out = clipseg(env, "finetune", "--project", "8").stdout  # 7 new corrections >= FINETUNE_EVERY: queued
    assert out.startswith("queued finetune-8-")
    assert clipseg(env, "finetune", "--project", "8", "--now").stdout.startswith("not queued: active")
    assert len(fine_tune_jobs(redis_conn)) == 1
    clipseg(env, "worker", "--burst")

    registry = VersionRegistry(redis_conn)
    [rec] = [r for r in registry.list() if r.status != "base"]
    assert rec.status == "rejected" and rec.reason.startswith("not shown better"), rec
    assert rec.metrics["evidence"]["n"] == 2 and rec.metrics["evidence"]["difference"] <= 0
    assert rec.metrics["corrections_miou"] <= rec.metrics["parent_corrections_miou"]
    assert registry.active() is None  # the base model stays
    assert store.new_since_last_finetune(8) == 0  # these corrections were used; a new job needs new ones
    rows = json.loads(clipseg(env, "jobs", "--json").stdout)
    assert [(r["state"], r["stage"]) for r in rows] == [("finished", "done")]
    # the job ran the spec its enqueuer (the CLI, from its settings) put in it, shown by `clipseg jobs`
    assert rows[0]["spec"]["steps"] == 15 and rows[0]["spec"]["lr"] == 3e-3 and rows[0]["spec"]["project"] == "8"
    assert rows[0]["spec"]["base_model"] == str(model) and rows[0]["spec"]["min_evidence"] == 2
    assert "spec: base " in clipseg(env, "jobs").stdout
    assert "rejected" in clipseg(env, "versions").stdout


def test_jobs_lists_the_periodic_check_as_what_it_is(redis_conn, redis_url, tmp_path):
    """Issue 13 item 8: the scheduler's periodic check is not shown as a broken fine-tune (`project None ... 0/-`)."""
    from rq import SimpleWorker

    Queue("clipseg", connection=redis_conn).enqueue("finetune.triggers.periodic_check", kwargs={"queue_name": "clipseg"})
    SimpleWorker([Queue("clipseg", connection=redis_conn)], connection=redis_conn).work(burst=True)
    env = _env(redis_url, tmp_path / "none", tmp_path / "data")
    out = clipseg(env, "jobs").stdout
    assert "periodic check for new corrections nothing new" in out and "project None" not in out
    [row] = json.loads(clipseg(env, "jobs", "--json").stdout)
    assert row["kind"] == "periodic-check" and row["result"] == []


def test_worker_killed_mid_training_leaves_nothing_behind(redis_conn, redis_url, tiny_model_factory, tmp_path):
    """SIGKILL during training: the job ends up failed with its reason in `clipseg jobs`; no version record,
    no checkpoint, the active version unchanged; the next job removes temp dirs a killed writer leaves."""
    model = tiny_model_factory(PRESET)
    data_dir = tmp_path / "data"
    env = _env(redis_url, model, data_dir, FINETUNE_STEPS=100_000)
    jpeg, mask = scene(128, 96, seed=0)
    store = CorrectionStore(redis_conn)
    for task_id in range(1, 5):
        ingester(store).ingest_event(correction(task_id, mask, data_uri(jpeg), project=9), image_bytes=jpeg)
    # the enqueuer's spec says what the job does (the worker's FINETUNE_STEPS would not be read)
    spec = FinetuneSpec("", base_model=str(model), steps=100_000, lr=3e-3, replay_ratio=0, min_evidence=2)
    r = maybe_enqueue_finetune(redis_conn, 9, "manual", retry_max=0, spec=spec.to_dict())
    job = Job.fetch(r.job_id, connection=redis_conn)
    worker = subprocess.Popen([sys.executable, "-m", "backend.cli", "worker"], env=env, cwd=ROOT,
                              start_new_session=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        wait_for(lambda: (job.get_meta(refresh=True).get("step") or 0) >= 1, TIMEOUT, "training to start")
        meta = job.get_meta()
        assert meta["stage"] == "training" and meta["total_steps"] == 100_000 and meta["progress"] < 0.21
    finally:
        os.killpg(worker.pid, signal.SIGKILL)
        worker.wait()
    models = data_dir / "models"
    assert job.get_status(refresh=True) == JobStatus.STARTED
    assert [p.name for p in models.iterdir()] == []  # killed before saving: no checkpoint
    registry = VersionRegistry(redis_conn)
    assert [r.status for r in registry.list()] == ["base"] and registry.active() is None
    # what a kill during saving leaves: a temp dir named after the dead writer's pid
    leftover = models / f".p9-x-1.tmp-{worker.pid}-abc"
    leftover.mkdir()
    (leftover / "trainable.safetensors").write_bytes(b"partial")

    # the heartbeat TTL (monitoring interval + 60 s) would expire on its own; expire it now
    started = StartedJobRegistry("clipseg", connection=redis_conn)
    redis_conn.zadd(started.key, {m: 1 for m in redis_conn.zrange(started.key, 0, -1)})
    quick = {**env, "FINETUNE_STEPS": "2"}
    out = clipseg(quick, "finetune", "--project", "9", "--now").stdout  # cleans up the abandoned job, queues anew
    assert out.startswith("queued finetune-9-")
    assert job.get_status(refresh=True) == JobStatus.FAILED
    rows = {row["id"]: row for row in json.loads(clipseg(quick, "jobs", "--json").stdout)}
    assert rows[job.id]["state"] == "failed" and "AbandonedJobError" in rows[job.id]["error"]
    assert "AbandonedJobError" in clipseg(quick, "jobs").stdout

    clipseg(quick, "worker", "--burst")  # the next job runs and cleans up
    assert not leftover.exists()
    assert [p.name for p in models.iterdir() if p.name.startswith(".")] == []
    assert {r.status for r in registry.list()} <= {"base", "promoted", "rejected"} and len(registry.list()) == 2


def test_start_training_webhook_enqueues(redis_conn, redis_url, tiny_model_factory, tmp_path):
    """START_TRAINING (Label Studio's "Start Training" button) queues a fine-tune below the threshold; once."""
    env = _env(redis_url, tiny_model_factory(PRESET), tmp_path / "data")
    jpeg, mask = scene(128, 96, seed=0)
    with Server(env, tmp_path / "serve.log") as server:
        r = server.webhook({"action": "START_TRAINING", "project": {"id": 3}})
        assert r.status_code == 200 and r.json()["status"] == "no_corrections"
        assert server.webhook(correction(1, mask, data_uri(jpeg), project=3)).status_code == 201
        wait_for(lambda: CorrectionStore(redis_conn).count(3) == 1, 30, "the correction to be stored")
        assert fine_tune_jobs(redis_conn) == []  # 1 < FINETUNE_EVERY
        r = server.webhook({"action": "START_TRAINING", "project": {"id": 3}})
        assert r.status_code == 201 and r.json()["status"] == "enqueued"
        again = server.webhook({"action": "START_TRAINING", "project": 3})
        assert again.status_code == 200 and again.json() == {"status": "active", "job_id": r.json()["job_id"]}
        [job] = fine_tune_jobs(redis_conn)
        assert job.id == r.json()["job_id"] and job.meta["reason"] == "start_training"
