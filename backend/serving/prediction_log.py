"""Our predictions, recorded for review off the request path.

The corrections store compares each correction with what this backend predicted for the same task and label (the
review IoU per model version, `clipseg_review_iou`). Encoding every mask as PNG and writing it to Redis inside
/predict would add per-task work and a Redis round trip to Label Studio's wait, and a slow or down Redis would slow
predictions; so /predict hands the masks to this recorder's queue and a background thread writes them. The queue is
bounded: under a burst or with Redis down, the oldest pending record is dropped (review statistics are best
effort; corrections themselves go through the durable spool).
"""
from __future__ import annotations

import logging
import queue
import threading
from dataclasses import dataclass
from typing import Any, Callable, Mapping, Sequence

import numpy as np

from finetune.corrections import CorrectionStore

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class PredictionRecord:
    """One region we predicted: (H, W) bool mask of `label` in task `task_id`, for phrase `prompt`."""

    project: str
    task_id: int
    label: str
    prompt: str
    mask: np.ndarray
    score: float
    version: str


class PredictionRecorder:
    """A bounded queue of `PredictionRecord`s written to the corrections store by one daemon thread."""

    def __init__(self, store_factory: Callable[[], CorrectionStore], max_pending: int = 2048):
        self.store_factory = store_factory
        self._queue: queue.Queue[PredictionRecord | None] = queue.Queue(max_pending)
        self._thread: threading.Thread | None = None
        self._pending = 0  # queued and not yet written or dropped
        self._done = threading.Condition()
        self.dropped = 0
        self.written = 0

    def submit(self, records: Sequence[PredictionRecord]) -> None:
        """Queue records without blocking; when full, the oldest pending one is dropped."""
        for record in records:
            with self._done:
                self._pending += 1
            while True:
                try:
                    self._queue.put_nowait(record)
                    break
                except queue.Full:
                    try:
                        self._queue.get_nowait()
                        self.dropped += 1
                        self._finished()
                    except queue.Empty:
                        pass
        if self._thread is None:
            self.start()

    def on_prediction(self, project: str | None, task: Mapping[str, Any], pairs: Sequence, version: str) -> None:
        """`PredictService`'s hook: record each (PromptRequest, MaskPrediction) of `task`; nothing without a project
        or a task id."""
        if project is None or task.get("id") is None:
            return
        self.submit([PredictionRecord(str(project), int(task["id"]), request.label, request.text, pred.mask,
                                      pred.score, version) for request, pred in pairs])

    def start(self) -> None:
        if self._thread is None:
            self._thread = threading.Thread(target=self._run, name="prediction-recorder", daemon=True)
            self._thread.start()

    def stop(self) -> None:
        if self._thread is not None:
            self._queue.put(None)

    def flush(self, timeout: float = 10.0) -> bool:
        """Wait until everything queued so far is written (or dropped); True if that happened in time."""
        with self._done:
            return self._done.wait_for(lambda: self._pending == 0, timeout)

    def _finished(self) -> None:
        with self._done:
            self._pending -= 1
            if self._pending == 0:
                self._done.notify_all()

    def _run(self) -> None:
        store = None
        while True:
            record = self._queue.get()
            if record is None:
                return
            try:
                store = store or self.store_factory()
                store.record_prediction(record.project, record.task_id, record.label, record.mask, record.version,
                                        record.score, prompt=record.prompt)
                self.written += 1
            except Exception as exc:  # noqa: BLE001 - review statistics are best effort
                self.dropped += 1
                log.warning("could not record the prediction of task %s: %s", record.task_id, exc)
            finally:
                self._finished()
