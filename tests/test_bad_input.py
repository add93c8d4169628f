"""Bad input through the real Flask app: every hostile image, prompt and body gets a clear answer, never a 500.

The app is `create_app(Settings(...))` with a tiny random model (threshold 0, so every good task gets a
non-empty mask and "answered" is visible); images come as data: URIs or from a local HTTP server on 127.0.0.1.
Garbage RLE in webhooks goes to the spool's rejected/ directory instead of blocking the spool.
"""
from __future__ import annotations

import json
import logging
import time
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings as hyp_settings, strategies as st

from backend.http.app import create_app
from backend.labelstudio.results import result_to_mask
from backend.settings import Settings
from backend.labelstudio.rle import rle_to_mask
from tests.fixtures.bad_images import (
    HTML_ERROR_PAGE, ImageHost, corpus_bad, corpus_odd, data_uri, jpeg, png,
)
from tests.fixtures.webhooks import annotation_event, brush_region, scene

CONFIG = """<View>
  <Image name="image" value="$image"/>
  <BrushLabels name="tag" toName="image"><Label value="cat"/><Label value="dog"/></BrushLabels>
  <TextArea name="prompt" toName="image"/>
</View>"""
MAX_BODY = 1_000_000  # small on purpose: the 413 test posts just over it


@pytest.fixture(scope="module")
def host():
    with ImageHost() as server:
        yield server


@pytest.fixture(scope="module")
def app(tiny_model_factory, tmp_path_factory, host):
    settings = Settings(
        model=str(tiny_model_factory("tiny-clipseg")), device="cpu", threshold=0.0,
        data_dir=tmp_path_factory.mktemp("bad-input"), allowed_hosts=(f"127.0.0.1:{host.port}",),
        allow_private_networks=True, image_timeout=2.0, max_request_bytes=MAX_BODY,
    )
    flask_app = create_app(settings)
    runtime = flask_app.extensions["clipseg_runtime"]
    assert runtime.model.wait_ready(60), runtime.model.error
    yield flask_app
    runtime.stop()


@pytest.fixture
def client(app):
    return app.test_client()


def _predict(client, tasks, context=None, config=CONFIG):
    body = {"tasks": tasks, "label_config": config, "project": "1.1700000000", "params": {"context": context}}
    return client.post("/predict", json=body)


def _good(task_id: int = 1) -> dict:
    return {"id": task_id, "data": {"image": data_uri(png())}}


def _assert_answered(result: dict, size: tuple[int, int] | None = None) -> None:
    """A non-empty brush answer; with `size`, its mask is that (width, height)."""
    assert result["result"], "a good task got no regions"
    for item in result["result"]:
        assert item["type"] == "brushlabels"
        if size is not None:
            w, h = size
            assert (item["original_width"], item["original_height"]) == size
            assert result_to_mask(item, w, h).shape == (h, w)


# -- images ------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("name", sorted(corpus_bad()))
def test_bad_image_fails_only_its_own_task(client, caplog, name):
    data, status = corpus_bad()[name]
    tasks = [_good(1), {"id": 2, "data": {"image": data_uri(data)}}, _good(3)]
    with caplog.at_level(logging.ERROR, logger="backend.serving.predict_service"):
        response = _predict(client, tasks)
    assert response.status_code == 200, response.get_data(as_text=True)
    results = response.get_json()["results"]
    assert len(results) == 3
    _assert_answered(results[0], (64, 48))
    _assert_answered(results[2], (64, 48))
    assert results[1]["result"] == [] and results[1]["score"] == 0.0
    errors = [r.getMessage() for r in caplog.records if "task 2: no prediction" in r.getMessage()]
    assert errors and f"(status {status})" in errors[0], errors


@pytest.mark.parametrize("name", sorted(corpus_odd()))
def test_odd_image_is_segmented_at_displayed_size(client, name):
    data, size = corpus_odd()[name]
    response = _predict(client, [{"id": 7, "data": {"image": data_uri(data)}}])
    assert response.status_code == 200
    _assert_answered(response.get_json()["results"][0], size)


def test_images_from_a_misbehaving_host(client, host, caplog):
    """HTML error page as image/png and as text/html, a 500, a 404 and a good image, in one request."""
    tasks = [
        {"id": 1, "data": {"image": host.add("/lying.png", HTML_ERROR_PAGE, "image/png")}},
        {"id": 2, "data": {"image": host.add("/page.jpg", HTML_ERROR_PAGE, "text/html")}},
        {"id": 3, "data": {"image": host.add_status("/broken.jpg", 500, HTML_ERROR_PAGE)}},
        {"id": 4, "data": {"image": host.url("/missing.jpg")}},
        {"id": 5, "data": {"image": host.add("/good.jpg", jpeg(80, 60), "image/jpeg")}},
    ]
    with caplog.at_level(logging.ERROR, logger="backend.serving.predict_service"):
        response = _predict(client, tasks)
    assert response.status_code == 200
    results = response.get_json()["results"]
    assert [bool(r["result"]) for r in results] == [False, False, False, False, True]
    _assert_answered(results[4], (80, 60))
    log = "\n".join(r.getMessage() for r in caplog.records)
    for task_id, status in ((1, 415), (2, 415), (3, 502), (4, 404)):
        assert f"task {task_id}: no prediction" in log and f"(status {status})" in log


@pytest.mark.parametrize("data", [
    {}, {"image": ""}, {"image": "   "}, {"image": None}, {"image": 5}, {"image": ["a.png"]}, {"image": {"url": "x"}},
    {"other": data_uri(png())}, {"image": "data:image/png;base64"}, {"image": "data:image/png;base64,@@@"},
    {"image": "not a url at all"}, {"image": "ftp://127.0.0.1/x.png"},
])
def test_task_without_a_usable_image(client, data):
    response = _predict(client, [{"id": 1, "data": data}, _good(2)])
    assert response.status_code == 200, response.get_data(as_text=True)
    results = response.get_json()["results"]
    assert results[0]["result"] == [] and results[0]["score"] == 0.0
    _assert_answered(results[1])


def test_task_without_data_key_and_empty_task_list(client):
    response = _predict(client, [{"id": 1}, _good(2)])
    assert response.status_code == 200
    assert response.get_json()["results"][0]["result"] == []
    response = _predict(client, [])
    assert response.status_code == 200 and response.get_json()["results"] == []


# -- prompts -----------------------------------------------------------------------------------------------------

def _typed(text) -> dict:
    return {"result": [{"from_name": "prompt", "to_name": "image", "type": "textarea", "value": {"text": text}}]}


@pytest.mark.parametrize("item", [
    {"type": "brushlabels", "value": "x"}, {"type": "brushlabels", "value": ["a"]},
    {"type": "brushlabels", "from_name": ["tag"], "value": {"brushlabels": ["cat"]}},
    {"type": "brushlabels", "from_name": {"a": 1}, "value": {"brushlabels": ["zzz"]}},
    {"type": "brushlabels", "value": {"brushlabels": "cat"}}, {"type": "brushlabels", "value": {"brushlabels": [["cat"]]}},
    {"type": "textarea", "value": "x"}, {"type": "textarea", "value": {"text": {"a": 1}}},
    {"type": "textarea", "from_name": {"a": 1}, "value": {"text": ["x"]}}, {"type": ["x"]}, {"type": {"a": 1}},
], ids=range(11))
def test_malformed_context_items(client, item):
    """Interactive context is client input too: odd shapes fall back to the labels, never a 500."""
    response = _predict(client, [_good(1)], context={"result": [item, "junk", 5]})
    assert response.status_code == 200, response.get_data(as_text=True)
    _assert_answered(response.get_json()["results"][0], (64, 48))


@pytest.mark.parametrize("text", [
    ["ein Hund 🐕 und eine Katze 🐈"], ["猫"], ["\u202eevil rtl\u202c"], ["a" * 10_000], ["cat " * 2_500],
    ["\x00\x01\x02"], ["", "   ", "\n\t"], [""], ["🐈" * 3_000], ["cat", "cat", "CAT"], "a plain string",
])
def test_typed_prompts(client, text):
    response = _predict(client, [_good(1)], context=_typed(text))
    assert response.status_code == 200, response.get_data(as_text=True)
    _assert_answered(response.get_json()["results"][0], (64, 48))


def test_prompt_in_a_data_field(client):
    config = CONFIG.replace("<TextArea", '<Text name="e" value="$expression"/><TextArea')
    for phrase in ["🐕" * 100, "", "   ", "x" * 10_000, None, 17, ["a", "", "b"]]:
        task = {"id": 1, "data": {"image": data_uri(png()), "expression": phrase}}
        response = _predict(client, [task], config=config)
        assert response.status_code == 200, (phrase, response.get_data(as_text=True))
        _assert_answered(response.get_json()["results"][0])


# -- request bodies ----------------------------------------------------------------------------------------------

BAD_BODIES = [
    b"", b"{", b"not json", b"\xff\xfe\x00", b"[1, 2", b'{"tasks": [}', b"null", b"[]", b"42", b'"tasks"',
    json.dumps({"tasks": "x", "label_config": CONFIG}).encode(),
    json.dumps({"tasks": [1, 2], "label_config": CONFIG}).encode(),
    json.dumps({"tasks": [{"data": "x"}], "label_config": CONFIG}).encode(),
    json.dumps({"tasks": [], "label_config": 5}).encode(),
    json.dumps({"tasks": [], "label_config": CONFIG, "params": [1]}).encode(),
    json.dumps({"tasks": [], "label_config": CONFIG, "params": {"context": "x"}}).encode(),
    json.dumps({"label_config": CONFIG}).encode(),
    json.dumps({"tasks": [_good()]}).encode(),  # no config and no /setup for the project
    json.dumps({"tasks": [_good()], "project": "999.1"}).encode(),
]


@pytest.mark.parametrize("body", BAD_BODIES, ids=range(len(BAD_BODIES)))
def test_bad_predict_bodies_are_400(client, body):
    response = client.post("/predict", data=body, content_type="application/json")
    assert response.status_code == 400, response.get_data(as_text=True)
    assert response.get_json()["status"] == "error" and response.get_json()["error"]


@pytest.mark.parametrize("body", [
    b"", b"{", b"[]", b'"x"', b"null", json.dumps({}).encode(), json.dumps({"schema": 5}).encode(),
    json.dumps({"schema": "   "}).encode(), json.dumps({"schema": ["<View/>"]}).encode(),
])
def test_bad_setup_bodies_are_400(client, body):
    response = client.post("/setup", data=body, content_type="application/json")
    assert response.status_code == 400, response.get_data(as_text=True)


@pytest.mark.parametrize("body", [
    b"", b"{", b"[]", b"null", json.dumps({}).encode(), json.dumps({"action": 5}).encode(),
    json.dumps({"action": "START_TRAINING"}).encode(), json.dumps({"action": "START_TRAINING", "project": {}}).encode(),
])
def test_bad_webhook_bodies_are_400(client, body):
    response = client.post("/webhook", data=body, content_type="application/json")
    assert response.status_code == 400, response.get_data(as_text=True)


UNSUPPORTED_CONFIGS = [
    "<View>", "not xml", "<View></View>", "<View><Text name='t' value='$text'/></View>",
    "<View><Image name='image' value='$image'/><RectangleLabels name='r' toName='image'><Label value='a'/>"
    "</RectangleLabels></View>",
    "<View><Image name='image' value='$image'/><BrushLabels name='b' toName='other'><Label value='a'/></BrushLabels></View>",
    "<View><Image name='image' value='http://x/y.png'/><BrushLabels name='b' toName='image'><Label value='a'/></BrushLabels></View>",
    "<!DOCTYPE v [<!ENTITY x SYSTEM 'file:///etc/passwd'>]><View><Image name='image' value='$image'/>"
    "<BrushLabels name='b' toName='image'><Label value='&x;'/></BrushLabels></View>",
]


@pytest.mark.parametrize("config", UNSUPPORTED_CONFIGS, ids=range(len(UNSUPPORTED_CONFIGS)))
def test_unsupported_label_configs_are_400(client, config):
    setup = client.post("/setup", json={"project": "1.1", "schema": config})
    assert setup.status_code == 400, setup.get_data(as_text=True)
    assert "root:" not in setup.get_data(as_text=True)  # no file contents via external entities
    predict = _predict(client, [_good()], config=config)
    assert predict.status_code == 400, predict.get_data(as_text=True)


def test_oversized_body_is_413(client):
    body = json.dumps({"tasks": [{"id": 1, "data": {"image": "data:image/png;base64," + "A" * MAX_BODY}}]})
    for path in ("/predict", "/setup", "/webhook"):
        response = client.post(path, data=body, content_type="application/json")
        assert response.status_code == 413, (path, response.status_code)
        assert str(MAX_BODY) in response.get_json()["error"]


def test_wrong_methods_and_paths_are_4xx(client):
    assert client.get("/predict").status_code == 405
    assert client.put("/setup").status_code == 405
    assert client.get("/nope").status_code == 404
    assert client.post("/health").status_code == 405


# -- fuzzing -----------------------------------------------------------------------------------------------------

_json = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=20),
    lambda children: st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=8), children, max_size=4),
    max_leaves=20,
)
_keys = st.sampled_from(["tasks", "label_config", "schema", "project", "params", "context", "data", "image", "id",
                         "action", "annotation", "task", "result", "value", "text", "hostname", "access_token",
                         "type", "from_name", "to_name", "brushlabels", "expression"])
_words = st.sampled_from(["brushlabels", "textarea", "polygonlabels", "tag", "prompt", "image", "cat",
                          "ANNOTATION_CREATED", "START_TRAINING", "ANNOTATIONS_DELETED"])
# Bodies shaped like the real ones, with any value in any place: reaches deeper than random JSON.
_shaped = st.recursive(
    _json | _words | st.just(CONFIG) | st.just(data_uri(png(8, 8))),
    lambda children: st.lists(children, max_size=3) | st.dictionaries(_keys, children, max_size=5),
    max_leaves=25,
)
_FUZZ = hyp_settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture,
                                                                              HealthCheck.too_slow])


@_FUZZ
@given(path=st.sampled_from(["/predict", "/setup", "/webhook"]), body=_json | _shaped)
def test_fuzz_bodies_never_500(client, path, body):
    response = client.post(path, data=json.dumps(body), content_type="application/json")
    assert response.status_code < 500 or response.status_code == 503, (path, body, response.get_data(as_text=True))
    assert response.status_code != 503 or path == "/webhook"  # 503 only for "fine-tuning needs Redis"


@_FUZZ
@given(tasks=st.lists(st.dictionaries(_keys, _shaped, max_size=4), max_size=3), context=_shaped)
def test_fuzz_predict_envelope(client, tasks, context):
    body = {"tasks": tasks, "label_config": CONFIG, "params": {"context": context}}
    response = client.post("/predict", json=body)
    assert response.status_code in (200, 400), (body, response.get_data(as_text=True))
    if response.status_code == 200:
        assert len(response.get_json()["results"]) == len(tasks)


# -- RLE decoding ------------------------------------------------------------------------------------------------

_rle = st.lists(st.integers(0, 255), max_size=64) | st.lists(st.integers(-2**40, 2**40), max_size=16) | _json


@hyp_settings(max_examples=300, deadline=None)
@given(rle=_rle, width=st.integers(-2, 40), height=st.integers(-2, 40))
def test_fuzz_rle_decoding_is_clean(rle, width, height):
    """Garbage RLE raises ValueError (or decodes to the stated size) in both decoders; nothing else escapes."""
    item = {"type": "brushlabels", "value": {"format": "rle", "rle": rle, "brushlabels": ["cat"]}}
    for decode in (lambda: result_to_mask(item, width, height), lambda: rle_to_mask(rle, height, width)):
        try:
            mask = decode()
        except ValueError:
            continue
        assert mask.shape == (height, width) and mask.dtype == bool


def test_rle_with_a_huge_header_is_refused_without_allocating():
    """An RLE claiming 4 G values must not make the decoder allocate them (a 4 GB memset per webhook)."""
    item = {"type": "brushlabels", "value": {"format": "rle", "rle": [255] * 64}}
    started = time.perf_counter()
    with pytest.raises(ValueError):
        result_to_mask(item, 10, 10)
    with pytest.raises(ValueError):
        rle_to_mask([255] * 64, 10, 10)
    assert time.perf_counter() - started < 1.0


def test_valid_rle_still_round_trips():
    _, mask = scene(40, 30)
    item = brush_region(mask)
    assert np.array_equal(result_to_mask(item, 40, 30), mask)
    assert np.array_equal(rle_to_mask(item["value"]["rle"], 30, 40), mask)


# -- garbage corrections through the webhook ---------------------------------------------------------------------

@pytest.fixture
def redis_app(tiny_model_factory, tmp_path, redis_url, host):
    settings = Settings(model=str(tiny_model_factory("tiny-clipseg")), device="cpu", data_dir=tmp_path,
                        redis_url=redis_url, finetune_every=10_000, allowed_hosts=(f"127.0.0.1:{host.port}",),
                        allow_private_networks=True)
    flask_app = create_app(settings)
    yield flask_app
    flask_app.extensions["clipseg_runtime"].stop()


def _wait(predicate, timeout: float = 15.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.05)
    return predicate()


def _garbage_events(image_uri: str, good_rle: list[int], missing_url: str) -> list[dict]:
    """Correction webhooks that can never be ingested, each broken in another place."""
    def event(ann_id: int, **region_overrides) -> dict:
        region = {"id": "r1", "type": "brushlabels", "from_name": "tag", "to_name": "image",
                  "original_width": 40, "original_height": 30,
                  "value": {"format": "rle", "rle": good_rle, "brushlabels": ["cat"]}}
        region.update(region_overrides)
        return annotation_event([region], annotation_id=ann_id, task_id=ann_id, data={"image": image_uri})

    events = [
        event(201, value={"format": "rle", "rle": [255] * 40, "brushlabels": ["cat"]}),  # overflowing run value
        event(202, value={"format": "rle", "rle": [1, 2, 3], "brushlabels": ["cat"]}),  # ends mid-header
        event(203, value={"format": "rle", "rle": ["x", None], "brushlabels": ["cat"]}),  # not numbers
        event(204, value={"format": "rle", "rle": [-5, 999], "brushlabels": ["cat"]}),  # not bytes
        event(205, original_width=41),  # the RLE does not fit the stated size
        event(206, value={"format": "rle", "rle": "AAAA", "brushlabels": ["cat"]}),  # a string, not a list
        event(207, value=["not", "a", "dict"]),
        event(208, original_width=100_000, original_height=100_000),  # 10 G pixels
    ]
    events.append(annotation_event([brush_region(np.ones((30, 40), bool))], annotation_id=211, task_id=211,
                                   data=["not", "an", "object"]))
    events.append(annotation_event([brush_region(np.ones((30, 40), bool))], annotation_id=212, task_id=212,
                                   data={"image": missing_url}))  # Label Studio answers 404: gone for good
    broken = annotation_event([], annotation_id=209, task_id=209)
    broken["annotation"] = "not an object"
    events.append(broken)
    broken = annotation_event([], annotation_id=210, task_id=210)
    broken["annotation"]["id"] = {"nested": 1}
    events.append(broken)
    return events


@pytest.mark.slow
def test_garbage_rle_webhooks_are_rejected_not_retried(redis_app, host, tmp_path):
    """Each garbage event is refused at the webhook (4xx: a mask size its RLE or the limits contradict) or answered
    201 (spooled) and then moved to rejected/; none is retried, and a good event after them is stored."""
    from finetune.corrections import CorrectionStore

    client = redis_app.test_client()
    runtime = redis_app.extensions["clipseg_runtime"]
    image, mask = scene(40, 30)
    uri = data_uri(image, "image/jpeg")
    good = annotation_event([brush_region(mask)], annotation_id=300, task_id=300, data={"image": uri})
    garbage = _garbage_events(uri, brush_region(mask)["value"]["rle"], host.url("/deleted-upload.jpg"))
    accepted = 0
    for event in [*garbage, good]:
        response = client.post("/webhook", json=event)
        assert response.status_code in (201, 413, 422), response.get_data(as_text=True)
        accepted += response.status_code == 201
    assert 0 < accepted - 1 < len(garbage)  # some refused early, some only found out when ingested
    spool = Path(tmp_path) / "spool"
    store = CorrectionStore(runtime.redis)
    assert _wait(lambda: runtime.inbox.pending() == 0 and store.count("1") == 1), (
        runtime.inbox.pending(), runtime.inbox.last)
    assert [s.annotation_id for s in store.samples("1")] == [300]
    assert len(list((spool / "rejected").glob("*.json"))) == accepted - 1


@pytest.mark.parametrize("item", [
    {"type": "rectanglelabels", "value": {"x": "a", "y": 1}}, {"type": "rectanglelabels", "value": [1, 2]},
    {"type": "keypointlabels", "value": {"x": 1e308, "y": float("nan")}},
    {"type": "rectanglelabels", "value": {"x": 10, "y": 10, "width": -5, "height": 20}},
    {"type": "brushlabels", "original_width": 10**6, "original_height": 10**6, "value": {"rle": [1, 2, 3]}},
    {"type": "brushlabels", "value": {"rle": "not a list"}},
    {"type": "keypointlabels", "value": {"x": 50, "y": 50, "keypointlabels": {"a": 1}}, "is_positive": "no"},
], ids=range(7))
def test_malformed_visual_prompt_items(client, item):
    """Smart-tool regions (visual prompts, issue 28) are client input too: odd ones are skipped or answered, never
    a 500."""
    response = _predict(client, [_good(1)], context={"result": [item, "junk", 5]})
    assert response.status_code == 200, response.get_data(as_text=True)
