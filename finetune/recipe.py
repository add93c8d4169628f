"""The optimisation recipe (`TrainConfig`), its named presets and the learning-rate schedule they describe."""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any

from clipseg_model.errors import ClipsegError


@dataclass
class TrainConfig:
    """Optimisation recipe. Steps win over epochs when both are given."""

    optimizer: str = "adam"  # adam | adamw
    lr: float = 1e-3
    weight_decay: float = 0.0
    schedule: str = "constant"  # constant | cosine
    warmup_fraction: float = 0.0  # share of the total steps with linear warm-up
    min_lr_ratio: float = 0.0  # cosine floor, as a fraction of lr
    dice_weight: float = 0.0  # 0: plain BCE-with-logits
    align_weight: float = 0.0  # >0: add this x the text-token alignment loss (needs a model with text_alignment)
    batch_size: int = 32
    steps: int = 0  # optimizer steps; 0: use epochs
    epochs: int = 1
    grad_clip: float = 0.0  # max gradient L2 norm; 0: off
    eval_every: int = 0  # steps between validations (+ best checkpoint, resume state); 0: at the end only
    log_every: int = 10  # steps between loss rows in metrics.csv
    eval_batch_size: int = 16
    max_eval_samples: int = 0  # validate on N samples spread over the validation set; 0: all
    num_workers: int = 0  # DataLoader workers (0 or 1 on a 2-core machine: the main process needs the other)
    hflip: float = 0.0  # probability of a horizontal flip (left/right words swapped); off by default
    phrases_per_image: int = 0  # k >= 2: a training item is up to k phrases of one image (a SceneGroup, encoded
    # once; the step must tell the image's objects apart by phrase alone) and batch_size counts images; 0: one each
    # Visual prompts mixed in (CLIPSeg's recipe; `finetune.visual_training`): this share of the phrases is
    # conditioned on engineered crops of another instance of its concept (or of its own target) instead of its text;
    # visual_prompt_mix of those mix the crop with the text at a random weight; 1..visual_prompt_shots crops each.
    visual_prompt_ratio: float = 0.0  # 0: phrases only (and the loop is exactly the text-only one)
    visual_prompt_mix: float = 0.5
    visual_prompt_shots: int = 1
    visual_prompt_mode: str = "crop_blur_darken"  # visual_prompt.ENGINEERING
    # max hue rotation (degrees) of a visual-only phrase's image and its crops alike: unnamed colours to match, so
    # the vision tower embeds colours it never saw apart from the known ones (`visual_training`); 0: off
    visual_prompt_hue: float = 0.0
    amp: bool = True  # mixed precision on CUDA (bf16 where supported, else fp16 + GradScaler); CPU stays fp32
    seed: int = 0

    def __post_init__(self) -> None:
        if self.optimizer not in ("adam", "adamw"):
            raise ValueError(f"optimizer must be adam or adamw, got {self.optimizer!r}")
        if self.schedule not in ("constant", "cosine"):
            raise ValueError(f"schedule must be constant or cosine, got {self.schedule!r}")
        if self.batch_size < 1:
            raise ValueError("batch_size must be >= 1")

    def replace(self, **changes: Any) -> "TrainConfig":
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


TRAIN_PRESETS: dict[str, TrainConfig] = {
    # The seed's recipe: BCE-with-logits, Adam at a constant 1e-3, nothing else.
    "seed": TrainConfig(optimizer="adam", lr=1e-3, batch_size=32, epochs=10),
    # CLIPSeg-style: AdamW with decoupled weight decay, warm-up then cosine decay, Dice + BCE (Dice counters the
    # foreground/background imbalance of small referred objects), gradient clipping for the post-norm decoder.
    "improved": TrainConfig(optimizer="adamw", lr=1e-3, weight_decay=1e-4, schedule="cosine", warmup_fraction=0.05,
                            min_lr_ratio=0.01, dice_weight=1.0, batch_size=64, epochs=20, grad_clip=1.0),
    # The CPU learning benchmark's recipe (model preset cpu-scratch): `improved` at batch 12 images of 3 phrases each
    # for 3,400 steps, 3 % warm-up, plus the text-token alignment loss at weight 3. Three phrases of one image per
    # step (different objects where it has them) teach telling its objects apart; 12 x 3 costs what 16 x 2 did.
    "cpu-scratch": TrainConfig(optimizer="adamw", lr=1e-3, weight_decay=1e-4, schedule="cosine", warmup_fraction=0.03,
                               min_lr_ratio=0.01, dice_weight=1.0, align_weight=3.0, batch_size=12,
                               phrases_per_image=3, steps=3400,
                               grad_clip=1.0, eval_every=500, log_every=25, max_eval_samples=200),
}


def train_preset(name: str) -> TrainConfig:
    """A training preset by name."""
    try:
        return TRAIN_PRESETS[name]
    except KeyError:
        raise ClipsegError(f"unknown training preset {name!r}; choose one of: {', '.join(TRAIN_PRESETS)}") from None


def lr_factor(step: int, total: int, cfg: TrainConfig) -> float:
    """Multiplier of cfg.lr at optimizer step `step` (0-based) of `total`."""
    warm = int(round(cfg.warmup_fraction * total))
    if step < warm:
        return (step + 1) / warm
    if cfg.schedule == "constant":
        return 1.0
    progress = min(1.0, (step - warm) / max(1, total - warm))
    return cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress))
