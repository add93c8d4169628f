"""Everything a server process holds, built once from `Settings`: Redis, the served model, the image fetcher, the
predict service, the corrections inbox and the metrics. Routes (backend.app) only talk to this object."""
from __future__ import annotations

import logging
from functools import cached_property
from pathlib import Path
from typing import Any, Mapping, Sequence

from backend.images import ImageFetcher
from backend.label_config import LabelConfig
from backend.metrics import BackendMetrics, gauge
from backend.predictions import PredictService, project_id
from backend.serving_model import ServingModel
from backend.settings import Settings

log = logging.getLogger(__name__)


class BackendRuntime:
    def __init__(self, settings: Settings):
        self.settings = settings
        self.metrics = BackendMetrics()
        self.fetcher = ImageFetcher.from_settings(settings)
        self.configs: dict[str, LabelConfig] = {}  # project id -> parsed config from /setup
        self._config_cache: dict[str, LabelConfig] = {}
        self.model = ServingModel(settings.model, settings.device, settings.threshold, settings.bf16,
                                  registry_factory=self.registry if settings.redis_url else None,
                                  models_dir=str(Path(settings.data_dir) / "models"))
        self.predict_service = PredictService(self.fetcher, self.metrics, on_prediction=self._record_prediction)
        self.inbox = None
        if settings.redis_url:
            from backend.corrections_inbox import CorrectionsInbox

            self.inbox = CorrectionsInbox(str(Path(settings.data_dir) / "spool"), self.store, self._load_task_image,
                                          self._corrections_arrived)
        self.metrics.add_collector(self._collect)

    # ---- Redis-backed parts (only with REDIS_URL) ---------------------------------------------------------
    @cached_property
    def redis(self):
        import redis

        return redis.Redis.from_url(self.settings.redis_url, socket_timeout=2, socket_connect_timeout=1,
                                    health_check_interval=30)

    def registry(self):
        from finetune.versions import VersionRegistry

        return VersionRegistry(self.redis)

    def store(self):
        from finetune.corrections import CorrectionStore

        return CorrectionStore.from_settings(self.redis, self.settings)

    def trigger(self, project: str, reason: str):
        from finetune.triggers import maybe_enqueue_finetune

        s = self.settings
        return maybe_enqueue_finetune(self.redis, project, reason, every_n=s.finetune_every, job_timeout=s.job_timeout)

    def _corrections_arrived(self, project: str) -> None:
        result = self.trigger(project, "correction")
        if result.enqueued:
            log.info("fine-tune %s queued for project %s (%d new corrections)", result.job_id, project, result.new_corrections)

    def _load_task_image(self, task: dict) -> bytes:
        """Image bytes of a webhook's task (the corrections store keeps them by content hash)."""
        data = task.get("data") or {}
        config = self.configs.get(project_id(task.get("project")) or "")
        ref = config.image_ref(task) if config else None
        if ref is None:  # no /setup seen for this project: the first string value that looks like an image ref
            ref = next((v for v in data.values() if isinstance(v, str) and (v.startswith(("/data/", "http", "data:image", "s3://", "gs://", "azure")))), None)
        if ref is None:
            raise ValueError(f"task {task.get('id')} has no image reference")
        return self.fetcher.fetch_bytes(ref, task.get("id"))

    def _record_prediction(self, project: str | None, task: Mapping[str, Any], pairs: Sequence, version: str) -> None:
        if not self.settings.redis_url or project is None or task.get("id") is None:
            return
        store = self.store()
        for request, pred in pairs:
            store.record_prediction(project, int(task["id"]), request.label, pred.mask, version, pred.score)

    # ---- labeling configs --------------------------------------------------------------------------------
    def label_config(self, config: str) -> LabelConfig:
        """Parse (cached) a labeling config; raises UnsupportedConfigError."""
        parsed = self._config_cache.get(config)
        if parsed is None:
            parsed = LabelConfig.from_settings(config, self.settings)
            if len(self._config_cache) > 256:
                self._config_cache.clear()
            self._config_cache[config] = parsed
        return parsed

    # ---- lifecycle ---------------------------------------------------------------------------------------
    def start(self) -> None:
        self.model.start()
        if self.inbox is not None:
            self.inbox.start()

    def stop(self) -> None:
        self.model.stop()
        if self.inbox is not None:
            self.inbox.stop()

    # ---- scrape-time metrics -----------------------------------------------------------------------------
    def _collect(self):
        families = [gauge("clipseg_model_ready", "1 when a model is loaded", float(self.model.ready))]
        if self.inbox is not None:
            families.append(gauge("clipseg_spooled_events", "Webhook events waiting in the local spool", self.inbox.pending()))
        if not self.settings.redis_url:
            return families
        from finetune.triggers import QUEUE_NAME

        families.append(gauge("clipseg_queue_depth", "Jobs waiting in the fine-tune queue", self.redis.llen(f"rq:queue:{QUEUE_NAME}")))
        store = self.store()
        for project in store.projects():
            families.append(gauge("clipseg_corrections", "Corrections stored", store.count(project), {"project": project}))
        for version, stats in store.review_stats().items():
            families.append(gauge("clipseg_review_iou", "Mean IoU of our prediction vs the annotator's final mask",
                                  stats.get("mean_iou", 0.0), {"version": version}))
            families.append(gauge("clipseg_review_count", "Corrections with a review IoU", stats.get("n", 0), {"version": version}))
        active = self.registry().active()
        families.append(gauge("clipseg_active_version", "Active model version (label)", 1.0,
                              {"version": active[0] if active else f"base:{self.settings.model}"}))
        return families
