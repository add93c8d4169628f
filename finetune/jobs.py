"""The fine-tune job (run by `clipseg worker`): corrections + replayed base data → candidate → gate → promote.

    held-out corrections ──┐                          ┌─ the new is better: paired per-sample IoU difference vs
    train corrections ─────┼─> train candidate ─────> │  the parent on held-out corrections, lower bound > 0; the
    replayed base samples ─┘   on frozen features,    │  old is kept: paired drop on the replay's held-out part,
                               anchored to the parent └─ lower bound <= the forgetting budget (finetune.gate)

Everything the job does comes from the `FinetuneSpec` its enqueuer put in the job (finetune.spec); the worker
supplies only its Redis connection, DATA_DIR and DEVICE (`finetune.worker.WorkerContext`); every key the job reads
and writes is in the spec's namespace. The frozen part of the model
(`SegmentationModel.encode_frozen`) runs once per image and once per phrase, cached on disk under
DATA_DIR/features for later fine-tunes (clipseg_model.feature_cache); training steps and every evaluation of the
job run the trained part only. Replay sources: finetune.replay. Progress (stage, step, loss, %) goes to the RQ
job's meta as the job runs.
"""
from __future__ import annotations

import hashlib
import io
import itertools
import logging
import random
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

import torch
import torch.nn.functional as F
from PIL import Image

from clipseg_model.atomic import remove_abandoned_temp_dirs
from clipseg_model.checkpoint import save_checkpoint
from clipseg_model.feature_cache import FeatureCache, FrozenInputs
from clipseg_model.image_io import to_display_rgb
from clipseg_model.loading import load_model, resolve_device
from clipseg_model.segmenter_base import SegmentationModel
from finetune import mixing
from finetune import replay as replay_sources
from finetune.samples import ReferringSample
from finetune.spec import FinetuneSpec
from finetune.worker import WorkerContext
from finetune.batching import resize_mask
from finetune.evaluation import EvalResult, evaluate
from finetune.gate import (
    ACCURACY, AGREEMENT, DEFAULT_THRESHOLD, Forgetting, calibrate_threshold, decide, forgetting,
    paired_evidence,
)
from finetune.optimization import make_optimizer, make_scheduler, precision_policy, training_step
from finetune.recipe import TrainConfig
from finetune.visual_training import VisualPromptDraws, VisualPromptRecipe, visual_prompts

log = logging.getLogger(__name__)

HELD_OUT_FRACTION = 0.2
# The fine-tune recipe: AdamW, cosine decay to 0, BCE + Dice, gradient clipping (lr, steps, batch from the spec).
FINETUNE_RECIPE = TrainConfig(optimizer="adamw", lr=1e-4, weight_decay=1e-4, schedule="cosine", dice_weight=1.0,
                              grad_clip=1.0, batch_size=4)


# ---- corrections -------------------------------------------------------------------------------------------------
def _bucket(annotation_id: int) -> int:
    return int(hashlib.sha1(str(annotation_id).encode()).hexdigest(), 16) % 100


def _held_out(annotation_id: int) -> bool:
    """Stable split by annotation: the same correction is always on the same side, across fine-tunes."""
    return _bucket(annotation_id) < HELD_OUT_FRACTION * 100


def split_corrections(samples: Sequence[ReferringSample], min_held: int) -> tuple[list[ReferringSample], list[ReferringSample]]:
    """(train, held_out) by annotation: a stable 20 %, topped up to `min_held` by the next annotations in hash
    order (never more than half of the annotations), so that small projects still give the gate evidence."""
    ids = sorted({s.meta["annotation"] for s in samples}, key=lambda a: (_bucket(a), a))
    held_ids = {a for a in ids if _held_out(a)}
    count = lambda: sum(1 for s in samples if s.meta["annotation"] in held_ids)  # noqa: E731
    for a in ids:
        if count() >= min_held or len(held_ids) >= len(ids) // 2:
            break
        held_ids.add(a)
    if not held_ids and len(ids) >= 2:  # always keep something to judge on
        held_ids.add(ids[0])
    train = [s for s in samples if s.meta["annotation"] not in held_ids]
    held = [s for s in samples if s.meta["annotation"] in held_ids]
    return train, held


def corrections_as_samples(store, project: str) -> tuple[list[ReferringSample], int]:
    """(samples, watermark): the project's corrections as ReferringSamples, images decoded once per hash."""
    watermark = store.watermark(project)
    images: dict[str, Image.Image] = {}
    out = []
    for s in store.samples(project):
        if s.image_sha256 not in images:
            images[s.image_sha256] = to_display_rgb(Image.open(io.BytesIO(s.load_image())))
        image = images[s.image_sha256]
        if image.size != (s.mask.shape[1], s.mask.shape[0]):
            log.warning("correction %s: mask %s does not fit image %s; skipped", s.annotation_id, s.mask.shape, image.size)
            continue
        out.append(ReferringSample(image, s.prompt, s.mask, "correction",
                                   {"annotation": s.annotation_id, "task": s.task_id, mixing.SEQ: s.seq}))
    return out, watermark


# ---- evaluation and training on frozen features ----------------------------------------------------------------
def miou(model: SegmentationModel, samples: Sequence[ReferringSample], threshold: float = 0.5, batch: int = 8) -> float:
    """Mean IoU of `model` on `samples`, predictions at each sample's own resolution (NaN for no samples)."""
    if not samples:
        return float("nan")
    return float(evaluate(model, samples, batch_size=batch, threshold=threshold).metrics["miou"])


def evaluate_on(model: SegmentationModel, samples: Sequence[ReferringSample], frozen: FrozenInputs | None,
                threshold: float, sweep: bool = False) -> EvalResult:
    """`finetune.evaluation.evaluate` on the frozen features when given (the trained part runs only)."""
    forward = None
    if frozen is not None:
        forward = lambda batch: frozen.logits([s.image for s in batch], [s.phrase for s in batch], model)  # noqa: E731
    return evaluate(model, samples, batch_size=8, threshold=threshold, sweep=sweep, forward=forward)


def training_target(sample: ReferringSample, size: int) -> torch.Tensor:
    """(size, size) float32 target: a replayed sample's soft target (self-distillation), else its mask resized."""
    soft = sample.meta.get(replay_sources.SOFT_TARGET) if isinstance(sample.meta, dict) else None
    if soft is None:
        return resize_mask(sample.mask, size)
    soft = torch.from_numpy(soft)
    if soft.shape[-1] != size:
        soft = F.interpolate(soft[None, None], size=(size, size), mode="bilinear", align_corners=False)[0, 0]
    return soft


def train_candidate(model: SegmentationModel, samples: Sequence[ReferringSample], steps: int, batch_size: int = 4,
                    lr: float = 1e-4, seed: int = 0, on_step: Callable[[int, float], None] | None = None,
                    frozen: FrozenInputs | None = None, recipe: TrainConfig = FINETUNE_RECIPE,
                    anchor_weight: float = 0.0, weights: Sequence[float] | None = None,
                    stats: dict[str, int] | None = None) -> list[float]:
    """Fine-tune the trainable part of `model` in place with `finetune.optimization.training_step`; returns the loss
    per step. With `frozen`, steps run on the cached frozen features (same losses as the full forward pass).

    `anchor_weight` > 0 adds L2-SP anchoring: anchor_weight x the sum over trainable tensors of the squared
    distance to the starting (parent) weights, so the candidate moves only as far from what it knew as the
    corrections pay for (Li et al. 2018, "Explicit inductive bias for transfer learning").

    `weights` (one per sample, finetune.mixing.sample_weights): each batch is drawn with these probabilities
    instead of uniformly (None: uniformly).

    `recipe.visual_prompt_ratio` > 0 mixes visual prompts in (`finetune.visual_training`: a correction is its own
    example, the crop of its target); those steps run the full forward. `stats["visual_prompts"]` counts them.
    """
    if weights is not None and len(weights) != len(samples):
        raise ValueError(f"{len(weights)} weights for {len(samples)} samples")
    cfg = recipe.replace(lr=lr, batch_size=batch_size, steps=steps)
    rng = random.Random(seed)
    torch.manual_seed(seed)
    device = model.device
    model.train()
    params = list(model.trainable_parameters())
    optimizer = make_optimizer(params, cfg)
    scheduler = make_scheduler(optimizer, steps, cfg)
    precision = precision_policy(device, cfg.amp)
    scaler = precision.scaler()
    if frozen is not None:
        frozen.prepare([s.image for s in samples], [s.phrase for s in samples])
    size = model.config.output_size
    anchor = None
    if anchor_weight > 0:
        start = [p.detach().clone() for p in params]
        anchor = lambda: anchor_weight * sum(((p - p0) ** 2).sum() for p, p0 in zip(params, start))  # noqa: E731
    cumulative = list(itertools.accumulate(weights)) if weights is not None else None
    visual = VisualPromptRecipe.from_config(cfg)
    stats = stats if stats is not None else {}
    stats.setdefault("visual_prompts", 0)
    losses = []
    for step in range(1, steps + 1):
        if weights is None:
            picked = [samples[rng.randrange(len(samples))] for _ in range(batch_size)]
        else:
            picked = rng.choices(samples, cum_weights=cumulative, k=batch_size)
        masks = torch.stack([training_target(s, size) for s in picked]).to(device)
        shown = None
        if visual is not None:  # the draws of this step's samples, then their crops (None: none drawn)
            drawn = VisualPromptDraws(picked, visual, seed, step)
            shown = visual_prompts([drawn[i] for i in range(len(picked))], model, visual)
        if shown is not None:
            stats["visual_prompts"] += len(set(shown.index.tolist()))
            pixels = model.preprocess([s.image for s in picked]).to(device)
            forward = lambda: model(pixels, [s.phrase for s in picked], visual=shown)  # noqa: E731
        elif frozen is not None:
            forward = lambda: frozen.logits([s.image for s in picked], [s.phrase for s in picked], model)  # noqa: E731
        else:
            pixels = model.preprocess([s.image for s in picked]).to(device)
            forward = lambda: model(pixels, [s.phrase for s in picked])  # noqa: E731
        loss, _ = training_step(forward, masks, optimizer, scheduler, scaler, params, precision, cfg, extra_loss=anchor)
        losses.append(loss.item())
        if on_step is not None:
            on_step(step, losses[-1])
    model.eval()
    return losses


# ---- progress ----------------------------------------------------------------------------------------------------
class _Progress:
    """Writes stage/step/loss/% into the RQ job's meta (throttled) and the log."""

    def __init__(self, job, total_steps: int):
        self.job = job
        self.total = total_steps
        self._last = 0.0

    def stage(self, name: str, progress: float, message: str = "", **extra: Any) -> None:
        log.info("fine-tune %s: %s %s", name, f"{progress:.0%}", message)
        if self.job is not None:
            self.job.meta.update({"stage": name, "progress": progress, "message": message, "total_steps": self.total,
                                  "stages": [*self.job.meta.get("stages", []), name], **extra})
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


# ---- the job -----------------------------------------------------------------------------------------------------
def parent_watermark(registry, parent_version: str | None, project: str) -> int | None:
    """The correction watermark of `project` the parent version was trained to (`samples["trained_upto"]` of its
    record): 0 where it was trained on none of them (the base model, a base record, another project's version),
    None where unknown (a version recorded before
    the watermark was, or no record): then every correction counts as new (finetune.mixing.split_new)."""
    if parent_version is None:
        return 0
    from finetune.versions import UnknownVersionError

    try:
        record = registry.get(parent_version)
    except UnknownVersionError:
        return None
    if record.status == "base" or (record.project is not None and str(record.project) != str(project)):
        return 0
    upto = record.samples.get("trained_upto")
    return int(upto) if upto is not None else None


def _replay(spec: FinetuneSpec, source: replay_sources.ReplaySource, n_replay: int, seed: int, data_dir: Path,
            parent: SegmentationModel, frozen: FrozenInputs, corrections: Sequence[ReferringSample],
            ) -> tuple[list[ReferringSample], list[ReferringSample]]:
    if source.kind == "shapes":
        return replay_sources.shapes_replay(spec.replay_shapes, n_replay, seed)
    if source.kind == "distill":
        images = list({frozen.digest(s.image): s.image for s in corrections}.values())

        @torch.no_grad()
        def soft_targets(ims: list, phrases: list[str]) -> torch.Tensor:
            return torch.sigmoid(frozen.logits(ims, phrases, parent).float())

        return replay_sources.distillation_replay(
            images, [s.phrase for s in corrections], spec.distill_phrases or replay_sources.DEFAULT_DISTILL_PHRASES,
            soft_targets, n_replay, seed, frozen.digest)
    return replay_sources.dataset_replay(source, n_replay, seed, cache_dir=str(data_dir / "replay" / "hf-cache"))


def base_forgetting(spec: FinetuneSpec, source_kind: str, parent_base: EvalResult,
                    candidate_base: EvalResult) -> Forgetting:
    """The forgetting budget's measurement on the replay source's held-out part, at the scale of its score:
    agreement with the parent for self-distillation (DISTILL_EPSILON), accuracy otherwise (PROMOTE_EPSILON)."""
    agreement = source_kind == "distill"
    return forgetting([r["iou"] for r in parent_base.per_sample], [r["iou"] for r in candidate_base.per_sample],
                      spec.distill_epsilon if agreement else spec.promote_epsilon, AGREEMENT if agreement else ACCURACY,
                      spec.min_base_evidence, spec.confidence)


def finetune_project(project: str, spec: Mapping[str, Any] | FinetuneSpec | None = None,
                     redis_url: str | None = None) -> dict[str, Any]:
    """Fine-tune the active model on `project`'s corrections as `spec` says; promote the candidate only on evidence.

    Returns a summary: version, status (promoted / rejected / inconclusive), promoted (bool), reason, metrics,
    evidence, threshold, sample counts, replay source.
    """
    import redis
    from rq import get_current_job

    from finetune.corrections import CorrectionStore
    from finetune.versions import VersionRecord, VersionRegistry

    if spec is None:  # the worker has no recipe of its own: a job without one was enqueued by older code
        raise ValueError(f"fine-tune of project {project} was enqueued without a spec (maybe_enqueue_finetune(spec=...))")
    spec = spec if isinstance(spec, FinetuneSpec) else FinetuneSpec.from_dict({**spec, "project": str(project)})
    project = spec.project
    job = get_current_job()
    if job is None and not redis_url:
        raise ValueError("finetune_project needs redis_url outside an RQ job")
    conn = job.connection if job is not None else redis.Redis.from_url(redis_url)
    ctx = WorkerContext.current()  # this worker's DATA_DIR and DEVICE, never the enqueuer's
    store, registry = CorrectionStore(conn, spec.namespace), VersionRegistry(conn, spec.namespace)
    progress = _Progress(job, spec.steps)
    data_dir = Path(ctx.data_dir)
    models_dir = data_dir / "models"
    models_dir.mkdir(parents=True, exist_ok=True)
    remove_abandoned_temp_dirs(models_dir)
    started = time.perf_counter()

    progress.stage("loading", 0.02, "reading corrections")
    samples, watermark = corrections_as_samples(store, project)
    train, held = split_corrections(samples, spec.min_evidence)
    if not train or not held:
        raise ValueError(f"project {project}: {len(samples)} usable corrections; need at least 2")
    active = registry.active(project)  # the project's own lineage (else the default): never another project's
    parent_version, parent_path = active if active else (None, spec.base_model)
    device = resolve_device(ctx.device)
    parent = load_model(parent_path, device)
    if active is None:  # the first fine-tune: record the base model so that `clipseg rollback` can return to it
        registry.record_base(parent.version, str(parent_path))
    parent_version = parent_version or parent.version
    trained_upto = parent_watermark(registry, active[0] if active else None, project)
    gate_threshold = spec.threshold if spec.threshold is not None else DEFAULT_THRESHOLD

    precision = precision_policy(device)
    cache = FeatureCache(data_dir / "features", spec.feature_cache_bytes)
    frozen = FrozenInputs(parent, cache, autocast=precision.autocast)
    source = replay_sources.choose_source(spec, data_dir)
    n_replay = int(round(len(train) * spec.replay_ratio)) if source.kind != "none" else 0
    progress.stage("loading", 0.05, f"replay: {source.describe()}", replay_source=source.kind)
    frozen.prepare([s.image for s in samples], [s.phrase for s in samples])
    replay, base_val = _replay(spec, source, n_replay, spec.seed + watermark, data_dir, parent, frozen, train)

    progress.stage("evaluating", 0.1, "scoring the active model")
    parent_held = evaluate_on(parent, held, frozen, gate_threshold)
    parent_base = evaluate_on(parent, base_val, frozen, gate_threshold) if base_val else EvalResult({"n": 0})
    del parent
    candidate = load_model(parent_path, device)
    new, learnt = mixing.split_new(train, trained_upto)
    mix, weights, shares = mixing.sample_weights(new, learnt, replay, spec.replay_ratio)
    progress.stage("training", 0.2, f"{len(train)} corrections ({len(new)} new since the parent, drawn "
                   f"{shares.new:.0%}) + {len(replay)} replayed samples ({source.kind})")
    train_started = time.perf_counter()
    trained: dict[str, int] = {}
    losses = train_candidate(candidate, mix, spec.steps, spec.batch_size, spec.lr, seed=spec.seed,
                             on_step=progress.step, frozen=frozen, anchor_weight=spec.anchor_weight, weights=weights,
                             recipe=FINETUNE_RECIPE.replace(visual_prompt_ratio=spec.visual_prompt_ratio), stats=trained)
    train_s = time.perf_counter() - train_started

    progress.stage("evaluating", 0.85, "scoring the candidate")
    cand_held = evaluate_on(candidate, held, frozen, gate_threshold, sweep=spec.threshold is None)
    cand_base = evaluate_on(candidate, base_val, frozen, gate_threshold) if base_val else EvalResult({"n": 0})
    evidence = paired_evidence([r["iou"] for r in parent_held.per_sample], [r["iou"] for r in cand_held.per_sample],
                               spec.min_evidence, spec.confidence)
    kept = base_forgetting(spec, source.kind, parent_base, cand_base)
    status, reason = decide(evidence, kept)
    if spec.threshold is None:
        threshold, threshold_info = calibrate_threshold(cand_held, spec.threshold_min_samples)
    else:
        threshold, threshold_info = spec.threshold, {"calibrated": False, "explicit": True}

    version = f"p{project}-{time.strftime('%Y%m%d-%H%M%S')}-{watermark}"
    metrics = {"corrections_miou": cand_held.metrics["miou"], "base_miou": kept.candidate_score,
               "parent_corrections_miou": parent_held.metrics["miou"], "parent_base_miou": kept.parent_score,
               "forgetting": asdict(kept), "anchor_weight": spec.anchor_weight,
               "visual_prompt_ratio": spec.visual_prompt_ratio, "visual_prompts": trained["visual_prompts"],
               "mix": {"new": len(new), "learnt": len(learnt), **{f"share_{k}": round(v, 4) for k, v in asdict(shares).items()}},
               "final_loss": losses[-1] if losses else None, "steps": spec.steps, "lr": spec.lr,
               "threshold": threshold, "threshold_sweep": threshold_info, "evidence": asdict(evidence),
               "replay_source": source.kind, "train_seconds": round(train_s, 2),
               "job_seconds": round(time.perf_counter() - started, 2), "features_computed": frozen.computed_images}
    # trained_upto: corrections with seq <= it were in this version's data (the next fine-tune's "learnt")
    counts = {"corrections": len(train), "held_out": len(held), "replay": len(replay), "base_val": len(base_val),
              "new_corrections": len(new), "trained_upto": watermark}

    progress.stage("saving", 0.95, reason)
    path = models_dir / version
    save_checkpoint(candidate, path, {"version": version, "parent": parent_version, "project": project,
                                      "metrics": metrics, "samples": counts, "status": status,
                                      "promoted": status == "promoted", "threshold": threshold,
                                      "spec": spec.to_dict()})
    registry.record(VersionRecord(version, str(path.resolve()), parent_version, status="candidate", reason=reason,
                                  metrics=metrics, samples=counts, project=project))
    registry.store_artifact(version, path)
    if status == "promoted":
        registry.activate(version, "promoted", reason, project=project)
    else:
        registry.set_status(version, status)
    store.mark_trained(project, watermark)
    summary = {"version": version, "status": status, "promoted": status == "promoted", "reason": reason,
               "metrics": metrics, "samples": counts, "parent": parent_version, "replay_source": source.kind,
               "threshold": threshold}
    progress.stage("done", 1.0, f"{status} {version}")
    log.info("fine-tune of project %s: %s", project, summary)
    return summary
