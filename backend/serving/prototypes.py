"""Per-label prototypes at serving time (`finetune.prototypes`): label-prompted requests of a project whose label has
a prototype with weight w > 0 are decoded from (1 - w) * phrase + w * prototype.

`ProjectPrototypes.apply` wraps a project's served view in a `PrototypedSegmenter` carrying the prototypes made for
that view's version; its `version` is the view's plus "+proto.<digest of the prototypes>", so Label Studio, the
pre-label runs and the prediction recorder see a new version whenever a prototype changes (and stored predictions
made without it are not taken for current). /predict and pre-label chunks both go through
`PredictService.answer`, which asks the segmenter for each request's prototype. Prototypes are computed by
`ProjectPrototypes.refresh` (a server does it in the background when corrections arrive or the served version
changes); `apply` only reads Redis, so a request never waits for one.
"""
from __future__ import annotations

import logging
import threading
from typing import Any, Callable, Mapping

from backend.labelstudio.prompts import PromptRequest
from clipseg_model.predictor import StateSegmenter
from finetune.keyspace import NAMESPACE
from finetune.prototypes import LabelPrototype, PrototypeStore, prototype_version, refresh_prototypes

log = logging.getLogger(__name__)


class PrototypedSegmenter(StateSegmenter):
    """A project's served view with its applied label prototypes (label -> LabelPrototype, weight > 0)."""

    def __init__(self, view: StateSegmenter, prototypes: Mapping[str, LabelPrototype]):
        super().__init__(view.segmenter, view.state)
        self.view = view
        self.prototypes = dict(prototypes)

    @property
    def version(self) -> str:
        return prototype_version(self.view.version, list(self.prototypes.values()))

    def prototype_for(self, request: PromptRequest) -> LabelPrototype | None:
        """The prototype a request is decoded with: label-prompted requests whose phrase is the one the prototype's
        weight was chosen with; None for every other request (typed phrases, task fields)."""
        if request.source != "label" or request.label is None:
            return None
        proto = self.prototypes.get(request.label)
        return proto if proto is not None and proto.phrase == request.text else None


class ProjectPrototypes:
    """Reads (for every request) and rebuilds (in the background) the label prototypes of projects.

    Args:
        conn: the Redis connection of the corrections store, or a callable returning it.
        exemplars: callable Segmenter -> its `ExemplarSegmenter` (shared with the visual prompts: one embedding cache).
        phrase_of: callable (project, label) -> the phrase a label-prompted request of that label sends (needed by
            `refresh` only).
        namespace: the deployment's key prefix (REDIS_NAMESPACE), as its corrections store's.
    """

    def __init__(self, conn: Any, exemplars: Callable[[Any], Any], phrase_of: Callable[[str, str], str] | None = None,
                 namespace: str = NAMESPACE):
        self._conn = conn
        self.namespace = namespace
        self.exemplars = exemplars
        self.phrase_of = phrase_of
        self._lock = threading.Lock()
        self._running: set[str] = set()
        self._again: set[str] = set()

    def _redis(self):
        return self._conn() if callable(self._conn) else self._conn

    def store(self) -> PrototypeStore:
        return PrototypeStore(self._redis(), self.namespace)

    def apply(self, project: str | None, view: StateSegmenter, on_stale: Callable[[str], None] | None = None) -> StateSegmenter:
        """`view` with `project`'s applied prototypes (a PrototypedSegmenter), or `view` itself when there are none
        (or Redis cannot be read: the phrases alone, never an error). `on_stale(project)` is called when stored
        records were made for another version than `view`'s."""
        if project is None:
            return view
        try:
            records = self.store().all(project)
        except Exception as exc:  # noqa: BLE001 - prototypes are an improvement, never a reason to fail a request
            log.warning("project %s: label prototypes not read (%s); phrases alone", project, exc)
            return view
        if on_stale is not None and any(p.model_version != view.version for p in records.values()):
            on_stale(str(project))
        applied = {label: p for label, p in records.items() if p.applied and p.model_version == view.version}
        return PrototypedSegmenter(view, applied) if applied else view

    def refresh(self, project: str, view: StateSegmenter) -> dict[str, LabelPrototype]:
        """Recompute `project`'s prototypes for `view` (its corrections, its version) where they changed; returns
        label -> LabelPrototype as now stored."""
        from finetune.corrections import CorrectionStore

        if self.phrase_of is None:
            raise ValueError("refresh needs phrase_of")
        conn = self._redis()
        exemplar = self.exemplars(view.segmenter)
        try:
            return refresh_prototypes(CorrectionStore(conn, self.namespace), PrototypeStore(conn, self.namespace),
                                      exemplar, view.state, view.version,
                                      view.segmenter.threshold_for(view.state), project,
                                      lambda label: self.phrase_of(project, label))  # type: ignore[misc]
        except NotImplementedError as exc:  # a model that cannot take visual prompts
            log.info("project %s: no label prototypes: %s", project, exc)
            return {}

    def schedule(self, project: str, view_of: Callable[[str], StateSegmenter]) -> None:
        """Refresh `project` on a background thread (one at a time per project; a request during a run makes one
        more run after it, with the view `view_of(project)` gives then)."""
        project = str(project)
        with self._lock:
            if project in self._running:
                self._again.add(project)
                return
            self._running.add(project)

        def work() -> None:
            while True:
                try:
                    self.refresh(project, view_of(project))
                except Exception as exc:  # noqa: BLE001 - retried on the next correction or version change
                    log.warning("project %s: label prototypes not refreshed: %s", project, exc)
                with self._lock:
                    if project not in self._again:
                        self._running.discard(project)
                        return
                    self._again.discard(project)

        threading.Thread(target=work, name=f"prototypes-{project}", daemon=True).start()

    def busy(self) -> bool:
        """True while a background refresh runs (tests wait on it)."""
        with self._lock:
            return bool(self._running)
