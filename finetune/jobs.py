"""The fine-tune job (run by `clipseg worker`): corrections + replayed base data → candidate → gate → promote.

    held-out corrections ──┐                       ┌─ candidate beats the active model on held-out corrections
    train corrections ─────┼─> train candidate ──> │  and loses at most PROMOTE_EPSILON mIoU on base validation?
    replayed base samples ─┘   (CLIP frozen)       └─ yes: save atomically, record, activate (servers hot-reload)
                                                      no: record as rejected; the active model stays

The base data is RefCOCO when REFCOCO_DIR points at a local copy (refer layout), else the generated shapes
benchmark. Progress (stage, step, loss, %) is written to the RQ job's meta as the job runs.
"""
from __future__ import annotations

import hashlib
import io
import json
import logging
import random
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

import torch
from PIL import Image

from clipseg_model.atomic import remove_abandoned_temp_dirs
from clipseg_model.checkpoint import save_checkpoint
from clipseg_model.image_io import to_display_rgb
from clipseg_model.loading import load_model, resolve_device
from clipseg_model.losses import segmentation_loss
from clipseg_model.segmenter_base import SegmentationModel
from finetune.training import collate, evaluate
from finetune.samples import ReferringSample

log = logging.getLogger(__name__)

HELD_OUT_FRACTION = 0.2
BASE_VAL_SAMPLES = 48


@dataclass
class FinetuneData:
    train: list[ReferringSample]
    held_out: list[ReferringSample]
    replay: list[ReferringSample]
    base_val: list[ReferringSample]


def _held_out(annotation_id: int) -> bool:
    """Stable split by annotation: the same correction is always on the same side, across fine-tunes."""
    return int(hashlib.sha1(str(annotation_id).encode()).hexdigest(), 16) % 100 < HELD_OUT_FRACTION * 100


def corrections_as_samples(store, project: str) -> tuple[list[ReferringSample], list[ReferringSample], int]:
    """(train, held_out, watermark): the project's corrections as ReferringSamples, images decoded once per hash."""
    watermark = store.watermark(project)
    images: dict[str, Image.Image] = {}
    train, held = [], []
    for s in store.samples(project):
        if s.image_sha256 not in images:
            images[s.image_sha256] = to_display_rgb(Image.open(io.BytesIO(s.load_image())))
        image = images[s.image_sha256]
        if image.size != (s.mask.shape[1], s.mask.shape[0]):
            log.warning("correction %s: mask %s does not fit image %s; skipped", s.annotation_id, s.mask.shape, image.size)
            continue
        sample = ReferringSample(image, s.prompt, s.mask, "correction", {"annotation": s.annotation_id, "task": s.task_id})
        (held if _held_out(s.annotation_id) else train).append(sample)
    if not held and len(train) >= 2:  # always keep something to judge on
        held.append(train.pop())
    return train, held, watermark


def base_data(settings, n_replay: int, seed: int) -> tuple[list[ReferringSample], list[ReferringSample]]:
    """(replay, validation) samples of the base data: local RefCOCO when configured, else generated shapes."""
    if settings.refcoco_dir:
        from finetune.refcoco import ReferRefCOCO

        train = ReferRefCOCO(settings.refcoco_dir, split="train")
        val = ReferRefCOCO(settings.refcoco_dir, split="val")
        rng = random.Random(seed)
        replay = [train[i] for i in rng.sample(range(len(train)), min(n_replay, len(train)))]
        return replay, [val[i] for i in range(min(BASE_VAL_SAMPLES, len(val)))]
    from finetune.shapes import ShapesDataset

    # The generated data should look like what the model was trained on (REPLAY_SHAPES: the generator's options).
    try:
        options = json.loads(settings.replay_shapes) if settings.replay_shapes else {}
    except ValueError as exc:
        raise ValueError(f"REPLAY_SHAPES is not JSON: {exc}") from None
    replay = ShapesDataset(n_replay, seed=seed, **options)
    val = ShapesDataset(BASE_VAL_SAMPLES, seed=10_000, **options)  # fixed: scores comparable across versions
    return [replay[i] for i in range(len(replay))], [val[i] for i in range(len(val))]


def miou(model: SegmentationModel, samples: Sequence[ReferringSample], threshold: float = 0.5, batch: int = 8) -> float:
    """Mean IoU of `model` on `samples`, predictions at each sample's own resolution (NaN for no samples)."""
    if not samples:
        return float("nan")
    return float(evaluate(model, samples, batch_size=batch, threshold=threshold).metrics["miou"])


def train_candidate(model: SegmentationModel, samples: Sequence[ReferringSample], steps: int, batch_size: int = 4,
                    lr: float = 1e-4, seed: int = 0, on_step: Callable[[int, float], None] | None = None) -> list[float]:
    """Fine-tune the trainable part of `model` in place (AdamW, BCE + Dice); returns the loss per step."""
    rng = random.Random(seed)
    torch.manual_seed(seed)
    device = model.device
    model.train()
    params = list(model.trainable_parameters())
    optimizer = torch.optim.AdamW(params, lr=lr, weight_decay=1e-4)
    scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, max(1, steps))
    autocast = torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda" else torch.autocast("cpu", enabled=False)
    losses = []
    for step in range(1, steps + 1):
        batch = collate([samples[rng.randrange(len(samples))] for _ in range(batch_size)], model)
        with autocast:
            logits = model(batch.pixel_values.to(device), batch.phrases)
        loss = segmentation_loss(logits.float(), batch.masks.to(device), dice_weight=1.0)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        scheduler.step()
        losses.append(loss.item())
        if on_step is not None:
            on_step(step, losses[-1])
    model.eval()
    return losses


class _Progress:
    """Writes stage/step/loss/% into the RQ job's meta (throttled) and the log."""

    def __init__(self, job, total_steps: int):
        self.job = job
        self.total = total_steps
        self._last = 0.0

    def stage(self, name: str, progress: float, message: str = "", **extra: Any) -> None:
        log.info("fine-tune %s: %s %s", name, f"{progress:.0%}", message)
        if self.job is not None:
            self.job.meta.update({"stage": name, "progress": progress, "message": message, "total_steps": self.total, **extra})
            self.job.save_meta()

    def step(self, step: int, loss: float) -> None:
        now = time.monotonic()
        if self.job is not None and (now - self._last > 1.0 or step == self.total):
            self._last = now
            self.job.meta.update({"stage": "training", "step": step, "loss": round(loss, 5),
                                  "progress": 0.2 + 0.6 * step / self.total, "message": f"step {step}/{self.total}"})
            self.job.save_meta()
        if step % max(1, self.total // 10) == 0:
            log.info("fine-tune step %d/%d loss %.4f", step, self.total, loss)


def finetune_project(project: str, redis_url: str | None = None, steps: int | None = None, seed: int = 0,
                     lr: float | None = None, **setting_overrides: Any) -> dict[str, Any]:
    """Fine-tune the active model on `project`'s corrections; promote the candidate only if it is better.

    `steps` and `lr` default to FINETUNE_STEPS and FINETUNE_LR; other keywords override settings.

    Returns a summary: version, promoted (bool), reason, metrics, sample counts.
    """
    import redis
    from rq import get_current_job

    from backend.settings import Settings
    from finetune.corrections import CorrectionStore
    from finetune.versions import VersionRecord, VersionRegistry

    project = str(project)
    job = get_current_job()
    settings = Settings.from_env(**({"redis_url": redis_url} if redis_url else {}), **setting_overrides)
    conn = job.connection if job is not None else redis.Redis.from_url(settings.redis_url)
    store, registry = CorrectionStore(conn), VersionRegistry(conn)
    steps = steps or settings.finetune_steps
    lr = lr or settings.finetune_lr
    progress = _Progress(job, steps)
    models_dir = Path(settings.data_dir) / "models"
    models_dir.mkdir(parents=True, exist_ok=True)
    remove_abandoned_temp_dirs(models_dir)

    progress.stage("loading", 0.02, "reading corrections")
    train, held, watermark = corrections_as_samples(store, project)
    if not train or not held:
        raise ValueError(f"project {project}: {len(train) + len(held)} usable corrections; need at least 2")
    replay, base_val = base_data(settings, int(round(len(train) * settings.replay_ratio)), seed=seed + watermark)
    active = registry.active(project)  # the project's own lineage (else the default): never another project's
    parent_version, parent_path = active if active else (None, settings.model)
    device = resolve_device(settings.device)
    parent = load_model(parent_path, device)
    if active is None:  # the first fine-tune: record the base model so that `clipseg rollback` can return to it
        registry.record_base(parent.version, str(parent_path))
    parent_version = parent_version or parent.version

    progress.stage("evaluating", 0.1, "scoring the active model")
    parent_corr, parent_base = miou(parent, held, settings.threshold), miou(parent, base_val, settings.threshold)
    del parent
    candidate = load_model(parent_path, device)
    progress.stage("training", 0.2, f"{len(train)} corrections + {len(replay)} replayed samples")
    losses = train_candidate(candidate, train + replay, steps, lr=lr, seed=seed, on_step=progress.step)

    progress.stage("evaluating", 0.85, "scoring the candidate")
    cand_corr, cand_base = miou(candidate, held, settings.threshold), miou(candidate, base_val, settings.threshold)
    improved = cand_corr > parent_corr
    kept_base = cand_base >= parent_base - settings.promote_epsilon
    promote = improved and kept_base
    reason = ("better on held-out corrections and base score kept" if promote else
              "not better on held-out corrections" if not improved else
              f"base mIoU dropped by {parent_base - cand_base:.3f} > {settings.promote_epsilon}")
    version = f"p{project}-{time.strftime('%Y%m%d-%H%M%S')}-{watermark}"
    metrics = {"corrections_miou": cand_corr, "base_miou": cand_base, "parent_corrections_miou": parent_corr,
               "parent_base_miou": parent_base, "final_loss": losses[-1] if losses else None, "steps": steps, "lr": lr}
    samples = {"corrections": len(train), "held_out": len(held), "replay": len(replay), "base_val": len(base_val)}

    progress.stage("saving", 0.95, reason)
    path = models_dir / version
    save_checkpoint(candidate, path, {"version": version, "parent": parent_version, "project": project,
                                      "metrics": metrics, "samples": samples, "promoted": promote})
    registry.record(VersionRecord(version, str(path.resolve()), parent_version, status="candidate", reason=reason,
                                  metrics=metrics, samples=samples, project=project))
    registry.store_artifact(version, path)
    if promote:
        registry.activate(version, "promoted", reason, project=project)
    else:
        registry.set_status(version, "rejected")
    store.mark_trained(project, watermark)
    summary = {"version": version, "promoted": promote, "reason": reason, "metrics": metrics, "samples": samples,
               "parent": parent_version}
    progress.stage("done", 1.0, ("promoted " if promote else "rejected ") + version)
    log.info("fine-tune of project %s: %s", project, summary)
    return summary
