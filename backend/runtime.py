"""Everything a server process holds, built once from `Settings`: Redis, the served model, the image fetcher, the
labeling configs, the predict service, the prediction recorder, the corrections inbox and the metrics. Routes
(backend.http.app) only talk to this object and its verbs (`setup`, `config_for_predict`, `start_training`)."""
from __future__ import annotations

import logging
import threading
from functools import cached_property
from pathlib import Path

from backend.images import ImageFetcher
from backend.labelstudio.config import LabelConfig, LabelConfigs
from backend.labelstudio.prompts import PromptSettings
from backend.metrics import BackendMetrics, gauge
from backend.serving.prediction_log import PredictionRecorder
from backend.labelstudio.protocol import BadRequest
from backend.serving.predict_service import PredictService
from backend.serving.model import ServingModel
from backend.settings import Settings
from clipseg_model.checkpoint import base_version_name
from finetune.version_events import VersionEvents

log = logging.getLogger(__name__)


class BackendRuntime:
    def __init__(self, settings: Settings):
        self.settings = settings
        self.metrics = BackendMetrics()
        self.fetcher = ImageFetcher.from_settings(settings)
        self.configs = LabelConfigs(settings)
        self.prompts = PromptSettings.from_settings(settings)  # the prompt rule's settings: /predict and ingest alike
        # one version-activated listener per server: the model, the refresher and the Label Studio sync subscribe
        self.events = VersionEvents(self.registry) if settings.redis_url else None
        self.model = ServingModel.from_settings(settings, registry_factory=self.registry if settings.redis_url else None,
                                                events=self.events)
        self.recorder = PredictionRecorder(self.store) if settings.redis_url else None
        self.predict_service = PredictService(self.fetcher, self.metrics,
                                              on_prediction=self.recorder.on_prediction if self.recorder else None)
        self.inbox = None
        self.refresher = None
        self.version_sync = None
        if settings.sync_label_studio:
            from backend.studio.model_version import ModelVersionSync

            self.version_sync = ModelVersionSync(lambda: (self.fetcher.base_url, self.fetcher.api_key),
                                                 lambda project: self.project_model(project).version)
        self.prototypes = None
        if settings.redis_url:
            from backend.intake.inbox import CorrectionsInbox
            from backend.serving.prototypes import ProjectPrototypes

            self.prototypes = ProjectPrototypes(lambda: self.redis, self.predict_service.visual_prompts.exemplar,
                                                self.label_phrase, namespace=settings.namespace)

            self.inbox = CorrectionsInbox(str(Path(settings.data_dir) / "spool"), self.ingester, self.fetcher.fetch_bytes,
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

        return VersionRegistry(self.redis, self.settings.namespace)

    def store(self):
        from finetune.corrections import CorrectionStore

        return CorrectionStore(self.redis, self.settings.namespace)

    def ingester(self):
        from backend.intake.ingest import CorrectionIngester

        return CorrectionIngester(self.store(), self.configs, self.prompts, self.fetcher.fetch_bytes)

    def trigger(self, project: str, reason: str):
        from finetune.triggers import maybe_enqueue_finetune

        s = self.settings
        return maybe_enqueue_finetune(self.redis, project, reason, every_n=s.finetune_every, job_timeout=s.job_timeout,
                                      namespace=s.namespace, spec=s.finetune_spec(project).to_dict())

    def _corrections_arrived(self, project: str) -> None:
        self.refresh_prototypes(project, background=True)
        result = self.trigger(project, "correction")
        if result.enqueued:
            log.info("fine-tune %s queued for project %s (%d new corrections)", result.job_id, project, result.new_corrections)

    # ---- verbs of the routes -------------------------------------------------------------------------------
    def setup(self, schema: str, project: str | None, hostname: str, access_token: str) -> LabelConfig:
        """/setup: parse and remember the project's config, take Label Studio's URL and token for downloads.
        Raises UnsupportedConfigError."""
        config = self.configs.parse(schema)
        self.configs.remember(project, config)
        self.fetcher.use_setup_credentials(hostname, access_token)
        if self.version_sync is not None:  # Label Studio's model_version: equal to ours once it has saved its own
            from backend.studio.model_version import REFUSED

            self.version_sync.request(project, unless=REFUSED)
        if project:
            self.refresh_prototypes(project, background=True)
        return config

    def label_phrase(self, project: str, label: str) -> str:
        """The phrase a label-prompted /predict of `project` sends for `label` (the prompt rule's step 4)."""
        from backend.intake.ingest import project_label_config
        from backend.labelstudio.prompts import label_phrase

        config = self.configs.for_project(project, project_label_config(self.store(), project))
        control = next((c for c in config.controls if label in c.labels), None) if config is not None else None
        return label_phrase(self.prompts, control, label)

    def refresh_prototypes(self, project: str, background: bool = False):
        """Bring `project`'s label prototypes (`backend.serving.prototypes`) up to date with its corrections and
        the version it is served; in the background, or now (returns label -> LabelPrototype)."""
        if self.prototypes is None or not self.model.ready:
            return {}
        if background:
            self.prototypes.schedule(project, self.model.for_project)
            return {}
        return self.prototypes.refresh(project, self.model.for_project(project))

    def config_for_predict(self, schema: str | None, project: str | None) -> LabelConfig:
        """/predict's config: the request's `label_config`, else the project's from /setup. Raises
        UnsupportedConfigError, or BadRequest when neither is there."""
        config = self.configs.for_project(project, None) if not schema else self.configs.parse(schema)
        if config is None:
            raise BadRequest("no 'label_config' in the request and no /setup seen for this project")
        if schema:
            self.configs.remember(project, config)
        return config

    def prelabel_spec(self, project: str, **changes):
        """The `PrelabelSpec` this server queues for `project`: its settings, and the precision its model runs in
        (so a worker on this kind of CPU writes the masks /predict answers)."""
        from backend.prelabel import PrelabelSpec

        return PrelabelSpec.from_settings(self.settings, project, **{"precision": self.chosen_precision(), **changes})

    def chosen_precision(self) -> str:
        """The PRECISION mode that reproduces this server's choice (fp32, bf16, int8, int8+bf16: each taken as set but
        int8, whose decoder precision is measured), or the setting itself before the model is loaded or on CUDA."""
        choice = self.model.choice
        if choice is None or choice.precision.name == "fp16":
            return self.settings.precision_mode
        return choice.precision.name

    def announce_prelabel(self, project: str, tasks: int, segmenter_version: str | None) -> None:
        """In a thread (each title change makes Label Studio call this server): the ML backend's title says that a
        run of `tasks` tasks is queued, and whether a worker listens for it."""
        if not self.settings.sync_label_studio:
            return
        url, key = self.fetcher.base_url, self.fetcher.api_key
        if not (url and key):
            return

        def announce() -> None:
            from rq import Worker

            from backend.studio.api import open_client
            from backend.studio.run_notice import RunNotice, queued_notice
            from finetune.triggers import PRELABEL_QUEUE

            try:
                listening = any(PRELABEL_QUEUE in w.queue_names() for w in Worker.all(connection=self.redis))
            except Exception:  # noqa: BLE001 - Redis blip: say nothing about workers
                listening = True
            try:
                notice = RunNotice.for_project(open_client(url, key, timeout=10.0), project, self.registry(),
                                               segmenter_version, self.base_version)
            except Exception as exc:  # noqa: BLE001 - Redis blip: the run is queued, only its notice is lost
                log.warning("project %s: no notice of the queued run in Label Studio: %s", project, exc)
                return
            notice.show(queued_notice(tasks, waiting_for_worker=not listening), final=True, keep=True)

        threading.Thread(target=announce, name="prelabel-notice", daemon=True).start()

    # ---- per-project models ----------------------------------------------------------------------------
    def project_model(self, project: str | None, refresh: bool = False):
        """The segmenter (a `StateSegmenter`) that serves `project` now: its own version, else the default, else
        the base model, with the project's label prototypes (a `PrototypedSegmenter` whose version says so);
        `refresh` re-reads the pointers first (/setup). Raises ModelNotReady."""
        if refresh:
            self.model.check_for_update(force=True)
        view = self.model.for_project(project)
        if self.prototypes is None:
            return view
        return self.prototypes.apply(project, view, on_stale=lambda p: self.refresh_prototypes(p, background=True))

    @property
    def base_version(self) -> str:
        """The version served where no version is active: the loaded MODEL's own (a checkpoint names itself),
        else the base-model name of MODEL (`clipseg_model.checkpoint.base_version_name`)."""
        return self.model.base_version or base_version_name(self.settings.model)

    # ---- lifecycle ---------------------------------------------------------------------------------------
    def start(self) -> None:
        self.model.start()  # subscribes to self.events
        if self.inbox is not None:
            self.inbox.start()
        if self.settings.redis_url and self.settings.prelabel_on_promote:
            from backend.prelabel import PromotionRefresher  # fresh suggestions after a promotion

            self.refresher = PromotionRefresher(self.redis, self.settings, events=self.events,
                                                spec_for=self.prelabel_spec).start()
        if self.version_sync is not None:
            self.version_sync.start()
            if self.events is not None:
                self.events.subscribe(self.version_sync.on_activated)
        if self.events is not None:
            self.events.start()

    def stop(self) -> None:
        if self.events is not None:
            self.events.stop()
        if self.version_sync is not None:
            self.version_sync.stop()
        self.model.stop()
        if self.refresher is not None:
            self.refresher.stop()
        if self.inbox is not None:
            self.inbox.stop()
        if self.recorder is not None:
            self.recorder.stop()

    # ---- scrape-time metrics -----------------------------------------------------------------------------
    def _collect(self):
        families = [gauge("clipseg_model_ready", "1 when a model is loaded", float(self.model.ready))]
        if self.inbox is not None:
            families.append(gauge("clipseg_spooled_events", "Webhook events waiting in the local spool", self.inbox.pending()))
        if not self.settings.redis_url:
            return families
        from rq import Queue

        from finetune.triggers import QUEUE_NAME

        families.append(gauge("clipseg_queue_depth", "Jobs waiting in the fine-tune queue", Queue(QUEUE_NAME, connection=self.redis).count))
        store = self.store()
        for project in store.projects():
            families.append(gauge("clipseg_corrections", "Corrections stored", store.count(project), {"project": project}))
        registry = self.registry()
        default, pointers = registry.pointers()
        for project in sorted(set(store.projects()) | set(pointers) | set(registry.projects())):
            for version, stats in store.review_stats(project).items():
                labels = {"project": project, "version": version}
                families.append(gauge("clipseg_review_iou", "Mean IoU of our prediction vs the annotator's final mask",
                                      stats.get("mean_iou", 0.0), labels))
                families.append(gauge("clipseg_review_count", "Corrections with a review IoU", stats.get("n", 0), labels))
            active = pointers.get(project, default)
            families.append(gauge("clipseg_active_version", "Active model version of a project (label)", 1.0,
                                  {"project": project, "version": active[0] if active else self.base_version}))
        families.append(gauge("clipseg_active_version", "Active model version of a project (label)", 1.0,
                              {"project": "", "version": default[0] if default else self.base_version}))
        return families
