"""The backend against a real Label Studio 1.23, end to end, in both auth modes.

Everything is a real process on 127.0.0.1: Label Studio (tests.e2e.ls_harness), our backend started the way users
start it (`clipseg serve --host --port` with MODEL/DATA_DIR/REDIS_URL, no worker or scheduler), and the Redis
scratch DB 13 its corrections go to. The test drives Label Studio only through its REST API, as the UI does:

- a BrushLabels project with a TextArea for typed prompts; images imported three ways (upload, local files storage,
  a data: URL) plus a task whose upload is missing;
- the backend connected through `POST /api/ml` (interactive), so Label Studio calls /health and /setup and creates
  the project webhook;
- "Retrieve Predictions": every stored mask decodes to its image's real size, with the /setup version; the missing
  image gets an empty result while the others still get masks;
- interactive annotating with a typed prompt: the answer is one brush region for the typed phrase;
- an annotation created and updated: the webhook reaches the backend, which fetches the image from Label Studio
  and stores exactly one correction (replaced, not duplicated, by the update).

Auth modes (module parametrised): "legacy" — the backend gets NO Label Studio settings and works from what /setup
hands it (`hostname` is `http://localhost:<port>`, Label Studio's own host, which the SSRF guard must trust, and the
legacy `access_token`); "pat" — a JWT-only organisation: /setup's token cannot read media (401), so the backend is
configured as users must configure it, LABEL_STUDIO_URL + LABEL_STUDIO_API_KEY=<personal access token>, which it
exchanges for access tokens.

Measured here (2 CPU cores, LS venv and template cached): 27-33 s per auth mode, ~70 s for the module; most of it is
the backend's start (torch import + model load, ~10 s) and Label Studio's (~8-13 s), which overlap in legacy mode.
"""
from __future__ import annotations

import base64
import contextlib
import hashlib
import io
import logging
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np
import pytest
import requests
from PIL import Image, ImageDraw

from tests.conftest import REDIS_TEST_URL
from tests.e2e.ls_harness import HarnessError, LabelStudioServer, ManagedProcess, free_port

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(600)]

log = logging.getLogger(__name__)

LABEL_CONFIG = (
    '<View><Image name="image" value="$image"/>'
    '<BrushLabels name="tag" toName="image"><Label value="circle"/><Label value="square"/></BrushLabels>'
    '<TextArea name="prompt" toName="image" editable="true" perRegion="false" showSubmitButton="true"/>'
    # Visual prompts (issue 28): a smart box answers the object in it; the similar="true" tool everything like it.
    '<RectangleLabels name="box" toName="image" smart="true"><Label value="circle"/></RectangleLabels>'
    '<KeyPointLabels name="like_this" toName="image" smart="true" similar="true"><Label value="square"/></KeyPointLabels>'
    '</View>'
)
LABELS = {"circle", "square"}
MISSING_IMAGE = "/data/upload/999/missing.png"
BACKEND_READY_TIMEOUT = 180.0
INGEST_TIMEOUT = 10.0  # webhook → spool → background thread → Redis is asynchronous


# ---------------------------------------------------------------------------------------------------------------
# helpers


def scene_png(width: int, height: int) -> tuple[bytes, np.ndarray]:
    """A PNG with a red circle (top left) and a blue square (bottom right): (bytes, (H, W) bool mask of the circle)."""
    image = Image.new("RGB", (width, height), (235, 235, 235))
    draw = ImageDraw.Draw(image)
    circle = (2, 2, width // 2, height // 2)
    draw.ellipse(circle, fill=(220, 20, 20))
    draw.rectangle((width // 2 + 2, height // 2 + 2, width - 3, height - 3), fill=(20, 20, 220))
    mask = Image.new("L", (width, height), 0)
    ImageDraw.Draw(mask).ellipse(circle, fill=255)
    buf = io.BytesIO()
    image.save(buf, "PNG")
    return buf.getvalue(), np.asarray(mask) > 0


def decode_brush(item: dict[str, Any]) -> np.ndarray:
    """A brushlabels result item → (H, W) bool mask, decoded the way Label Studio's converter does."""
    from label_studio_sdk.converter.brush import decode_rle

    h, w = item["original_height"], item["original_width"]
    return decode_rle(item["value"]["rle"]).reshape(h, w, 4)[:, :, 3] > 0


def brush_item(mask: np.ndarray, label: str) -> dict[str, Any]:
    """A brush region as the editor submits it (RLE by label_studio_sdk's mask2rle of a 0/255 mask)."""
    from label_studio_sdk.converter.brush import mask2rle

    h, w = mask.shape
    return {
        "id": f"r-{label}", "from_name": "tag", "to_name": "image", "type": "brushlabels",
        "original_width": w, "original_height": h, "image_rotation": 0,
        "value": {"format": "rle", "rle": [int(v) for v in mask2rle(mask.astype(np.uint8) * 255)],
                  "brushlabels": [label]},
    }


def wait_for(predicate: Callable[[], Any], timeout: float, what: str, interval: float = 0.1,
             ignore_errors: bool = False) -> Any:
    """Poll until predicate() is truthy; returns its value or fails with `what`. With `ignore_errors`, a predicate
    that raises (a page element not there yet) counts as not yet."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            value = predicate()
        except Exception:
            if not ignore_errors:
                raise
            value = None
        if value:
            return value
        if time.monotonic() > deadline:
            pytest.fail(f"timed out after {timeout:.0f} s waiting for {what}")
        time.sleep(interval)


def wait_backend_ready(backend: ManagedProcess, timeout: float = BACKEND_READY_TIMEOUT) -> dict[str, Any]:
    """/health answers 200 at once while the model loads in the background; wait for `ready`. Label Studio's /setup
    call times out after 3 s, so connecting a backend that is still loading fails (users retry; the test waits)."""
    deadline = time.monotonic() + timeout
    while True:
        if not backend.alive():
            raise HarnessError(f"backend exited while loading\n{backend.log_tail()}")
        try:
            health = requests.get(f"{backend.base_url}/health", timeout=2).json()
            if health.get("ready"):
                return health
            if health.get("error"):
                raise HarnessError(f"backend failed to load its model: {health['error']}\n{backend.log_tail()}")
        except requests.RequestException:
            pass
        if time.monotonic() > deadline:
            raise HarnessError(f"backend not ready after {timeout:.0f} s\n{backend.log_tail()}")
        time.sleep(0.2)


def clipseg_command() -> list[str]:
    """`clipseg` from the running venv (what users type), else the module form."""
    script = Path(sys.executable).with_name("clipseg")
    return [str(script)] if script.exists() else [sys.executable, "-m", "backend.cli"]


# ---------------------------------------------------------------------------------------------------------------
# the stack: Label Studio + backend + project, once per auth mode


@dataclass
class Stack:
    ls: LabelStudioServer
    backend: ManagedProcess
    project: int
    ml_id: int
    setup_version: str
    tasks: dict[str, dict[str, Any]]  # "upload" | "local" | "data_url" | "missing" -> task
    images: dict[str, tuple[bytes, np.ndarray]]  # same keys (not "missing") -> (bytes, circle mask)
    timings: dict[str, float] = field(default_factory=dict)

    @property
    def client(self):
        return self.ls.client

    def store(self):
        import redis

        from finetune.corrections import CorrectionStore

        return CorrectionStore(redis.Redis.from_url(REDIS_TEST_URL))


@pytest.fixture(scope="module", params=["legacy", "pat"])
def stack(request, tiny_model_factory, tmp_path_factory):
    import redis

    mode = request.param
    timings: dict[str, float] = {}
    t0 = time.monotonic()
    model_dir = tiny_model_factory("tiny-clipseg")
    conn = redis.Redis.from_url(REDIS_TEST_URL)
    conn.flushdb()
    tmp = tmp_path_factory.mktemp(f"e2e-{mode}")
    port = free_port()
    with contextlib.ExitStack() as resources:
        backend = ManagedProcess(
            [*clipseg_command(), "serve", "--host", "127.0.0.1", "--port", str(port), "--no-worker", "--no-scheduler"],
            env={"MODEL": str(model_dir), "DATA_DIR": str(tmp / "data"), "REDIS_URL": REDIS_TEST_URL,
                 "LOG_LEVEL": "INFO", "LABEL_STUDIO_URL": None, "LABEL_STUDIO_API_KEY": None},
            cwd=Path(__file__).resolve().parents[2], log_path=tmp / "backend.log", name="backend")
        resources.callback(backend.stop)
        if mode == "legacy":
            # Nothing about Label Studio in its settings: everything comes from /setup. It may start (and load its
            # model) while Label Studio starts.
            backend.start()
        ls = resources.enter_context(LabelStudioServer(mode))
        timings["label_studio_s"] = time.monotonic() - t0
        if mode == "pat":
            # As users must configure it for a JWT-only organisation: Label Studio's URL and a personal access token.
            backend.env.update({"LABEL_STUDIO_URL": ls.url, "LABEL_STUDIO_API_KEY": ls.pat})
            backend.start()
        backend.health_url = f"http://127.0.0.1:{port}/health"
        wait_backend_ready(backend)
        timings["both_ready_s"] = time.monotonic() - t0
        c = ls.client
        project = c.create_project(f"e2e {mode}", LABEL_CONFIG)
        images = {"upload": scene_png(96, 64), "local": scene_png(80, 120), "data_url": scene_png(50, 40)}
        upload_file = tmp / "scene.png"
        upload_file.write_bytes(images["upload"][0])
        c.upload_file(project, upload_file)
        folder = ls.local_files_root / f"p{project}"
        folder.mkdir()
        (folder / "local.png").write_bytes(images["local"][0])
        c.add_local_files_storage(project, folder, regex_filter=r".*\.png")
        data_url = "data:image/png;base64," + base64.b64encode(images["data_url"][0]).decode()
        c.import_tasks(project, [{"image": data_url}, {"image": MISSING_IMAGE}])

        tasks: dict[str, dict[str, Any]] = {}
        for task in c.tasks(project):
            ref = task["data"]["image"]
            kind = ("missing" if ref == MISSING_IMAGE else "upload" if ref.startswith("/data/upload/")
                    else "local" if ref.startswith("/data/local-files/") else "data_url" if ref == data_url else ref)
            tasks[kind] = task
        assert set(tasks) == {"upload", "local", "data_url", "missing"}, sorted(tasks)

        t2 = time.monotonic()
        ml_id = c.add_ml_backend(project, backend.base_url, "clipseg", is_interactive=True)
        timings["connect_s"] = time.monotonic() - t2
        # What the backend's /setup answers for this project (a second call, as Label Studio repeats it too).
        setup = requests.post(f"{backend.base_url}/setup", json={
            "project": f"{project}.{int(time.time())}", "schema": LABEL_CONFIG,
            "hostname": f"http://localhost:{ls.port}", "access_token": ls.legacy_token,
        }, timeout=10)
        assert setup.status_code == 200, setup.text
        s = Stack(ls, backend, project, ml_id, setup.json()["model_version"], tasks, images, timings)
        try:
            yield s
        finally:
            timings["total_s"] = time.monotonic() - t0
            log.info("e2e %s timings: %s", mode, {k: round(v, 1) for k, v in timings.items()})
            print(f"\n[e2e {mode}] timings: { {k: round(v, 1) for k, v in timings.items()} }")
    conn.flushdb()
    conn.close()


@pytest.fixture(scope="module")
def predictions(stack: Stack) -> dict[str, list[dict[str, Any]]]:
    """Run "Retrieve Predictions" on all four tasks once; task kind -> the predictions Label Studio stored."""
    c = stack.client
    ids = [t["id"] for t in stack.tasks.values()]
    t0 = time.monotonic()
    reply = c.retrieve_predictions(stack.project, ids)
    stack.timings["retrieve_predictions_s"] = time.monotonic() - t0
    assert reply["processed_items"] == len(ids), reply
    stored = c.predictions(stack.project)
    by_task = {kind: [p for p in stored if p["task"] == task["id"]] for kind, task in stack.tasks.items()}
    return by_task


# ---------------------------------------------------------------------------------------------------------------
# tests


def test_label_studio_connects_the_backend(stack: Stack):
    """POST /api/ml went through /health and /setup: connected, with our version, and the webhook is in place."""
    (ml,) = stack.client.ml_backends(stack.project)
    assert ml["state"] == "CO", ml
    assert ml["is_interactive"] is True
    assert ml["model_version"] == stack.setup_version
    assert stack.setup_version == requests.get(f"{stack.backend.base_url}/health").json()["model_version"]
    hooks = stack.client.webhooks(stack.project)
    assert [h["url"] for h in hooks] == [f"{stack.backend.base_url}/webhook"]
    assert hooks[0]["send_payload"] and hooks[0]["send_for_all_actions"]


def test_retrieve_predictions_masks_decode_at_image_size(stack: Stack, predictions):
    for kind in ("upload", "local", "data_url"):
        preds = predictions[kind]
        assert len(preds) == 1, f"{kind}: expected one stored prediction, got {len(preds)}"
        pred = preds[0]
        assert pred["model_version"] == stack.setup_version, (kind, pred["model_version"])
        assert pred["result"], f"{kind}: the model answered no region (backend log:\n{stack.backend.log_tail()})"
        width, height = Image.open(io.BytesIO(stack.images[kind][0])).size
        for item in pred["result"]:
            assert item["type"] == "brushlabels" and item["from_name"] == "tag" and item["to_name"] == "image"
            assert (item["original_width"], item["original_height"]) == (width, height), kind
            assert item["value"]["format"] == "rle" and set(item["value"]["brushlabels"]) <= LABELS
            mask = decode_brush(item)
            assert mask.shape == (height, width) and mask.any(), kind
            assert 0.0 <= item["score"] <= 1.0
        # One region per label at most (no prompt from a data field or typed text here: the labels are the prompts).
        labels = [item["value"]["brushlabels"][0] for item in pred["result"]]
        assert len(labels) == len(set(labels))
        assert pred["score"] == pytest.approx(min(item["score"] for item in pred["result"]))


def test_missing_image_gets_an_empty_result_others_still_answered(stack: Stack, predictions):
    """One /predict carried all four tasks; the task whose upload does not exist gets an empty result only."""
    (pred,) = predictions["missing"]
    assert pred["result"] == [] and pred["score"] == 0.0
    assert pred["model_version"] == stack.setup_version
    assert all(predictions[kind][0]["result"] for kind in ("upload", "local", "data_url"))
    log_text = stack.backend.log_tail(200)
    # Label Studio 1.23 answers a missing upload with HTTP 500 (not 404). In legacy mode the URL is built from the
    # hostname /setup sent: Label Studio's own, http://localhost:<port>.
    host = f"http://localhost:{stack.ls.port}" if stack.ls.auth_mode == "legacy" else stack.ls.url
    assert f"{host}{MISSING_IMAGE}" in log_text, log_text


def test_typed_prompt_answers_one_brush_region(stack: Stack, predictions):
    """Interactive annotating with text typed in the TextArea: LS sends it as params.context; the answer is one
    region for the typed phrase (the label-per-prompt predictions above had one region per label)."""
    task = stack.tasks["upload"]
    context = {"result": [{"from_name": "prompt", "to_name": "image", "type": "textarea",
                           "value": {"text": ["the red circle"]}}]}
    out = stack.client.interactive_annotating(stack.ml_id, task["id"], context)
    data = out["data"]
    assert data["model_version"] == stack.setup_version
    (item,) = data["result"]
    # No label picked and the text names no label exactly: the region gets the first label.
    assert item["type"] == "brushlabels" and item["value"]["brushlabels"] == ["circle"]
    mask = decode_brush(item)
    assert mask.shape == (64, 96) and mask.any()
    # Interactive answers are not stored as predictions.
    assert len(stack.client.predictions(task=task["id"])) == len(predictions["upload"])


def test_a_smart_box_or_click_answers_a_mask_from_the_example(stack: Stack, predictions):
    """Interactive annotating with a region instead of words (issue 28): Label Studio forwards the smart tool's
    region as params.context; a box answers one brush region inside the box, labelled like the box; a click with
    the similar="true" tool answers a region labelled like it, which may reach past the click's object."""
    task = stack.tasks["upload"]  # 96 x 64
    box = {"id": "b1", "from_name": "box", "to_name": "image", "type": "rectanglelabels", "original_width": 96,
           "original_height": 64, "value": {"x": 0, "y": 0, "width": 50, "height": 50, "rectanglelabels": ["circle"]}}
    data = stack.client.interactive_annotating(stack.ml_id, task["id"], {"result": [box]})["data"]
    assert data["model_version"] == stack.setup_version
    (item,) = data["result"]
    assert item["type"] == "brushlabels" and item["value"]["brushlabels"] == ["circle"]
    assert item["meta"] == {"prompt": "circle", "prompt_label": "circle"}
    mask = decode_brush(item)
    assert mask.shape == (64, 96) and mask.any() and not mask[32:, :].any() and not mask[:, 48:].any()
    click = {"id": "k1", "from_name": "like_this", "to_name": "image", "type": "keypointlabels", "is_positive": True,
             "original_width": 96, "original_height": 64, "value": {"x": 75, "y": 75, "keypointlabels": ["square"]}}
    data = stack.client.interactive_annotating(stack.ml_id, task["id"], {"result": [click]})["data"]
    assert [r["value"]["brushlabels"] for r in data["result"]] == [["square"]] and decode_brush(data["result"][0]).any()


def test_annotation_webhooks_reach_the_corrections_store(stack: Stack, predictions):
    """Submit and update an annotation in Label Studio: the auto-created webhook delivers both; the backend fetches
    the task image from Label Studio (with the right auth) and keeps exactly one correction, the latest."""
    store = stack.store()
    project = str(stack.project)
    task = stack.tasks["upload"]
    image_bytes, circle = stack.images["upload"]
    assert store.count(project) == 0

    prompt = {"id": "typed", "from_name": "prompt", "to_name": "image", "type": "textarea",
              "value": {"text": ["the red circle"]}}
    ann = stack.client.create_annotation(task["id"], [brush_item(circle, "circle"), prompt])
    samples = wait_for(lambda: store.samples(project), INGEST_TIMEOUT,
                       f"ANNOTATION_CREATED in the store\n{stack.backend.log_tail()}")
    assert store.count(project) == 1
    (sample,) = samples
    assert sample.annotation_id == ann["id"] and sample.task_id == task["id"]
    assert sample.prompt == "the red circle" and sample.label == "circle"
    assert np.array_equal(sample.mask, circle)
    # The image came from Label Studio itself, byte for byte.
    assert sample.image_sha256 == hashlib.sha256(image_bytes).hexdigest()
    assert sample.load_image() == image_bytes
    # Our prediction for this task and label was recorded at /predict time: the review IoU compares with it.
    assert sample.model_version == stack.setup_version and sample.iou is not None and 0.0 <= sample.iou <= 1.0

    shrunk = np.zeros_like(circle)
    shrunk[4:20, 4:30] = True
    stack.client.update_annotation(ann["id"], [brush_item(shrunk, "circle"), prompt])
    wait_for(lambda: [s for s in store.samples(project) if np.array_equal(s.mask, shrunk)], INGEST_TIMEOUT,
             f"ANNOTATION_UPDATED in the store\n{stack.backend.log_tail()}")
    assert store.count(project) == 1
    time.sleep(1.0)  # nothing late turns the update into a second correction
    assert store.count(project) == 1 and len(store.samples(project)) == 1


REFCOCO_CONFIG = (
    '<View><Image name="image" value="$image"/><Header value="$expression"/>'
    '<BrushLabels name="tag" toName="image"><Label value="object"/></BrushLabels></View>'
)


def test_refcoco_style_project_stores_corrections_under_the_tasks_phrase(stack: Stack):
    """A project whose phrase per task is shown with `<Header value="$expression"/>` and no PROMPT_FIELD set: the
    backend predicted for the task's phrase, and the correction Label Studio posts is stored under that phrase,
    not under the label name (the config comes with the webhook; no /setup for this project needs to be seen)."""
    c = stack.client
    project = c.create_project(f"refcoco-style {stack.ml_id}", REFCOCO_CONFIG)
    png, circle = scene_png(64, 48)
    data_url = "data:image/png;base64," + base64.b64encode(png).decode()
    c.import_tasks(project, [{"image": data_url, "expression": "the red circle on the left"}])
    (task,) = c.tasks(project)
    c.add_ml_backend(project, stack.backend.base_url, "clipseg", is_interactive=True)
    ann = c.create_annotation(task["id"], [brush_item(circle, "object")])
    store = stack.store()
    (sample,) = wait_for(lambda: store.samples(str(project)), INGEST_TIMEOUT,
                         f"the correction in the store\n{stack.backend.log_tail()}")
    assert sample.annotation_id == ann["id"]
    assert sample.prompt == "the red circle on the left" and sample.label == "object"
    assert np.array_equal(sample.mask, circle) and sample.load_image() == png
