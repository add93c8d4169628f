"""Settings: the one place that reads the environment.

Every other module receives a `Settings` (or plain arguments) instead of calling `os.environ`.
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Mapping

from finetune.keyspace import NAMESPACE

DEFAULT_MODEL = "CIDAS/clipseg-rd64-refined"
MB = 1024 * 1024  # the *_CACHE_MB settings' unit


def _bool(value: str) -> bool:
    return value.strip().lower() in {"1", "true", "yes", "on"}


def _list(value: str) -> tuple[str, ...]:
    return tuple(part.strip() for part in value.split(",") if part.strip())


def _mapping(value: str) -> dict[str, str]:
    """Parse `person=a person;car=a car` (`;` or newline separated) into a dict."""
    out: dict[str, str] = {}
    for item in value.replace("\n", ";").split(";"):
        if "=" in item:
            key, val = item.split("=", 1)
            if key.strip():
                out[key.strip()] = val.strip()
    return out


@dataclass(frozen=True)
class Settings:
    """Runtime configuration. Field metadata names the environment variable and documents it."""

    model: str = field(default=DEFAULT_MODEL, metadata={"env": "MODEL", "help": "hub id or local directory of the model"})
    device: str = field(default="auto", metadata={"env": "DEVICE", "help": "auto, cpu, cuda or cuda:N"})
    precision: str = field(default="auto", metadata={"env": "PRECISION", "help": "CPU inference arithmetic: auto (the fastest of fp32, bf16, int8 whose masks match fp32's, measured once per machine and model), fp32, bf16, int8 or int8+bf16; CUDA always uses fp16 autocast"})
    bf16: bool = field(default=False, metadata={"env": "BF16", "help": "older spelling of PRECISION=bf16 (used when PRECISION is unset)"})
    threshold: float | None = field(default=None, metadata={"env": "THRESHOLD", "help": "probability above which a pixel is in the mask; unset: the served version's calibrated threshold, else 0.5"})
    data_dir: Path = field(default=Path("data"), metadata={"env": "DATA_DIR", "help": "checkpoints, embedded Redis, spool"})
    redis_url: str = field(default="", metadata={"env": "REDIS_URL", "help": "empty: `clipseg serve` starts an embedded Redis"})
    namespace: str = field(default=NAMESPACE, metadata={"env": "REDIS_NAMESPACE", "help": "prefix of every Redis key of this deployment (RQ's queues aside); queued jobs carry it, so deployments with different namespaces can share one Redis database without seeing each other's corrections, versions or runs"})
    label_studio_url: str = field(default="", metadata={"env": "LABEL_STUDIO_URL", "help": "base URL for image downloads; /setup's hostname when empty"})
    label_studio_api_key: str = field(default="", metadata={"env": "LABEL_STUDIO_API_KEY", "help": "legacy token or personal access token; /setup's token when empty"})
    basic_auth_user: str = field(default="", metadata={"env": "BASIC_AUTH_USER", "help": "HTTP basic auth user for the backend (off when empty)"})
    basic_auth_pass: str = field(default="", metadata={"env": "BASIC_AUTH_PASS", "help": "HTTP basic auth password"})
    prompt_field: str = field(default="", metadata={"env": "PROMPT_FIELD", "help": "task data field holding the phrase (e.g. expression)"})
    label_prompts: Mapping[str, str] = field(default_factory=dict, metadata={"env": "LABEL_PROMPTS", "help": "label=phrase;... mapping"})
    allowed_hosts: tuple[str, ...] = field(default=(), metadata={"env": "ALLOWED_IMAGE_HOSTS", "help": "extra hosts images may come from"})
    allow_private_networks: bool = field(default=False, metadata={"env": "ALLOW_PRIVATE_NETWORKS", "help": "allow image URLs on private ranges"})
    image_timeout: float = field(default=10.0, metadata={"env": "IMAGE_TIMEOUT", "help": "seconds per image download"})
    max_image_pixels: int = field(default=50_000_000, metadata={"env": "MAX_IMAGE_PIXELS", "help": "larger images are refused"})
    max_request_bytes: int = field(default=32 * 1024 * 1024, metadata={"env": "MAX_REQUEST_BYTES", "help": "request body limit"})
    polygon: bool = field(default=False, metadata={"env": "POLYGONS", "help": "answer PolygonLabels controls when both exist"})
    finetune_every: int = field(default=20, metadata={"env": "FINETUNE_EVERY", "help": "new corrections per project that trigger a fine-tune"})
    finetune_interval: int = field(default=3600, metadata={"env": "FINETUNE_INTERVAL", "help": "seconds between periodic checks"})
    finetune_steps: int = field(default=200, metadata={"env": "FINETUNE_STEPS", "help": "optimizer steps per fine-tune"})
    finetune_lr: float = field(default=1e-4, metadata={"env": "FINETUNE_LR", "help": "AdamW learning rate of a fine-tune"})
    replay_ratio: float = field(default=1.0, metadata={"env": "REPLAY_RATIO", "help": "base samples per correction in a fine-tune"})
    promote_epsilon: float = field(default=0.02, metadata={"env": "PROMOTE_EPSILON", "help": "forgetting budget on real replay data: the lower confidence bound of the base mIoU drop may not exceed it"})
    distill_epsilon: float = field(default=0.10, metadata={"env": "DISTILL_EPSILON", "help": "forgetting budget when the base score is agreement with the parent (self-distillation)"})
    min_base_evidence: int = field(default=24, metadata={"env": "MIN_BASE_EVIDENCE", "help": "fewest base-validation samples forgetting is judged on (else: inconclusive)"})
    finetune_anchor: float = field(default=0.0, metadata={"env": "FINETUNE_ANCHOR", "help": "L2-SP weight anchoring a fine-tune's weights to its parent's (0: off)"})
    finetune_visual_ratio: float = field(default=0.0, metadata={"env": "FINETUNE_VISUAL_PROMPT_RATIO", "help": "share of a fine-tune's phrases conditioned on the crop of the correction's own target instead of their text (0: phrases only)"})
    refcoco_dir: str = field(default="", metadata={"env": "REFCOCO_DIR", "help": "local RefCOCO for replay, any of the three formats (docs/loop.md)"})
    replay: str = field(default="auto", metadata={"env": "REPLAY", "help": "replay source: auto (RefCOCO, fetched subset, REPLAY_SHAPES, else self-distillation), refcoco, fetched, shapes, distill, none"})
    distill_phrases: tuple[str, ...] = field(default=(), metadata={"env": "DISTILL_PHRASES", "help": "comma-separated phrases self-distillation asks the parent about (empty: common COCO objects)"})
    min_evidence: int = field(default=6, metadata={"env": "MIN_EVIDENCE", "help": "fewest held-out corrections a fine-tune is judged on (else: not enough evidence)"})
    replay_shapes: str = field(default="", metadata={"env": "REPLAY_SHAPES", "help": "generated replay data's options as JSON, e.g. {\"exclude_words\": [\"green\"], \"image_size\": 96}"})
    predict_budget: float = field(default=80.0, metadata={"env": "PREDICT_BUDGET", "help": "seconds a /predict may take (Label Studio waits 100 s); bigger requests become a background pre-label run"})
    prelabel_chunk: int = field(default=100, metadata={"env": "PRELABEL_CHUNK", "help": "tasks per pre-label chunk (the unit workers share and retry)"})
    prelabel_on_promote: bool = field(default=True, metadata={"env": "PRELABEL_ON_PROMOTE", "help": "pre-label a project's unannotated tasks when its new version is promoted"})
    prelabel_replace_older: bool = field(default=True, metadata={"env": "PRELABEL_REPLACE_OLDER", "help": "a pre-label run deletes older versions' predictions of unannotated tasks it predicts"})
    sync_label_studio: bool = field(default=True, metadata={"env": "SYNC_LABEL_STUDIO", "help": "keep each project's model_version in Label Studio equal to the served version (score column, sorting) and show pre-label runs in the ML backend's title; needs LABEL_STUDIO_URL and LABEL_STUDIO_API_KEY (else /setup's hostname and token)"})
    image_cache_mb: int = field(default=256, metadata={"env": "IMAGE_CACHE_MB", "help": "downloaded images kept in memory per process, MB (0: off)"})
    feature_cache_mb: int = field(default=512, metadata={"env": "FEATURE_CACHE_MB", "help": "image features kept in memory per loaded backbone, MB: another phrase on a recent image skips the image encoder (0: off)"})
    model_cache_mb: int = field(default=512, metadata={"env": "MODEL_CACHE_MB", "help": "projects' fine-tuned weights kept in memory, MB; the least recently used are read from disk again when asked for"})
    job_timeout: int = field(default=3600, metadata={"env": "JOB_TIMEOUT", "help": "seconds before an RQ job is killed"})
    log_level: str = field(default="INFO", metadata={"env": "LOG_LEVEL", "help": "DEBUG, INFO, WARNING"})
    log_json: bool = field(default=False, metadata={"env": "LOG_JSON", "help": "one JSON object per log line"})

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None, **overrides) -> "Settings":
        """Build settings from `environ` (default: the process environment); keyword overrides win."""
        env = os.environ if environ is None else environ
        values = {}
        for f in fields(cls):
            name = f.metadata["env"]
            if name not in env or f.name in overrides:
                continue
            raw = env[name]
            kind = dict if callable(f.default_factory) else type(f.default)
            if f.name in ("allowed_hosts", "distill_phrases"):
                values[f.name] = _list(raw)
            elif f.name == "threshold":
                values[f.name] = float(raw) if raw.strip() else None
            elif kind is dict:
                values[f.name] = _mapping(raw)
            elif kind is bool:
                values[f.name] = _bool(raw)
            elif kind is int:
                values[f.name] = int(raw)
            elif kind is float:
                values[f.name] = float(raw)
            elif f.name == "data_dir":
                values[f.name] = Path(raw)
            else:
                values[f.name] = raw
        values.update(overrides)
        return cls(**values)


    @property
    def precision_mode(self) -> str:
        """PRECISION, or bf16 where only the older BF16=true says so."""
        return "bf16" if self.bf16 and self.precision == "auto" else self.precision

    @property
    def mask_threshold(self) -> float:
        """THRESHOLD, or 0.5 where no calibrated threshold applies (commands run on one model)."""
        return 0.5 if self.threshold is None else self.threshold

    def finetune_spec(self, project: str = ""):
        """The `finetune.spec.FinetuneSpec` this process's settings describe (the job gets it, not the worker's env)."""
        from finetune.spec import FinetuneSpec

        return FinetuneSpec(
            project=str(project), base_model=self.model, steps=self.finetune_steps, lr=self.finetune_lr,
            replay=self.replay, replay_ratio=self.replay_ratio, refcoco_dir=self.refcoco_dir,
            replay_shapes=self.replay_shapes, distill_phrases=self.distill_phrases,
            promote_epsilon=self.promote_epsilon, distill_epsilon=self.distill_epsilon,
            min_base_evidence=self.min_base_evidence, anchor_weight=self.finetune_anchor,
            visual_prompt_ratio=self.finetune_visual_ratio,
            min_evidence=self.min_evidence, threshold=self.threshold,
            namespace=self.namespace,
        )


def settings_table() -> list[tuple[str, str, str]]:
    """(variable, default, help) for every setting: the docs/configuration.md table and the compose-file test use it."""
    rows = []
    for f in fields(Settings):
        default = f.default_factory() if callable(f.default_factory) else f.default
        rows.append((f.metadata["env"], str(default), f.metadata["help"]))
    return rows
