"""Label Studio's "current model" of a project, kept equal to the version this backend serves it.

Label Studio's data manager shows a task's "Prediction score" only for predictions whose `model_version` equals the
project's `model_version`, and "use predictions to pre-label" picks by it too. Connecting a backend sets that field
to the backend's *title* (when it is empty, after /setup returns), and nothing updates it after a promotion. So after
each /setup (a few times over ~10 s, since Label Studio writes its own value after our answer) and after every
activation (promotion, rollback) the project's field is read and, when it differs, PATCHed to the served version.

Label Studio accepts a project's model_version only when an ML backend of the project has it as its title or some
prediction has it: so right after connecting, before any prediction of the served version is stored, it refuses
(HTTP 400) and the field is set once predictions exist: after a /predict whose answer Label Studio stores, and at
the end of a pre-label run (its worker sets it, `set_model_version`).

Credentials: LABEL_STUDIO_URL and LABEL_STUDIO_API_KEY, else the hostname and token Label Studio sent to /setup.
Without either, nothing is written and one warning per project says what to set.
"""
from __future__ import annotations

import heapq
import logging
import threading
import time
from dataclasses import dataclass
from typing import Callable

from finetune.version_events import VersionActivated

log = logging.getLogger(__name__)

AFTER_SETUP_S = (0.5, 2.0, 5.0, 10.0)  # Label Studio saves its own model_version after /setup answers
AFTER_ACTIVATION_S = (0.0, 2.0)
AFTER_PREDICT_S = (2.0, 10.0)  # Label Studio stores "Retrieve predictions" answers after /predict returns
IN_SYNC = ("unchanged", "set")
REFUSED = ("refused",)  # HTTP 400: no ML backend titled so and no prediction of it in the project


def set_model_version(client, project: str, version: str) -> tuple[str, str | None]:
    """Make Label Studio's model_version of `project` equal `version`: ("unchanged" | "set", the value before).
    Raises the SDK's ApiError (400 while no prediction of `version` exists)."""
    from backend.studio.api import api_json

    current = (api_json(client, "GET", f"api/projects/{int(project)}") or {}).get("model_version")
    if current == version:
        return "unchanged", current
    api_json(client, "PATCH", f"api/projects/{int(project)}", {"model_version": version})
    log.info("project %s: Label Studio's model_version %r -> %s (the served version)", project, current, version)
    return "set", current


@dataclass
class SyncState:
    """The last outcome for one project, as /health shows it."""

    served: str | None = None
    in_label_studio: str | None = None
    outcome: str = "pending"  # pending, unchanged, set, no-credentials, refused: ..., error: ...
    at: float = 0.0

    def as_dict(self) -> dict:
        return {"served": self.served, "label_studio": self.in_label_studio, "outcome": self.outcome,
                "at": round(self.at, 3)}


class ModelVersionSync:
    """A thread that sets each project's `model_version` in Label Studio to `served_version(project)`.

    `credentials()` gives (url, key) or empty strings; `served_version(project)` the version served now (may raise
    while the model loads: tried again at the next due time)."""

    def __init__(self, credentials: Callable[[], tuple[str, str]], served_version: Callable[[str], str | None]):
        self.credentials, self.served_version = credentials, served_version
        self.state: dict[str, SyncState] = {}
        self._due: list[tuple[float, str]] = []
        self._cond = threading.Condition()
        self._stopped = False
        self._warned: set[str] = set()
        self._clients: dict[tuple[str, str], object] = {}
        self._thread: threading.Thread | None = None

    # ---- what asks for a sync ---------------------------------------------------------------------------
    def request(self, project: str | None, delays: tuple[float, ...] = AFTER_SETUP_S,
                unless: tuple[str, ...] = ()) -> None:
        """Check `project` after each of `delays` seconds (from now); None is ignored (no project). Nothing when the
        last check of the version served now ended in an outcome `unless` names: IN_SYNC for every /predict, REFUSED
        for every /setup (Label Studio checks its backends at each load of the model page: a refused version stays
        refused until predictions of it are stored, which a /predict or a run's end reports)."""
        if not project:
            return
        state = self.state.get(project)
        if unless and state is not None:
            try:
                served = self.served_version(project)
            except Exception:  # noqa: BLE001 - still loading
                return
            if state.served == served and state.outcome.split(":", 1)[0] in unless:
                return
        now = time.monotonic()
        with self._cond:
            wanted = {round(now + d, 1) for d in delays}
            already = {round(t, 1) for t, p in self._due if p == project}
            for t in sorted(wanted - already):
                heapq.heappush(self._due, (t, project))
            self.state.setdefault(project, SyncState())
            self._cond.notify()

    def on_activated(self, event: VersionActivated) -> None:
        """A version became active: its project, or (the default changed) every project seen so far."""
        projects = [event.project] if event.project else list(self.state)
        for project in projects:
            self.request(project, AFTER_ACTIVATION_S)

    # ---- the work --------------------------------------------------------------------------------------
    def sync(self, project: str) -> SyncState:
        """Read the project's model_version and PATCH it when it differs from the served version; the outcome."""
        from label_studio_sdk.core.api_error import ApiError

        from backend.studio.api import api_error_text, open_client

        state = self.state.setdefault(project, SyncState())
        state.at = time.time()
        state.served = self.served_version(project)
        url, key = self.credentials()
        if not (url and key):
            state.outcome = "no-credentials"
            if project not in self._warned:
                self._warned.add(project)
                log.warning("project %s: Label Studio's model_version cannot follow the served version %s (its "
                            "score column stays empty): set LABEL_STUDIO_URL and LABEL_STUDIO_API_KEY", project,
                            state.served)
            return state
        client = self._clients.get((url, key))
        if client is None:
            client = self._clients[(url, key)] = open_client(url, key, timeout=10.0)
        if not state.served:
            state.outcome = "unchanged"
            return state
        try:
            state.outcome, _ = set_model_version(client, project, state.served)
            state.in_label_studio = state.served
        except (ApiError, OSError, ValueError) as exc:
            if getattr(exc, "status_code", None) == 400:
                state.outcome = f"refused: {api_error_text(exc)[:200]}"
                return state  # no prediction of the served version stored yet: set after the next /predict or run
            state.outcome = f"error: {api_error_text(exc)[:200]}"
            if project not in self._warned:
                self._warned.add(project)
                log.warning("project %s: cannot set Label Studio's model_version to %s: %s", project, state.served,
                            api_error_text(exc))
        except Exception as exc:  # noqa: BLE001 - httpx errors, a model still loading: try at the next due time
            state.outcome = f"error: {type(exc).__name__}: {str(exc)[:200]}"
        return state

    def _loop(self) -> None:
        while True:
            with self._cond:
                while not self._stopped and (not self._due or self._due[0][0] > time.monotonic()):
                    self._cond.wait(None if not self._due else max(0.0, self._due[0][0] - time.monotonic()))
                if self._stopped:
                    return
                _, project = heapq.heappop(self._due)
            self.sync(project)

    def start(self) -> "ModelVersionSync":
        self._thread = threading.Thread(target=self._loop, name="ls-model-version", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        with self._cond:
            self._stopped = True
            self._cond.notify_all()
        if self._thread is not None:
            self._thread.join(timeout=5)

    def status(self) -> dict[str, dict]:
        return {p: s.as_dict() for p, s in self.state.items()}
