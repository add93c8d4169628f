"""One prompt rule for both paths: the phrase a stored correction is trained with is the phrase /predict used for
that region, for every prompt source. Both paths run for real: /predict and /webhook through the Flask app with a
tiny model, real Redis, the spool and the background prediction recorder."""
from __future__ import annotations

import base64
import io
import time

import numpy as np
import pytest
from PIL import Image

from backend.http.app import create_app
from backend.labelstudio.prompts import PromptSettings
from backend.labelstudio.webhooks import reprompt
from backend.settings import Settings
from finetune.corrections import CorrectionStore
from tests.fixtures.webhooks import annotation_event, brush_region, textarea_region

IMAGE = '<Image name="image" value="$image"/>'
CAT_DOG = '<BrushLabels name="tag" toName="image"><Label value="cat"/><Label value="dog"/></BrushLabels>'


def view(*tags: str) -> str:
    return "<View>" + "".join(tags) + "</View>"


def typed(text: str | list[str], region_id: str | None = None, label: str | None = None) -> dict:
    """/predict's params.context when an annotator typed `text` (one line, or several: a restored draft's older
    lines first) for region `region_id` with `label` selected."""
    items = [{"id": region_id or "typed1", "from_name": "prompt", "to_name": "image", "type": "textarea",
              "value": {"text": text if isinstance(text, list) else [text]}}]
    if label is not None:
        items.append({"id": region_id, "from_name": "tag", "to_name": "image", "type": "brushlabels",
                      "value": {"brushlabels": [label]}})
    return {"result": items}


# (id, labeling config, settings, task data besides the image, /predict context, region label, per-region text,
#  annotation-level text, expected phrase)
CASES = [
    ("typed TextArea", view(IMAGE, CAT_DOG, '<TextArea name="prompt" toName="image" editable="true"/>'), {},
     {}, typed("the sleeping cat"), "cat", None, "the sleeping cat", "the sleeping cat"),
    # Label Studio 1.23.2 restores an unsubmitted draft: the TextArea holds the older line first, the one just typed
    # last; both paths must use the last (the rule took the first: the correction was trained as "the green circle").
    ("draft TextArea, newest line last", view(IMAGE, CAT_DOG, '<TextArea name="prompt" toName="image" editable="true"/>'),
     {}, {}, typed(["the green cat", "the red cat"]), "cat", None, ["the green cat", "the red cat"], "the red cat"),
    ("several typed lines", view(IMAGE, CAT_DOG, '<TextArea name="prompt" toName="image" editable="true"/>'), {},
     {}, typed(["the dog", "the sleeping cat", "the cat on the left"]), "cat", None,
     ["the dog", "the sleeping cat", "the cat on the left"], "the cat on the left"),
    ("per-region TextArea", view(IMAGE, CAT_DOG, '<TextArea name="prompt" toName="image" perRegion="true"/>'), {},
     {}, typed("the dog on the right", "r1", "dog"), "dog", "the dog on the right", None, "the dog on the right"),
    ("PROMPT_FIELD", view(IMAGE, CAT_DOG), {"prompt_field": "ref"},
     {"ref": "the big cat", "note": "ignore me"}, None, "cat", None, None, "the big cat"),
    ("$field shown by Header", view(IMAGE, '<Header value="$expression"/>',
                                    '<BrushLabels name="tag" toName="image"><Label value="person"/></BrushLabels>'), {},
     {"expression": "the man on the left"}, None, "person", None, None, "the man on the left"),
    ("$field shown by Text", view(IMAGE, '<Text name="caption" value="$caption"/>', CAT_DOG), {},
     {"caption": "a cat under the table"}, None, "cat", None, None, "a cat under the table"),
    ("label", view(IMAGE, CAT_DOG), {}, {}, None, "dog", None, None, "dog"),
    ("label with an alias", view(IMAGE, '<BrushLabels name="tag" toName="image"><Label value="Big dog" alias="d"/>'
                                        '</BrushLabels>'), {}, {}, None, "d", None, None, "Big dog"),
    ("mapped label", view(IMAGE, CAT_DOG), {"label_prompts": {"dog": "a sleeping dog"}},
     {}, None, "dog", None, None, "a sleeping dog"),
    # No config known where the annotation arrives (rows in NO_CONFIG): the rule runs with the settings alone.
    ("no config: PROMPT_FIELD", view(IMAGE, '<Header value="$caption"/>', CAT_DOG), {"prompt_field": "ref"},
     {"ref": "the big cat", "caption": "ignore me"}, None, "cat", None, None, "the big cat"),
    ("no config: mapped label", view(IMAGE, CAT_DOG), {"label_prompts": {"dog": "a sleeping dog"}},
     {}, None, "dog", None, None, "a sleeping dog"),
    ("no config: typed", view(IMAGE, CAT_DOG, '<TextArea name="prompt" toName="image" editable="true"/>'), {},
     {}, typed(["the green cat", "the red cat"]), "cat", None, ["the green cat", "the red cat"], "the red cat"),
]
# The webhook carries no `label_config` and reaches a server process that never saw the project (another gunicorn
# worker than the one /predict ran in): `region_prompt` gets config=None and must still give /predict's phrase.
NO_CONFIG = {c[0] for c in CASES if c[0].startswith("no config:")}


def jpeg_uri(seed: int) -> tuple[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    pixels = rng.integers(0, 255, (40, 56, 3), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, "JPEG")
    mask = np.zeros((40, 56), bool)
    mask[10:30, 8:40] = True
    return "data:image/jpeg;base64," + base64.b64encode(buf.getvalue()).decode(), mask


def wait_for(predicate, timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.05)


@pytest.fixture(scope="module")
def model_dir(tiny_model_factory):
    return tiny_model_factory("tiny-clipseg")


@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_stored_prompt_is_the_phrase_predict_used(case, model_dir, tmp_path, redis_url, redis_conn):
    case_id, config, settings, data, context, label, region_text, whole_text, expected = case
    app = create_app(Settings(model=str(model_dir), data_dir=tmp_path, redis_url=redis_url, finetune_every=1000,
                              **settings))
    runtime = app.extensions["clipseg_runtime"]
    client = app.test_client()
    webhook_app = app
    if case_id in NO_CONFIG:
        webhook_app = create_app(Settings(model=str(model_dir), data_dir=tmp_path / "other", redis_url=redis_url,
                                          finetune_every=1000, **settings))
    try:
        assert runtime.model.wait_ready(60)
        image, mask = jpeg_uri(seed=len(expected))
        task = {"id": 21, "data": {"image": image, **data}}
        resp = client.post("/predict", json={"tasks": [task], "project": "7.1700000000", "label_config": config,
                                             "params": {"context": context}})
        assert resp.status_code == 200
        assert runtime.recorder.flush(20)
        store = CorrectionStore(redis_conn)
        recorded = store.prediction("7", 21, label)
        assert recorded is not None, f"/predict made no region labelled {label!r}"
        predicted_phrase = recorded[1]["prompt"]
        assert predicted_phrase == expected

        # The annotator corrects the region and submits; Label Studio posts the annotation with the project's config.
        result = [brush_region(mask, label, "r1")]
        result[0]["original_width"], result[0]["original_height"] = 56, 40
        if region_text:
            result.append(textarea_region(region_text, "r1", 56, 40))
        if whole_text:
            lines = whole_text if isinstance(whole_text, list) else [whole_text]
            item = textarea_region(lines[0], "t9", 56, 40)
            item["value"]["text"] = lines
            result.append(item)
        event = annotation_event(result, project_id=7, task_id=21, annotation_id=31, data=task["data"])
        if case_id in NO_CONFIG:
            del event["project"]["label_config"]
        else:
            event["project"]["label_config"] = config
        assert webhook_app.test_client().post("/webhook", json=event).status_code == 201
        webhook_runtime = webhook_app.extensions["clipseg_runtime"]
        webhook_runtime.inbox.drain_once()
        wait_for(lambda: store.count("7") == 1)
        (sample,) = store.samples("7")
        assert sample.prompt == predicted_phrase
        assert sample.label == label and np.array_equal(sample.mask, mask)
        assert (webhook_runtime.configs.for_project("7") is None) == (case_id in NO_CONFIG)
    finally:
        runtime.stop()
        if webhook_app is not app:
            webhook_app.extensions["clipseg_runtime"].stop()


def test_webhook_of_a_project_never_set_up_uses_the_payloads_config(model_dir, tmp_path, redis_url, redis_conn):
    """No /setup or /predict of project 8 in this process: the image key and the phrase still come from the
    project's own config in the payload (a guess would take the first URL-looking value, `homepage`)."""
    config = view('<Image name="img" value="$picture"/>', '<Header value="$expression"/>',
                  CAT_DOG.replace('toName="image"', 'toName="img"'))
    app = create_app(Settings(model=str(model_dir), data_dir=tmp_path, redis_url=redis_url, finetune_every=1000))
    runtime = app.extensions["clipseg_runtime"]
    try:
        image, mask = jpeg_uri(seed=3)
        data = {"homepage": "https://example.invalid/page", "picture": image, "expression": "the cat in the box"}
        result = [brush_region(mask, "cat", "r1")]
        result[0].update(to_name="img", original_width=56, original_height=40)
        event = annotation_event(result, project_id=8, task_id=5, annotation_id=6, data=data)
        event["project"]["label_config"] = config
        assert app.test_client().post("/webhook", json=event).status_code == 201
        runtime.inbox.drain_once()
        store = CorrectionStore(redis_conn)
        wait_for(lambda: store.count("8") == 1)
        (sample,) = store.samples("8")
        assert sample.prompt == "the cat in the box"
        assert sample.load_image() == base64.b64decode(image.split(",", 1)[1])
    finally:
        runtime.stop()


def test_an_accepted_suggestion_keeps_the_phrase_it_was_made_for(model_dir, tmp_path, redis_url, redis_conn):
    """Rule step 1b (issue 26): the annotator types "the sleeping cat", accepts the suggestion, then types "the dog"
    for another region and paints it. The TextArea's newest line is "the dog" now; the accepted region is still
    stored as "the sleeping cat" (its result item's `meta`, which Label Studio's editor keeps), the painted one as
    "the dog" — and a suggestion relabelled by the annotator is about something else: it takes the typed line."""
    config = view(IMAGE, CAT_DOG, '<TextArea name="prompt" toName="image" editable="true"/>')
    app = create_app(Settings(model=str(model_dir), data_dir=tmp_path, redis_url=redis_url, finetune_every=1000,
                              precision="fp32"))
    runtime = app.extensions["clipseg_runtime"]
    client = app.test_client()
    try:
        assert runtime.model.wait_ready(60)
        image, mask = jpeg_uri(seed=5)
        task = {"id": 22, "data": {"image": image}}
        body = client.post("/predict", json={"tasks": [task], "project": "9.1700000000", "label_config": config,
                                             "params": {"context": typed("the sleeping cat", label="cat")}}).get_json()
        (suggestion,) = [r for r in body["results"][0]["result"] if r["type"] == "brushlabels"]
        assert suggestion["meta"] == {"prompt": "the sleeping cat", "prompt_label": "cat"}

        painted = brush_region(~mask, "dog", "r2")
        relabelled = {**suggestion, "id": "r3", "value": {**suggestion["value"], "brushlabels": ["dog"]}}
        typed_now = textarea_region("the sleeping cat", "t9", 56, 40)
        typed_now["value"]["text"] = ["the sleeping cat", "the dog"]
        painted["original_width"], painted["original_height"] = 56, 40
        event = annotation_event([suggestion, painted, relabelled, typed_now], project_id=9, task_id=22,
                                 annotation_id=32, data=task["data"])
        event["project"]["label_config"] = config
        assert client.post("/webhook", json=event).status_code == 201
        runtime.inbox.drain_once()
        store = CorrectionStore(redis_conn)
        wait_for(lambda: store.count("9") == 1)
        (stored,) = store.annotations("9")
        by_key = {r["key"]: (r["prompt"], r["source"]) for r in stored.regions}
        assert by_key == {suggestion["id"]: ("the sleeping cat", "suggestion"), "r2": ("the dog", "typed"),
                          "r3": ("the dog", "typed")}
        # Re-resolving after a settings change (`clipseg corrections --reprompt`) keeps the rule: meta is stored.
        assert reprompt(stored.context, list(by_key), None, PromptSettings()) == list(by_key.values())
    finally:
        runtime.stop()
