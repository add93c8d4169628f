"""The training core: batching, the train loop (AMP, DDP, resume) and evaluation.

Used by `clipseg train` and by the fine-tuning job. Everything here works on any `ReferringDataset`
(RefCOCO, generated shapes, corrections) and any `SegmentationModel`.

Layout of a training output directory (`out_dir`):

    metrics.csv      one row per logged step (loss, lr) and per evaluation (val_miou, val_mean_dice, ...)
    loss.png         training loss curve, written at the end
    best/            checkpoint with the best validation mIoU (`clipseg_model.checkpoint` layout)
    last/            checkpoint of the last step
    state/           resume state: model.safetensors (trainable weights), optimizer.safetensors
                     (optimizer tensors + RNG states), state.json (step, scheduler, scaler, config) — no pickle
    tensorboard/     event files, only when `torch.utils.tensorboard` is importable

Distributed training follows torch's environment protocol: under `torchrun` (WORLD_SIZE > 1) the process
group is initialised here, every rank trains on its shard (DistributedSampler) and only rank 0 evaluates and
writes files.
"""
from __future__ import annotations

import contextlib
import dataclasses
import functools
import json
import logging
import math
import os
import re
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from safetensors.torch import load_file, save_file
from torch.utils.data import DataLoader, DistributedSampler

from clipseg_model.atomic import atomic_directory
from clipseg_model.checkpoint import save_checkpoint
from clipseg_model.errors import ClipsegError
from clipseg_model.losses import segmentation_loss
from clipseg_model.segmenter_base import SegmentationModel
from finetune.metrics import MetricAccumulator, ThresholdSweep
from finetune.report import CSVMetricsLogger, GridRow, write_loss_curve
from finetune.samples import ReferringDataset, ReferringSample, SceneGroup

log = logging.getLogger(__name__)

STATE_FORMAT = 1
# Words whose meaning a horizontal flip inverts ("left", "leftmost", "right-hand", ...: whole words that start with
# left/right, so "bright" and "upright" are not). A flipped image with an unchanged "the leftmost circle" would teach
# the model to point at the rightmost one: a flip swaps them instead (`mirror_phrase`).
_MIRRORED_WORDS = re.compile(r"\b(left|right)", re.IGNORECASE)


# ------------------------------------------------------------------------------------------------------------
# Batching


@dataclass
class Batch:
    """A training batch.

    Attributes:
        pixel_values: (B, 3, S, S) float32, normalised (S = model.config.image_size).
        phrases: P referring phrases.
        masks: (P, S_out, S_out) float32 in [0, 1] (S_out = model.config.output_size); area-resized, so
            boundary pixels carry the covered fraction (a soft target BCE handles).
        image_index: (P,) long, the image each phrase refers to, where some image has several phrases (items
            that are scene groups); None when P == B, phrase p on image p.
    """

    pixel_values: torch.Tensor
    phrases: list[str]
    masks: torch.Tensor
    image_index: torch.Tensor | None = None

    def __len__(self) -> int:
        return len(self.phrases)


def resize_mask(mask: np.ndarray, size: int) -> torch.Tensor:
    """Bool (H, W) → float32 (size, size) with area averaging (nearest when enlarging).

    Area keeps thin objects that nearest-neighbour sampling can skip entirely when shrinking.
    """
    t = torch.from_numpy(np.ascontiguousarray(mask, dtype=np.float32))[None, None]
    h, w = t.shape[-2:]
    if h >= size and w >= size:
        out = F.interpolate(t, size=(size, size), mode="area")
    else:
        out = F.interpolate(t, size=(size, size), mode="nearest")
    return out[0, 0]


def collate(items: Sequence[ReferringSample | SceneGroup], model: SegmentationModel) -> Batch:
    """Samples or scene groups (several phrases of one image) → `Batch`: each image once through
    `model.preprocess`, masks at the model's output size, `image_index` where a group has more than one phrase."""
    size = model.config.output_size
    groups = [list(item) if isinstance(item, (list, tuple)) else [item] for item in items]
    if any(not group for group in groups):
        raise ValueError("a scene group holds no samples")
    samples = [s for group in groups for s in group]
    pixel_values = model.preprocess([group[0].image for group in groups])
    masks = torch.stack([resize_mask(s.mask, size) for s in samples]) if samples else torch.zeros(0, size, size)
    image_index = None
    if len(samples) != len(groups):
        image_index = torch.tensor([i for i, group in enumerate(groups) for _ in group], dtype=torch.long)
    return Batch(pixel_values, [s.phrase for s in samples], masks, image_index)


def mirror_phrase(phrase: str) -> str:
    """What `phrase` says of the horizontally flipped image: left and right swapped, case kept
    ("the leftmost circle" → "the rightmost circle", "man on the Right" → "man on the Left")."""
    def swap(match: re.Match) -> str:
        word = match.group(0)
        other = "right" if word.lower() == "left" else "left"
        if word.isupper():
            return other.upper()
        return other.capitalize() if word[0].isupper() else other
    return _MIRRORED_WORDS.sub(swap, phrase)


class _Augmented:
    """Random horizontal flips, deterministic per (seed, epoch, index) so resumed runs see the same data.

    A flipped sample's phrase has left and right swapped (`mirror_phrase`), so direction phrases stay true and are
    augmented too (referring data is full of them: "man on the left", "second from right").
    """

    def __init__(self, dataset: ReferringDataset, hflip: float, seed: int, epoch: int) -> None:
        self.dataset, self.hflip, self.seed, self.epoch = dataset, hflip, seed, epoch

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index: int) -> ReferringSample | SceneGroup:
        item = self.dataset[index]
        if self.hflip <= 0 or np.random.default_rng([self.seed, self.epoch, index]).random() >= self.hflip:
            return item
        if isinstance(item, (list, tuple)):  # a scene group: one image, so one decision for all its phrases
            return [self.flip(sample) for sample in item]
        return self.flip(item)

    @staticmethod
    def flip(sample: ReferringSample) -> ReferringSample:
        return dataclasses.replace(sample, image=sample.image.transpose(Image.FLIP_LEFT_RIGHT),
                                   mask=np.ascontiguousarray(sample.mask[:, ::-1]), phrase=mirror_phrase(sample.phrase))


def make_loader(dataset: ReferringDataset, model: SegmentationModel, batch_size: int, indices: Sequence[int],
                num_workers: int = 0, seed: int = 0) -> DataLoader:
    """A DataLoader over `dataset[indices]` in that order, yielding `Batch`es.

    The collate function holds the model only for `preprocess` (CPU work); with worker processes it is shared by
    fork, not copied. `generator` is fixed so creating the loader draws nothing from torch's global RNG (which
    dropout uses, and which resume restores).
    """
    return DataLoader(
        dataset, batch_size=batch_size, sampler=list(indices), num_workers=num_workers,
        collate_fn=functools.partial(collate, model=model), generator=torch.Generator().manual_seed(seed),
        persistent_workers=False, pin_memory=False,
    )


# ------------------------------------------------------------------------------------------------------------
# Configuration


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


# ------------------------------------------------------------------------------------------------------------
# Results


@dataclass
class EvalResult:
    """Evaluation output.

    Attributes:
        metrics: n, mean_dice, pooled_dice, miou, oiou, prec@0.5..0.9 at `threshold` (see finetune.metrics).
        sweep: {threshold: metrics} for 0.1..0.9 when asked for, else None.
        rows: up to max_rows `GridRow`s for the HTML grid (first samples of the dataset).
        per_sample: per sample: its dataset index, phrase, ids (ref_id, sent_id, ... when the dataset has them),
            iou, dice and pixel counts.
    """

    metrics: dict[str, float]
    sweep: dict[float, dict[str, float]] | None = None
    rows: list[GridRow] = field(default_factory=list)
    per_sample: list[dict[str, Any]] = field(default_factory=list)


@dataclass
class TrainResult:
    """What `train` did and where it wrote it (paths are None on ranks other than 0)."""

    steps: int  # optimizer steps done in total (including before a resume)
    final_loss: float  # mean loss of the last logging window
    best_miou: float  # best validation mIoU (NaN without validation data)
    best_step: int
    last_metrics: dict[str, float]  # last validation metrics ({} without validation data)
    best_checkpoint: Path | None
    last_checkpoint: Path | None
    metrics_csv: Path | None
    loss_png: Path | None
    loss_history: list[tuple[int, float]]  # (step, loss) of every step run in this call
    seconds: float


# ------------------------------------------------------------------------------------------------------------
# Evaluation


def spread_indices(total: int, n: int) -> list[int]:
    """`n` indices spread evenly over range(total) (all of them when n is 0 or >= total).

    RefCOCO loaders order samples by ref, and refs by image: the first N samples are a few images' objects, often
    all from one split-scheme corner (testA people); evenly spaced ones see the whole split.
    """
    if not n or n >= total:
        return list(range(total))
    return [(i * total) // n for i in range(n)]


def _eval_collate(samples: Sequence[ReferringSample], model: SegmentationModel | None) -> tuple[torch.Tensor | None, list[ReferringSample]]:
    return (model.preprocess([s.image for s in samples]) if model is not None else None), list(samples)


@dataclass(frozen=True)
class Precision:
    """The one mixed-precision policy of `clipseg train` and the fine-tune job: on CUDA bf16 autocast where the GPU
    has it, else fp16 autocast with a GradScaler; on the CPU fp32 (faster to train there than bf16 autocast)."""

    device: torch.device
    dtype: torch.dtype | None  # None: no autocast

    def autocast(self) -> contextlib.AbstractContextManager:
        return torch.autocast(self.device.type, dtype=self.dtype) if self.dtype is not None else contextlib.nullcontext()

    def scaler(self) -> torch.amp.GradScaler:
        return torch.amp.GradScaler("cuda", enabled=self.dtype == torch.float16)


def precision_policy(device: str | torch.device, amp: bool = True) -> Precision:
    """The training precision for `device` (`amp=False`: fp32 everywhere)."""
    device = torch.device(device)
    if device.type == "cuda" and amp:
        return Precision(device, torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16)
    return Precision(device, None)


def make_optimizer(params: Sequence[torch.nn.Parameter], cfg: TrainConfig) -> torch.optim.Optimizer:
    """Adam or AdamW over `params` as `cfg` says; the fused kernel where every parameter is a float tensor on the
    CPU or CUDA (one kernel for all parameters: 0.53 -> 0.50 s per cpu-scratch step on 2 CPU threads)."""
    opt_cls = torch.optim.AdamW if cfg.optimizer == "adamw" else torch.optim.Adam
    params = list(params)
    fused = bool(params) and all(p.device.type in ("cpu", "cuda") and p.is_floating_point() for p in params)
    return opt_cls(params, lr=cfg.lr, weight_decay=cfg.weight_decay, fused=fused or None)


def make_scheduler(optimizer: torch.optim.Optimizer, total: int, cfg: TrainConfig) -> torch.optim.lr_scheduler.LambdaLR:
    """`lr_factor` (warm-up, then constant or cosine) over `total` optimizer steps."""
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: lr_factor(s, total, cfg))


def training_step(forward: Callable[[], torch.Tensor | tuple[torch.Tensor, torch.Tensor]], masks: torch.Tensor,
                  optimizer: torch.optim.Optimizer, scheduler: torch.optim.lr_scheduler.LRScheduler,
                  scaler: torch.amp.GradScaler, params: Sequence[torch.nn.Parameter], precision: Precision,
                  cfg: TrainConfig) -> tuple[torch.Tensor, float]:
    """One optimizer step, the same for `train` and the fine-tune job.

    Args:
        forward: runs the model: logits (B, S_out, S_out), or (logits, alignment loss) with `cfg.align_weight`.
            It runs under the precision policy's autocast; the loss is computed in fp32 outside it.
        masks: (B, S_out, S_out) targets in [0, 1] on the model's device.
    Returns:
        (the step's loss, detached scalar tensor; the learning rate the step used).
    """
    with precision.autocast():
        out = forward()
    logits, align = out if isinstance(out, tuple) else (out, None)
    loss = segmentation_loss(logits, masks, cfg.dice_weight)
    if align is not None:
        loss = loss + cfg.align_weight * align.float()
    optimizer.zero_grad(set_to_none=True)
    scaler.scale(loss).backward()
    if cfg.grad_clip > 0:
        scaler.unscale_(optimizer)
        torch.nn.utils.clip_grad_norm_(params, cfg.grad_clip)
    scaler.step(optimizer)
    scaler.update()
    lr = scheduler.get_last_lr()[0]
    scheduler.step()
    return loss.detach(), lr


# Sample metadata copied into every per-sample row (RefCOCO loaders and the shapes generator set them).
PER_SAMPLE_META = ("ref_id", "sent_id", "ann_id", "image_id", "file_name", "dataset", "kind", "question_id")


@torch.no_grad()
def evaluate(model: SegmentationModel, dataset: ReferringDataset, batch_size: int = 16,
             device: str | torch.device | None = None, threshold: float = 0.5, sweep: bool = False,
             max_rows: int = 0, num_workers: int = 0, max_samples: int = 0,
             forward: Callable[[list[ReferringSample]], torch.Tensor] | None = None) -> EvalResult:
    """Metrics of `model` on `dataset` at each sample's ground-truth resolution.

    Logits (P, S_out, S_out) become probabilities that are bilinearly resized to the sample's (H, W), as the
    predictor does, then binarised at `threshold`. The model is left in the mode it was in. `max_samples` > 0
    evaluates that many samples spread evenly over the dataset (`spread_indices`). `forward` replaces the model
    call (samples → logits (B, S_out, S_out)), e.g. on cached frozen features; images are then not preprocessed.
    """
    device = torch.device(device) if device is not None else model.device
    indices = spread_indices(len(dataset), max_samples)
    accumulator = MetricAccumulator(threshold)
    sweeper = ThresholdSweep() if sweep else None
    rows: list[GridRow] = []
    was_training = model.training
    model.eval()
    loader = DataLoader(dataset, batch_size=batch_size, sampler=indices, num_workers=num_workers,
                        collate_fn=functools.partial(_eval_collate, model=None if forward else model))
    precision = precision_policy(device)
    index = 0
    per_sample: list[dict[str, Any]] = []
    try:
        for pixel_values, samples in loader:
            with precision.autocast():
                if forward is not None:
                    logits = forward(samples)
                else:
                    logits = model(pixel_values.to(device), [s.phrase for s in samples])  # (B, S_out, S_out)
            probs = torch.sigmoid(logits.float()).unsqueeze(1).cpu()  # (B, 1, S_out, S_out)
            for prob, sample in zip(probs, samples):
                h, w = sample.mask.shape
                full = F.interpolate(prob[None], size=(h, w), mode="bilinear", align_corners=False)[0, 0].clamp_(0, 1)
                full_np = full.numpy()
                meta = sample.meta if isinstance(sample.meta, dict) else {}
                sample_id = meta.get("id", indices[index])
                (counts,) = accumulator.update(full_np, sample.mask, ids=[sample_id])
                # What a reader needs to find the sample again: its dataset index, the phrase, and the
                # dataset's own ids (RefCOCO: ref, sentence, annotation, image).
                per_sample.append({"index": indices[index], "phrase": sample.phrase,
                                   **{k: meta[k] for k in PER_SAMPLE_META if meta.get(k) is not None}})
                if sweeper is not None:
                    sweeper.update(full_np, sample.mask, ids=[sample_id])
                if len(rows) < max_rows:
                    rows.append(GridRow(sample.phrase, sample.image, full_np > threshold, sample.mask,
                                        note=f"IoU {counts.iou:.2f}"))
                index += 1
    finally:
        model.train(was_training)
    metrics = accumulator.compute()
    metrics["threshold"] = float(threshold)
    rows_out = [{**extra, **counts} for extra, counts in zip(per_sample, accumulator.per_sample())]
    return EvalResult(metrics, sweeper.compute() if sweeper else None, rows, rows_out)


# ------------------------------------------------------------------------------------------------------------
# Distributed helpers (torch's env protocol: WORLD_SIZE, RANK, LOCAL_RANK, MASTER_ADDR/PORT set by torchrun)


@dataclass
class DistInfo:
    """This process's place in a torchrun job (world 1, rank 0 when not distributed)."""

    world: int = 1
    rank: int = 0
    local_rank: int = 0
    owns_group: bool = False  # the process group was initialised by setup_distributed, which tears it down

    @property
    def main(self) -> bool:
        return self.rank == 0

    def barrier(self) -> None:
        if self.world > 1:
            torch.distributed.barrier()


def setup_distributed(device: torch.device) -> tuple[DistInfo, torch.device]:
    """Join the torchrun process group when WORLD_SIZE > 1 (nccl on CUDA, gloo on CPU).

    Returns (DistInfo, device): under torchrun on CUDA the device becomes cuda:LOCAL_RANK. Idempotent: a group
    that already exists is used as is.
    """
    import torch.distributed as dist

    device = torch.device(device)
    if dist.is_available() and dist.is_initialized():
        world, rank = dist.get_world_size(), dist.get_rank()
        local_rank = int(os.environ.get("LOCAL_RANK", "0"))
        owns = False
    else:
        world = int(os.environ.get("WORLD_SIZE", "1"))  # torchrun's protocol, not our configuration
        if world <= 1:
            return DistInfo(), device
        local_rank = int(os.environ.get("LOCAL_RANK", "0"))
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
        world, rank, owns = dist.get_world_size(), dist.get_rank(), True
    if world > 1 and device.type == "cuda":
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
    return DistInfo(world, rank, local_rank, owns), device


def teardown_distributed(info: DistInfo) -> None:
    """Destroy the process group if `setup_distributed` created it."""
    if info.owns_group and torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()


# ------------------------------------------------------------------------------------------------------------
# Resume state (no pickle: tensors in safetensors, everything else in JSON)

STATE_DIR = "state"


def _optimizer_tensors(optimizer: torch.optim.Optimizer) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Split an optimizer state_dict into flat tensors and a JSON-able remainder."""
    sd = optimizer.state_dict()
    tensors: dict[str, torch.Tensor] = {}
    scalars: dict[str, dict[str, Any]] = {}
    for pid, entry in sd["state"].items():
        for key, value in entry.items():
            if isinstance(value, torch.Tensor):
                tensors[f"optim.{pid}.{key}"] = value.detach().cpu().contiguous()
            else:
                scalars.setdefault(str(pid), {})[key] = value
    return tensors, {"param_groups": sd["param_groups"], "scalars": scalars}


def _optimizer_state_from(tensors: dict[str, torch.Tensor], info: dict[str, Any]) -> dict[str, Any]:
    state: dict[int, dict[str, Any]] = {}
    for name, value in tensors.items():
        if not name.startswith("optim."):
            continue
        _, pid, key = name.split(".", 2)
        state.setdefault(int(pid), {})[key] = value
    for pid, entry in info["scalars"].items():
        state.setdefault(int(pid), {}).update(entry)
    groups = []
    for group in info["param_groups"]:
        group = dict(group)
        if isinstance(group.get("betas"), list):
            group["betas"] = tuple(group["betas"])
        groups.append(group)
    return {"state": state, "param_groups": groups}


def save_train_state(path: Path, model: SegmentationModel, optimizer: torch.optim.Optimizer,
                     scheduler: torch.optim.lr_scheduler.LRScheduler, scaler: torch.amp.GradScaler | None,
                     step: int, cfg: TrainConfig, extra: dict[str, Any]) -> Path:
    """Write everything `train(..., resume=True)` needs to continue exactly, atomically (temp dir + rename)."""
    with atomic_directory(path, replace=True) as tmp:
        save_file(model.trainable_state_dict(), str(tmp / "model.safetensors"))
        tensors, optim_info = _optimizer_tensors(optimizer)
        tensors["rng.cpu"] = torch.get_rng_state()
        if torch.cuda.is_available() and torch.cuda.is_initialized():
            for i, s in enumerate(torch.cuda.get_rng_state_all()):
                tensors[f"rng.cuda.{i}"] = s
        save_file(tensors, str(tmp / "optimizer.safetensors"))
        info = {
            "format": STATE_FORMAT, "step": step, "config": cfg.to_dict(), "optimizer": optim_info,
            "scheduler": scheduler.state_dict(), "scaler": scaler.state_dict() if scaler is not None and scaler.is_enabled() else None,
            **extra,
        }
        (tmp / "state.json").write_text(json.dumps(info, indent=2, default=_json_default))
    return path


def _json_default(value: Any) -> Any:
    if isinstance(value, torch.Tensor):
        return value.item() if value.numel() == 1 else value.tolist()
    if isinstance(value, (np.generic,)):
        return value.item()
    raise TypeError(f"cannot store {type(value).__name__} in the training state")


def load_train_state(path: Path, model: SegmentationModel, optimizer: torch.optim.Optimizer,
                     scheduler: torch.optim.lr_scheduler.LRScheduler, scaler: torch.amp.GradScaler | None) -> dict[str, Any]:
    """Restore what `save_train_state` wrote into freshly built objects; returns state.json's content."""
    info = json.loads((path / "state.json").read_text())
    if info.get("format") != STATE_FORMAT:
        raise ClipsegError(f"{path}: training state format {info.get('format')!r}, this code reads {STATE_FORMAT}")
    weights = load_file(str(path / "model.safetensors"))
    with torch.no_grad():
        missing = [k for k, p in model.named_parameters() if p.requires_grad and k not in weights]
        if missing:
            raise ClipsegError(f"{path} does not hold this model's trainable weights (missing {missing[:3]})")
        model.load_state_dict(weights, strict=False)
    tensors = load_file(str(path / "optimizer.safetensors"))
    optimizer.load_state_dict(_optimizer_state_from(tensors, info["optimizer"]))
    scheduler.load_state_dict(info["scheduler"])
    if scaler is not None and info.get("scaler"):
        scaler.load_state_dict(info["scaler"])
    torch.set_rng_state(tensors["rng.cpu"])
    cuda_keys = sorted((k for k in tensors if k.startswith("rng.cuda.")), key=lambda k: int(k.rsplit(".", 1)[1]))
    cuda_states = [tensors[k] for k in cuda_keys]
    if cuda_states and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(cuda_states[: torch.cuda.device_count()])
    return info


# ------------------------------------------------------------------------------------------------------------
# Checkpoints


def _write_checkpoint(model: SegmentationModel, path: Path, metadata: dict[str, Any]) -> Path:
    """Write (or replace) a run's checkpoint directory atomically: a crash never leaves no checkpoint."""
    return save_checkpoint(model, path, metadata, replace=True)


def _tensorboard(out_dir: Path):
    """A SummaryWriter when tensorboard is installed, else None (it is optional)."""
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:  # torch imports it lazily; without the tensorboard package this fails
        return None
    return SummaryWriter(str(out_dir / "tensorboard"))


def _truncate_csv(path: Path, after_step: int) -> None:
    """Drop rows logged after `after_step` (they belong to a run that stopped before saving its state)."""
    if not path.exists():
        return
    import csv

    with open(path, newline="") as f:
        reader = csv.DictReader(f)
        fields, rows = reader.fieldnames or [], [r for r in reader if int(r["step"]) <= after_step]
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=fields)
        writer.writeheader()
        writer.writerows(rows)


def _loss_points(csv_path: Path) -> list[tuple[int, float]]:
    points = []
    for row in CSVMetricsLogger(csv_path).read():
        if row.get("loss"):
            points.append((int(row["step"]), float(row["loss"])))
    return points


# ------------------------------------------------------------------------------------------------------------
# Training


def train(model: SegmentationModel, train_data: ReferringDataset, val_data: ReferringDataset | None,
          cfg: TrainConfig, out_dir: str | os.PathLike, device: str | torch.device = "cpu", progress: bool = True,
          on_step: Callable[[int, int, float], None] | None = None, resume: bool = False,
          metadata: dict[str, Any] | None = None) -> TrainResult:
    """Train `model`'s trainable parameters on `train_data`; validate on `val_data` (may be None).

    Args:
        model: a SegmentationModel (frozen parts stay frozen; only `model.trainable_parameters()` change).
        cfg: the recipe (see TrainConfig / TRAIN_PRESETS).
        out_dir: where metrics.csv, loss.png, best/, last/ and state/ go (module docstring).
        device: "cpu", "cuda", "cuda:N" (under torchrun each rank uses cuda:LOCAL_RANK).
        on_step: called on rank 0 after every optimizer step as on_step(step, total_steps, loss).
        resume: continue from out_dir/state (exactly: weights, optimizer, scheduler, scaler, RNG, data order).
        metadata: extra entries for the checkpoints' metadata (e.g. version, parent).
    Returns:
        TrainResult. The model ends in eval mode holding the LAST step's weights.
    """
    if cfg.align_weight and not model.config.text_alignment:
        raise ClipsegError("align_weight needs a model built with text_alignment (the film-decoder's alignment head)")
    started = time.time()
    out = Path(out_dir)
    device = torch.device(device)
    dist_info, device = setup_distributed(device)
    state_path = out / STATE_DIR
    if dist_info.main:
        if state_path.exists() and not resume:
            raise ClipsegError(f"{out} already holds a training run; pass resume to continue it or choose another directory")
        out.mkdir(parents=True, exist_ok=True)
    if resume and not state_path.exists():
        log.warning("nothing to resume in %s: starting from step 0", out)
        resume = False

    model.to(device)
    params = list(model.trainable_parameters())
    if not params:
        raise ClipsegError("the model has no trainable parameters")
    optimizer = make_optimizer(params, cfg)

    world = dist_info.world
    sampler = DistributedSampler(train_data, num_replicas=world, rank=dist_info.rank, shuffle=True, seed=cfg.seed)
    per_rank = len(sampler)
    if per_rank == 0:
        raise ClipsegError("the training set is empty")
    steps_per_epoch = math.ceil(per_rank / cfg.batch_size)
    total = cfg.steps if cfg.steps > 0 else cfg.epochs * steps_per_epoch
    scheduler = make_scheduler(optimizer, total, cfg)
    precision = precision_policy(device, cfg.amp)
    scaler = precision.scaler()

    step, best_miou, best_step = 0, -math.inf, -1
    if not resume:
        torch.manual_seed(cfg.seed)
    else:
        info = load_train_state(state_path, model, optimizer, scheduler, scaler)
        step, best_miou, best_step = int(info["step"]), float(info.get("best_miou") if info.get("best_miou") is not None else -math.inf), int(info.get("best_step", -1))
        log.info("resumed %s at step %d of %d", out, step, total)

    ddp_model: torch.nn.Module = model
    if world > 1:
        from torch.nn.parallel import DistributedDataParallel

        # An alignment head that this run does not train gets no gradient: DDP must be told, or it waits for one.
        unused = model.config.text_alignment and not cfg.align_weight
        ddp_model = DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None,
                                            find_unused_parameters=unused)

    csv_path = out / "metrics.csv"
    logger = writer = None
    if dist_info.main:
        if resume:
            _truncate_csv(csv_path, step)
        logger = CSVMetricsLogger(csv_path)
        writer = _tensorboard(out)
    bar = None
    if progress and dist_info.main:
        from tqdm.auto import tqdm

        bar = tqdm(total=total, initial=step, desc="train", unit="step", dynamic_ncols=True)

    meta = {**(metadata or {}), "train_config": cfg.to_dict()}
    window: list[float] = []
    history: list[tuple[int, float]] = []
    last_metrics: dict[str, float] = {}
    final_loss = math.nan

    def validate_and_save(done: int) -> None:
        nonlocal best_miou, best_step, last_metrics
        if dist_info.main:
            if val_data is not None and len(val_data):
                result = evaluate(model, val_data, cfg.eval_batch_size, device, max_samples=cfg.max_eval_samples,
                                  num_workers=cfg.num_workers)
                last_metrics = result.metrics
                logger.log(done, **{f"val_{k}": v for k, v in result.metrics.items() if k != "threshold"})
                if writer is not None:
                    for k, v in result.metrics.items():
                        if k not in ("n", "threshold"):
                            writer.add_scalar(f"val/{k}", v, done)
                log.info("step %d: val mIoU %.4f, mean Dice %.4f", done, result.metrics["miou"], result.metrics["mean_dice"])
                if result.metrics["miou"] > best_miou:
                    best_miou, best_step = result.metrics["miou"], done
                    _write_checkpoint(model, out / "best", {**meta, "step": done, "val": result.metrics})
            save_train_state(state_path, model, optimizer, scheduler, scaler, done, cfg,
                             {"best_miou": best_miou if math.isfinite(best_miou) else None, "best_step": best_step})
        dist_info.barrier()

    model.train()
    try:
        while step < total:
            epoch, offset = divmod(step, steps_per_epoch)
            sampler.set_epoch(epoch)
            indices = list(sampler)[offset * cfg.batch_size :]
            data = _Augmented(train_data, cfg.hflip, cfg.seed, epoch) if cfg.hflip > 0 else train_data
            loader = make_loader(data, model, cfg.batch_size, indices, cfg.num_workers, seed=cfg.seed + epoch)
            for batch in loader:
                masks = batch.masks.to(device)
                pixels = batch.pixel_values.to(device, non_blocking=True)
                image_index = batch.image_index.to(device) if batch.image_index is not None else None
                forward = functools.partial(ddp_model, pixels, batch.phrases, masks if cfg.align_weight else None,
                                            image_index)
                loss, lr = training_step(forward, masks, optimizer, scheduler, scaler, params, precision, cfg)
                step += 1
                value = float(loss.detach())
                if not math.isfinite(value):
                    raise ClipsegError(f"training diverged: loss is {value} at step {step}; lower the learning rate")
                window.append(value)
                history.append((step, value))
                if dist_info.main:
                    if bar is not None:
                        bar.update(1)
                        bar.set_postfix(loss=f"{value:.4f}", lr=f"{lr:.2e}")
                    if on_step is not None:
                        on_step(step, total, value)
                    if step % max(1, cfg.log_every) == 0 or step == total:
                        final_loss = float(np.mean(window))
                        logger.log(step, loss=final_loss, lr=lr, epoch=epoch)
                        if writer is not None:
                            writer.add_scalar("train/loss", final_loss, step)
                            writer.add_scalar("train/lr", lr, step)
                        window.clear()
                if (cfg.eval_every and step % cfg.eval_every == 0) or step == total:
                    validate_and_save(step)
                if step >= total:
                    break
        if dist_info.main:
            if window:
                final_loss = float(np.mean(window))
            _write_checkpoint(model, out / "last", {**meta, "step": step, "val": last_metrics})
            png = write_loss_curve(out / "loss.png", _loss_points(csv_path))
    finally:
        if bar is not None:
            bar.close()
        if writer is not None:
            writer.close()
        teardown_distributed(dist_info)
    model.eval()
    main = dist_info.main
    return TrainResult(
        steps=step, final_loss=final_loss, best_miou=best_miou if math.isfinite(best_miou) else math.nan,
        best_step=best_step, last_metrics=last_metrics,
        best_checkpoint=(out / "best") if main and (out / "best").exists() else None,
        last_checkpoint=(out / "last") if main else None, metrics_csv=csv_path if main else None,
        loss_png=png if main else None, loss_history=history, seconds=time.time() - started,
    )
