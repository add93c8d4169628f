"""Webhook hand-off: Label Studio events → local spool (durable, fast) → corrections store → fine-tune trigger.

The webhook must answer within Label Studio's 1 s, and an event must never be lost: the handler only appends the
event to a spool directory (atomic file write) and returns. A background thread replays the spool into the Redis
corrections store (downloading the image, decoding masks) and then asks the trigger whether a fine-tune is due.
If Redis or Label Studio is down, files wait and are replayed later, in order — also after a restart.
"""
from __future__ import annotations

import logging
import threading
from typing import Any, Callable, Mapping

from backend.ingest import CorrectionIngester, ImageLoader, IngestResult
from backend.labelstudio.webhooks import HANDLED_ACTIONS
from backend.spool import ReplayResult, Spool

log = logging.getLogger(__name__)


class _RecordingStore:
    """Passes events to the real store and remembers which projects got new corrections."""

    def __init__(self, store: CorrectionIngester):
        self.store = store
        self.projects: set[str] = set()

    def ingest_event(self, payload: Mapping[str, Any], image_loader=None) -> IngestResult:
        result = self.store.ingest_event(payload, image_loader)
        log.info("webhook %s: %s (project %s, task %s, %d samples)", result.action, result.status, result.project,
                 result.task_id, result.n_samples)
        if result.status in ("stored", "replaced") and result.project:
            self.projects.add(result.project)
        return result


class CorrectionsInbox:
    """Accepts webhook events and feeds them to the corrections store from a background thread."""

    def __init__(self, spool_dir: str, store_factory: Callable[[], CorrectionIngester],
                 image_loader: ImageLoader | None, on_new_corrections: Callable[[str], None],
                 retry_interval: float = 2.0):
        self.spool = Spool(spool_dir)
        self.store_factory = store_factory
        self.image_loader = image_loader
        self.on_new_corrections = on_new_corrections
        self.retry_interval = retry_interval
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.last: ReplayResult | None = None

    def submit(self, payload: Mapping[str, Any]) -> str:
        """Durably accept one event ("accepted"), or "ignored" for actions the store does not handle."""
        if payload.get("action") not in HANDLED_ACTIONS:
            return "ignored"
        self.spool.append(dict(payload))
        self._wake.set()
        return "accepted"

    def pending(self) -> int:
        return len(self.spool)

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name="corrections-inbox", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._wake.set()

    def drain_once(self) -> ReplayResult:
        """Replay what is spooled now; then trigger fine-tunes for projects that got corrections."""
        recorder = _RecordingStore(self.store_factory())
        result = self.spool.replay(recorder, self.image_loader)  # type: ignore[arg-type]
        self.last = result
        for project in sorted(recorder.projects):
            try:
                self.on_new_corrections(project)
            except Exception as exc:  # noqa: BLE001 - the periodic check will catch up
                log.warning("fine-tune trigger for project %s failed: %s", project, exc)
        return result

    def _run(self) -> None:
        while not self._stop.is_set():
            self._wake.wait(self.retry_interval)
            self._wake.clear()
            if self._stop.is_set():
                break
            if not len(self.spool):
                continue
            try:
                result = self.drain_once()
                if result.error and result.error != "another process is replaying":
                    log.warning("%d webhook events wait in the spool: %s", result.pending, result.error)
            except Exception as exc:  # noqa: BLE001 - Redis down while building the store, etc.
                log.warning("corrections inbox: %s; will retry", exc)
