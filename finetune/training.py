"""The train loop of `clipseg train` (AMP, DDP, resume, validation, checkpoints).

Its parts live by concern: batching and augmentation (finetune.batching), the recipe and its presets
(finetune.recipe), the optimizer step shared with the fine-tune job (finetune.optimization), evaluation
(finetune.evaluation), resume state (finetune.train_state) and torchrun's protocol (finetune.distributed).
Everything here works on any `ReferringDataset` (RefCOCO, generated shapes, corrections) and any `SegmentationModel`.

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

import functools
import logging
import math
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
from torch.utils.data import DistributedSampler

from clipseg_model.checkpoint import save_checkpoint
from clipseg_model.errors import ClipsegError
from clipseg_model.segmenter_base import SegmentationModel
from finetune.batching import Augmented, make_loader
from finetune.distributed import setup_distributed, teardown_distributed
from finetune.evaluation import evaluate
from finetune.optimization import make_optimizer, make_scheduler, precision_policy, training_step
from finetune.recipe import TrainConfig
from finetune.report import CSVMetricsLogger, write_loss_curve
from finetune.samples import ReferringDataset
from finetune.train_state import STATE_DIR, load_train_state, save_train_state
from finetune.visual_training import VisualPromptDraws, VisualPromptRecipe

log = logging.getLogger(__name__)


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
    try:
        visual = VisualPromptRecipe.from_config(cfg)
    except ValueError as exc:
        raise ClipsegError(str(exc)) from exc
    if visual is not None and getattr(model.config, "word_attention", False):
        raise ClipsegError("visual_prompt_ratio > 0 needs a model without word_attention (visual prompts condition "
                           "through the pooled embedding only)")
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
            data = Augmented(train_data, cfg.hflip, cfg.seed, epoch) if cfg.hflip > 0 else train_data
            if visual is not None:
                data = VisualPromptDraws(data, visual, cfg.seed, epoch)
            loader = make_loader(data, model, cfg.batch_size, indices, cfg.num_workers, seed=cfg.seed + epoch,
                                 visual=visual)
            for batch in loader:
                masks = batch.masks.to(device)
                pixels = batch.pixel_values.to(device, non_blocking=True)
                image_index = batch.image_index.to(device) if batch.image_index is not None else None
                # Only a batch with visual prompts passes them: the text-only call stays the one it always was
                extra = {"visual": batch.visual} if batch.visual is not None else {}
                forward = functools.partial(ddp_model, pixels, batch.phrases, masks if cfg.align_weight else None,
                                            image_index, **extra)
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
