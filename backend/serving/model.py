"""The models a server process serves: one backbone, and a trainable state (decoder) per Label Studio project.

The backbone (MODEL) is loaded in the background at start; requests answer 503 until it is ready, at once when its
load has failed (nothing is coming). Each project's version (finetune.versions: its own pointer, else the default,
else the base model) is resolved on first use: its trainable state — a few MB — is read from the checkpoint
(materialised from Redis when trained elsewhere), checked against the checksum recorded with the version, and kept
in a byte-bounded LRU shared by all projects. A prediction copies the project's state into the backbone between
passes (`Segmenter.for_state`); the image-feature cache is keyed by image and shared by every project.

A promotion or rollback in project P (pub/sub, polling as a backup) changes P's state on every server between
requests and nothing else. A version that cannot be loaded (damaged, missing, not trained over this backbone) is
marked broken and P falls back to its parent, then the base model; /health and the log say so.

A version trained over another backbone (another MODEL, or a preset that unfreezes vision layers: its trainable
part then holds those layers and its config differs) needs that backbone: it is loaded once per distinct config
(a whole model's memory) and shared by every version trained over it.
"""
from __future__ import annotations

import json
import logging
import threading
import time
from pathlib import Path
from typing import Callable

from backend.settings import MB, Settings
from clipseg_model.caches import LRUCache
from clipseg_model.checkpoint import is_checkpoint, read_checkpoint_config, read_trainable_state
from clipseg_model.loading import load_model
from clipseg_model.precision import apply_precision
from clipseg_model.precision_choice import choose_precision
from clipseg_model.predictor import Segmenter, StateSegmenter
from clipseg_model.segmenter_base import SegmentationModel, TrainableState
from finetune.version_events import VersionActivated, VersionEvents

log = logging.getLogger(__name__)

Pointer = tuple[str, str]


class ModelNotReady(RuntimeError):
    pass


def _config_key(config) -> str:
    """Versions whose configs are equal share a backbone (architecture, base weights, sizes, what trains)."""
    return json.dumps(config.to_dict(), sort_keys=True, default=str)


class ServingModel:
    """Holds the backbone's `Segmenter` and the projects' trainable states; follows every project's pointer."""

    def __init__(self, base_model: str, device: str = "auto", threshold: float | None = None, bf16: bool = False,
                 registry_factory: Callable[[], object] | None = None, check_interval: float = 1.0,
                 models_dir: str = "data/models", state_cache_bytes: int = 512 * MB,
                 feature_cache_bytes: int = 512 * MB, events: VersionEvents | None = None,
                 precision: str = "fp32", precision_cache: str | None = None):
        self.base_model = base_model
        self.events = events  # the process's version-activated listener; None: start() makes its own
        self._own_events = False
        # PRECISION (auto|fp32|bf16|int8; bf16=True: the older BF16): settled when the backbone loads (`choice`)
        self.precision_mode = "bf16" if bf16 and precision == "fp32" else precision
        self.precision_cache = precision_cache
        self.choice = None  # clipseg_model.precision.Choice, once the backbone is loaded
        self.feature_cache_bytes = feature_cache_bytes  # each loaded backbone's in-memory image-feature cache
        self.models_dir = models_dir
        self.device = device
        self.threshold = threshold
        self.bf16 = bf16
        self.registry_factory = registry_factory
        self.check_interval = check_interval
        self._segmenter: Segmenter | None = None
        self._loading: threading.Thread | None = None
        self._lock = threading.RLock()  # resolving and loading project states
        self._last_check = 0.0
        self.error: str | None = None  # the backbone's load error
        self._pointers: tuple[Pointer | None, dict[str, Pointer]] = (None, {})
        # version -> (backbone key, its trainable state): every project on a version shares its state
        self._states: LRUCache[tuple[str, TrainableState]] = LRUCache(state_cache_bytes, lambda v: v[1].nbytes)
        self._backbones: dict[str, Segmenter] = {}  # config (JSON) -> a loaded backbone; MODEL's is one of them
        self._resolved: dict[str | None, tuple[str | None, str | None]] = {}  # project -> (wanted, served version)
        # version -> why it cannot be loaded here; not retried until it is activated again (pub/sub), else a damaged
        # checkpoint would be read on every request
        self.broken: dict[str, str] = {}
        self._stop = threading.Event()

    # ---- state ---------------------------------------------------------------------------------------
    @property
    def ready(self) -> bool:
        return self._segmenter is not None

    @property
    def segmenter(self) -> Segmenter:
        """The backbone's segmenter (the base model's own trainable part unless a state is named per call)."""
        if self._segmenter is None:
            raise ModelNotReady(self.error or "model is still loading")
        return self._segmenter

    @property
    def version(self) -> str | None:
        """The version served to projects without their own (the default, else the base model)."""
        if self._segmenter is None:
            return None
        try:
            return self.for_project(None).version
        except ModelNotReady:
            return None

    @property
    def loading(self) -> bool:
        return self._loading is not None and self._loading.is_alive()

    def status(self) -> dict:
        """For /health: each project's served version, and what is served instead of what (fallbacks)."""
        with self._lock:
            resolved = dict(self._resolved)
        projects = {p: served or self._base_version() for p, (_, served) in resolved.items() if p is not None}
        fallbacks = {str(p): {"wanted": w, "serving": s or self._base_version()}
                     for p, (w, s) in resolved.items() if w is not None and w != s}
        return {"projects": projects, "fallbacks": fallbacks, "broken": dict(self.broken),
                "precision": self.choice.as_dict() if self.choice is not None else None}

    def problem(self) -> str | None:
        """One line for /health's `error`: the backbone's load error, else the wanted versions not served."""
        if self.error:
            return self.error
        fallbacks = self.status()["fallbacks"]
        if not fallbacks:
            return None
        return "; ".join(f"{'default' if p == 'None' else 'project ' + p}: version {f['wanted']} cannot be loaded "
                         f"({self.broken.get(f['wanted'], 'see the log')}), serving {f['serving']}"
                         for p, f in sorted(fallbacks.items()))

    @property
    def base_version(self) -> str | None:
        """MODEL's own version once loaded (not `model.version`: that names whichever state was copied in last)."""
        return self._base_version()

    def _base_version(self) -> str | None:
        """MODEL's own version (not `model.version`: that names whichever state was copied in last)."""
        return self._segmenter.version if self._segmenter is not None else None

    # ---- the backbone --------------------------------------------------------------------------------
    @classmethod
    def from_settings(cls, settings: Settings, registry_factory: Callable[[], object] | None = None,
                      check_interval: float = 1.0, events: VersionEvents | None = None) -> "ServingModel":
        """The serving model `settings` describe (MODEL, DEVICE, THRESHOLD, BF16, DATA_DIR/models, cache budgets)."""
        return cls(settings.model, settings.device, settings.threshold,
                   registry_factory=registry_factory, check_interval=check_interval,
                   models_dir=str(Path(settings.data_dir) / "models"), state_cache_bytes=settings.model_cache_mb * MB,
                   feature_cache_bytes=settings.feature_cache_mb * MB, events=events,
                   precision=settings.precision_mode, precision_cache=str(Path(settings.data_dir) / "precision"))

    def _segmenter_for(self, model: SegmentationModel) -> Segmenter:
        """A segmenter over `model` in the precision chosen for MODEL's backbone (chosen here when it is MODEL)."""
        if self.choice is None:
            self.choice = choose_precision(model, self.precision_mode, self.precision_cache,
                                           0.5 if self.threshold is None else self.threshold, name=self.base_model)
            log.info("precision %s: %s", self.choice.precision.name, self.choice.reason)
        model = apply_precision(model, self.choice.precision)
        return Segmenter(model, threshold=self.threshold, precision=self.choice.precision,
                         feature_cache_bytes=self.feature_cache_bytes)

    def _load_backbone(self) -> None:
        started = time.perf_counter()
        try:
            model = load_model(self.base_model, self.device)
        except Exception as exc:  # noqa: BLE001 - reported by /health, /setup and /predict (503 at once)
            self.error = f"cannot load model {self.base_model}: {exc}"
            log.error("%s", self.error)
            return
        try:
            self._segmenter = self._segmenter_for(model)
        except Exception as exc:  # noqa: BLE001 - e.g. PRECISION=fp8: reported like a load error
            self.error = f"cannot set up precision {self.precision_mode} for {self.base_model}: {exc}"
            log.error("%s", self.error)
            return
        self._backbones[_config_key(model.config)] = self._segmenter
        self.error = None
        self.check_for_update(force=True)
        log.info("backbone %s (version %s) loaded in %.1f s", self.base_model, model.version, time.perf_counter() - started)

    def start(self) -> None:
        """Begin loading the backbone in the background and listen for promotions."""
        self._loading = threading.Thread(target=self._load_backbone, name="model-load", daemon=True)
        self._loading.start()
        if self.registry_factory is not None:
            if self.events is None:  # standalone: listen ourselves (a server hands in its shared listener)
                self.events = VersionEvents(self.registry_factory)
                self._own_events = True
            self.events.subscribe(self.on_activated)
            if self._own_events:
                self.events.start()

    def wait_ready(self, timeout: float) -> bool:
        """Wait up to `timeout` for the backbone; returns at once when its load has failed (nothing is coming)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.ready:
                return True
            if self._loading is not None and not self.loading:
                return self.ready  # the load thread ended without a model
            time.sleep(0.02)
        return self.ready

    # ---- projects ------------------------------------------------------------------------------------
    def check_for_update(self, force: bool = False, wait: float = 0.0) -> None:
        """Between requests: re-read every project's pointer (at most once per `check_interval` unless `force`).
        `wait` is accepted for callers of the single-model API; states load on first use, so nothing waits."""
        now = time.monotonic()
        if self.registry_factory is None or not (force or now - self._last_check >= self.check_interval):
            return
        self._last_check = now
        try:
            pointers = self.registry_factory().pointers()  # type: ignore[attr-defined]
        except Exception as exc:  # noqa: BLE001 - Redis down: keep serving what we have
            log.warning("cannot read the active model versions (%s); keeping the current ones", exc)
            return
        with self._lock:
            self._pointers = pointers

    def _wanted(self, project: str | None) -> Pointer | None:
        default, projects = self._pointers
        return projects.get(project, default) if project is not None else default

    def for_project(self, project: str | None) -> StateSegmenter:
        """What `project` (None: projects without their own version) is served now; raises ModelNotReady."""
        segmenter = self.segmenter
        wanted = self._wanted(project)
        wanted_version = wanted[0] if wanted else None
        with self._lock:
            known = self._resolved.get(project)
            if known is not None and known[0] == wanted_version:
                served = known[1]
                view = self._view(served) if served is not None else segmenter.for_state(None)
                if view is not None:
                    return view
            view, served = self._resolve(wanted_version)
            if known is None or known != (wanted_version, served):
                where = f"project {project}" if project is not None else "projects without their own version"
                log.info("%s: serving version %s", where, view.version)
            self._resolved[project] = (wanted_version, served)
            return view

    def _resolve(self, version: str | None) -> tuple[StateSegmenter, str | None]:
        """The first loadable version of `version`, its parent, its parent's parent ..., else the base model."""
        tried: list[str] = []
        for candidate in self._lineage(version):
            view = self._view(candidate)
            if view is not None:
                if tried:
                    log.warning("version %s cannot be served; falling back to %s", tried[0], candidate)
                return view, candidate
            tried.append(candidate)
        if tried:
            log.warning("version %s cannot be served; falling back to the base model %s", tried[0], self._base_version())
        return self.segmenter.for_state(None), None

    def _lineage(self, version: str | None) -> list[str]:
        if version is None:
            return []
        try:
            return [r.version for r in self.registry_factory().lineage(version)] or [version]  # type: ignore[union-attr]
        except Exception as exc:  # noqa: BLE001 - Redis down: try the version alone
            log.warning("cannot read the lineage of %s (%s)", version, exc)
            return [version]

    def _view(self, version: str) -> StateSegmenter | None:
        """A segmenter serving `version`, loading its state on a miss; None when it cannot be loaded (broken)."""
        if version in self.broken:
            return None
        if version == self._base_version():
            return self.segmenter.for_state(None)
        cached = self._states.get(version)
        if cached is not None:
            return self._backbones[cached[0]].for_state(cached[1])
        started = time.perf_counter()
        try:
            view = self._load_version(version)
        except Exception as exc:  # noqa: BLE001 - any failure: this version is broken here
            reason = f"{type(exc).__name__}: {exc}"
            self.broken[version] = reason
            log.error("cannot load model version %s: %s", version, reason)
            try:
                self.registry_factory().mark_broken(version, reason)  # type: ignore[union-attr]
            except Exception:  # noqa: BLE001 - best effort: the local mark is what matters here
                pass
            return None
        log.info("version %s loaded in %.0f ms", version, (time.perf_counter() - started) * 1000)
        return view

    def _load_version(self, version: str) -> StateSegmenter:
        registry = self.registry_factory()  # type: ignore[misc]
        record = registry.get(version)
        if record.status == "base" and record.path == self.base_model:
            return self.segmenter.for_state(None)
        path = registry.materialize(version, self.models_dir)
        if not is_checkpoint(path):  # another base model (a hub id or a transformers directory)
            return self._backbone(f"path:{path}", path).for_state(None)
        key = _config_key(read_checkpoint_config(path)[0])
        backbone = self._backbone(key, path)
        state = read_trainable_state(backbone.model, path, record.checksum or None)
        state.version = version
        self._states.put(version, (key, state))
        return backbone.for_state(state)

    def _backbone(self, key: str, path: str) -> Segmenter:
        """The loaded backbone for `key`, loading it from `path` the first time (a whole model's memory)."""
        if key not in self._backbones:
            log.warning("%s was not trained over the backbone %s: loading its own backbone (a whole model's memory, "
                        "shared by every version trained over it)", path, self.base_model)
            model = load_model(path, self.device)
            self._backbones[key] = self._segmenter_for(model)
        return self._backbones[key]

    def forget_broken(self, version: str) -> None:
        """Try `version` again on its next use (it was activated anew: an operator may have repaired it)."""
        with self._lock:
            if self.broken.pop(version, None) is not None:
                self._resolved = {p: r for p, r in self._resolved.items() if r[0] != version}

    def on_activated(self, event: VersionActivated) -> None:
        """A version was activated somewhere: re-read the pointers now (polling in check_for_update backs this up)
        and load the new state here, so the next request of that project finds it ready."""
        log.info("version %s announced for %s", event.version,
                 f"project {event.project}" if event.project else "the default")
        self.forget_broken(event.version)
        self.check_for_update(force=True)
        if self.ready:
            self.for_project(event.project)

    def stop(self, load_grace: float = 5.0) -> None:
        """Stop listening for promotions; give a backbone load still under way up to `load_grace` seconds to end (it
        cannot be interrupted; a daemon thread, it dies with the process), so no load outlives its owner's stop."""
        self._stop.set()
        if self._own_events and self.events is not None:
            self.events.stop()
        if self._loading is not None and self._loading is not threading.current_thread():
            self._loading.join(load_grace)
