"""The predictor: original-size outputs, odd image modes, prompt edge cases, caches that change nothing."""
from __future__ import annotations

import io

import numpy as np
import pytest
import torch
from PIL import Image

from clipseg_model.image_io import to_display_rgb
from clipseg_model.loading import load_model
from clipseg_model.predictor import Segmenter


@pytest.fixture(scope="module")
def segmenter(tiny_model_factory):
    return Segmenter(load_model(tiny_model_factory("tiny-improved"), "cpu"), threshold=0.5)


def _exif_rotated(orientation: int, size=(40, 20)) -> Image.Image:
    image = Image.new("RGB", size, "white")
    image.paste((255, 0, 0), (0, 0, 10, 10))
    exif = Image.Exif()
    exif[0x0112] = orientation
    buf = io.BytesIO()
    image.save(buf, "JPEG", exif=exif.tobytes())
    return Image.open(io.BytesIO(buf.getvalue()))


def test_outputs_at_original_size(segmenter):
    image = Image.new("RGB", (123, 45), "blue")
    preds = segmenter.predict(image, ["a red circle", "the sky"])
    assert [p.prompt for p in preds] == ["a red circle", "the sky"]
    for p in preds:
        assert p.probability.shape == (45, 123) and p.probability.dtype == np.float32
        assert p.mask.shape == (45, 123) and p.mask.dtype == bool
        assert 0.0 <= p.probability.min() and p.probability.max() <= 1.0
        assert np.array_equal(p.mask, p.probability > 0.5)
        assert 0.0 <= p.score <= 1.0
        assert p.score == (pytest.approx(float(p.probability[p.mask].mean())) if p.mask.any() else 0.0)


@pytest.mark.parametrize("orientation", range(1, 9))
def test_exif_orientation_gives_displayed_size(segmenter, orientation):
    image = _exif_rotated(orientation)
    shown = to_display_rgb(image)
    expected = (40, 20) if orientation in (1, 2, 3, 4) else (20, 40)  # width, height as displayed
    assert shown.size == expected
    (pred,) = segmenter.predict(image, ["red"])
    assert pred.mask.shape == (expected[1], expected[0])


@pytest.mark.parametrize("mode", ["L", "RGBA", "P", "I;16", "CMYK", "LA", "1", "I", "F"])
def test_image_modes(segmenter, mode):
    base = Image.new("RGB", (30, 20), (200, 100, 50))
    if mode == "I;16":
        image = Image.fromarray(np.full((20, 30), 40000, dtype=np.uint16))
    elif mode == "P":
        image = base.convert("P", palette=Image.ADAPTIVE)
    else:
        image = base.convert(mode)
    shown = to_display_rgb(image)
    assert shown.mode == "RGB" and shown.size == (30, 20)
    if mode == "I;16":
        assert shown.getpixel((0, 0))[0] == round(40000 / 65535 * 255) or abs(shown.getpixel((0, 0))[0] - 155) <= 1
    (pred,) = segmenter.predict(image, ["thing"])
    assert pred.mask.shape == (20, 30)


def test_transparent_pixels_become_white():
    image = Image.new("RGBA", (4, 4), (0, 0, 0, 0))
    assert to_display_rgb(image).getpixel((1, 1)) == (255, 255, 255)


def test_empty_prompt_list(segmenter):
    assert segmenter.predict(Image.new("RGB", (10, 10)), []) == []
    out = segmenter.predict_batch([Image.new("RGB", (10, 10)), Image.new("RGB", (8, 8))], [[], ["a"]])
    assert out[0] == [] and len(out[1]) == 1 and out[1][0].mask.shape == (8, 8)


def test_long_unicode_and_empty_prompts(segmenter):
    long_prompt = "the small red circle on the far left " * 40  # far beyond 77 tokens
    prompts = [long_prompt, "die Katze links 🐱", "红色的圆", "", "   "]
    preds = segmenter.predict(Image.new("RGB", (32, 32), "red"), prompts)
    assert len(preds) == 5 and all(p.mask.shape == (32, 32) for p in preds)


def test_batched_images_equal_single_calls(segmenter):
    rng = np.random.default_rng(0)
    images = [Image.fromarray(rng.integers(0, 255, (h, w, 3), dtype=np.uint8)) for h, w in [(30, 40), (50, 20)]]
    prompts = [["a", "b c"], ["the left one"]]
    batched = segmenter.predict_batch(images, prompts)
    segmenter.feature_cache.clear()
    segmenter.text_cache.clear()
    for image, group, together in zip(images, prompts, batched):
        for prompt, pred in zip(group, together):
            (alone,) = segmenter.predict(image, [prompt])
            assert np.allclose(alone.probability, pred.probability, atol=1e-5)


def test_caches_hit_and_change_nothing(tiny_model_factory):
    seg = Segmenter(load_model(tiny_model_factory("tiny-clipseg"), "cpu"))
    image = Image.fromarray(np.random.default_rng(1).integers(0, 255, (40, 40, 3), dtype=np.uint8))
    cold = seg.predict(image, ["a red circle", "blue"])
    assert len(seg.feature_cache) == 1 and len(seg.text_cache) == 2
    hits = seg.feature_cache.hits
    warm = seg.predict(image, ["blue", "a red circle"])
    assert seg.feature_cache.hits == hits + 1
    # same numbers up to float32 batching noise (the decode batch is in another order)
    assert np.allclose(warm[1].probability, cold[0].probability, atol=1e-5)
    assert np.allclose(warm[0].probability, cold[1].probability, atol=1e-5)


def test_feature_cache_is_bounded(tiny_model_factory):
    seg = Segmenter(load_model(tiny_model_factory("tiny-clipseg"), "cpu"), feature_cache_bytes=20_000)
    for i in range(10):
        seg.predict(Image.new("RGB", (16, 16), (i * 20, 0, 0)), ["x"])
    assert seg.feature_cache.total_cost <= 20_000 and 0 < len(seg.feature_cache) < 10


def test_bf16_close_to_fp32(tiny_model_factory):
    model = load_model(tiny_model_factory("tiny-clipseg"), "cpu")
    image = Image.fromarray(np.random.default_rng(2).integers(0, 255, (48, 48, 3), dtype=np.uint8))
    fp32 = Segmenter(model).predict(image, ["a", "b"])
    bf16 = Segmenter(model, bf16=True).predict(image, ["a", "b"])
    assert len(fp32) == len(bf16) == 2
    for a, b in zip(fp32, bf16):
        # the probabilities, not the masks: a tiny random model's masks may be empty, which any answer would match
        assert a.probability.shape == b.probability.shape and a.probability.std() > 0
        assert np.abs(a.probability - b.probability).mean() < 0.01  # the full-size check is in `clipseg bench`
        assert (a.mask == b.mask).mean() >= 0.95


def test_swap_model_changes_version_and_clears_caches(tiny_model_factory):
    seg = Segmenter(load_model(tiny_model_factory("tiny-clipseg"), "cpu"))
    seg.predict(Image.new("RGB", (16, 16)), ["x"])
    other = load_model(tiny_model_factory("tiny-clipseg"), "cpu")
    other.version = "v2"
    seg.swap_model(other)
    assert seg.version == "v2" and len(seg.feature_cache) == 0 and len(seg.text_cache) == 0


def test_inference_mode_no_grad(segmenter):
    logits = segmenter.logits([Image.new("RGB", (16, 16))], [["x"]])[0]
    assert not logits.requires_grad and torch.is_inference(logits)


def test_concurrent_calls_are_merged_and_give_the_same_masks(tiny_model_factory):
    """Threads calling at once share model passes (fewer passes than calls) and get exactly their own answers."""
    import threading

    seg = Segmenter(load_model(tiny_model_factory("tiny-clipseg"), "cpu"), max_images_per_pass=4, merge_concurrent=True)
    rng = np.random.default_rng(7)
    jobs = [(Image.fromarray(rng.integers(0, 255, (24 + i, 30, 3), dtype=np.uint8)), [f"phrase {i}", "x"]) for i in range(12)]
    alone = [seg.predict(im, ps) for im, ps in jobs]
    seg.feature_cache.clear()
    seg.text_cache.clear()
    passes = seg.batches_run
    out: dict[int, list] = {}
    start = threading.Barrier(len(jobs))

    def call(i: int) -> None:
        start.wait()
        out[i] = seg.predict(*jobs[i])

    threads = [threading.Thread(target=call, args=(i,)) for i in range(len(jobs))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert sorted(out) == list(range(len(jobs)))
    assert seg.batches_run - passes < len(jobs), "concurrent calls should have shared passes"
    for i, preds in out.items():
        assert [p.prompt for p in preds] == jobs[i][1]
        for a, b in zip(preds, alone[i]):
            assert a.mask.shape == b.mask.shape and np.allclose(a.probability, b.probability, atol=1e-5)


def test_a_bad_call_fails_alone_when_merged(tiny_model_factory):
    """A call whose input breaks the model pass gets the error; calls merged with it still get their masks."""
    import threading

    seg = Segmenter(load_model(tiny_model_factory("tiny-clipseg"), "cpu"), merge_concurrent=True)
    results: dict[str, object] = {}
    start = threading.Barrier(6)

    def call(name: str, image: Image.Image) -> None:
        start.wait()
        try:
            results[name] = seg.predict(image, ["x"])
        except Exception as exc:  # noqa: BLE001 - recorded for the assertion
            results[name] = exc

    images = {"bad": Image.new("RGB", (0, 0)), **{f"good{i}": Image.new("RGB", (10 + i, 9)) for i in range(5)}}
    threads = [threading.Thread(target=call, args=item) for item in images.items()]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert isinstance(results["bad"], Exception)
    for i in range(5):
        (pred,) = results[f"good{i}"]
        assert pred.mask.shape == (9, 10 + i)


def test_cpu_default_runs_each_call_on_its_own(tiny_model_factory):
    seg = Segmenter(load_model(tiny_model_factory("tiny-clipseg"), "cpu"))
    assert seg.merge_concurrent is None and seg.model.device.type == "cpu"
    before = seg.batches_run
    for i in range(3):
        seg.predict(Image.new("RGB", (8, 8), (i, 0, 0)), ["x"])
    assert seg.batches_run - before == 3


def test_vision_batches_give_the_same_masks(tiny_model_factory):
    """Several images in one vision pass (the GPU default) equal one image per pass (the CPU default)."""
    model = load_model(tiny_model_factory("tiny-clipseg"), "cpu")
    rng = np.random.default_rng(11)
    images = [Image.fromarray(rng.integers(0, 255, (20 + 3 * i, 28, 3), dtype=np.uint8)) for i in range(5)]
    prompts = [["a", "b"], ["c"], [], ["d e"], ["f"]]
    one = Segmenter(model).predict_batch(images, prompts)
    many = Segmenter(model, vision_batch=4).predict_batch(images, prompts)
    assert Segmenter(model).vision_batch is None
    for a_list, b_list in zip(one, many):
        assert len(a_list) == len(b_list)
        for a, b in zip(a_list, b_list):
            assert np.allclose(a.probability, b.probability, atol=1e-5)
