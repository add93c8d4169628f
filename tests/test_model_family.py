"""Both architectures behind one interface: shapes, FiLM, freezing, checkpoints, multi-prompt equivalence."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from clipseg_model.checkpoint import CONFIG_FILE, load_trainable_weights, save_checkpoint
from clipseg_model.config import PRESETS, ModelConfig
from clipseg_model.errors import CheckpointMismatchError, ModelNotAvailableError
from clipseg_model.film_decoder import FiLM
from clipseg_model.loading import load_model
from clipseg_model.losses import segmentation_loss

TINY = ["tiny-seed", "tiny-improved", "tiny-pixel", "tiny-words", "tiny-clipseg"]


@pytest.fixture(params=TINY)
def model(request, tiny_model_factory):
    return load_model(tiny_model_factory(request.param), "cpu")


def test_shapes_and_dtypes(model):
    s = model.config.image_size
    pixels = torch.randn(2, 3, s, s)
    features = model.encode_images(pixels)
    assert features.batch_size == 2 and all(h.dtype == torch.float32 for h in features.layers)
    text = model.encode_text(["a red circle", "the left square", "x"])
    assert text.shape[0] == 3 and text.dtype == torch.float32
    logits = model.decode(features, text, torch.tensor([0, 1, 1]))
    assert logits.shape == (3, model.config.output_size, model.config.output_size)
    assert logits.dtype == torch.float32 and torch.isfinite(logits).all()
    assert model.forward(pixels, ["a", "b"]).shape == (2, model.config.output_size, model.config.output_size)


def test_film_is_gamma_x_plus_beta():
    torch.manual_seed(0)
    film = FiLM(text_dim=8, d_model=6)
    x, t = torch.randn(3, 5, 6), torch.randn(3, 8)
    expected = (t @ film.gamma.weight.T + film.gamma.bias)[:, None, :] * x + (t @ film.beta.weight.T + film.beta.bias)[:, None, :]
    assert torch.allclose(film(x, t), expected, atol=1e-6)
    maps = x.transpose(1, 2).reshape(3, 6, 5, 1)  # the same numbers as channel-first maps (the pixel branch's form)
    assert torch.allclose(film.maps(maps, t), expected.transpose(1, 2).reshape(3, 6, 5, 1), atol=1e-6)


def test_seed_preset_matches_the_seed_design():
    seed = PRESETS["seed"].config
    assert (seed.image_size, seed.d_model, seed.output_size, seed.extract_layers, seed.learned_upsampler) == (224, 768, 224, (), False)
    assert seed.base_model == "openai/clip-vit-base-patch16" and seed.unfreeze_last == 0
    improved = PRESETS["improved"].config
    assert improved.extract_layers == (3, 6, 9) and improved.image_size == 352 and improved.learned_upsampler


def test_frozen_backbone_gets_no_gradient(model):
    model.train()
    s = model.config.image_size
    logits = model(torch.randn(2, 3, s, s), ["a", "b"])
    loss = segmentation_loss(logits, torch.rand(2, s, s) > 0.5, dice_weight=1.0)
    loss.backward()
    backbone = [p for m in model.backbone_modules() for p in m.parameters()]
    assert backbone and all(p.grad is None for p in backbone)
    assert all(not m.training for m in model.backbone_modules())  # dropout off in the frozen part
    trainable = list(model.trainable_parameters())
    # the alignment head (tiny-pixel) only learns from the alignment loss, which this forward does not compute
    alignment = {id(p) for n, p in model.named_parameters() if n.startswith(("align_head.", "align_logit_scale"))}
    assert trainable and all(p.grad is not None for p in trainable if id(p) not in alignment)
    assert {id(p) for p in trainable}.isdisjoint({id(p) for p in backbone})


def test_unfreeze_last_layers_trains_them(tiny_model_factory):
    model = load_model(tiny_model_factory("tiny-seed"), "cpu")
    before = {id(p) for p in model.trainable_parameters()}
    model.config = model.config.replace(unfreeze_last=1)
    model.apply_freezing()
    model.train()
    extra = [p for p in model.trainable_parameters() if id(p) not in before]
    assert extra, "the last vision layer should be trainable"
    s = model.config.image_size
    model(torch.randn(1, 3, s, s), ["a"]).sum().backward()
    assert all(p.grad is not None for p in extra)
    last = model.unfreezable_layers()[-1]
    assert all(p.requires_grad for p in last.parameters())
    assert not any(p.requires_grad for p in model.unfreezable_layers()[0].parameters())


def test_save_load_round_trip_is_identical(model, tmp_path):
    with torch.no_grad():
        for p in model.trainable_parameters():
            p.add_(torch.randn_like(p) * 0.1)  # make it differ from the init checkpoint
    s = model.config.image_size
    pixels = torch.randn(1, 3, s, s)
    with torch.no_grad():
        expected = model(pixels, ["the red one"])
    out = save_checkpoint(model, tmp_path / "ckpt", {"version": "v-test", "parent": "init"}, base_dir=model.config.base_model)
    meta = json.loads((out / CONFIG_FILE).read_text())
    assert meta["config"]["architecture"] == model.config.architecture and meta["metadata"]["version"] == "v-test"
    assert not list(tmp_path.glob(".ckpt.*")), "no temp directory left behind"
    loaded = load_model(out, "cpu")
    assert loaded.version == "v-test"
    with torch.no_grad():
        assert torch.equal(loaded(pixels, ["the red one"]), expected)


def test_wrong_architecture_is_refused_with_clear_message(tiny_model_factory):
    film = load_model(tiny_model_factory("tiny-seed"), "cpu")
    with pytest.raises(CheckpointMismatchError, match="'clipseg-rd64' model; it cannot be loaded into a 'film-decoder'"):
        load_trainable_weights(film, tiny_model_factory("tiny-clipseg"))
    improved = load_model(tiny_model_factory("tiny-improved"), "cpu")
    with pytest.raises(CheckpointMismatchError, match="does not fit|other shapes|lacks"):
        load_trainable_weights(improved, tiny_model_factory("tiny-seed"))


def test_corrupt_weights_are_refused(tiny_model_factory, tmp_path):
    import shutil

    bad = tmp_path / "bad"
    shutil.copytree(tiny_model_factory("tiny-seed"), bad)
    (bad / "trainable.safetensors").write_bytes(b"\x00garbage")
    with pytest.raises(CheckpointMismatchError, match="unreadable"):
        load_model(bad, "cpu")


def test_many_prompts_equal_one_at_a_time(model):
    """One vision pass for P prompts gives the same logits as P separate calls (float32: rtol 1e-4, atol 1e-4)."""
    s = model.config.image_size
    torch.manual_seed(1)
    pixels = torch.randn(2, 3, s, s)
    prompts = ["a red circle", "the leftmost square", "blue", "the bigger shape"]
    index = torch.tensor([0, 0, 1, 1])
    with torch.no_grad():
        together = model.decode(model.encode_images(pixels), model.encode_text(prompts), index)
        for i, prompt in enumerate(prompts):
            alone = model.decode(model.encode_images(pixels[index[i] : index[i] + 1]), model.encode_text([prompt]))
            assert torch.allclose(together[i], alone[0], rtol=1e-4, atol=1e-4), prompt


def test_layer_cut_matches_hf_clipseg(tiny_model_factory):
    """Our truncated single vision pass equals CLIPSegForImageSegmentation called the ordinary way."""
    model = load_model(tiny_model_factory("tiny-clipseg"), "cpu")
    hf = model.hf
    assert max(model.read_layers) < hf.config.vision_config.num_hidden_layers  # really cut
    s = model.config.image_size
    torch.manual_seed(2)
    pixels = torch.randn(1, 3, s, s)
    prompts = ["a cat", "the remote on the left", "blanket"]
    tokens = model.tokenizer(prompts, padding=True, return_tensors="pt")
    with torch.no_grad():
        reference = hf(input_ids=tokens["input_ids"], attention_mask=tokens["attention_mask"],
                       pixel_values=pixels.expand(3, -1, -1, -1)).logits
        ours = model.decode(model.encode_images(pixels), model.encode_text(prompts), torch.zeros(3, dtype=torch.long))
    assert torch.allclose(ours, reference, rtol=1e-4, atol=1e-4)


def test_loss_bce_and_dice():
    logits = torch.tensor([[[10.0, -10.0], [-10.0, 10.0]]])
    target = torch.tensor([[[1.0, 0.0], [0.0, 1.0]]])
    assert segmentation_loss(logits, target).item() < 1e-3
    assert segmentation_loss(logits, 1 - target, dice_weight=1.0).item() > 10


def test_offline_missing_model_is_one_clear_line(monkeypatch):
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(ModelNotAvailableError) as info:
        load_model("CIDAS/clipseg-rd64-refined", "cpu")
    message = str(info.value)
    assert "CIDAS/clipseg-rd64-refined" in message and "offline" in message and "\n" not in message
    with pytest.raises(ModelNotAvailableError, match="does not exist"):
        load_model("./no/such/dir", "cpu")


def test_config_round_trip_and_validation():
    cfg = PRESETS["improved"].config
    assert ModelConfig.from_dict(json.loads(cfg.to_json())) == cfg
    with pytest.raises(ValueError, match="unknown architecture"):
        ModelConfig(architecture="unet")
    with pytest.raises(ValueError, match="unknown model config keys"):
        ModelConfig.from_dict({"architecture": "film-decoder", "colour": 1})
    with pytest.raises(ValueError, match="pixel_channels needs the film-decoder with learned_upsampler"):
        ModelConfig(pixel_channels=8)  # the seed's bilinear head has no full-resolution maps to refine
    with pytest.raises(ValueError, match="pixel_tokens needs a pixel branch"):
        ModelConfig(learned_upsampler=True, pixel_tokens=True)


def test_pixel_branch_reads_full_resolution_pixels(tiny_model_factory):
    """With the pixel branch, a change inside one patch moves the logits at full resolution through both paths:
    the refinement (pixel-level maps) and the pixel tokens (the patch grid the decoder attends over)."""
    model = load_model(tiny_model_factory("tiny-pixel"), "cpu")
    assert model.pixel_branch is not None and model.pixel_branch.to_tokens is not None
    s = model.config.image_size
    torch.manual_seed(0)
    pixels = torch.randn(1, 3, s, s)
    with torch.no_grad():
        features = model.encode_images(pixels)
        assert torch.equal(features.layers[-1], pixels)  # the pixels travel with the (cacheable) features
        tokens = model.pixel_branch.tokens(model.pixel_branch.stem(pixels))
        grid = s // model.patch_size
        assert tokens.shape == (1, grid * grid, model.config.d_model)
        text = model.encode_text(["the red one"])
        base = model.decode(features, text)
        changed = pixels.clone()
        changed[:, :, 5, 5] += 3.0
        moved = model.decode(model.encode_images(changed), text)
    assert base.shape == (1, model.config.output_size, model.config.output_size)
    assert (moved - base).abs().max() > 1e-4


def test_train_text_makes_the_text_tower_learn(tiny_model_factory):
    model = load_model(tiny_model_factory("tiny-seed"), "cpu")
    model.config = model.config.replace(train_text=True)
    model.apply_freezing()
    model.train()
    s = model.config.image_size
    model(torch.randn(2, 3, s, s), ["a red circle", "blue"]).sum().backward()
    text = [p for m in model.text_modules() for p in m.parameters()]
    assert text and all(p.requires_grad and p.grad is not None for p in text)
    assert all(p.grad is None for p in model.vision.parameters())  # the vision tower stays frozen


def test_alignment_loss_matches_a_hand_computation(tiny_model_factory):
    """Per token: exp(scale) * cos(head(token), phrase) - 5, binary cross-entropy against the share of the token's
    patch the target covers; CLS ignored; mean over images and tokens."""
    import math

    import torch.nn.functional as F

    from clipseg_model.film_decoder import ALIGN_BIAS

    model = load_model(tiny_model_factory("tiny-pixel"), "cpu")
    torch.manual_seed(0)
    grid, d = 4, model.config.d_model
    tokens = torch.randn(2, 1 + grid * grid, d)
    text = torch.randn(2, model.align_head.out_features)
    masks = torch.zeros(2, 8, 8)
    masks[0, :4, :4] = 1  # patches 0, 1, 4, 5 fully covered
    masks[1, 0, 0] = 1  # a quarter of patch 0
    loss = model.alignment_loss(tokens, text, masks)

    covered = torch.zeros(2, grid * grid)
    covered[0, [0, 1, 4, 5]] = 1
    covered[1, 0] = 0.25
    scale = 1 / 0.07
    total = 0.0
    with torch.no_grad():
        for b in range(2):
            t = F.normalize(text[b], dim=0)
            for n in range(grid * grid):
                z = scale * float(F.normalize(model.align_head(tokens[b, 1 + n]), dim=0) @ t) + ALIGN_BIAS
                y = float(covered[b, n])
                p = 1 / (1 + math.exp(-z))
                total -= y * math.log(p) + (1 - y) * math.log(1 - p)
    assert ALIGN_BIAS == -5.0
    assert float(loss.detach()) == pytest.approx(total / (2 * grid * grid), rel=1e-5)
    tokens[:, 0] += 100.0  # the CLS token plays no part
    assert float(model.alignment_loss(tokens, text, masks).detach()) == pytest.approx(float(loss.detach()), rel=1e-6)


def test_alignment_loss_trains_image_tokens_towards_their_phrases(tiny_model_factory):
    """A few optimiser steps on the alignment loss alone halve it: the gradient reaches the image tokens (vision
    embeddings, pixel tokens), the head and the text tower."""
    model = load_model(tiny_model_factory("tiny-pixel"), "cpu")
    model.config = model.config.replace(train_embeddings=True, train_text=True)
    model.apply_freezing()
    model.train()
    torch.manual_seed(0)
    pixels = torch.randn(4, 3, 64, 64)
    masks = torch.zeros(4, 64, 64)
    masks[:, 8:40, 8:40] = 1
    phrases = ["the star", "the circle", "the star", "the circle"]
    params = list(model.trainable_parameters())
    opt = torch.optim.Adam(params, lr=3e-3)
    first = None
    for _ in range(30):
        logits, loss = model(pixels, phrases, masks)
        assert logits.shape == (4, 64, 64)
        first = float(loss.detach()) if first is None else first
        opt.zero_grad()
        loss.backward()
        for name, param in (("pixel tokens", model.pixel_branch.to_tokens[1].weight),
                            ("vision embeddings", model.vision.embeddings.patch_embedding.weight),
                            ("text tower", model.clip.text_projection.weight)):
            if param.grad is None or not param.grad.abs().sum() > 0:
                pytest.fail(f"no gradient reached the {name}")
        opt.step()
    assert float(loss.detach()) < 0.5 * first


def test_alignment_needs_the_head():
    with pytest.raises(ValueError, match="text_alignment needs the film-decoder"):
        ModelConfig(architecture="clipseg-rd64", text_alignment=True)


@pytest.mark.parametrize("preset", ["tiny-improved", "tiny-clipseg"])
def test_models_without_the_alignment_head_refuse_masks(tiny_model_factory, preset):
    model = load_model(tiny_model_factory(preset), "cpu")
    s = model.config.image_size
    with pytest.raises(ValueError, match="no text-token alignment head"):
        model(torch.randn(1, 3, s, s), ["a"], torch.ones(1, s, s))


def test_word_attention_ignores_padding(tiny_model_factory):
    """A phrase padded to a longer one's length (in one batch) gives the same logits as the phrase alone: the
    cross-attention masks padded tokens out."""
    model = load_model(tiny_model_factory("tiny-words"), "cpu")
    s = model.config.image_size
    torch.manual_seed(2)
    pixels = torch.randn(1, 3, s, s)
    short, long = "the left one", "the much bigger red circle at the very top of the picture"
    with torch.no_grad():
        features = model.encode_images(pixels)
        padded_text = model.encode_text([short, long])
        assert int(padded_text[0, 1:, -1].sum()) < int(padded_text[1, 1:, -1].sum())  # the short one has padding
        together = model.decode(features, padded_text, torch.tensor([0, 0]))
        alone = model.decode(features, model.encode_text([short]))
        assert torch.allclose(together[0], alone[0], atol=1e-5)
        # The padded positions' values do not matter either: garbage there changes nothing.
        dirty = padded_text.clone()
        dirty[0, 1:, :-1][dirty[0, 1:, -1] == 0] = 123.0
        assert torch.allclose(model.decode(features, dirty, torch.tensor([0, 0])), together, atol=1e-5)
        # ... while the words themselves do: another word in the same slot changes the map.
        other = model.decode(features, model.encode_text(["the right one"]))
        assert not torch.allclose(other, alone, atol=1e-4)


def test_pack_and_unpack_text_round_trip():
    from clipseg_model.film_decoder import pack_text, unpack_text

    pooled, words = torch.randn(2, 4), torch.randn(2, 3, 5)
    valid = torch.tensor([[True, True, False], [True, True, True]])
    packed = pack_text(pooled, words, valid, length=7)
    assert packed.shape == (2, 8, 6)
    p, w, v = unpack_text(packed, 4, 5)
    assert torch.equal(p, pooled) and torch.equal(v, valid)
    assert torch.equal(w[valid], words[valid]) and not w[~valid].any()
    p, w, v = unpack_text(packed[:1], 4, 5)  # a batch of short phrases is cut to its own longest
    assert w.shape == (1, 2, 5) and v.all()


def test_decoder_positions_tell_tokens_apart_at_any_grid(tiny_model_factory):
    """Position features differ between patches, and exist for any grid size (the model runs at other sizes)."""
    model = load_model(tiny_model_factory("tiny-words"), "cpu")
    with torch.no_grad():
        for grid in (4, 6):
            pos = model.positions(grid)
            assert pos.shape == (grid * grid, model.config.d_model)
            assert torch.cdist(pos, pos).add(torch.eye(grid * grid) * 1e3).min() > 1e-3  # no two patches alike
        s = model.config.image_size
        x, _ = model.image_tokens(model.encode_images(torch.zeros(1, 3, s, s)))
        model.positions.proj.weight.zero_()
        model.positions.proj.bias.zero_()
        y, _ = model.image_tokens(model.encode_images(torch.zeros(1, 3, s, s)))
        assert not torch.allclose(x[:, 1:], y[:, 1:]) and torch.equal(x[:, 0], y[:, 0])  # patches only, not CLS


def test_word_attention_is_refused_for_clipseg():
    with pytest.raises(ValueError, match="word_attention needs the film-decoder"):
        ModelConfig(architecture="clipseg-rd64", word_attention=True)
    assert not PRESETS["clipseg-rd64"].config.word_attention and not PRESETS["clipseg-rd64"].config.decoder_positions


def test_run_directory_stays_loadable_when_moved_or_copied(tiny_model_factory, tmp_path):
    """A run's checkpoints record their base model (run/init/base) relative to themselves: moving or copying the
    run directory whole keeps them loadable; a checkpoint cut off from its base says so (not "could not be
    downloaded")."""
    import shutil

    run = tmp_path / "run"
    shutil.copytree(tiny_model_factory("tiny-seed"), run / "init")  # what `clipseg train --init-random` makes
    model = load_model(run / "init", "cpu")
    with torch.no_grad():
        for p in model.trainable_parameters():
            p.add_(0.1)
    save_checkpoint(model, run / "best", {"version": "v-best"})
    record = json.loads((run / "best" / CONFIG_FILE).read_text())
    assert record["config"]["base_model"] == "../init/base"
    s = model.config.image_size
    pixels = torch.randn(1, 3, s, s)
    with torch.no_grad():
        expected = model(pixels, ["the red one"])

    moved = tmp_path / "elsewhere" / "deeper" / "run-moved"
    moved.parent.mkdir(parents=True)
    shutil.move(str(run), str(moved))
    copied = tmp_path / "copy"
    shutil.copytree(moved, copied)
    shutil.rmtree(moved)  # nothing of the original place is left: only the relative path can work
    loaded = load_model(copied / "best", "cpu")
    assert loaded.version == "v-best" and loaded.config.base_model == str((copied / "init" / "base").resolve())
    with torch.no_grad():
        assert torch.equal(loaded(pixels, ["the red one"]), expected)

    alone = tmp_path / "alone"
    shutil.copytree(copied / "best", alone)
    shutil.rmtree(copied)
    with pytest.raises(ModelNotAvailableError, match="copy the whole run directory") as info:
        load_model(alone, "cpu")
    assert "downloaded" not in str(info.value)


def test_checkpoint_copied_alone_on_the_same_machine_still_loads(tiny_model_factory, tmp_path):
    """The absolute base path is kept as a fallback: a checkpoint copied alone (as versions are materialised from
    Redis into another folder) still finds its base where it was."""
    import shutil

    model = load_model(tiny_model_factory("tiny-seed"), "cpu")
    save_checkpoint(model, tmp_path / "a" / "ckpt", {"version": "v1"})
    shutil.copytree(tmp_path / "a" / "ckpt", tmp_path / "b" / "c" / "ckpt")
    assert load_model(tmp_path / "b" / "c" / "ckpt", "cpu").version == "v1"


def test_missing_local_model_path_is_not_a_download_failure(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "runs").mkdir()
    with pytest.raises(ModelNotAvailableError, match="directory 'runs/best' does not exist"):
        load_model("runs/best", "cpu")


def test_predictor_caches_word_attention_phrases(tiny_model_factory):
    """The predictor caches one text row per phrase and stacks rows from different batches: packed word states
    (fixed length) allow that, and cached phrases give the same probabilities as fresh ones."""
    from PIL import Image

    from clipseg_model.predictor import Segmenter

    segmenter = Segmenter(load_model(tiny_model_factory("tiny-words"), "cpu"), threshold=0.5)
    image = Image.new("RGB", (50, 40), "gray")
    image.paste((200, 30, 30), (5, 5, 20, 20))
    first = segmenter.predict(image, ["the red square on the left"])  # cached alone (short batch)
    mixed = segmenter.predict(image, ["x", "the red square on the left", "the much bigger shape at the very top"])
    assert np.allclose(mixed[1].probability, first[0].probability, atol=1e-5)


def test_relative_position_bias_depends_on_offsets_at_any_grid(tiny_model_factory):
    """The decoder's relative-position bias starts at zero (a new model attends as without it), is a function of
    each pair's (dx, dy) at any grid size (CLS rows/columns 0), and once learnt it changes the decoder's answer."""
    model = load_model(tiny_model_factory("tiny-words"), "cpu")
    bias_module = model.relative_bias
    with torch.no_grad():
        assert not bias_module(4).any()  # zero at start
        s = model.config.image_size
        torch.manual_seed(0)
        pixels = torch.randn(1, 3, s, s)
        features, text = model.encode_images(pixels), model.encode_text(["the leftmost one"])
        before = model.decode(features, text)
        torch.nn.init.normal_(bias_module.mlp[-1].weight, std=1.0)
        for grid in (4, 6):
            bias = bias_module(grid)
            assert bias.shape == (model.config.n_heads, 1 + grid * grid, 1 + grid * grid)
            assert not bias[:, 0].any() and not bias[:, :, 0].any()
            # the same offset gives the same bias wherever the pair is: (0,0)->(0,1) and (1,1)->(1,2)
            assert torch.allclose(bias[:, 1, 2], bias[:, 1 + grid + 1, 1 + grid + 2])
            assert not torch.allclose(bias[:, 1, 2], bias[:, 2, 1])  # left of vs right of
        after = model.decode(features, text)
        assert not torch.allclose(before, after, atol=1e-4)
        # a 96 px input (another grid) still decodes
        assert model.decode(model.encode_images(torch.randn(1, 3, 96, 96)), text).shape[-1] == model.config.output_size


def test_relative_positions_is_refused_for_clipseg():
    with pytest.raises(ValueError, match="relative_positions needs the film-decoder"):
        ModelConfig(architecture="clipseg-rd64", relative_positions=True)


@pytest.mark.parametrize("trains_text", [True, False])
def test_alignment_trains_text_or_only_the_image_side(tiny_model_factory, trains_text):
    """alignment_trains_text=False detaches the phrase embedding in the alignment loss: its gradient reaches the
    image side and the alignment head, never the text tower (which the mask loss still trains)."""
    model = load_model(tiny_model_factory("tiny-pixel"), "cpu")
    model.config = model.config.replace(alignment_trains_text=trains_text, train_text=True)
    for p in model.clip.text_model.parameters():
        p.requires_grad_(True)
    s = model.config.image_size
    torch.manual_seed(0)
    pixels, masks = torch.randn(2, 3, s, s), (torch.rand(2, s, s) > 0.5).float()
    text = model.encode_text(["the leftmost one", "the rightmost one"])
    x, _ = model.image_tokens(model.encode_images(pixels))
    model.alignment_loss(x, text, masks).backward()
    text_grad = sum(float(p.grad.abs().sum()) for p in model.clip.text_model.parameters() if p.grad is not None)
    assert (text_grad > 0) == trains_text
    assert model.align_head.weight.grad is not None and model.align_head.weight.grad.abs().sum() > 0


def test_pixel_coordinates_let_the_phrase_prefer_a_side():
    """With pixel_coordinates the pixel branch's FiLM sees (x, y): on a uniform image the answer can differ between
    left and right (a direction word's one-step path); without them it cannot (convolutions are translation
    equivariant, so the interior of a uniform image is one value)."""
    from clipseg_model.film_decoder import PixelBranch

    torch.manual_seed(0)
    stem, maps, text = torch.zeros(1, 4, 16, 16), torch.zeros(1, 8, 16, 16), torch.randn(1, 8)
    with torch.no_grad():
        plain = PixelBranch(8, 4, 8)(stem, maps, text, None)[0, 0, 2:-2, 2:-2]
        assert torch.allclose(plain, plain[0, 0].expand_as(plain))
        branch = PixelBranch(8, 4, 8, coordinates=True)
        out = branch(stem, maps, text, None)[0, 0, 2:-2, 2:-2]
        assert not torch.allclose(out[:, 0], out[:, -1], atol=1e-4)  # left column vs right column
        assert torch.allclose(branch(stem.repeat(2, 1, 1, 1), maps.repeat(2, 1, 1, 1), text.repeat(2, 1), None)[1, 0, 2:-2, 2:-2], out)
    with pytest.raises(ValueError, match="pixel_coordinates needs a pixel branch"):
        ModelConfig(pixel_coordinates=True)


def test_pixel_stride_two_works_at_half_the_side(tiny_model_factory):
    """pixel_stride 2: the stem's maps and the pixel branch's logits are at half the input side (a quarter of the
    convolution work), the model still returns output_size logits that the pixels move; 3 and a branchless
    stride are refused."""
    from clipseg_model.film_decoder import FilmDecoderModel

    base = load_model(tiny_model_factory("tiny-pixel"), "cpu")
    torch.manual_seed(0)
    model = FilmDecoderModel(base.config.replace(pixel_stride=2), base.clip, base.tokenizer).eval()
    s = model.config.image_size
    pixels = torch.randn(1, 3, s, s)
    with torch.no_grad():
        tokens, stem = model.image_tokens(model.encode_images(pixels))
        assert stem.shape[-2:] == (s // 2, s // 2)
        assert tokens.shape[1] == 1 + (s // model.patch_size) ** 2
        text = model.encode_text(["the leftmost one"])
        base_logits = model.decode(model.encode_images(pixels), text)
        changed = pixels.clone()
        changed[:, :, 5, 5] += 3.0
        moved = model.decode(model.encode_images(changed), text)
    assert base_logits.shape == (1, model.config.output_size, model.config.output_size)
    assert (moved - base_logits).abs().max() > 1e-4
    with pytest.raises(ValueError, match="pixel_stride must be 1 or 2"):
        ModelConfig(pixel_channels=4, learned_upsampler=True, pixel_stride=3)
    with pytest.raises(ValueError, match="pixel_stride needs a pixel branch"):
        ModelConfig(pixel_stride=2)


@pytest.mark.parametrize("preset", ["tiny-pixel", "tiny-words"])
def test_phrases_sharing_an_image_equal_the_image_repeated(tiny_model_factory, preset):
    """forward with image_index (B images, P phrases) gives the logits and alignment loss of the images repeated
    per phrase (what a scene group saves is the repeated encoding), and a bad index is one clear error."""
    model = load_model(tiny_model_factory(preset), "cpu").eval()
    s = model.config.image_size
    torch.manual_seed(2)
    pixels = torch.randn(2, 3, s, s)
    prompts = ["the red circle", "the leftmost one", "blue", "the bigger shape"]
    index = torch.tensor([0, 0, 1, 0])
    masks = (torch.rand(4, model.config.output_size, model.config.output_size) > 0.7).float()
    with torch.no_grad():
        grouped, grouped_align = model(pixels, prompts, masks, index)
        repeated, repeated_align = model(pixels[index], prompts, masks)
    assert torch.allclose(grouped, repeated, rtol=1e-4, atol=1e-4)
    assert torch.allclose(grouped_align, repeated_align, rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match="image_index must lie in"):
        model(pixels, prompts, None, torch.tensor([0, 1, 2, 0]))
    with pytest.raises(ValueError, match="2 images but 4 prompts"):
        model(pixels, prompts)


@pytest.mark.parametrize("token_layers", [0, 1])
def test_pixel_token_layers_widen_what_a_pixel_token_sees(token_layers):
    """A 3x3 convolution at the patch grid lets a pixel token see the next patch over: a stem change at row 4,
    column 8 (patch (0, 1) at patch 8) reaches token (0, 2) only with pixel_token_layers 1, token (0, 3) never."""
    from clipseg_model.film_decoder import PixelBranch

    torch.manual_seed(0)
    branch = PixelBranch(8, 4, 8, patch=8, d_model=16, token_layers=token_layers)
    stem = torch.randn(1, 4, 64, 64)
    changed = stem.clone()
    changed[:, :, 4, 8] += 5.0
    with torch.no_grad():
        moved = (branch.tokens(changed) - branch.tokens(stem)).abs().amax(-1)[0]  # (64,) per token
    assert moved[1] > 1e-4  # its own patch
    assert (moved[2] > 1e-6) == bool(token_layers) and moved[3] == 0
    with pytest.raises(ValueError, match="pixel_token_layers needs pixel_tokens"):
        ModelConfig(pixel_channels=4, learned_upsampler=True, pixel_token_layers=1)
