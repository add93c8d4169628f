"""What a worker supplies to pre-label jobs, and what it keeps between them.

A job's recipe comes from the `PrelabelSpec` it carries; a worker adds only what is its own: Redis (the job's
connection), Label Studio's URL and key (secrets stay out of Redis), DEVICE, DATA_DIR, BF16 and cache sizes. The
context also holds what a worker process keeps between jobs: the served model per (model, threshold) and one
predict service (its thread pools and image cache) per Label Studio account. Redis keys are in the run's namespace
(`PrelabelSpec.namespace`), not the worker's: the caches are kept per namespace.
"""
from __future__ import annotations

import time
from typing import Any, ClassVar

from redis import Redis

from backend.prelabel.runs import PrelabelError
from backend.prelabel.spec import PrelabelSpec
from backend.settings import Settings


class WorkerContext:
    """One per worker process (`WorkerContext.current()`), built from the worker's own settings."""

    _current: ClassVar["WorkerContext | None"] = None

    def __init__(self, settings: Settings):
        self.settings = settings
        self._models: dict[tuple, Any] = {}
        self._services: dict[tuple, Any] = {}
        self._recorders: dict[tuple, Any] = {}

    @classmethod
    def current(cls) -> "WorkerContext":
        """This process's context; built on first use from the worker's settings (its environment)."""
        if cls._current is None:
            cls._current = cls(Settings.from_env())
        return cls._current

    @classmethod
    def install(cls, settings: Settings) -> "WorkerContext":
        """Make `settings` this process's worker context (tests, benchmarks, a worker command that has them)."""
        cls._current = cls(settings)
        return cls._current

    def settings_for(self, spec: PrelabelSpec) -> Settings:
        """The worker's settings with every field of the run's recipe taken from `spec`."""
        return spec.apply_to(self.settings)

    def segmenter(self, conn: Redis, spec: PrelabelSpec, timeout: float = 300.0):
        """The segmenter of the version every server serves `spec.project` (its active one, else the default, else
        `spec.model`), loaded once per worker process and following promotions; with `spec.version`, wait until
        that one is served. Raises PrelabelError when it does not load in `timeout` s."""
        from backend.serving.model import ServingModel
        from finetune.versions import VersionRegistry

        s = self.settings_for(spec)  # s.namespace: the run's
        key = (s.model, s.device, s.threshold, s.precision_mode, str(s.data_dir), s.namespace)
        model = self._models.get(key)
        if model is None:
            model = ServingModel.from_settings(s, registry_factory=lambda: VersionRegistry(conn, s.namespace),
                                               check_interval=0.0)
            model.start()
            self._models[key] = model
        deadline = time.monotonic() + timeout
        while True:
            model.check_for_update(force=True, wait=max(0.0, deadline - time.monotonic()))
            model.wait_ready(max(0.0, deadline - time.monotonic()))
            if model.ready:
                view = model.for_project(spec.project)  # per-project models (issue 14): that project's own version
                if spec.version is None or view.version == spec.version:
                    return view
            if time.monotonic() > deadline:
                raise PrelabelError(model.error or f"model version {spec.version} did not load within {timeout:.0f} s")
            time.sleep(0.2)

    def recorder(self, conn: Redis, namespace: str):
        """The prediction recorder writing to `conn`'s corrections store in `namespace` (the run's): pre-labelled
        tasks are recorded like /predict's, so the review IoU covers them."""
        from backend.serving.prediction_log import PredictionRecorder
        from finetune.corrections import CorrectionStore

        recorder = self._recorders.get((id(conn), namespace))
        if recorder is None:
            recorder = self._recorders[(id(conn), namespace)] = PredictionRecorder(
                lambda: CorrectionStore(conn, namespace))
        return recorder

    def service(self, conn: Redis, namespace: str):
        """The predict service of this worker (one per process, Label Studio account and namespace: thread pools and
        the image cache are reused across jobs), recording its predictions through `recorder(conn, namespace)`."""
        from backend.images import ImageFetcher
        from backend.metrics import BackendMetrics
        from backend.serving.predict_service import PredictService

        s = self.settings
        key = (s.label_studio_url, s.label_studio_api_key, id(conn), namespace)  # in memory only, never logged
        service = self._services.get(key)
        if service is None:
            service = self._services[key] = PredictService(ImageFetcher.from_settings(s), BackendMetrics(),
                                                           on_prediction=self.recorder(conn, namespace).on_prediction)
        return service
