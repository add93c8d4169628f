"""The automatic precision choice (clipseg_model.precision): a faster candidate whose masks disagree with fp32's is
refused, the choice is cached per machine and model, and cached features are keyed by precision."""
from __future__ import annotations

import copy

import pytest

from clipseg_model.feature_cache import FeatureCache, FrozenInputs
from clipseg_model.loading import load_model
from clipseg_model.precision import MIN_IOU, PRECISIONS, apply_precision, pick, probe_images
from clipseg_model.precision_choice import choose_precision, measure


@pytest.fixture(scope="module")
def model(tiny_model_factory):
    return load_model(str(tiny_model_factory("tiny-clipseg")), "cpu").eval()


def without_vision_layers(model):
    """A real candidate that is wrong: a copy of the model whose decoder reads the patch embeddings instead of the
    vision layers (no vision layer runs: faster, and the masks change)."""
    broken = copy.deepcopy(model)
    broken.read_layers = tuple(0 for _ in model.read_layers)
    return broken


def test_a_candidate_whose_masks_disagree_is_refused_and_fp32_is_served(model, tmp_path):
    choice = choose_precision(model, "auto", tmp_path, options=[(PRECISIONS["int8"], without_vision_layers)])
    assert choice.measured["int8"]["min_iou"] < MIN_IOU  # the probe saw the wrong masks
    assert choice.precision.name == "fp32"
    assert "rejected: int8 (IoU" in choice.reason
    assert not list(tmp_path.iterdir())  # an injected candidate set is never cached as this machine's choice


def test_the_same_computation_agrees_on_every_probe_mask(model):
    """The probe itself: fp32 against an fp32 copy agrees exactly, so a refusal above is the masks' doing."""
    measured = measure(model, [(PRECISIONS["bf16"].__class__("copy"), copy.deepcopy)], repeats=1)
    assert measured["copy"]["min_iou"] == 1.0


def test_pick_takes_the_fastest_agreeing_candidate():
    measured = {"fp32": {"speedup": 1.0, "min_iou": 1.0}, "bf16": {"speedup": 1.9, "min_iou": 0.995},
                "int8": {"speedup": 4.0, "min_iou": 0.98}, "int8+bf16": {"speedup": 1.02, "min_iou": 0.999}}
    name, reason = pick(measured)
    assert name == "bf16" and "1.90x" in reason and "int8 (IoU 0.9800" in reason and "int8+bf16" in reason
    assert pick({"fp32": measured["fp32"], "int8": measured["int8"]})[0] == "fp32"


def test_the_choice_is_cached_per_machine_and_model(model, tmp_path):
    first = choose_precision(model, "auto", tmp_path)
    files = list(tmp_path.glob("*.json"))
    assert len(files) == 1 and not first.cached
    again = choose_precision(model, "auto", tmp_path)
    assert again.cached and again.precision == first.precision and again.reason == first.reason
    choose_precision(model, "int8", tmp_path)  # another mode: another entry
    assert len(list(tmp_path.glob("*.json"))) == 2
    assert choose_precision(model, "fp32", tmp_path).precision.name == "fp32"  # set: nothing measured
    # int8+bf16, what a measured choice travels as in a pre-label run's spec, is taken as set too
    assert choose_precision(model, "int8+bf16", tmp_path).precision.name == "int8+bf16"
    assert len(list(tmp_path.glob("*.json"))) == 2
    with pytest.raises(ValueError, match="PRECISION"):
        choose_precision(model, "fp8", tmp_path)


def test_int8_quantises_only_frozen_linears_and_keeps_masks_close(model):
    import torch

    from torch.ao.nn.quantized.dynamic import Linear as DynamicLinear

    quantised = apply_precision(copy.deepcopy(model), PRECISIONS["int8"])
    vision = list(quantised.hf.clip.vision_model.encoder.modules())
    assert any(isinstance(m, DynamicLinear) for m in vision)
    assert not any(type(m) is torch.nn.Linear for m in vision)  # every frozen vision linear is int8
    decoder = list(quantised.hf.decoder.modules())
    assert any(type(m) is torch.nn.Linear for m in decoder) and not any(isinstance(m, DynamicLinear) for m in decoder)
    assert set(quantised.trainable_tensors()) == set(model.trainable_tensors())  # project states still fit


def test_feature_cache_key_changes_with_precision(model, tmp_path):
    cache = FeatureCache(tmp_path)
    image = probe_images(1, (64, 48))[0]
    fp32 = FrozenInputs(model, cache)
    bf16 = FrozenInputs(model, cache, precision=PRECISIONS["bf16"])
    assert fp32.fingerprint != bf16.fingerprint
    fp32.prepare([image])
    bf16.prepare([image])
    assert bf16.computed_images == 1  # bf16 did not take fp32's features from the shared cache
    assert len({p.parent.name for p in cache.files()}) == 2
    assert bf16.features([image]).layers[0].dtype != fp32.features([image]).layers[0].dtype or \
        not bf16.features([image]).layers[0].equal(fp32.features([image]).layers[0])
