"""The model a server process serves: loaded in the background at start, swapped when a new version is promoted.

Weights are never loaded inside a request: `start()` loads in a thread and requests answer 503 until it is ready.
A promoted version (Redis key + pub/sub, see finetune.versions) is loaded in a thread too and swapped in between
requests; /setup waits briefly for a swap already under way so Label Studio sees the new version at once.
"""
from __future__ import annotations

import json
import logging
import threading
import time
from typing import Callable

from clipseg_model.loading import load_model
from clipseg_model.predictor import Segmenter

log = logging.getLogger(__name__)


class ModelNotReady(RuntimeError):
    pass


class ServingModel:
    """Holds the `Segmenter`; knows which version is wanted (`registry.active()`) and follows it."""

    def __init__(self, base_model: str, device: str = "auto", threshold: float = 0.5, bf16: bool = False,
                 registry_factory: Callable[[], object] | None = None, check_interval: float = 1.0,
                 models_dir: str = "data/models"):
        self.base_model = base_model
        self.models_dir = models_dir
        self.device = device
        self.threshold = threshold
        self.bf16 = bf16
        self.registry_factory = registry_factory
        self.check_interval = check_interval
        self._segmenter: Segmenter | None = None
        self._loaded_path: str | None = None
        self._loading: threading.Thread | None = None
        self._lock = threading.Lock()
        self._last_check = 0.0
        self.error: str | None = None
        # A version whose load failed: polling does not retry it (a pub/sub announcement does), else a corrupt
        # checkpoint would be reloaded on every request.
        self._failed_version: str | None = None
        self._stop = threading.Event()

    # ---- state ---------------------------------------------------------------------------------------
    @property
    def ready(self) -> bool:
        return self._segmenter is not None

    @property
    def segmenter(self) -> Segmenter:
        if self._segmenter is None:
            raise ModelNotReady(self.error or "model is still loading")
        return self._segmenter

    @property
    def version(self) -> str | None:
        return self._segmenter.version if self._segmenter else None

    @property
    def loading(self) -> bool:
        return self._loading is not None and self._loading.is_alive()

    # ---- loading -------------------------------------------------------------------------------------
    def _wanted(self) -> tuple[str | None, str]:
        """(version, path) to serve: the registry's active version, else the configured base model."""
        if self.registry_factory is not None:
            try:
                active = self.registry_factory().active()
                if active:
                    return active
            except Exception as exc:  # noqa: BLE001 - Redis down: keep serving what we have
                log.warning("cannot read the active model version (%s); keeping the current one", exc)
                if self._loaded_path:
                    return None, self._loaded_path
        return None, self.base_model

    def _load(self, path: str, version: str | None) -> None:
        started = time.perf_counter()
        try:
            if version is not None and self.registry_factory is not None:
                # a version trained on another machine: its checkpoint comes from Redis
                path = self.registry_factory().materialize(version, self.models_dir)
            model = load_model(path, self.device)
            if version:
                model.version = version
        except Exception as exc:  # noqa: BLE001 - report, keep the old model serving
            self.error = f"cannot load model {path}: {exc}"
            self._failed_version = version
            log.error("%s", self.error)
            return
        with self._lock:
            if self._segmenter is None:
                self._segmenter = Segmenter(model, threshold=self.threshold, bf16=self.bf16)
            else:
                self._segmenter.swap_model(model)
            self._loaded_path = path
            self.error = None
            self._failed_version = None
        log.info("serving %s (version %s), loaded in %.1f s", path, model.version, time.perf_counter() - started)

    def _load_async(self, path: str, version: str | None) -> None:
        with self._lock:
            if self.loading:
                return
            self._loading = threading.Thread(target=self._load, args=(path, version), name="model-load", daemon=True)
            self._loading.start()

    def start(self) -> None:
        """Begin loading the wanted model in the background and listen for promotions."""
        version, path = self._wanted()
        self._load_async(path, version)
        if self.registry_factory is not None:
            threading.Thread(target=self._listen, name="version-listener", daemon=True).start()

    def wait_ready(self, timeout: float) -> bool:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.ready and not self.loading:
                return True
            time.sleep(0.02)
        return self.ready

    def check_for_update(self, force: bool = False, wait: float = 0.0) -> None:
        """Between requests: start loading a newly activated version; with `wait`, give it that long to finish."""
        now = time.monotonic()
        if force or now - self._last_check >= self.check_interval:
            self._last_check = now
            version, path = self._wanted()
            if self._failed_version is not None and version != self._failed_version and not self.loading:
                self._failed_version = self.error = None  # the broken version is no longer wanted (rollback)
            if version is not None and version not in (self.version, self._failed_version) and not self.loading:
                log.info("model version %s is active; loading it", version)
                self._load_async(path, version)
        if wait and self.loading:
            self._loading.join(wait)  # type: ignore[union-attr]

    def _listen(self) -> None:
        """Pub/sub: load a promoted version as soon as it is announced (polling in check_for_update backs this up)."""
        while not self._stop.is_set():
            try:
                registry = self.registry_factory()  # type: ignore[misc]
                pubsub = registry.conn.pubsub(ignore_subscribe_messages=True)
                pubsub.subscribe(registry.channel)
                while not self._stop.is_set():
                    message = pubsub.get_message(timeout=1.0)
                    if message and message.get("type") == "message":
                        data = json.loads(message["data"])
                        if data.get("event") == "activated" and data.get("version") != self.version:
                            log.info("version %s announced; loading it", data.get("version"))
                            self._load_async(data["path"], data["version"])
            except Exception as exc:  # noqa: BLE001 - Redis restarts: resubscribe
                log.debug("version listener: %s; retrying", exc)
                self._stop.wait(2.0)

    def stop(self) -> None:
        self._stop.set()
