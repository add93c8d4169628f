"""Training on cached frozen features (clipseg_model.feature_cache): the same losses as the full forward pass, the
right boundary when layers are unfrozen, a byte-bounded disk cache that later fine-tunes reuse."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from clipseg_model.feature_cache import FeatureCache, FrozenInputs, frozen_fingerprint
from clipseg_model.loading import load_model
from finetune.jobs import evaluate_on, train_candidate
from finetune.shapes import ShapesDataset


def _model(tiny_model_factory, preset: str, **changes):
    model = load_model(tiny_model_factory(preset), "cpu")
    if changes:
        model.config = model.config.replace(**changes)
        model.apply_freezing()
    return model


def _samples(size: int, n: int = 10):
    ds = ShapesDataset(n, seed=3, image_size=size)
    return [ds[i] for i in range(n)]


@pytest.mark.parametrize("preset,changes", [
    ("tiny-clipseg", {}),
    ("tiny-improved", {}),
    ("tiny-pixel", {}),  # the decoder reads the pixels too
    ("tiny-seed", {"unfreeze_last": 1}),  # boundary below the last layer: it trains on top of the cache
    ("tiny-clipseg", {"unfreeze_last": 2}),
    ("tiny-seed", {"train_embeddings": True, "train_text": True}),  # nothing frozen: pixels are the boundary
])
def test_frozen_then_trained_part_equals_encode_images(tiny_model_factory, preset, changes):
    model = _model(tiny_model_factory, preset, **changes).eval()
    s = model.config.image_size
    pixels = torch.randn(2, 3, s, s)
    with torch.no_grad():
        full = model.encode_images(pixels)
        split = model.encode_from_frozen(model.encode_frozen(pixels))
    assert len(full.layers) == len(split.layers)
    for a, b in zip(full.layers, split.layers):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("preset,changes", [("tiny-clipseg", {}), ("tiny-seed", {"unfreeze_last": 1}),
                                            ("tiny-improved", {"unfreeze_last": 2})])
def test_cached_training_has_the_same_loss_per_step(tiny_model_factory, tmp_path, preset, changes):
    """Issue 15: same seed, same samples: the loss of every step on cached features equals the full forward's."""
    size = _model(tiny_model_factory, preset).config.image_size
    samples = _samples(size)
    full = _model(tiny_model_factory, preset, **changes)
    losses_full = train_candidate(full, samples, steps=12, batch_size=4, lr=3e-3, seed=5)
    cached = _model(tiny_model_factory, preset, **changes)
    frozen = FrozenInputs(cached, FeatureCache(tmp_path / "features"))
    losses_cached = train_candidate(cached, samples, steps=12, batch_size=4, lr=3e-3, seed=5, frozen=frozen)
    np.testing.assert_allclose(losses_cached, losses_full, rtol=1e-4, atol=1e-5)
    assert losses_full[-1] < losses_full[0]  # it did learn
    assert frozen.computed_images == len({id(s.image) for s in samples})  # once per image, never per step
    # the trained models agree too (weights like attention key biases get only rounding noise as gradient, which
    # Adam normalises, so compare what the models compute)
    probe = torch.randn(2, 3, size, size)
    with torch.no_grad():
        torch.testing.assert_close(cached.eval()(probe, ["a", "b"]), full.eval()(probe, ["a", "b"]), rtol=1e-3, atol=1e-3)
    if changes.get("unfreeze_last"):
        layer = cached.unfreezable_layers()[-1]
        reference = load_model(tiny_model_factory(preset), "cpu").unfreezable_layers()[-1]
        assert any(not torch.equal(p, q) for p, q in zip(layer.parameters(), reference.parameters()))
    # evaluation on the cache equals the ordinary one
    a = evaluate_on(cached, samples, frozen, 0.5).per_sample
    b = evaluate_on(cached, samples, None, 0.5).per_sample
    assert [round(r["iou"], 4) for r in a] == [round(r["iou"], 4) for r in b]


def test_disk_cache_is_byte_bounded_and_reused(tiny_model_factory, tmp_path):
    model = _model(tiny_model_factory, "tiny-clipseg")
    samples = _samples(model.config.image_size, 6)
    probe = FrozenInputs(model, None)
    probe.prepare([samples[0].image])
    per_image = probe.nbytes
    cache = FeatureCache(tmp_path / "features", max_bytes=int(per_image * 3.5) + 3 * 1024)  # ~3 files fit
    first = FrozenInputs(model, cache)
    first.prepare([s.image for s in samples])
    assert first.computed_images == 6
    assert len(cache.files()) == 3 and cache.total_bytes <= cache.max_bytes
    # a later fine-tune of the same base model reuses what is still there; a different base model does not
    again = FrozenInputs(_model(tiny_model_factory, "tiny-clipseg"), cache)
    again.prepare([s.image for s in samples[3:]])
    assert again.computed_images == 0 and cache.hits == 3
    other = _model(tiny_model_factory, "tiny-clipseg")
    with torch.no_grad():
        next(p for p in other.parameters() if not p.requires_grad).add_(1.0)
    assert frozen_fingerprint(other) != first.fingerprint
    assert FrozenInputs(other, cache).fingerprint != first.fingerprint
    # unfreezing layers moves the boundary: another key
    assert frozen_fingerprint(_model(tiny_model_factory, "tiny-clipseg", unfreeze_last=1)) != first.fingerprint
