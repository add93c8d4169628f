"""What a fine-tune job does, decided by whoever enqueues it (server, CLI or scheduler) and carried in the job.

The worker reads nothing of the job's recipe from its own environment: it needs only REDIS_URL (to find the job),
DATA_DIR (where checkpoints and the feature cache go) and DEVICE (`finetune.worker.WorkerContext`). The Redis
namespace is the job's, not the worker's: a worker serves the queues of every deployment on its database.
`clipseg jobs` shows the spec of every job.
Plain JSON types only: RQ stores job kwargs in Redis and the spec must read the same in any process.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, Mapping

from finetune.keyspace import NAMESPACE

REPLAY_CHOICES = ("auto", "refcoco", "fetched", "shapes", "distill", "none")


def spec_from_dict(cls, data: Mapping[str, Any]):
    """Rebuild the job spec dataclass `cls` from its dict; keys this code does not know (a newer enqueuer's) go to
    its `extra` field, so a job queued by a later release still runs here. Every job spec uses this."""
    names = {f.name for f in dataclasses.fields(cls)}
    known = {k: v for k, v in data.items() if k in names}
    unknown = {k: v for k, v in data.items() if k not in names}
    if unknown:
        known["extra"] = {**known.get("extra", {}), **unknown}
    return cls(**known)


@dataclass(frozen=True)
class FinetuneSpec:
    """The recipe of one fine-tune.

    Attributes:
        base_model: MODEL of the enqueuer: what to fine-tune when no version is active yet.
        steps / lr / batch_size: optimizer steps, AdamW learning rate, samples per step.
        replay: where replayed base data comes from: "auto" (local RefCOCO, else the fetched replay subset, else
            REPLAY_SHAPES when set, else self-distillation), or one source by name, or "none".
        replay_ratio: replayed base samples per training correction; also sets the draws' share of the corrections
            newer than the parent, 1 / (1 + replay_ratio) (finetune.mixing).
        refcoco_dir: a local RefCOCO in any of the three formats (finetune.refcoco), "" for none.
        replay_shapes: generator options (JSON) of a model trained on generated shapes, "" for none.
        distill_phrases: phrases the parent is asked about on the project's images (self-distillation).
        promote_epsilon: the forgetting budget on real replay data (accuracy): the one-sided lower confidence
            bound of the base mIoU drop (parent minus candidate, paired per sample) may not exceed it.
        distill_epsilon: the forgetting budget when the base score is agreement with the parent
            (self-distillation): the same bound on the drop of IoU against the parent's own answers.
        min_base_evidence: fewest base-validation samples forgetting is judged on (fewer: inconclusive).
        anchor_weight: L2-SP weight: the fine-tune's loss adds this x the squared distance of the trained
            weights to the parent's (0: off).
        min_evidence: fewest held-out corrections the gate decides on ("not enough evidence" below).
        confidence: one-sided confidence of the gate's bound on the paired mIoU difference.
        threshold: the mask threshold set explicitly (None: calibrate one per version).
        threshold_min_samples: fewest held-out corrections a calibrated threshold is chosen on (else 0.5).
        feature_cache_bytes: bound of the on-disk cache of frozen features under DATA_DIR/features.
        visual_prompt_ratio: share of the fine-tune's phrases conditioned on a visual prompt (the engineered crop of
            the correction's own target, `TrainConfig.visual_prompt_ratio`) instead of their text; 0 (the default,
            nothing measured says more helps a fine-tune): phrases only, the cached-features path.
        namespace: REDIS_NAMESPACE of the enqueuer: the prefix of every key the job reads and writes
            (finetune.keyspace); a spec of the previous release has none: the default.
    """

    project: str
    base_model: str = "CIDAS/clipseg-rd64-refined"
    steps: int = 200
    lr: float = 1e-4
    batch_size: int = 4
    replay: str = "auto"
    replay_ratio: float = 1.0
    refcoco_dir: str = ""
    replay_shapes: str = ""
    distill_phrases: tuple[str, ...] = ()
    promote_epsilon: float = 0.02
    distill_epsilon: float = 0.10
    min_base_evidence: int = 24
    anchor_weight: float = 0.0
    min_evidence: int = 6
    confidence: float = 0.9
    threshold: float | None = None
    threshold_min_samples: int = 6
    feature_cache_bytes: int = 4 * 1024**3
    visual_prompt_ratio: float = 0.0
    seed: int = 0
    namespace: str = NAMESPACE
    extra: dict[str, Any] = field(default_factory=dict)  # room for options of later versions; ignored today

    def __post_init__(self) -> None:
        if self.replay not in REPLAY_CHOICES:
            raise ValueError(f"replay must be one of {REPLAY_CHOICES}, not {self.replay!r}")
        if self.steps < 1:
            raise ValueError("steps must be >= 1")
        object.__setattr__(self, "project", str(self.project))
        object.__setattr__(self, "distill_phrases", tuple(self.distill_phrases))

    def to_dict(self) -> dict[str, Any]:
        data = dataclasses.asdict(self)
        data["distill_phrases"] = list(self.distill_phrases)
        return data

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> "FinetuneSpec":
        """Rebuild a spec; keys this code does not know (a newer enqueuer's) go to `extra`."""
        return spec_from_dict(cls, data)

    def replace(self, **changes: Any) -> "FinetuneSpec":
        return dataclasses.replace(self, **changes)

    def summary(self) -> str:
        """One line for `clipseg jobs`."""
        thr = "calibrated" if self.threshold is None else f"{self.threshold:g}"
        return (f"base {self.base_model}, {self.steps} steps at lr {self.lr:g}, replay {self.replay} x{self.replay_ratio:g}, "
                f"forgetting budget {self.promote_epsilon:g} (distill {self.distill_epsilon:g}), anchor {self.anchor_weight:g}, "
                f"threshold {thr}")
