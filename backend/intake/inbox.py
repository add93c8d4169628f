"""Webhook hand-off: Label Studio events → local spool (durable, fast) → corrections store → fine-tune trigger.

The webhook must answer within Label Studio's 1 s, and an event must never be lost: the handler only appends the
event to a spool directory (atomic file write) and returns. A background thread replays the spool into the Redis
corrections store (downloading the image, decoding masks) and then asks the trigger whether a fine-tune is due.
If Redis or Label Studio is down, files wait and are replayed later, in order — also after a restart.
"""
from __future__ import annotations

import logging
import threading
import time
from typing import Any, Callable, Mapping

from backend.intake.ingest import CorrectionIngester, ImageLoader, IngestResult
from backend.labelstudio.webhooks import HANDLED_ACTIONS
from backend.intake.spool import QUARANTINE, REJECTED, ReplayResult, Spool
from backend.intake.errors import describe

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


class SpoolUnavailable(Exception):
    """The spool refused an event (disk full, read-only, no permission): it was NOT accepted."""


class CorrectionsInbox:
    """Accepts webhook events and feeds them to the corrections store from a background thread.

    After a transient failure (Redis down, MISCONF, Label Studio down) the replay waits `retry_interval` seconds,
    doubling up to `max_backoff`; a new event does not shorten the wait, so a dead Redis is not hammered.
    """

    def __init__(self, spool_dir: str, store_factory: Callable[[], CorrectionIngester],
                 image_loader: ImageLoader | None, on_new_corrections: Callable[[str], None],
                 retry_interval: float = 2.0, max_backoff: float = 30.0):
        self.spool = Spool(spool_dir)
        self.store_factory = store_factory
        self.image_loader = image_loader
        self.on_new_corrections = on_new_corrections
        self.retry_interval = retry_interval
        self.max_backoff = max_backoff
        self._backoff = 0.0
        self._next_try = 0.0
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.last: ReplayResult | None = None
        self.last_error: str | None = None  # the transient fault that keeps events pending, for /health
        self.spool_error: str | None = None  # why the last spool write failed (cleared by the next success)

    def submit(self, payload: Mapping[str, Any], raw: bytes | None = None) -> str:
        """Durably accept one event ("accepted"), or "ignored" for actions the store does not handle.

        `raw`: the request body as received (already parsed into `payload`), written as is. Raises
        SpoolUnavailable when the event could not be written: the webhook must then answer 503, not 2xx.
        """
        if payload.get("action") not in HANDLED_ACTIONS:
            return "ignored"
        try:
            self.spool.append(raw if raw is not None else dict(payload))
        except OSError as exc:
            self.spool_error = f"cannot write to {self.spool.dir}: {exc.strerror or exc}"
            log.error("webhook %s NOT accepted: %s", payload.get("action"), self.spool_error)
            raise SpoolUnavailable(self.spool_error) from exc
        self.spool_error = None
        self._wake.set()
        return "accepted"

    def pending(self) -> int:
        return len(self.spool)

    def counts(self) -> dict[str, int]:
        """Events pending, rejected and quarantined (for /health, /metrics and `clipseg status`)."""
        return {"pending": len(self.spool), "rejected": len(self.spool.set_aside(REJECTED)),
                "quarantined": len(self.spool.set_aside(QUARANTINE))}

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
                log.warning("fine-tune trigger for project %s failed: %s", project, describe(exc))
        return result

    def _failed(self, error: str) -> None:
        self.last_error = error
        self._backoff = min(self.max_backoff, self._backoff * 2 if self._backoff else self.retry_interval)
        self._next_try = time.monotonic() + self._backoff
        log.warning("%d webhook events wait in the spool (%s); next try in %.0f s", self.pending(), error,
                    self._backoff)

    def _run(self) -> None:
        while not self._stop.is_set():
            wait = max(self._next_try - time.monotonic(), 0.0) if self._backoff else self.retry_interval
            if self._backoff:
                self._stop.wait(wait)  # backing off: new events wait too (they are safe on disk)
            else:
                self._wake.wait(wait)
            self._wake.clear()
            if self._stop.is_set():
                break
            if not len(self.spool):
                continue
            try:
                result = self.drain_once()
            except Exception as exc:  # noqa: BLE001 - Redis down while building the store, etc.
                self._failed(describe(exc))
                continue
            if result.error and result.error not in ("another process is replaying", "deadline"):
                self._failed(result.error)
            else:
                self._backoff, self.last_error = 0.0, None
