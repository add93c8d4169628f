"""Full-size training on CUDA with mixed precision: the `seed` model (ViT-B/16 shapes, random weights built with
init_model, nothing downloaded) for a few steps. Skipped without a GPU."""
from __future__ import annotations

import math

import pytest
import torch

from clipseg_model.loading import load_model
from clipseg_model.random_init import init_model
from finetune.samples import SampleList
from finetune.shapes import ShapesDataset
from finetune.evaluation import evaluate
from finetune.recipe import TrainConfig
from finetune.training import train

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA"),
]


@pytest.fixture(scope="module")
def seed_model_dir(tmp_path_factory):
    return init_model("seed", tmp_path_factory.mktemp("gpu") / "seed", seed=0)


@pytest.mark.parametrize("amp", ["bf16", "fp16"])
def test_full_size_training_with_amp(seed_model_dir, tmp_path, monkeypatch, amp):
    if amp == "fp16":  # force the fp16 + GradScaler path that pre-Ampere GPUs take
        monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: False)
    elif not torch.cuda.is_bf16_supported():
        pytest.skip("this GPU has no bf16")
    model = load_model(seed_model_dir, "cuda")
    ds = ShapesDataset(16, seed=0, image_size=224)
    data = SampleList([ds[i] for i in range(16)])
    # A fixed batch of 16 seen 12 times: the loss must fall (lower lr than the recipe for a random-weight CLIP).
    cfg = TrainConfig(optimizer="adam", lr=1e-4, batch_size=16, steps=12, log_every=4)
    frozen = model.clip.vision_model.encoder.layers[0].mlp.fc1.weight.detach().clone()
    result = train(model, data, None, cfg, tmp_path / "run", device="cuda", progress=False)
    losses = [loss for _, loss in result.loss_history]
    assert len(losses) == 12 and all(math.isfinite(x) for x in losses), losses
    assert sum(losses[-3:]) / 3 < sum(losses[:3]) / 3, losses
    assert torch.equal(frozen, model.clip.vision_model.encoder.layers[0].mlp.fc1.weight)
    metrics = evaluate(model, data, batch_size=8).metrics
    assert metrics["n"] == 16 and 0.0 <= metrics["miou"] <= 1.0
    assert (tmp_path / "run" / "last" / "trainable.safetensors").is_file()
