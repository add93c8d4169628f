"""Training with visual prompts mixed in (finetune.visual_training, TrainConfig.visual_prompt_*; issue 28 build 4),
on tiny random models (CPU)."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from clipseg_model.errors import ClipsegError
from clipseg_model.loading import load_model
from clipseg_model.visual_prompt import encode_visual, engineer_prompt
from finetune.batching import collate, make_loader
from finetune.recipe import TrainConfig
from finetune.samples import SampleList
from finetune.shapes import ShapesDataset
from finetune.training import train
from finetune.visual_training import (DRAW_KEY, SOURCE_KEY, VisualPromptDraws, VisualPromptRecipe, rotate_hue,
                                      visual_prompts)

SHAPES = dict(image_size=64, kinds=("color",), min_objects=2, max_objects=3)


def _recipe(ratio: float = 1.0, mix: float = 0.0, shots: int = 1) -> VisualPromptRecipe:
    return VisualPromptRecipe(ratio, mix, shots, "crop_blur_darken")


def test_shapes_samples_name_their_visual_concept():
    """A colour phrase's concept is its target's colour; position phrases only where the target's look is unique."""
    for s in ShapesDataset(20, seed=0, image_size=64):
        target = s.meta["objects"][s.meta["target"]]
        concept = s.meta["concept"]
        if s.meta["kind"] == "color":
            assert concept == target["color"]
        elif s.meta["kind"] == "shape":
            assert concept == target["shape"]
        elif concept is not None:
            assert concept == f"{target['color']} {target['shape']}"
            assert sum(o["color"] == target["color"] and o["shape"] == target["shape"]
                       for o in s.meta["objects"]) == 1


def test_draws_are_deterministic_and_follow_the_ratio():
    data = ShapesDataset(200, seed=0, **SHAPES)
    draws = VisualPromptDraws(data, _recipe(ratio=0.3, mix=0.5, shots=3), seed=0, epoch=0)
    first = [draws[i].meta[DRAW_KEY] for i in range(200)]
    assert first == [draws[i].meta[DRAW_KEY] for i in range(200)]  # a resumed run sees the same prompts
    assert first != [VisualPromptDraws(data, _recipe(0.3, 0.5, 3), seed=0, epoch=1)[i].meta[DRAW_KEY] for i in range(200)]
    used = [d for d in first if d["use"]]
    assert 0.2 < len(used) / 200 < 0.4
    assert {len(d["picks"]) for d in first} == {1, 2, 3}
    assert any(d["weight"] == 1.0 for d in used) and any(d["weight"] < 1.0 for d in used)
    assert DRAW_KEY not in data[0].meta  # the dataset itself is untouched


def test_a_batch_pairs_each_phrase_with_another_instance_of_its_concept(tiny_model_factory):
    """ratio 1: every phrase gets a crop, of a same-colour object on another image where the batch has one, else of
    its own target; a phrase no example stands for (concept None) keeps its text."""
    model = load_model(tiny_model_factory("tiny-seed"), "cpu")
    samples = [s for s in ShapesDataset(40, seed=0, **SHAPES)]
    marked = VisualPromptDraws(SampleList(samples), _recipe(), seed=0, epoch=0)
    batch = collate([marked[i] for i in range(len(samples))], model, visual=_recipe())
    prompts = batch.visual
    assert prompts is not None and len(prompts) == len(samples)
    assert prompts.index.tolist() == list(range(len(samples)))  # one crop each, in phrase order
    assert prompts.pixel_values.shape == (len(samples), 3, 64, 64)
    assert torch.all(prompts.weight == 1.0)  # mix 0: visual alone
    no_concept = collate([marked[0]], model, visual=_recipe())  # alone in its batch: its own target is the example
    assert no_concept.visual is not None and len(no_concept.visual) == 1
    position = next(s for s in ShapesDataset(60, seed=1, image_size=64, kinds=("position",))
                    if s.meta["concept"] is None)
    unmarked = VisualPromptDraws(SampleList([position]), _recipe(), 0, 0)[0]
    assert visual_prompts([unmarked], model, _recipe()) is None


def test_visual_rows_are_conditioned_on_the_example_embedding(tiny_model_factory):
    """The condition of a drawn phrase is the crop's embedding (w = 1) or the mix, not the text; other rows keep
    their text; the logits change only on the drawn rows."""
    model = load_model(tiny_model_factory("tiny-seed"), "cpu").eval()
    samples = list(ShapesDataset(6, seed=2, **SHAPES))
    marked = [VisualPromptDraws(SampleList(samples), _recipe(ratio=0.5), 0, 0)[i] for i in range(6)]
    batch = collate(marked, model, visual=_recipe(ratio=0.5))
    drawn = sorted(set(batch.visual.index.tolist()))
    assert 0 < len(drawn) < 6
    with torch.no_grad():
        text = model.encode_text(batch.phrases)
        cond = model.conditions(batch.phrases, batch.visual)
        visual = encode_visual(model, batch.visual.pixel_values)
        plain = model(batch.pixel_values, batch.phrases)
        mixed = model(batch.pixel_values, batch.phrases, visual=batch.visual)
    others = [p for p in range(6) if p not in drawn]
    assert torch.allclose(cond[drawn], visual, atol=1e-5)
    assert not torch.allclose(cond[drawn], text[drawn], atol=1e-3)
    assert torch.equal(cond[others], text[others])
    assert not torch.allclose(mixed[drawn], plain[drawn], atol=1e-4)
    assert torch.allclose(mixed[others], plain[others], atol=1e-5)


def test_a_training_step_with_visual_prompts_trains_the_film_on_the_example(tiny_model_factory, tmp_path):
    """One step with visual_prompt_ratio 1 (visual alone) differs from the text-only step from the same start: the
    FiLM's gradient came through the example embeddings. With the vision tower training, the visual rows' gradient
    reaches it too (the crop's pass runs with autograd)."""
    data = ShapesDataset(8, seed=3, **SHAPES)
    base = TrainConfig(batch_size=8, steps=1, lr=1e-2, log_every=1)
    runs = {}
    for name, cfg in {"text": base, "visual": base.replace(visual_prompt_ratio=1.0, visual_prompt_mix=0.0)}.items():
        torch.manual_seed(0)
        model = load_model(tiny_model_factory("tiny-seed"), "cpu")
        train(model, data, None, cfg, tmp_path / name, progress=False)
        runs[name] = {k: v.detach().clone() for k, v in model.film.state_dict().items()}
    assert any(not torch.allclose(runs["text"][k], runs["visual"][k]) for k in runs["text"])

    model = load_model(tiny_model_factory("tiny-seed"), "cpu")
    model.config = model.config.replace(unfreeze_last=1)
    model.apply_freezing()
    model.train()
    samples = [VisualPromptDraws(data, _recipe(), 0, 0)[i] for i in range(4)]
    batch = collate(samples, model, visual=_recipe())
    condition = model.conditions(batch.phrases, batch.visual)  # (P, D): the examples' embeddings (w = 1)
    condition.sum().backward()  # no image features involved: any tower gradient came through the crops
    grad = model.vision.encoder.layers[-1].mlp.fc1.weight.grad
    assert grad is not None and grad.abs().sum() > 0


def test_train_refuses_visual_prompts_on_a_word_attention_model(tiny_model_factory, tmp_path):
    model = load_model(tiny_model_factory("tiny-words"), "cpu")
    cfg = TrainConfig(batch_size=2, steps=1, visual_prompt_ratio=0.5)
    with pytest.raises(ClipsegError, match="word_attention"):
        train(model, ShapesDataset(4, seed=0, **SHAPES), None, cfg, tmp_path / "run", progress=False)


def test_make_loader_without_a_recipe_has_no_visual_prompts(tiny_model_factory):
    model = load_model(tiny_model_factory("tiny-seed"), "cpu")
    batch = next(iter(make_loader(ShapesDataset(4, seed=0, **SHAPES), model, 4, range(4))))
    assert batch.visual is None


def test_hue_jitter_turns_a_visual_only_phrase_and_its_examples_alike(tiny_model_factory):
    """visual_prompt_hue: a phrase conditioned on examples alone gets its image AND its example crops turned by one
    hue angle (the concept "this example's colour", not one of the named colours); an example from another scene
    is cut from that scene as it was, turned by the phrase's own angle; text and mixed phrases keep their images."""
    model = load_model(tiny_model_factory("tiny-seed"), "cpu")
    samples = [s for s in ShapesDataset(40, seed=0, **SHAPES)]
    recipe = VisualPromptRecipe(1.0, 0.0, 1, "crop_blur_darken", hue=90.0)
    marked = [VisualPromptDraws(SampleList(samples), recipe, seed=0, epoch=0)[i] for i in range(len(samples))]
    for original, sample in zip(samples, marked):
        angle = sample.meta[DRAW_KEY]["hue"]
        assert 0 < abs(angle) <= 90
        assert sample.meta[SOURCE_KEY] is original.image
        assert np.array_equal(np.asarray(sample.image), np.asarray(rotate_hue(original.image, angle)))
        assert not np.array_equal(np.asarray(sample.image), np.asarray(original.image))
    # two phrases about one colour: each one's crop is the OTHER scene's object, turned by its own angle
    p, q = next((i, j) for i in range(len(marked)) for j in range(len(marked))
                if i != j and marked[i].meta["concept"] == marked[j].meta["concept"])
    batch = collate([marked[p], marked[q]], model, visual=recipe)
    expected = [engineer_prompt(np.asarray(rotate_hue(marked[b].meta[SOURCE_KEY], marked[a].meta[DRAW_KEY]["hue"])),
                                marked[b].mask, "crop_blur_darken") for a, b in ((p, q), (q, p))]
    assert torch.allclose(batch.visual.pixel_values, model.preprocess([Image.fromarray(e) for e in expected]))
    # mixed with text (w < 1): the phrase still names the colour, so nothing turns; nor with hue 0
    for kept in (VisualPromptRecipe(1.0, 1.0, 1, "crop_blur_darken", hue=90.0), _recipe()):
        for original, sample in zip(samples, VisualPromptDraws(SampleList(samples), kept, 0, 0)):
            assert sample.image is original.image and SOURCE_KEY not in sample.meta
