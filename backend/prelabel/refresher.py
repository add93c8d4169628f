"""Fresh suggestions after a promotion: when a project's version is activated, pre-label its unannotated tasks."""
from __future__ import annotations

import logging
from typing import Callable

from redis import Redis

from backend.prelabel.jobs import queue_prelabel
from backend.prelabel.runs import PrelabelRuns
from backend.prelabel.spec import PrelabelSpec
from finetune.version_events import VersionActivated, VersionEvents

log = logging.getLogger(__name__)


class PromotionRefresher:
    """Subscribed to the process's `VersionEvents`: when a project's version is activated, queues a pre-label run
    of that project's unannotated tasks with that version (once per version, however many servers listen). The run
    carries this server's `PrelabelSpec`, so its suggestions are what /predict would answer. Everything is in the
    server's namespace (`settings.namespace`): the versions it hears of, the once-per-version mark, the run."""

    def __init__(self, conn: Redis, settings, events: VersionEvents | None = None,
                 spec_for: Callable[..., PrelabelSpec] | None = None):
        from finetune.versions import VersionRegistry

        self.conn, self.settings = conn, settings
        self.registry = VersionRegistry(conn, settings.namespace)
        self.runs = PrelabelRuns(conn, settings.namespace)
        self.events = events
        self.spec_for = spec_for or (lambda project, **changes: PrelabelSpec.from_settings(settings, project, **changes))
        self._own_events = False

    def handle(self, event: VersionActivated) -> str | None:
        """Queue the refresh for an activation; the run id, or None when there is nothing to do."""
        try:
            project = self.registry.get(event.version).project
        except Exception:  # noqa: BLE001 - unknown version: nothing to refresh
            return None
        if not project:
            return None  # the base model (no project): a rollback to it refreshes nothing
        if not (self.settings.label_studio_url and self.settings.label_studio_api_key):
            # the run could only fail: say once per version what is missing instead of queueing it
            log.warning("version %s of project %s is active, but fresh suggestions need LABEL_STUDIO_URL and "
                        "LABEL_STUDIO_API_KEY (PRELABEL_ON_PROMOTE=false silences this)", event.version, project)
            return None
        if not self.runs.mark_refreshed(event.version):
            return None  # another server queued it
        spec = self.spec_for(project, unlabeled_only=True, version=event.version)
        run_id, _ = queue_prelabel(self.conn, spec, reason=f"promoted {event.version}")
        log.info("version %s of project %s is active: pre-label run %s queued for its unannotated tasks",
                 event.version, project, run_id)
        return run_id

    def start(self) -> "PromotionRefresher":
        if self.events is None:  # standalone: listen ourselves (a server hands in its shared listener)
            self.events, self._own_events = VersionEvents(lambda: self.registry), True
        self.events.subscribe(self.handle)
        if self._own_events:
            self.events.start()
        return self

    def stop(self) -> None:
        if self._own_events and self.events is not None:
            self.events.stop()
