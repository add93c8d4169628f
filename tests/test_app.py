"""The ML backend's HTTP endpoints through Flask's test client, with a tiny real model and real Redis."""
from __future__ import annotations

import base64
import io
import threading
import time
from functools import partial
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer

import numpy as np
import pytest
from label_studio_sdk.converter.brush import decode_rle
from PIL import Image

from backend.http.app import create_app
from backend.settings import Settings
from clipseg_model.loading import load_model
from clipseg_model.predictor import Segmenter

BRUSH = ('<View><Image name="image" value="$image"/><BrushLabels name="tag" toName="image">'
         '<Label value="circle"/><Label value="square"/></BrushLabels>'
         '<TextArea name="prompt" toName="image" editable="true" showSubmitButton="true"/></View>')
REFCOCO = ('<View><Image name="image" value="$image"/><Header value="$expression"/>'
           '<BrushLabels name="tag" toName="image"><Label value="object"/></BrushLabels></View>')
POLYGON = ('<View><Image name="image" value="$image"/><PolygonLabels name="poly" toName="image">'
           '<Label value="thing"/></PolygonLabels></View>')


def data_uri(image: Image.Image, fmt: str = "PNG") -> str:
    buf = io.BytesIO()
    image.save(buf, fmt)
    return f"data:image/{fmt.lower()};base64," + base64.b64encode(buf.getvalue()).decode()


def picture(w: int = 48, h: int = 32, seed: int = 0) -> Image.Image:
    return Image.fromarray(np.random.default_rng(seed).integers(0, 255, (h, w, 3), dtype=np.uint8))


@pytest.fixture(scope="module")
def model_dir(tiny_model_factory):
    return tiny_model_factory("tiny-clipseg")


def make_client(model_dir, tmp_path, **overrides):
    overrides.setdefault("precision", "fp32")  # the expected masks are fp32's; PRECISION=auto may pick bf16/int8 here
    settings = Settings(model=str(model_dir), data_dir=tmp_path, **overrides)
    app = create_app(settings)
    runtime = app.extensions["clipseg_runtime"]
    assert runtime.model.wait_ready(60)
    return app.test_client(), runtime


@pytest.fixture
def client(model_dir, tmp_path):
    c, runtime = make_client(model_dir, tmp_path)
    yield c
    runtime.stop()


def decode_brush(item) -> np.ndarray:
    h, w = item["original_height"], item["original_width"]
    return decode_rle(item["value"]["rle"]).reshape(h, w, 4)[:, :, 3] > 0


def expected_mask(model_dir, image, phrase, threshold=0.5) -> np.ndarray:
    return Segmenter(load_model(model_dir, "cpu"), threshold=threshold).predict(image, [phrase])[0].mask


def test_health(client):
    body = client.get("/health").get_json()
    assert body["status"] == "UP" and body["ready"] is True and body["model_version"] == "init-tiny-clipseg-0"


def test_setup_returns_version_fast(client):
    started = time.perf_counter()
    resp = client.post("/setup", json={"project": "7.1700000000", "schema": BRUSH, "hostname": "http://localhost:8080",
                                       "access_token": "x" * 40, "extra_params": None})
    assert resp.status_code == 200 and resp.get_json() == {"model_version": "init-tiny-clipseg-0"}
    assert time.perf_counter() - started < 3.0


@pytest.mark.parametrize("body,needle", [
    ({"project": "1.1"}, "'schema'"),
    ({"project": "1.1", "schema": "<View><Text name='t' value='$t'/></View>"}, "Image"),
    ({"project": "1.1", "schema": "<View><Image name='i' value='$i'/><Choices name='c' toName='i'><Choice value='a'/></Choices></View>"}, "BrushLabels"),
    ({"project": "1.1", "schema": "not xml <"}, ""),
])
def test_setup_rejects_configs_it_cannot_answer(client, body, needle):
    resp = client.post("/setup", json=body)
    assert resp.status_code == 400 and needle in resp.get_json()["error"]


def test_predict_one_result_per_task_in_order_with_labels_as_prompts(client, model_dir):
    setup_version = client.post("/setup", json={"project": "3.1", "schema": BRUSH}).get_json()["model_version"]
    images = [picture(48, 32, 0), picture(20, 60, 1), picture(33, 33, 2)]
    tasks = [{"id": 10 + i, "data": {"image": data_uri(im)}} for i, im in enumerate(images)]
    resp = client.post("/predict", json={"tasks": tasks, "project": "3.1", "label_config": BRUSH, "params": {"context": None}})
    assert resp.status_code == 200
    results = resp.get_json()["results"]
    assert len(results) == 3
    expected = [{label: expected_mask(model_dir, image, label) for label in ("circle", "square")} for image in images]
    assert any(m.any() for e in expected for m in e.values())  # the tiny model draws something: an empty answer fails
    for image, res, want in zip(images, results, expected):
        assert res["model_version"] == setup_version
        labels = [item["value"]["brushlabels"] for item in res["result"]]
        # one region per label whose mask is not empty, none for the others
        assert sorted(label[0] for label in labels) == sorted(k for k, m in want.items() if m.any())
        for item in res["result"]:
            assert (item["original_width"], item["original_height"]) == image.size
            assert item["type"] == "brushlabels" and item["from_name"] == "tag" and item["to_name"] == "image"
            mask = decode_brush(item)
            assert mask.any()  # an empty mask gives no region at all
            assert np.array_equal(mask, expected_mask(model_dir, image, item["value"]["brushlabels"][0]))
        if res["result"]:
            assert res["score"] == pytest.approx(min(item["score"] for item in res["result"]))


def test_typed_prompt_from_context_wins(client, model_dir):
    image = picture(40, 40, 3)
    context = {"result": [{"from_name": "prompt", "to_name": "image", "type": "textarea",
                           "value": {"text": ["the red circle"]}, "origin": "manual"}]}
    resp = client.post("/predict", json={"tasks": [{"id": 1, "data": {"image": data_uri(image)}}], "project": "4.1",
                                         "label_config": BRUSH, "params": {"login": None, "password": None, "context": context}})
    (res,) = resp.get_json()["results"]
    want = expected_mask(model_dir, image, "the red circle")
    assert want.any()  # the typed phrase's mask is not empty: an empty answer fails
    (item,) = res["result"]
    assert np.array_equal(decode_brush(item), want)


def test_data_field_prompt_refcoco_style(client, model_dir):
    image = picture(30, 50, 4)
    task = {"id": 5, "data": {"image": data_uri(image), "expression": "the leftmost square"}}
    (res,) = client.post("/predict", json={"tasks": [task], "label_config": REFCOCO}).get_json()["results"]
    want = expected_mask(model_dir, image, "the leftmost square")
    assert want.any()
    (item,) = res["result"]
    assert item["value"]["brushlabels"] == ["object"]
    assert np.array_equal(decode_brush(item), want)


def test_label_mapping_from_settings(model_dir, tmp_path):
    c, runtime = make_client(model_dir, tmp_path, label_prompts={"circle": "a round red blob"}, threshold=0.3)
    image = picture(36, 36, 5)
    (res,) = c.post("/predict", json={"tasks": [{"id": 1, "data": {"image": data_uri(image)}}], "label_config": BRUSH}).get_json()["results"]
    circles = [i for i in res["result"] if i["value"]["brushlabels"] == ["circle"]]
    want = expected_mask(model_dir, image, "a round red blob", 0.3)
    assert want.any() and len(circles) == 1  # the mapped phrase at THRESHOLD 0.3 draws a region
    assert np.array_equal(decode_brush(circles[0]), want)
    runtime.stop()


def test_polygons_when_the_config_asks(client):
    image = picture(64, 64, 6)
    (res,) = client.post("/predict", json={"tasks": [{"id": 1, "data": {"image": data_uri(image)}}], "label_config": POLYGON}).get_json()["results"]
    assert res["result"]  # "thing" draws a region on this picture with the tiny model: an empty answer fails
    for item in res["result"]:
        assert item["type"] == "polygonlabels" and item["value"]["polygonlabels"] == ["thing"]
        pts = np.array(item["value"]["points"])
        assert pts.ndim == 2 and pts.shape[1] == 2 and (pts >= 0).all() and (pts <= 100).all()


def test_empty_masks_give_no_region(model_dir, tmp_path):
    c, runtime = make_client(model_dir, tmp_path, threshold=1.0)  # nothing is ever above 1.0
    (res,) = c.post("/predict", json={"tasks": [{"id": 1, "data": {"image": data_uri(picture())}}], "label_config": BRUSH}).get_json()["results"]
    assert res["result"] == [] and res["score"] == 0.0
    runtime.stop()


@pytest.fixture
def label_studio_files(tmp_path):
    """A plain HTTP server standing in for Label Studio's /data/upload (serves files, 404s the rest)."""
    root = tmp_path / "ls"
    (root / "data" / "upload" / "1").mkdir(parents=True)
    picture(50, 40, 7).save(root / "data" / "upload" / "1" / "a.png")
    server = ThreadingHTTPServer(("127.0.0.1", 0), partial(SimpleHTTPRequestHandler, directory=str(root)))
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()


def test_bad_image_gets_empty_result_others_still_answered(model_dir, tmp_path, label_studio_files):
    c, runtime = make_client(model_dir, tmp_path, label_studio_url=label_studio_files, label_studio_api_key="secret-token")
    tasks = [{"id": 1, "data": {"image": "/data/upload/1/a.png"}},
             {"id": 2, "data": {"image": "/data/upload/1/missing.png"}},
             {"id": 3, "data": {"image": "data:image/png;base64,bm90IGFuIGltYWdl"}},
             {"id": 4, "data": {}}]
    resp = c.post("/predict", json={"tasks": tasks, "label_config": BRUSH})
    assert resp.status_code == 200
    results = resp.get_json()["results"]
    assert len(results) == 4
    assert results[0]["result"] and results[0]["result"][0]["original_width"] == 50
    assert [r["result"] for r in results[1:]] == [[], [], []]
    metrics = c.get("/metrics").data.decode()
    assert 'clipseg_errors_total{kind="image"} 3.0' in metrics
    assert 'clipseg_predict_tasks_total{outcome="ok"} 1.0' in metrics
    runtime.stop()


@pytest.mark.parametrize("raw,status", [("{not json", 400), ("[]", 400), ('{"tasks": 3}', 400),
                                        ('{"tasks": [1]}', 400), ('{"tasks": [], "params": 5}', 400)])
def test_malformed_predict_requests_get_400(client, raw, status):
    resp = client.post("/predict", data=raw, content_type="application/json")
    assert resp.status_code == status and resp.get_json()["error"]


def test_predict_without_config_or_setup_is_400(client):
    resp = client.post("/predict", json={"tasks": [{"id": 1, "data": {"image": "x"}}], "project": "99.1"})
    assert resp.status_code == 400 and "label_config" in resp.get_json()["error"]


def test_predict_uses_config_from_setup(client):
    client.post("/setup", json={"project": "12.5", "schema": BRUSH})
    resp = client.post("/predict", json={"tasks": [{"id": 1, "data": {"image": data_uri(picture())}}], "project": "12.5"})
    assert resp.status_code == 200 and len(resp.get_json()["results"]) == 1


def test_basic_auth_everywhere_but_health(model_dir, tmp_path):
    c, runtime = make_client(model_dir, tmp_path, basic_auth_user="ls", basic_auth_pass="s3cret")
    assert c.get("/health").status_code == 200
    for method, path in [("post", "/setup"), ("post", "/predict"), ("post", "/webhook"), ("get", "/metrics")]:
        assert getattr(c, method)(path, json={}).status_code == 401
    bad = {"Authorization": "Basic " + base64.b64encode(b"ls:wrong").decode()}
    good = {"Authorization": "Basic " + base64.b64encode(b"ls:s3cret").decode()}
    assert c.post("/setup", json={"schema": BRUSH}, headers=bad).status_code == 401
    assert c.post("/setup", json={"schema": BRUSH}, headers=good).status_code == 200
    assert c.get("/metrics", headers=good).status_code == 200
    runtime.stop()


def test_webhook_without_redis_is_acknowledged(client):
    resp = client.post("/webhook", json={"action": "ANNOTATION_CREATED", "annotation": {}, "task": {}, "project": {}})
    assert resp.status_code == 200 and resp.get_json()["status"] == "ignored"
    assert client.post("/webhook", json={"no": "action"}).status_code == 400


def test_webhook_to_corrections_store_and_training_trigger(model_dir, tmp_path, redis_url, redis_conn):
    from finetune.corrections import CorrectionStore
    from tests.fixtures.webhooks import annotation_event, brush_region, scene

    c, runtime = make_client(model_dir, tmp_path, redis_url=redis_url, finetune_every=100)
    jpg, mask = scene(64, 48, seed=1)
    event = annotation_event([brush_region(mask, "circle")], project_id=5,
                             data={"image": "data:image/jpeg;base64," + base64.b64encode(jpg).decode()})
    started = time.perf_counter()
    resp = c.post("/webhook", json=event)
    assert resp.status_code == 201 and resp.get_json()["status"] == "accepted"
    assert time.perf_counter() - started < 1.0
    assert c.post("/webhook", json=event).status_code == 201  # the same event again
    store = CorrectionStore(redis_conn)
    deadline = time.monotonic() + 10
    while (store.count("5") < 1 or runtime.inbox.pending()) and time.monotonic() < deadline:
        time.sleep(0.05)  # until both deliveries have left the spool
    assert runtime.inbox.counts() == {"pending": 0, "rejected": 0, "quarantined": 0}
    assert store.count("5") == 1  # delivered twice, stored once
    assert c.post("/webhook", json={"action": "PROJECT_UPDATED", "project": {"id": 5}}).get_json()["status"] == "ignored"
    first = c.post("/webhook", json={"action": "START_TRAINING", "project": {"id": 5}})
    assert first.status_code == 201 and first.get_json()["job_id"]
    second = c.post("/webhook", json={"action": "START_TRAINING", "project": {"id": 5}})
    assert second.status_code == 200 and second.get_json()["status"] == "active"
    assert second.get_json()["job_id"] == first.get_json()["job_id"]
    metrics = c.get("/metrics").data.decode()
    assert 'clipseg_corrections{project="5"} 1.0' in metrics and "clipseg_queue_depth 1.0" in metrics
    runtime.stop()


def test_metrics_prometheus_text(client):
    client.post("/predict", json={"tasks": [{"id": 1, "data": {"image": data_uri(picture())}}], "label_config": BRUSH})
    resp = client.get("/metrics")
    assert resp.status_code == 200 and resp.headers["Content-Type"].startswith("text/plain")
    text = resp.data.decode()
    for name in ("clipseg_predict_seconds_bucket", "clipseg_predict_tasks_total", "clipseg_model_ready 1.0"):
        assert name in text
