"""REDIS_NAMESPACE is a real setting: two deployments with different namespaces on ONE Redis database see none of
each other's corrections, versions or version events, and a job runs in the namespace of whoever queued it, with
the DATA_DIR of the worker that runs it (real Redis, real RQ workers, a real `clipseg worker` process)."""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
from rq import Queue
from rq.job import Job

from backend.prelabel import PrelabelRuns, WorkerContext, queue_prelabel
from backend.runtime import BackendRuntime
from backend.settings import Settings
from finetune.commands import run_status, run_versions
from finetune.corrections import Region
from finetune.triggers import PRELABEL_QUEUE, QUEUE_NAME, lock_key
from finetune.versions import VersionRecord, VersionRegistry
from finetune.worker import SimpleWorker
from tests.fixtures.webhooks import scene

ROOT = Path(__file__).resolve().parents[1]
B = "team-b"  # the second deployment's namespace; the first one runs with the default (REDIS_NAMESPACE unset)


def _deployments(redis_url: str, tmp_path: Path, **b_settings) -> tuple[BackendRuntime, BackendRuntime]:
    """(A, B): two servers' runtimes on the same Redis database, A in the default namespace, B in `B`."""
    a = BackendRuntime(Settings(redis_url=redis_url, data_dir=tmp_path / "a", sync_label_studio=False))
    b = BackendRuntime(Settings(redis_url=redis_url, data_dir=tmp_path / "b", sync_label_studio=False, namespace=B,
                                **b_settings))
    return a, b


def _wait(predicate, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.02)


def _correct(store, project: int, task: int, annotation: int, seed: int = 0) -> None:
    jpeg, mask = scene(96, 64, seed=seed)
    store.put_annotation(project, task, annotation, [Region("cat", mask, "cat")], jpeg)


def test_two_namespaces_on_one_database_see_nothing_of_each_other(redis_url, tmp_path, capsys):
    a, b = _deployments(redis_url, tmp_path)
    heard: dict[str, list[str]] = {"a": [], "b": []}
    try:
        for name, runtime in (("a", a), ("b", b)):
            runtime.events.subscribe(lambda event, name=name: heard[name].append(event.version)).start()
            assert runtime.events.subscribed.wait(10)
        _correct(b.store(), 1, 1, 11)
        _correct(b.store(), 1, 2, 12, seed=1)
        _correct(a.store(), 2, 1, 21)
        assert (a.store().projects(), a.store().count(2), a.store().count(1)) == (["2"], 1, 0)
        assert (b.store().projects(), b.store().count(1), b.store().count(2)) == (["1"], 2, 0)

        # versions and the version-activated event: B activates first, then A, then B once more; each listener
        # hears its own deployment's activations only (pub/sub keeps the order of the publishes)
        for runtime, version, project in ((b, "p1-b", "1"), (a, "p2-a", "2"), (b, "p1-b2", "1")):
            registry = runtime.registry()
            registry.record(VersionRecord(version, str(tmp_path), None, project=project))
            registry.activate(version, "promoted", "test", project=project)
        _wait(lambda: "p2-a" in heard["a"] and "p1-b2" in heard["b"])
        assert heard == {"a": ["p2-a"], "b": ["p1-b", "p1-b2"]}
        assert [r.version for r in a.registry().list()] == ["p2-a"] and a.registry().active("1") is None
        assert [r.version for r in b.registry().list()] == ["p1-b", "p1-b2"] and b.registry().active("2") is None
    finally:
        a.events.stop()
        b.events.stop()

    # the CLI reads the namespace of its settings too
    def cli(command, settings) -> dict:
        capsys.readouterr()
        command(argparse.Namespace(json=True, project=None, set_default=None), settings)
        return json.loads(capsys.readouterr().out)

    for runtime, projects, versions in ((a, {"2"}, ["p2-a"]), (b, {"1"}, ["p1-b", "p1-b2"])):
        status = cli(run_status, runtime.settings)
        assert set(status["projects"]) == projects and status["redis"]["namespace"] == runtime.settings.namespace
        assert [v["version"] for v in cli(run_versions, runtime.settings)["versions"]] == versions


def test_a_prelabel_run_queued_under_a_namespace_runs_in_it(redis_url, redis_conn, tmp_path):
    """A worker of the default namespace runs B's plan job: it finds B's run and fails it (Label Studio cannot be
    reached), in B; the default namespace never sees the run."""
    _, b = _deployments(redis_url, tmp_path)
    run, created = queue_prelabel(redis_conn, b.prelabel_spec("4"), task_ids=[1, 2])
    assert created
    (job,) = Queue(PRELABEL_QUEUE, connection=redis_conn).get_jobs()
    assert job.kwargs["spec"]["namespace"] == B and "namespace" not in job.kwargs  # carried in the spec
    WorkerContext.install(Settings(label_studio_url="http://127.0.0.1:9", label_studio_api_key="k" * 40))
    SimpleWorker([PRELABEL_QUEUE], connection=redis_conn).work(burst=True)
    info = PrelabelRuns(redis_conn, B).info(run)
    assert info.state == "failed" and "cannot reach Label Studio" in info.error, info.error
    assert PrelabelRuns(redis_conn).runs(5) == [] and PrelabelRuns(redis_conn).info(run) is None


@pytest.mark.parametrize("worker_class", ["simple", "spawn"])
def test_a_fine_tune_runs_in_its_namespace_under_the_workers_data_dir(redis_url, redis_conn, tiny_model_factory,
                                                                     tmp_path, worker_class):
    """B's server (DATA_DIR X) queues a fine-tune; a `clipseg worker` of the default namespace with DATA_DIR Y runs
    it (spawn: in a spawned work horse, which inherits no module state): B's corrections are trained on and B's
    registry records the version, its checkpoint under Y; nothing is written under X or into the default
    namespace."""
    model = tiny_model_factory("tiny-clipseg")
    a, b = _deployments(redis_url, tmp_path, model=str(model), finetune_steps=4, replay_ratio=0.0, min_evidence=2,
                        promote_epsilon=1.0)
    for i in range(6):
        _correct(b.store(), 5, i + 1, 500 + i, seed=i)
    result = b.trigger("5", "manual")
    assert result.enqueued
    (job,) = Queue(QUEUE_NAME, connection=redis_conn).get_jobs()
    assert job.kwargs["spec"]["namespace"] == B and "data_dir" not in job.kwargs["spec"]
    # as the previous release's enqueuer wrote it: its spec also named the enqueuer's DATA_DIR and DEVICE
    job.kwargs = {**job.kwargs, "spec": {**job.kwargs["spec"], "data_dir": str(tmp_path / "b"), "device": "cpu"}}
    job.save()
    assert Job.fetch(job.id, connection=redis_conn).kwargs["spec"]["data_dir"] == str(tmp_path / "b")

    worker_dir = tmp_path / "worker"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])),
           "REDIS_URL": redis_url, "DATA_DIR": str(worker_dir), "DEVICE": "cpu", "HF_HUB_OFFLINE": "1",
           "OMP_NUM_THREADS": "2", "LOG_LEVEL": "WARNING"}
    env.pop("REDIS_NAMESPACE", None)
    proc = subprocess.run([sys.executable, "-m", "backend.cli", "worker", "--burst", "--worker-class", worker_class,
                           "--queues", QUEUE_NAME], env=env, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-4000:]
    job.refresh()
    assert job.get_status() == "finished", proc.stderr[-4000:]

    [rec] = [r for r in VersionRegistry(redis_conn, B).list() if r.status != "base"]
    assert rec.project == "5" and Path(rec.path).resolve().parent == (worker_dir / "models").resolve()
    assert (worker_dir / "models" / rec.version).is_dir() and not (tmp_path / "b" / "models").exists()
    assert b.store().new_since_last_finetune(5) == 0  # B's corrections were the ones trained on
    assert VersionRegistry(redis_conn).list() == [] and a.store().projects() == []
    assert redis_conn.get(lock_key("5", B)) is None  # B's lock, released by the job's callback
