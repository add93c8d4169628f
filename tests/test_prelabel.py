"""Pre-label runs without Label Studio: chunk leases in real Redis, the /predict budget, the promotion hook, and the
job's errors when Label Studio cannot be used (e2e with a real Label Studio: tests/e2e/test_prelabel_e2e.py)."""
from __future__ import annotations

import json

import pytest
from rq import Queue
from rq.worker import SimpleWorker

from backend import prelabel
from backend.serving.budget import PredictBudget
from backend.prelabel import PrelabelRuns, PrelabelSpec, PromotionRefresher, WorkerContext, queue_prelabel
from backend.settings import Settings
from finetune.triggers import PRELABEL_QUEUE
from finetune.version_events import VersionActivated
from finetune.versions import VersionRecord, VersionRegistry


def test_budget_estimates_from_measured_time_and_always_runs_one_task():
    budget = PredictBudget(80.0, prior_s_per_task=1.0)
    assert budget.fits(1) and budget.fits(53) and not budget.fits(54)  # 1.5 x 1 s prior per task
    budget.observe(10, 1.0)  # 0.1 s per task measured
    assert budget.seconds_per_task == pytest.approx(0.1)
    assert budget.fits(500) and not budget.fits(600)
    budget.observe(10, 11.0)  # slower now: the mean moves towards it
    assert 0.1 < budget.seconds_per_task < 1.1
    assert PredictBudget(0.001).fits(1)


def test_one_run_per_project_and_chunks_are_claimed_once(redis_conn):
    runs = PrelabelRuns(redis_conn)
    run, created = runs.create("5", task_ids=None, unlabeled_only=False, chunk_size=2, version=None, reason="t")
    again, created2 = runs.create("5", task_ids=None, unlabeled_only=False, chunk_size=2, version=None, reason="t")
    assert created and not created2 and again == run
    runs.plan(run, [[1, 2], [3, 4], [5]])
    a, b, c = runs.claim(run, "A", 3), runs.claim(run, "B", 3), runs.claim(run, "A", 3)
    assert (a, b, c) == (0, 1, 2) and runs.claim(run, "C", 3) is None
    assert runs.finish(run, 0, "A") and not runs.finish(run, 1, "A")  # B holds chunk 1
    assert not runs.settle(run)
    # B dies: its lease runs out, the chunk goes to whoever claims next
    redis_conn.delete(runs.key(run, "lease:1"))
    assert runs.claim(run, "C", 3) == 1 and not runs.renew(run, 1, "B") and runs.renew(run, 1, "C")
    assert runs.finish(run, 1, "C") and runs.finish(run, 2, "A") and runs.settle(run)
    assert runs.info(run).state == "done"
    # the project is free again
    assert runs.create("5", task_ids=[9], unlabeled_only=True, chunk_size=2, version=None, reason="t")[1]


def test_queue_prelabel_enqueues_the_plan_job_on_its_own_queue(redis_conn):
    spec = PrelabelSpec.from_settings(Settings(threshold=0.7, prompt_field="expression"), 3, chunk_size=1)
    run, created = queue_prelabel(redis_conn, spec, task_ids=[7, 8])
    assert created
    (job,) = Queue(PRELABEL_QUEUE, connection=redis_conn).get_jobs()
    assert job.func_name == "backend.prelabel.jobs.plan_job" and job.args == (run,) and job.meta["run"] == run
    # the job carries the queuer's recipe: a worker elsewhere predicts with these, not its own environment
    assert PrelabelSpec.from_dict(job.kwargs["spec"]) == spec and job.kwargs["spec"]["threshold"] == 0.7
    assert PrelabelRuns(redis_conn).info(run).task_ids == [7, 8]
    assert PrelabelRuns(redis_conn).info(run).spec["prompt_field"] == "expression"
    assert queue_prelabel(redis_conn, PrelabelSpec(project=3)) == (run, False)


@pytest.mark.parametrize("env, fragment", [
    ({"LABEL_STUDIO_URL": "", "LABEL_STUDIO_API_KEY": "k"}, "LABEL_STUDIO_URL is not set"),
    ({"LABEL_STUDIO_URL": "http://127.0.0.1:9", "LABEL_STUDIO_API_KEY": ""}, "LABEL_STUDIO_API_KEY is not set"),
    ({"LABEL_STUDIO_URL": "http://127.0.0.1:9", "LABEL_STUDIO_API_KEY": "k" * 40},
     "cannot reach Label Studio at LABEL_STUDIO_URL=http://127.0.0.1:9"),
])
def test_plan_job_fails_naming_the_setting_and_writes_nothing(redis_conn, monkeypatch, env, fragment):
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    WorkerContext.install(Settings.from_env())  # the worker's own settings: Label Studio URL and key
    run, _ = queue_prelabel(redis_conn, PrelabelSpec(project=4, chunk_size=10))
    queue = Queue(PRELABEL_QUEUE, connection=redis_conn)
    SimpleWorker([queue], connection=redis_conn).work(burst=True)
    info = PrelabelRuns(redis_conn).info(run)
    assert info.state == "failed" and fragment in info.error, info.error
    assert redis_conn.hlen(PrelabelRuns(redis_conn).key(run, "chunks")) == 0  # no chunk, no work job
    assert not [j for j in queue.get_jobs() if j.func_name.endswith("work_job")]
    assert redis_conn.get(PrelabelRuns(redis_conn).active_key("4")) is None


def test_promotion_queues_one_refresh_of_unannotated_tasks(redis_conn, tmp_path):
    registry = VersionRegistry(redis_conn)
    registry.record(VersionRecord("p6-v2", str(tmp_path), "base", status="candidate", project="6"))
    event = VersionActivated("p6-v2", None, str(tmp_path))
    # without Label Studio settings the run could only fail: nothing is queued
    assert PromotionRefresher(redis_conn, Settings(redis_url="x")).handle(event) is None
    refresher = PromotionRefresher(redis_conn, Settings(redis_url="x", prelabel_chunk=50, label_studio_url="http://ls",
                                                        label_studio_api_key="k"))
    run = refresher.handle(event)
    info = PrelabelRuns(redis_conn).info(run)
    assert info.project == "6" and info.unlabeled_only and info.version == "p6-v2" and info.chunk_size == 50
    assert refresher.handle(event) is None  # a second server hearing the same event queues nothing
    registry.record(VersionRecord("base-v", "MODEL", None, status="base"))
    assert refresher.handle(VersionActivated("base-v", None, "MODEL")) is None


def test_over_budget_predict_queues_a_run_and_answers_at_once(tiny_model_factory, tmp_path, redis_url, redis_conn):
    from backend.http.app import create_app

    settings = Settings(model=str(tiny_model_factory("tiny-clipseg")), data_dir=tmp_path, redis_url=redis_url,
                        predict_budget=0.5, prelabel_chunk=4)
    app = create_app(settings)
    runtime = app.extensions["clipseg_runtime"]
    try:
        assert runtime.model.wait_ready(60)
        config = ('<View><Image name="image" value="$image"/><BrushLabels name="tag" toName="image">'
                  '<Label value="circle"/></BrushLabels></View>')
        tasks = [{"id": i, "data": {"image": "/data/upload/1/x.png"}} for i in range(1, 11)]
        client = app.test_client()
        resp = client.post("/predict", json={"tasks": tasks, "project": "9.123", "label_config": config})
        assert resp.status_code == 503
        body = resp.get_json()
        assert body["tasks"] == 10 and "PREDICT_BUDGET" in body["error"] and body["job_id"] in body["error"]
        assert PrelabelRuns(redis_conn).info(body["job_id"]).task_ids == list(range(1, 11))
        # one task always runs (here its image cannot be fetched: an empty result, as before)
        one = client.post("/predict", json={"tasks": tasks[:1], "project": "9.123", "label_config": config})
        assert one.status_code == 200 and len(one.get_json()["results"]) == 1
    finally:
        runtime.stop()


def test_jobs_listing_shows_prelabel_chunk_progress(redis_conn):
    from finetune.commands import job_rows

    queue_prelabel(redis_conn, PrelabelSpec(project=2), task_ids=[1])
    job = Queue(PRELABEL_QUEUE, connection=redis_conn).get_jobs()[0]
    job.meta.update({"chunk": 0, "chunks": 3, "done": 5, "total": 10})
    job.save_meta()
    (row,) = job_rows(redis_conn)
    assert (row["run"], row["chunk"], row["chunks"], row["done"], row["total"]) == (job.meta["run"], 0, 3, 5, 10)
    assert json.dumps(row, default=str)
    assert prelabel.LEASE_S > prelabel.RENEW_S * 2


def test_prelabel_command_queues_and_shows_a_run_chunk_by_chunk(redis_url, redis_conn, monkeypatch, capsys):
    from backend.cli import main

    monkeypatch.setenv("REDIS_URL", redis_url)
    assert main(["prelabel", "--project", "12", "--unlabeled-only", "--chunk", "2"]) == 0
    run = PrelabelRuns(redis_conn).runs()[0]
    assert f"queued pre-label run {run} for project 12" in capsys.readouterr().out
    info = PrelabelRuns(redis_conn).info(run)
    assert info.unlabeled_only and info.chunk_size == 2
    runs = PrelabelRuns(redis_conn)
    runs.plan(run, [[1, 2], [3]])
    runs.set_progress(run, 0, {"done": 1, "total": 2, "worker": "w1", "attempts": 1,
                               "failed_tasks": [{"task": 2, "error": "HTTP 404"}]})
    assert main(["prelabel", "--status", run]) == 0
    out = capsys.readouterr().out
    assert "chunk    0 pending  1/2 worker w1" in out and "task 2: no prediction: HTTP 404" in out
    assert main(["prelabel", "--status", "nope"]) == 1


def test_prelabel_wait_follows_the_run_to_its_end(redis_url, redis_conn, tiny_model_factory, tmp_path):
    """`clipseg prelabel --wait` (real CLI) shows progress until a real `clipseg worker` has finished the run; here
    Label Studio cannot be reached, so the run fails naming the setting and --wait exits 1 with that error."""
    import os
    import subprocess
    import sys
    import time
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    env = {**os.environ, "PYTHONPATH": str(root), "REDIS_URL": redis_url, "LABEL_STUDIO_URL": "http://127.0.0.1:9",
           "LABEL_STUDIO_API_KEY": "k" * 40, "MODEL": str(tiny_model_factory("tiny-clipseg")),
           "DATA_DIR": str(tmp_path / "data"), "HF_HUB_OFFLINE": "1"}
    waiting = subprocess.Popen([sys.executable, "-m", "backend.cli", "prelabel", "--project", "21", "--wait"],
                               env=env, cwd=root, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 60
        while not PrelabelRuns(redis_conn).runs():  # the run is queued before the burst worker looks
            assert time.monotonic() < deadline and waiting.poll() is None, "clipseg prelabel did not queue a run"
            time.sleep(0.1)
        worker = subprocess.run([sys.executable, "-m", "backend.cli", "worker", "--burst"], env=env, cwd=root,
                                capture_output=True, text=True, timeout=300)
        assert worker.returncode == 0, worker.stderr[-2000:]
        out, err = waiting.communicate(timeout=60)
    finally:
        waiting.kill()
    assert waiting.returncode == 1
    assert "queued pre-label run" in out and "failed" in out
    assert "cannot reach Label Studio at LABEL_STUDIO_URL=http://127.0.0.1:9" in out
    assert "tasks," in err and "chunks" in err  # the progress line


def test_a_run_whose_every_job_failed_is_marked_failed_and_frees_its_project(redis_conn, monkeypatch):
    """Label Studio goes away after planning: every work job fails for good. Before, the run stayed "running" for
    ever and each later request for the project got that dead run back."""
    monkeypatch.setattr(prelabel.jobs, "JOB_RETRIES", (0, []))
    monkeypatch.setattr(prelabel.runs, "STALL_GRACE_S", 0.0)
    WorkerContext.install(Settings(label_studio_url="http://127.0.0.1:9", label_studio_api_key="k" * 40))
    runs = PrelabelRuns(redis_conn)
    run, _ = queue_prelabel(redis_conn, PrelabelSpec(project=8, chunk_size=2), task_ids=[1, 2, 3])
    queue = Queue(PRELABEL_QUEUE, connection=redis_conn)
    queue.fetch_job(prelabel.plan_job_id(run)).delete()  # planned as plan_job would, without Label Studio
    runs.plan(run, [[1, 2], [3]])
    for i in range(2):
        queue.enqueue("backend.prelabel.work_job", run, job_id=prelabel.work_job_id(run, i), retry=prelabel._retry())
    assert runs.current(run).state == "running"  # its jobs are queued: not stalled
    assert runs.create("8", task_ids=None, unlabeled_only=False, chunk_size=2, version=None, reason="t") == (run, False)
    SimpleWorker([queue], connection=redis_conn).work(burst=True)
    assert runs.info(run).state == "running"  # nobody has looked yet
    info = runs.current(run)
    assert info.state == "failed", info
    assert "every job of the run stopped" in info.error and "cannot reach Label Studio" in info.error
    assert runs.summary(run)["state"] == "failed"
    new, created = runs.create("8", task_ids=None, unlabeled_only=False, chunk_size=2, version=None, reason="t")
    assert created and new != run


def test_jobs_queued_by_the_previous_release_still_run(redis_conn):
    """The previous release stored `backend.prelabel.plan_job` (no spec) in Redis: it resolves to the new job, which
    falls back to the worker's own settings for a run record without a spec."""
    from rq.utils import import_attribute

    from backend.prelabel import jobs

    assert import_attribute("backend.prelabel.plan_job") is jobs.plan_job
    assert import_attribute("backend.prelabel.work_job") is jobs.work_job
    WorkerContext.install(Settings(label_studio_url="", label_studio_api_key="k"))
    runs = PrelabelRuns(redis_conn)
    run, _ = runs.create("12", task_ids=[1], unlabeled_only=False, chunk_size=5, version=None, reason="old release")
    queue = Queue(PRELABEL_QUEUE, connection=redis_conn)
    queue.enqueue("backend.prelabel.plan_job", run, namespace="clipseg", job_id=prelabel.plan_job_id(run))
    SimpleWorker([queue], connection=redis_conn).work(burst=True)
    info = runs.info(run)
    assert info.spec is None and info.state == "failed" and "LABEL_STUDIO_URL is not set" in info.error, info


def test_run_status_header_names_the_version_the_run_predicts_with(redis_url, redis_conn, monkeypatch, capsys):
    """`clipseg prelabel --status`: the version a run predicts with, never "version -": the served one before any
    chunk ran (and which that is now), the one its chunks were predicted with, or the one it is pinned to."""
    from backend.cli import main

    monkeypatch.setenv("REDIS_URL", redis_url)
    runs = PrelabelRuns(redis_conn)
    spec = PrelabelSpec(project=21, model="CIDAS/clipseg-rd64-refined")
    run, _ = queue_prelabel(redis_conn, spec, task_ids=[1, 2])

    def header() -> str:
        assert main(["prelabel", "--status", run]) == 0
        return capsys.readouterr().out.splitlines()[0]

    assert "version the project's served version (now base:CIDAS/clipseg-rd64-refined)" in header()
    registry = VersionRegistry(redis_conn)
    registry.record(VersionRecord("p21-v1", "/models/p21-v1", "base", status="candidate", project="21"))
    registry.activate("p21-v1", project="21")
    assert "version the project's served version (now p21-v1)" in header()
    runs.plan(run, [[1], [2]])
    runs.set_progress(run, 0, {"done": 1, "total": 1, "worker": "w", "attempts": 1, "version": "p21-v1"})
    line = header()
    assert ", version p21-v1 (" in line and "version -" not in line
    assert runs.summary(run)["predicts_with"] == "p21-v1"
    pinned, _ = queue_prelabel(redis_conn, spec.replace(project="22", version="p22-v3"), task_ids=[3])
    assert runs.summary(pinned)["predicts_with"] == "p22-v3"
