"""Visual prompts at /predict (issue 28, build 2): a box, clicks or a smart brush stroke in the interactive context
is the example; the answer is that object, or with a tool marked similar="true" every object like it. The scope
rule is checked on known masks; the wiring through the Flask app with a real tiny model, whose threshold is set so
low that its mask is the whole image (so what comes back is exactly what the scope leaves)."""
from __future__ import annotations

import base64
import io

import numpy as np
import pytest
from PIL import Image

from backend.http.app import create_app
from backend.labelstudio.interactive import ContextRegion
from backend.labelstudio.results import result_to_mask
from backend.serving.visual_prompts import scope_mask
from backend.settings import Settings

W, H = 80, 60


def region(kind: str, box: tuple[int, int, int, int], positive: bool = True) -> ContextRegion:
    mask = np.zeros((H, W), bool)
    x0, y0, x1, y1 = box
    mask[y0:y1, x0:x1] = True
    return ContextRegion(kind, "cat", positive, mask, "box")


def two_blobs() -> np.ndarray:
    mask = np.zeros((H, W), bool)
    mask[10:30, 5:25] = True  # left object
    mask[20:50, 45:75] = True  # right object
    return mask


def test_the_scope_is_the_object_the_example_marks_unless_similar():
    mask = two_blobs()
    left_box = region("rectanglelabels", (0, 5, 20, 35))  # covers most of the left blob, not all of it
    got = scope_mask(mask, [left_box], [], similar=False)
    assert got[10:30, 5:20].all() and not got[:, 20:].any()  # the left object, clipped to the box
    click = region("keypointlabels", (50, 30, 52, 32))
    assert np.array_equal(scope_mask(mask, [click], [], similar=False), mask & (np.arange(W) >= 45)[None, :])
    assert np.array_equal(scope_mask(mask, [click], [], similar=True), mask)  # every object like it
    negative = region("keypointlabels", (10, 15, 12, 17), positive=False)
    assert np.array_equal(scope_mask(mask, [click], [negative], similar=True), mask & (np.arange(W) >= 45)[None, :])
    assert not scope_mask(mask, [region("keypointlabels", (30, 52, 32, 54))], [], similar=False).any()  # on nothing
    assert not scope_mask(np.zeros((H, W), bool), [click], [], similar=True).any()


CONFIG = ('<View><Image name="image" value="$image"/>'
          '<BrushLabels name="tag" toName="image"><Label value="cat"/><Label value="dog"/></BrushLabels>'
          '<RectangleLabels name="box" toName="image" smart="true"><Label value="dog"/></RectangleLabels>'
          '<KeyPointLabels name="all" toName="image" smart="true" similar="true"><Label value="dog"/></KeyPointLabels>'
          '<TextArea name="prompt" toName="image" editable="true"/></View>')


def png_uri() -> str:
    pixels = np.random.default_rng(0).integers(0, 255, (H, W, 3), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, "PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


@pytest.fixture
def client(tiny_model_factory, tmp_path):
    settings = Settings(model=str(tiny_model_factory("tiny-clipseg")), data_dir=tmp_path, precision="fp32",
                        threshold=0.0)
    app = create_app(settings)
    runtime = app.extensions["clipseg_runtime"]
    assert runtime.model.wait_ready(60)
    yield app.test_client()
    runtime.stop()


def predict(client, *items) -> list[dict]:
    body = client.post("/predict", json={"tasks": [{"id": 1, "data": {"image": png_uri()}}], "project": "4.17",
                                         "label_config": CONFIG, "params": {"context": {"result": list(items)}}})
    assert body.status_code == 200, body.get_data(as_text=True)
    return body.get_json()["results"][0]["result"]


def box_item(x: float, y: float, w: float, h: float) -> dict:
    return {"id": "b1", "from_name": "box", "to_name": "image", "type": "rectanglelabels", "original_width": W,
            "original_height": H, "value": {"x": x, "y": y, "width": w, "height": h, "rectanglelabels": ["dog"]}}


def click_item(x: float, y: float, positive: bool = True) -> dict:
    return {"id": f"k{x}", "from_name": "all", "to_name": "image", "type": "keypointlabels", "original_width": W,
            "original_height": H, "is_positive": positive, "value": {"x": x, "y": y, "keypointlabels": ["dog"]}}


def test_a_box_gives_a_mask_of_the_object_in_it_labelled_like_the_box(client):
    (item,) = predict(client, box_item(25, 50, 50, 25))  # x 20..60, y 30..45 of 80x60
    assert item["type"] == "brushlabels" and item["value"]["brushlabels"] == ["dog"]
    expected = np.zeros((H, W), bool)
    expected[30:45, 20:60] = True
    got = result_to_mask(item, W, H)
    assert np.array_equal(got, expected), (got.sum(), expected.sum(), np.argwhere(got ^ expected)[:5])  # the whole-image mask, scoped to the box
    assert item["meta"] == {"prompt": "dog", "prompt_label": "dog"}  # a correction of it is trained as "dog"


def test_a_click_with_the_similar_tool_gives_everything_like_it_and_a_typed_phrase_mixes_in(client):
    (item,) = predict(client, click_item(50, 50))
    assert result_to_mask(item, W, H).all()  # every object like the example: here the whole image
    typed = {"id": "t1", "from_name": "prompt", "to_name": "image", "type": "textarea",
             "value": {"text": ["the spotted dog"]}}
    (mixed,) = predict(client, click_item(50, 50), typed)
    assert mixed["meta"]["prompt"] == "the spotted dog" and mixed["value"]["brushlabels"] == ["dog"]
    assert mixed["score"] != item["score"]  # the phrase moved the probabilities
    # A negative click on the (one, whole-image) object removes it: nothing comes back rather than a wrong mask.
    assert predict(client, click_item(50, 50), click_item(10, 10, positive=False)) == []


def test_text_only_context_still_takes_the_text_path(client):
    typed = {"id": "t1", "from_name": "prompt", "to_name": "image", "type": "textarea", "value": {"text": ["a cat"]}}
    (item,) = predict(client, typed)
    assert item["meta"] == {"prompt": "a cat", "prompt_label": "cat"} and result_to_mask(item, W, H).all()
