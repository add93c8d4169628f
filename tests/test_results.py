"""Mask ↔ Label Studio result items."""
from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays
from label_studio_sdk.label_interface import LabelInterface

from backend.labelstudio.results import mask_to_brush, mask_to_polygons, mask_to_results, region_id, result_to_mask

CONFIG = """<View>
  <Image name="image" value="$image"/>
  <BrushLabels name="tag" toName="image"><Label value="cat"/></BrushLabels>
  <PolygonLabels name="poly" toName="image"><Label value="cat"/></PolygonLabels>
</View>"""


def rect_mask(h=60, w=90, y0=10, y1=40, x0=20, x1=70) -> np.ndarray:
    m = np.zeros((h, w), bool)
    m[y0:y1, x0:x1] = True
    return m


def test_brush_item_shape():
    item = mask_to_brush(rect_mask(), from_name="tag", to_name="image", label="cat", score=0.87)
    assert item["type"] == "brushlabels" and item["from_name"] == "tag" and item["to_name"] == "image"
    assert (item["original_width"], item["original_height"], item["image_rotation"]) == (90, 60, 0)
    assert item["value"]["format"] == "rle" and item["value"]["brushlabels"] == ["cat"]
    assert all(isinstance(v, int) and 0 <= v <= 255 for v in item["value"]["rle"])
    assert item["score"] == pytest.approx(0.87) and isinstance(item["id"], str) and len(item["id"]) == 10
    assert LabelInterface(CONFIG).validate_prediction({"result": [item]})


def test_empty_mask_gives_no_region():
    empty = np.zeros((20, 30), np.uint8)
    assert mask_to_brush(empty, from_name="t", to_name="i", label="x") is None
    assert mask_to_polygons(empty, from_name="t", to_name="i", label="x") == []
    assert mask_to_results(empty, kind="brush", from_name="t", to_name="i", label="x") == []


def test_mask_dtypes_accepted():
    for m in (rect_mask(), rect_mask().astype(np.uint8), rect_mask().astype(np.float32) * 0.7, rect_mask() * 255):
        item = mask_to_brush(m, from_name="t", to_name="i", label="x")
        assert np.array_equal(result_to_mask(item, 90, 60), rect_mask())
    with pytest.raises(ValueError):
        mask_to_brush(np.zeros((2, 3, 4)), from_name="t", to_name="i", label="x")


@settings(max_examples=60, deadline=None)
@given(arrays(np.bool_, st.tuples(st.integers(1, 40), st.integers(1, 40))))
def test_brush_round_trip_is_exact(mask):
    item = mask_to_brush(mask, from_name="t", to_name="i", label="x")
    if not mask.any():
        assert item is None
        return
    height, width = mask.shape
    back = result_to_mask(item, width, height)
    assert back.dtype == np.bool_ and back.shape == mask.shape
    assert np.array_equal(back, mask)


@settings(max_examples=60, deadline=None)
@given(
    h=st.integers(8, 80),
    w=st.integers(8, 80),
    data=st.data(),
)
def test_polygon_of_rectangle_round_trips(h, w, data):
    y0 = data.draw(st.integers(0, h - 3))
    y1 = data.draw(st.integers(y0 + 3, h))
    x0 = data.draw(st.integers(0, w - 3))
    x1 = data.draw(st.integers(x0 + 3, w))
    mask = rect_mask(h, w, y0, y1, x0, x1)
    (item,) = mask_to_polygons(mask, from_name="poly", to_name="image", label="cat", min_area=1)
    points = np.asarray(item["value"]["points"])
    assert len(points) == 4 and points.min() >= 0 and points.max() <= 100
    back = result_to_mask(item, w, h)
    # Exact here; "nearly" would do, but pixel-centre vertices make rectangles come back unchanged.
    assert np.array_equal(back, mask)


def test_polygon_item_shape_and_validation():
    (item,) = mask_to_polygons(rect_mask(), from_name="poly", to_name="image", label="cat", score=0.5)
    assert item["type"] == "polygonlabels" and item["value"]["polygonlabels"] == ["cat"]
    assert (item["original_width"], item["original_height"]) == (90, 60) and item["value"]["closed"] is True
    assert item["score"] == 0.5 and item["id"]
    assert LabelInterface(CONFIG).validate_prediction({"result": [item]})


def test_one_polygon_per_component_above_min_area():
    mask = np.zeros((100, 100), np.uint8)
    mask[5:25, 5:25] = 1  # 400 px
    mask[50:90, 40:95] = 1  # 2200 px
    mask[96:98, 2:4] = 1  # 4 px speckle
    items = mask_to_polygons(mask, from_name="p", to_name="i", label="x", min_area=16)
    assert len(items) == 2
    assert len({it["id"] for it in items}) == 2
    union = np.zeros((100, 100), bool)
    for it in items:
        union |= result_to_mask(it, 100, 100)
    expected = mask.astype(bool)
    expected[96:98, 2:4] = False
    assert np.array_equal(union, expected)
    assert len(mask_to_polygons(mask, from_name="p", to_name="i", label="x", min_area=1)) == 3


def test_polygon_tolerance_simplifies_a_circle():
    yy, xx = np.mgrid[:200, :200]
    disk = (yy - 100) ** 2 + (xx - 100) ** 2 < 70**2
    fine = mask_to_polygons(disk, from_name="p", to_name="i", label="x", tolerance=0.5)[0]
    coarse = mask_to_polygons(disk, from_name="p", to_name="i", label="x", tolerance=3.0)[0]
    assert len(coarse["value"]["points"]) < len(fine["value"]["points"])
    for item in (fine, coarse):
        back = result_to_mask(item, 200, 200)
        iou = (back & disk).sum() / (back | disk).sum()
        assert iou > 0.97


def test_polygon_rasterises_at_any_size():
    (item,) = mask_to_polygons(rect_mask(), from_name="p", to_name="i", label="x")
    big = result_to_mask(item, 180, 120)
    assert big.shape == (120, 180)
    expected = rect_mask(120, 180, 20, 80, 40, 140)
    assert (big ^ expected).sum() <= 2 * (60 + 100) + 4  # at most the one-pixel border differs


def test_mask_to_results_dispatch():
    m = rect_mask()
    (brush,) = mask_to_results(m, kind="brush", from_name="t", to_name="i", label="x", score=0.3)
    assert brush["type"] == "brushlabels" and brush["score"] == 0.3
    (poly,) = mask_to_results(m, kind="polygonlabels", from_name="p", to_name="i", label="x")
    assert poly["type"] == "polygonlabels"
    with pytest.raises(ValueError):
        mask_to_results(m, kind="ellipse", from_name="t", to_name="i", label="x")


def test_result_to_mask_errors():
    item = mask_to_brush(rect_mask(), from_name="t", to_name="i", label="x")
    with pytest.raises(ValueError):
        result_to_mask(item, 10, 10)  # RLE size must match
    with pytest.raises(ValueError):
        result_to_mask({"type": "rectanglelabels", "value": {"x": 1}}, 10, 10)
    degenerate = {"type": "polygonlabels", "value": {"points": [[1, 1], [2, 2]]}}
    assert not result_to_mask(degenerate, 10, 10).any()


def test_region_ids_unique():
    assert len({region_id() for _ in range(1000)}) == 1000
