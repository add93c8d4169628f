"""Every speed-up of the inference path changes nothing (on tiny random models).

Already covered elsewhere and not repeated here: one HF call with K=3 vs our decode (test_model_family), P prompts
in one pass vs one at a time (test_model_family), batched images on the film-decoder (test_predictor), re-prompting
one image with a warm cache (test_predictor), bf16 on tiny-clipseg at IoU >= 0.9 (test_predictor).

Tolerances: float32 paths must agree to 1e-4 on logits / 1e-5 on probabilities (different batch shapes change the
summation order, nothing else); masks must be identical except for pixels within 1e-4 of the threshold. bf16 is
lossy by design: on these tiny random models we require mask IoU >= 0.9 per mask and >= 0.95 on average, and
probabilities within 0.01 on average (the full-size check, IoU >= 0.99, is row c of
`clipseg bench`).
"""
from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from clipseg_model.loading import load_model
from clipseg_model.predictor import Segmenter

TINY = ["tiny-seed", "tiny-improved", "tiny-pixel", "tiny-clipseg"]
PHRASES = ["a red circle", "the left square", "blue", "the bigger shape on the right", "sky", "x"]


def _images(sizes, seed=0):
    rng = np.random.default_rng(seed)
    return [Image.fromarray(rng.integers(0, 255, (h, w, 3), dtype=np.uint8)) for w, h in sizes]


def _same_masks(a, b, threshold=0.5):
    """Masks equal wherever the probability is not within 1e-4 of the threshold."""
    clear = np.abs(a.probability - threshold) > 1e-4
    return np.array_equal(a.mask[clear], b.mask[clear])


@pytest.fixture(scope="module")
def clipseg(tiny_model_factory):
    return load_model(tiny_model_factory("tiny-clipseg"), "cpu")


@pytest.mark.parametrize("k", [1, 2, 6])
def test_predictor_logits_equal_hf_ordinary_call(clipseg, k):
    """Segmenter (truncated single vision pass, text cache, chunked decode) == CLIPSegForImageSegmentation called with
    the image repeated K times and K prompts padded to max_length, as transformers' docs show. K=1 covers the
    batch-of-one squeeze; K=6 with 4 prompts per pass covers chunking."""
    seg = Segmenter(clipseg, max_prompts_per_pass=4)
    (image,) = _images([(50, 40)], seed=k)
    prompts = PHRASES[:k]
    (ours,) = seg.logits([image], [prompts])
    pixels = clipseg.preprocess([image])
    tokens = clipseg.tokenizer(prompts, padding="max_length", max_length=77, return_tensors="pt")
    with torch.no_grad():
        reference = clipseg.hf(input_ids=tokens["input_ids"], attention_mask=tokens["attention_mask"],
                               pixel_values=pixels.expand(k, -1, -1, -1)).logits
    reference = reference.reshape(k, *reference.shape[-2:])
    assert ours.shape == reference.shape
    assert torch.allclose(ours, reference, rtol=1e-4, atol=1e-4)


def test_two_images_with_mixed_prompts_equal_hf(clipseg):
    """Prompt p looks at image index[p]: the expanded features equal HF's one-image-per-prompt call."""
    seg = Segmenter(clipseg)
    images = _images([(64, 64), (30, 70)], seed=3)
    groups = [PHRASES[:2], PHRASES[2:5]]
    ours = torch.cat(seg.logits(images, groups))
    pixels = clipseg.preprocess(images)
    per_prompt = torch.cat([pixels[i : i + 1].expand(len(g), -1, -1, -1) for i, g in enumerate(groups)])
    flat = [p for g in groups for p in g]
    tokens = clipseg.tokenizer(flat, padding=True, return_tensors="pt")
    with torch.no_grad():
        reference = clipseg.hf(**tokens, pixel_values=per_prompt).logits
    assert torch.allclose(ours, reference, rtol=1e-4, atol=1e-4)


def test_vision_pass_stops_at_the_deepest_layer_read(clipseg):
    """Layers after max(read_layers) never run, and each image runs the tower once whatever the prompt count."""
    layers = clipseg.hf.clip.vision_model.encoder.layers
    calls = [0] * len(layers)
    handles = [layer.register_forward_hook(lambda *_a, i=i: calls.__setitem__(i, calls[i] + 1)) for i, layer in enumerate(layers)]
    try:
        Segmenter(clipseg).predict(_images([(40, 40)])[0], PHRASES)
    finally:
        for h in handles:
            h.remove()
    depth = max(clipseg.read_layers)
    assert depth < len(layers)
    assert calls == [1] * depth + [0] * (len(layers) - depth)


@pytest.mark.parametrize("preset", TINY)
def test_caches_change_nothing_over_a_session(tiny_model_factory, preset):
    """A sequence of requests with repeated images and phrases: cached segmenter == one with no caches at all."""
    model = load_model(tiny_model_factory(preset), "cpu")
    cached = Segmenter(model)
    uncached = Segmenter(model, text_cache_entries=0, feature_cache_bytes=0)
    a, b = _images([(48, 36), (20, 60)], seed=5)
    session = [(a, PHRASES[:2]), (b, PHRASES[1:3]), (a, [PHRASES[2], PHRASES[0]]), (a, PHRASES[3:4]), (b, PHRASES[:1])]
    for image, prompts in session:
        for x, y in zip(cached.predict(image, prompts), uncached.predict(image, prompts)):
            assert np.allclose(x.probability, y.probability, atol=1e-5)
            assert _same_masks(x, y)
    assert cached.feature_cache.hits >= 3 and cached.text_cache.hits >= 3
    assert len(uncached.feature_cache) == 0 and len(uncached.text_cache) == 0


@pytest.mark.parametrize("preset", ["tiny-seed", "tiny-clipseg"])  # tiny-improved: test_predictor
def test_batched_images_equal_one_at_a_time(tiny_model_factory, preset):
    """predict_batch (one vision pass over all images, one decode over all prompts) == one image per call, including
    an image without prompts and a duplicated image (deduplicated by the feature cache)."""
    model = load_model(tiny_model_factory(preset), "cpu")
    images = _images([(40, 30), (25, 50), (64, 64)], seed=7)
    images.append(images[0])
    groups = [PHRASES[:2], [], PHRASES[2:5], PHRASES[5:]]
    batched = Segmenter(model).predict_batch(images, groups)
    for image, prompts, together in zip(images, groups, batched):
        alone = Segmenter(model).predict(image, prompts)
        assert len(alone) == len(together) == len(prompts)
        for x, y in zip(alone, together):
            assert np.allclose(x.probability, y.probability, atol=1e-5)
            assert _same_masks(x, y)


def test_chunked_decode_equals_one_pass(clipseg):
    images = _images([(32, 32), (40, 24)], seed=9)
    groups = [PHRASES, PHRASES[:3]]
    one = Segmenter(clipseg, max_prompts_per_pass=64).logits(images, groups)
    chunked = Segmenter(clipseg, max_prompts_per_pass=2).logits(images, groups)
    for x, y in zip(one, chunked):
        assert torch.allclose(x, y, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("preset", TINY)
def test_bf16_within_tolerance(tiny_model_factory, preset):
    model = load_model(tiny_model_factory(preset), "cpu")
    images = _images([(48, 48), (60, 30)], seed=11)
    groups = [PHRASES[:3], PHRASES[3:]]
    fp32 = Segmenter(model).predict_batch(images, groups)
    bf16 = Segmenter(model, bf16=True).predict_batch(images, groups)
    ious = []
    for x_group, y_group in zip(fp32, bf16):
        for x, y in zip(x_group, y_group):
            diff = np.abs(x.probability - y.probability)
            assert diff.mean() <= 0.01, diff.mean()  # single pixels of steep tiny random maps move by up to ~0.35
            union = (x.mask | y.mask).sum()
            ious.append(1.0 if union == 0 else (x.mask & y.mask).sum() / union)
    assert min(ious) >= 0.9 and np.mean(ious) >= 0.95, ious
    # the feature cache keys carry the precision: a bf16 and an fp32 result never mix
    seg = Segmenter(model, bf16=True)
    seg.predict(images[0], PHRASES[:1])
    assert seg.feature_cache._items and all(key[1] == "bf16" for key in seg.feature_cache._items)
