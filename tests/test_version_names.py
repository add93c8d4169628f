"""The base model's version name has one home (clipseg_model.checkpoint.base_version_name): with MODEL a local
folder, /health, /setup, /metrics and `clipseg status` all say the same name (before: `base:tiny` on /health and
`base:models/tiny` in /metrics and `clipseg status`)."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from backend.settings import Settings
from clipseg_model.checkpoint import base_version_name

ROOT = Path(__file__).resolve().parents[1]


def test_base_version_name_of_hub_ids_folders_and_checkpoints(tmp_path, tiny_model_factory):
    from clipseg_model.loading import load_model

    assert base_version_name("CIDAS/clipseg-rd64-refined") == "base:CIDAS/clipseg-rd64-refined"
    (tmp_path / "models" / "tiny").mkdir(parents=True)
    assert base_version_name(str(tmp_path / "models" / "tiny")) == "base:tiny"
    checkpoint = str(tiny_model_factory("tiny-clipseg"))  # a checkpoint of ours names itself, as loaded
    assert base_version_name(checkpoint) == load_model(checkpoint, "cpu").version != f"base:{Path(checkpoint).name}"


def test_health_setup_metrics_and_status_name_the_base_model_alike(tiny_model_factory, tmp_path, redis_url):
    from backend.http.app import create_app

    model = str(tiny_model_factory("tiny-clipseg"))
    settings = Settings(model=model, data_dir=tmp_path, redis_url=redis_url)
    app = create_app(settings)
    runtime = app.extensions["clipseg_runtime"]
    try:
        assert runtime.model.wait_ready(60)
        client = app.test_client()
        config = ('<View><Image name="image" value="$image"/><BrushLabels name="tag" toName="image">'
                  '<Label value="cat"/></BrushLabels></View>')
        served = client.post("/setup", json={"project": "3.1", "schema": config}).get_json()["model_version"]
        assert served == base_version_name(model) == runtime.base_version
        metrics = client.get("/metrics").get_data(as_text=True)
        active = [line for line in metrics.splitlines() if line.startswith("clipseg_active_version{")]
        assert active and all(f'version="{served}"' in line for line in active), active
    finally:
        runtime.stop()
    env = {"REDIS_URL": redis_url, "MODEL": model, "DATA_DIR": str(tmp_path), "PATH": "/usr/bin:/bin"}
    status = subprocess.run([sys.executable, "-m", "backend.cli", "status", "--json"], cwd=ROOT, capture_output=True,
                            text=True, timeout=60, env=env)
    assert status.returncode == 0, status.stderr
    body = json.loads(status.stdout)
    assert body["active_version"] == served, body
    # ... and the precision the server chose under PRECISION=auto, with its reason (issue 29), as /health says it.
    chosen = runtime.model.choice
    assert body["precision"]["mode"] == "auto" and body["precision"]["model"] == model, body["precision"]
    assert (body["precision"]["precision"], body["precision"]["reason"]) == (chosen.precision.name, chosen.reason)
    text = subprocess.run([sys.executable, "-m", "backend.cli", "status"], cwd=ROOT, capture_output=True, text=True,
                          timeout=60, env=env).stdout
    assert f"precision {chosen.precision.name} under PRECISION=auto: {chosen.reason}" in text, text
    # A run queued from the command line carries that measured choice, so its worker writes the masks /predict
    # answers instead of timing its own (issue 29).
    queued = subprocess.run([sys.executable, "-m", "backend.cli", "prelabel", "--project", "5"], cwd=ROOT,
                            capture_output=True, text=True, timeout=60, env=env)
    assert queued.returncode == 0, queued.stderr
    import redis
    from rq import Queue

    from finetune.triggers import PRELABEL_QUEUE

    (job,) = Queue(PRELABEL_QUEUE, connection=redis.Redis.from_url(redis_url)).jobs
    assert job.kwargs["spec"]["precision"] == chosen.precision.name, job.kwargs
    fresh = subprocess.run([sys.executable, "-m", "backend.cli", "status", "--json"], cwd=ROOT, capture_output=True,
                           text=True, timeout=60, env={**env, "DATA_DIR": str(tmp_path / "elsewhere")})
    assert json.loads(fresh.stdout)["precision"]["precision"] is None  # nothing measured there: not made up
