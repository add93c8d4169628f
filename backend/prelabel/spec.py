"""What a pre-label run does, decided by whoever queues it (a server's /predict, `clipseg prelabel`, the promotion
hook) and carried in its RQ jobs, like `finetune.spec.FinetuneSpec` for fine-tunes.

A worker supplies only what is its own (`backend.prelabel.worker.WorkerContext`): Redis, Label Studio's URL and key
(secrets never go into Redis), device, data dir and its caches. Everything that decides which phrases are segmented
and how masks are cut is here, so a worker on another machine writes exactly what /predict would answer.
Plain JSON types only: RQ stores job kwargs in Redis and the spec must read the same in any process.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, Mapping

from backend.labelstudio.prompts import PromptSettings
from backend.settings import Settings
from finetune.keyspace import NAMESPACE
from finetune.spec import spec_from_dict


# spec field -> the Settings field it comes from: the one list of what a pre-label run takes from its queuer
SETTINGS_FIELDS = {"model": "model", "threshold": "threshold", "prompt_field": "prompt_field",
                   "label_prompts": "label_prompts", "polygon": "polygon", "replace_older": "prelabel_replace_older",
                   "chunk_size": "prelabel_chunk", "job_timeout": "job_timeout",
                   "notify": "sync_label_studio", "precision": "precision", "namespace": "namespace"}


@dataclass(frozen=True)
class PrelabelSpec:
    """The recipe of one pre-label run.

    Attributes:
        project: Label Studio project id.
        model: MODEL of the queuer: what is served when the project has no active version.
        threshold: THRESHOLD of the queuer (None: the served version's calibrated threshold, else 0.5).
        prompt_field / label_prompts: the prompt rule's settings (PROMPT_FIELD, LABEL_PROMPTS).
        polygon: POLYGONS: answer PolygonLabels when a config has both kinds.
        version: the version the run must predict with (a promotion's refresh); None: whatever is served.
        unlabeled_only: skip tasks that have an annotation.
        replace_older: delete older versions' predictions of ours on the unannotated tasks predicted.
        chunk_size: tasks per chunk, the unit workers share and retry.
        job_timeout: seconds before RQ kills one of the run's jobs.
        precision: PRECISION for the worker: a server queues the precision it chose (fp32, bf16, int8), so the
            run's masks are the ones /predict answers; "auto": the worker chooses on its own CPU.
        notify: show the run's progress and end in the ML backend's title (SYNC_LABEL_STUDIO).
        namespace: REDIS_NAMESPACE of the queuer: the prefix of every key the run's jobs read and write (its run
            record, versions, exemplars, recorded predictions), whatever the worker's own.
        exemplar: name of a stored exemplar of the project (`finetune.exemplars`): every task is pre-labelled with
            everything like it (its label) instead of the phrases; its predictions are versioned
            "<version>+<exemplar>", so they sit beside the phrase predictions and a rerun skips what it wrote.
        exemplars: names of several stored exemplars (`clipseg prelabel --exemplar A --exemplar B`): every task
            gets one region per label, each from that label's own examples; versioned "<version>+<A>+<B>".
    """

    project: str
    model: str = "CIDAS/clipseg-rd64-refined"
    threshold: float | None = None
    prompt_field: str = ""
    label_prompts: Mapping[str, str] = field(default_factory=dict)
    polygon: bool = False
    version: str | None = None
    unlabeled_only: bool = False
    replace_older: bool = True
    chunk_size: int = 100
    job_timeout: int = 3600
    notify: bool = True
    precision: str = "auto"
    exemplar: str | None = None
    namespace: str = NAMESPACE
    exemplars: tuple[str, ...] = ()
    extra: dict[str, Any] = field(default_factory=dict)  # options of later versions; ignored today

    def __post_init__(self) -> None:
        if int(self.chunk_size) < 1:
            raise ValueError("chunk_size must be >= 1")
        object.__setattr__(self, "project", str(self.project))
        object.__setattr__(self, "chunk_size", int(self.chunk_size))
        object.__setattr__(self, "label_prompts", dict(self.label_prompts or {}))
        object.__setattr__(self, "exemplars", tuple(self.exemplars or ()))

    @property
    def exemplar_names(self) -> list[str]:
        """The stored exemplars the run predicts from ([]: the phrases)."""
        return ([self.exemplar] if self.exemplar else []) + list(self.exemplars)

    @classmethod
    def from_settings(cls, settings: Settings, project: str | int, **changes: Any) -> "PrelabelSpec":
        """The spec the queuer's `settings` describe (MODEL, THRESHOLD, PROMPT_FIELD, LABEL_PROMPTS, POLYGONS,
        PRELABEL_REPLACE_OLDER, PRELABEL_CHUNK, JOB_TIMEOUT, SYNC_LABEL_STUDIO, PRECISION, REDIS_NAMESPACE); `changes`
        override fields."""
        fields = {name: getattr(settings, setting) for name, setting in SETTINGS_FIELDS.items()}
        return cls(**{"project": str(project), **fields, **changes})

    def apply_to(self, settings: Settings) -> Settings:
        """`settings` (a worker's) with every field of this recipe taken from the spec instead."""
        return dataclasses.replace(settings, **{setting: getattr(self, name) for name, setting in SETTINGS_FIELDS.items()})

    @property
    def prompt_settings(self) -> PromptSettings:
        """The prompt rule's settings input (`backend.labelstudio.prompts`)."""
        return PromptSettings(self.prompt_field, self.label_prompts)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> "PrelabelSpec":
        """Rebuild a spec; keys this code does not know (a newer queuer's) go to `extra`."""
        return spec_from_dict(cls, data)

    def replace(self, **changes: Any) -> "PrelabelSpec":
        return dataclasses.replace(self, **changes)

    def summary(self) -> str:
        """One line for `clipseg prelabel --status` and `clipseg jobs`."""
        thr = "calibrated" if self.threshold is None else f"{self.threshold:g}"
        prompts = f"PROMPT_FIELD={self.prompt_field}" if self.prompt_field else "labels/typed"
        if self.exemplar_names:
            prompts = f"exemplar {', '.join(self.exemplar_names)}"
        return (f"model {self.model}, version {self.version or 'served'}, threshold {thr}, prompts {prompts}, "
                f"{'polygons' if self.polygon else 'brush'}, chunks of {self.chunk_size}")
