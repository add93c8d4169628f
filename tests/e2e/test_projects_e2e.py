"""Per-project models through a real Label Studio 1.23 (issue 14): two projects connected to one backend;
annotations in one project fine-tune and promote a version for it (real `clipseg worker`), and Label Studio shows
the new `model_version` for that project only — the other keeps the base version and its stored predictions.

The backend serves `tiny-seed` with the fine-tune settings of tests/test_finetune_loop.py, under which six
corrections of one scene promote a candidate deterministically.
"""
from __future__ import annotations

import base64
import contextlib
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import requests

from tests.conftest import REDIS_TEST_URL
from tests.e2e.ls_harness import LabelStudioServer, ManagedProcess, free_port
from tests.e2e.test_backend_e2e import LABEL_CONFIG, brush_item, clipseg_command, wait_backend_ready, wait_for
from tests.fixtures.webhooks import scene

pytestmark = [pytest.mark.e2e, pytest.mark.slow, pytest.mark.timeout(900)]

ROOT = Path(__file__).resolve().parents[2]
EVERY = 6
FINETUNE_ENV = {"FINETUNE_EVERY": str(EVERY), "FINETUNE_STEPS": "15", "FINETUNE_LR": "3e-3", "REPLAY_RATIO": "0",
                "PROMOTE_EPSILON": "1.0", "MIN_EVIDENCE": "2", "DEVICE": "cpu", "HF_HUB_OFFLINE": "1"}


def test_annotations_in_one_project_change_only_its_model_version(tiny_model_factory, tmp_path):
    import redis

    from finetune.corrections import CorrectionStore
    from finetune.versions import VersionRegistry

    conn = redis.Redis.from_url(REDIS_TEST_URL)
    conn.flushdb()
    model_dir = tiny_model_factory("tiny-seed")
    port = free_port()
    env = {"MODEL": str(model_dir), "DATA_DIR": str(tmp_path / "data"), "REDIS_URL": REDIS_TEST_URL,
           "LOG_LEVEL": "INFO", "LABEL_STUDIO_URL": None, "LABEL_STUDIO_API_KEY": None, **FINETUNE_ENV}
    jpeg, mask = scene(128, 96, seed=0)
    image = "data:image/jpeg;base64," + base64.b64encode(jpeg).decode()
    with contextlib.ExitStack() as resources:
        backend = ManagedProcess(
            [*clipseg_command(), "serve", "--host", "127.0.0.1", "--port", str(port), "--no-worker", "--no-scheduler"],
            env=env, cwd=ROOT, log_path=tmp_path / "backend.log", name="backend")
        resources.callback(backend.stop)
        backend.start()
        ls = resources.enter_context(LabelStudioServer("legacy"))
        backend.health_url = f"http://127.0.0.1:{port}/health"
        base_version = wait_backend_ready(backend)["model_version"]
        c = ls.client
        a, b = c.create_project("project A", LABEL_CONFIG), c.create_project("project B", LABEL_CONFIG)
        for project in (a, b):
            c.import_tasks(project, [{"image": image} for _ in range(EVERY)])
            c.add_ml_backend(project, backend.base_url, "clipseg", is_interactive=True)
        assert [m["model_version"] for m in c.ml_backends(a)] == [m["model_version"] for m in c.ml_backends(b)] == [base_version]
        b_tasks = [t["id"] for t in c.tasks(b)]
        c.retrieve_predictions(b, b_tasks[:1])
        [b_prediction] = c.predictions(b)
        assert b_prediction["model_version"] == base_version and b_prediction["result"]

        # annotators correct every task of A: the webhook stores the corrections and queues one fine-tune for A
        for task in c.tasks(a):
            c.create_annotation(task["id"], [brush_item(mask, "circle")])
        store = CorrectionStore(conn)
        wait_for(lambda: store.count(str(a)) == EVERY, 60, f"A's corrections in the store\n{backend.log_tail()}")
        assert store.count(str(b)) == 0
        wait_for(lambda: conn.llen("rq:queue:clipseg"), 30, "the fine-tune job of A")

        worker_env = {**os.environ, "PYTHONPATH": str(ROOT), **{k: v for k, v in env.items() if v is not None}}
        done = subprocess.run([sys.executable, "-m", "backend.cli", "worker", "--burst"], env=worker_env, cwd=ROOT,
                              capture_output=True, text=True, timeout=600)
        assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
        registry = VersionRegistry(conn)
        promoted = registry.own_active(str(a))
        assert promoted is not None, [(r.version, r.status, r.reason) for r in registry.list()]
        version = promoted[0]
        assert registry.get(version).project == str(a) and registry.own_active(str(b)) is None

        # Label Studio asks /setup again when it lists a project's backends: A shows the new version, B does not
        wait_for(lambda: c.ml_backends(a)[0]["model_version"] == version, 30, "A's new model_version in Label Studio")
        time.sleep(1.0)
        assert c.ml_backends(b)[0]["model_version"] == base_version
        health = requests.get(f"{backend.base_url}/health", timeout=5).json()
        assert health["projects"][str(a)] == version and health["projects"].get(str(b), base_version) == base_version

        # B's predictions: still the base version, so Label Studio does not even ask again; a new task of B is
        # answered by the base model, a new task of A by A's version
        c.retrieve_predictions(b, b_tasks[:2])
        assert {p["model_version"] for p in c.predictions(b)} == {base_version}
        a_task = c.tasks(a)[0]["id"]
        c.retrieve_predictions(a, [a_task])
        assert {p["model_version"] for p in c.predictions(a)} == {version}
    conn.flushdb()
