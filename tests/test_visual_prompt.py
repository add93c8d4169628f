"""Visual prompts (issue 28): example-region engineering, embedding through each family's CLIP, text/visual mix."""
import numpy as np
import pytest
import torch

from clipseg_model.loading import load_model
from clipseg_model.visual_prompt import box_to_mask, encode_visual, engineer_prompt, mix, prompt_key


def _scene() -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(0)
    image = rng.integers(0, 255, size=(60, 80, 3), dtype=np.uint8)
    mask = np.zeros((60, 80), dtype=bool)
    mask[20:30, 40:60] = True
    return image, mask


def test_engineering_crops_to_the_region_and_dims_only_the_background():
    image, mask = _scene()
    crop = engineer_prompt(image, mask, "crop", margin=0.1)
    assert crop.shape == (14, 24, 3)  # 10 x 20 box, 2 px margin on every side
    assert np.array_equal(crop, image[18:32, 38:62])
    out = engineer_prompt(image, mask, "crop_blur_darken", margin=0.1)
    assert out.shape == crop.shape
    inside = mask[18:32, 38:62]
    assert np.array_equal(out[inside], crop[inside])  # the object is untouched
    assert out[~inside].astype(float).mean() < 0.7 * crop[~inside].astype(float).mean()  # background darkened
    assert engineer_prompt(image, mask, "none") is image
    with pytest.raises(ValueError, match="empty"):
        engineer_prompt(image, np.zeros_like(mask))
    with pytest.raises(ValueError, match="unknown"):
        engineer_prompt(image, mask, "sepia")


def test_box_mask_and_content_key():
    image, mask = _scene()
    assert np.array_equal(box_to_mask((60, 80), (40, 20, 60, 30)), mask)
    assert box_to_mask((60, 80), (-5, -5, 3, 2)).sum() == 6  # clipped to the image
    key = prompt_key(image, mask, "crop")
    assert key == prompt_key(image.copy(), mask.copy(), "crop")
    other = mask.copy()
    other[0, 0] = True
    assert len({key, prompt_key(image, other, "crop"), prompt_key(image, mask, "crop_blur_darken")}) == 3


def test_rd64_visual_prompt_equals_hf_conditional_pixel_values(tiny_model_factory):
    """Our vision-once decode with `encode_visual`'s embedding equals CLIPSegForImageSegmentation called with
    `conditional_pixel_values` (float32, atol 1e-4): the visual prompt conditions the decoder exactly as HF does."""
    model = load_model(tiny_model_factory("tiny-clipseg"), "cpu")
    s = model.config.image_size
    torch.manual_seed(3)
    pixels, example = torch.randn(1, 3, s, s), torch.randn(1, 3, s, s)
    with torch.no_grad():
        reference = model.hf(pixel_values=pixels, conditional_pixel_values=example).logits
        visual = encode_visual(model, example)
        ours = model.decode(model.encode_images(pixels), visual)
    assert visual.shape == (1, model.hf.config.projection_dim)
    assert torch.allclose(ours.reshape(reference.shape), reference, rtol=1e-4, atol=1e-4)


def test_film_decoder_decodes_a_visual_prompt_and_mix_interpolates(tiny_model_factory):
    model = load_model(tiny_model_factory("tiny-seed"), "cpu")
    s = model.config.image_size
    torch.manual_seed(4)
    pixels, examples = torch.randn(1, 3, s, s), torch.randn(2, 3, s, s)
    with torch.no_grad():
        visual = encode_visual(model, examples)
        text = model.encode_text(["the red circle"])
        assert visual.shape == (2, text.shape[1])  # same space as a phrase
        features = model.encode_images(pixels)
        only_text = model.decode(features, mix(text, visual, 0.0))
        assert torch.allclose(only_text, model.decode(features, text), atol=1e-5)
        only_visual = model.decode(features, mix(None, visual))
        assert torch.allclose(mix(text, visual, 1.0), visual.mean(0, keepdim=True))
        assert not torch.allclose(only_visual, only_text, atol=1e-3)
        assert torch.isfinite(only_visual).all()
    with pytest.raises(ValueError):
        mix(text, visual, 1.5)


@pytest.mark.parametrize("preset", ["tiny-seed", "tiny-clipseg"])
def test_exemplar_segmenter_caches_the_example_and_returns_an_image_sized_mask(tiny_model_factory, preset):
    from PIL import Image

    from clipseg_model.exemplar_segmenter import ExemplarSegmenter
    from clipseg_model.predictor import Segmenter

    image, mask = _scene()
    picture = Image.fromarray(image)
    seg = ExemplarSegmenter(Segmenter(load_model(tiny_model_factory(preset), "cpu")))
    first = seg.predict(picture, [(picture, mask)])
    assert first.mask.shape == (60, 80) and first.probability.shape == (60, 80)
    again = seg.predict(picture, [(picture, mask)], text="the red circle", visual_weight=0.5)
    assert seg.vision_passes == 1  # the example's crop was encoded once, then served from the cache
    assert not np.allclose(first.probability, again.probability)  # the phrase moved the result
    other = mask.copy()
    other[0:5, 0:5] = True
    seg.predict(picture, [(picture, mask), (picture, other)])
    assert seg.vision_passes == 2 and len(seg.cache) == 2
    with pytest.raises(ValueError):
        seg.predict(picture, [])
