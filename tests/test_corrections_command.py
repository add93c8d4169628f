"""`clipseg corrections`: what is stored and the phrase each region is trained with; re-prompting after a change
of prompt settings. Real Redis, the real CLI in a subprocess."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from finetune.corrections import CorrectionStore
from tests.fixtures.webhooks import annotation_event, brush_region, ingester, scene

ROOT = Path(__file__).resolve().parents[1]
CONFIG = ('<View><Image name="image" value="$image"/><Header value="$expression"/>'
          '<BrushLabels name="tag" toName="image"><Label value="person"/><Label value="dog"/></BrushLabels></View>')


def clipseg(redis_url: str, *args: str, **env: str) -> subprocess.CompletedProcess:
    full = {**os.environ, "REDIS_URL": redis_url, "PYTHONPATH": str(ROOT), **env}
    return subprocess.run([sys.executable, "-m", "backend.cli", "corrections", *args], env=full, cwd=ROOT,
                          capture_output=True, text=True, timeout=120)


def test_listing_and_reprompt_after_a_settings_change(redis_conn, redis_url):
    store = CorrectionStore(redis_conn)
    image, mask = scene(64, 48, seed=5)
    person = annotation_event([brush_region(mask, "person")], project_id=4, task_id=1, annotation_id=10,
                              data={"image": "/data/upload/4/a.jpg", "expression": "the man on the left",
                                    "caption": "a man in a red coat"})
    dog = annotation_event([brush_region(mask, "dog", "r2")], project_id=4, task_id=2, annotation_id=11,
                           data={"image": "/data/upload/4/b.jpg"})
    for event in (person, dog):
        event["project"]["label_config"] = CONFIG
        assert ingester(store).ingest_event(event, image_bytes=image).status == "stored"

    listed = [json.loads(line) for line in clipseg(redis_url, "--project", "4", "--json").stdout.splitlines()]
    assert [(r["task"], r["label"], r["prompt"], r["source"]) for r in listed] == [
        (1, "person", "the man on the left", "field"), (2, "dog", "dog", "label")]
    assert listed[0]["mask"] == "48x64" and listed[0]["area"] == int(mask.sum())
    assert all(r["now"] == r["prompt"] for r in listed)  # nothing changed yet

    new_settings = {"PROMPT_FIELD": "caption", "LABEL_PROMPTS": "dog=a small dog"}
    table = clipseg(redis_url, "--project", "4", **new_settings)
    assert table.returncode == 0, table.stderr
    assert "-> now 'a man in a red coat' (field)" in table.stdout and "-> now 'a small dog' (label)" in table.stdout
    assert "2 region(s) would get another phrase" in table.stdout
    assert [s.prompt for s in store.samples("4")] == ["the man on the left", "dog"]  # listing changes nothing

    done = clipseg(redis_url, "--project", "4", "--reprompt", **new_settings)
    assert done.returncode == 0 and "re-prompted 2 region(s)" in done.stdout
    assert [s.prompt for s in store.samples("4")] == ["a man in a red coat", "a small dog"]
    assert store.new_since_last_finetune("4") == 2  # re-prompting is not a new correction


def test_unknown_project_is_one_clear_line(redis_conn, redis_url):
    out = clipseg(redis_url, "--project", "99")
    assert out.returncode == 1 and out.stderr.strip().startswith("clipseg corrections: error: project 99 has no")
