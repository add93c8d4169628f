"""Interactive-annotating context regions (issue 28): rectangles, clicks and brush strokes as LS sends them."""
import numpy as np

from backend.labelstudio.interactive import context_regions
from backend.labelstudio.rle import mask_to_rle


def test_rectangle_click_and_brush_become_masks_and_junk_is_skipped():
    stroke = np.zeros((40, 100), dtype=bool)
    stroke[5:10, 50:60] = True
    context = {"result": [
        {"type": "rectanglelabels", "original_width": 100, "original_height": 40,
         "value": {"x": 10, "y": 25, "width": 20, "height": 50, "rectanglelabels": ["cat"]}},
        {"type": "keypointlabels", "is_positive": False, "original_width": 100, "original_height": 40,
         "value": {"x": 50, "y": 50, "width": 1, "keypointlabels": ["cat"]}},
        {"type": "brushlabels", "original_width": 100, "original_height": 40,
         "value": {"format": "rle", "rle": mask_to_rle(stroke), "brushlabels": ["dog"]}},
        {"type": "textarea", "value": {"text": ["a cat"]}},
        {"type": "rectanglelabels", "value": {}},
    ]}
    box, click, brush = context_regions(context, 100, 40)
    expected = np.zeros((40, 100), dtype=bool)
    expected[10:30, 10:30] = True
    assert box.kind == "rectanglelabels" and box.label == "cat" and box.positive
    assert np.array_equal(box.mask, expected)
    assert not click.positive and click.mask[20, 50] and click.mask.sum() < 20  # a small disc at (50%, 50%)
    assert brush.label == "dog" and np.array_equal(brush.mask, stroke)
    half = context_regions(context, 50, 20)  # the image is shown at another size: the regions scale with it
    assert half[0].mask.sum() == 100 and np.array_equal(half[2].mask, stroke[::2, ::2])  # nearest
    assert context_regions(None, 10, 10) == [] and context_regions({"result": []}, 10, 10) == []
