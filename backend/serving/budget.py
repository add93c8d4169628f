"""How long a /predict will take, from the measured time per task, and whether it fits the budget.

Label Studio sends every selected task without a current prediction in ONE /predict and gives up after 100 s
(ML_TIMEOUT_PREDICT), storing nothing. A request whose estimate exceeds PREDICT_BUDGET is therefore not started; the
route queues it as a pre-label run instead (backend.prelabel) and says so.
"""
from __future__ import annotations

import threading

PRIOR_S_PER_TASK = 1.0  # before the first measurement: a full-size model on a CPU, with the download
SAFETY = 1.5  # a busy machine is slower than the average so far
EWMA_WEIGHT = 0.3


class PredictBudget:
    """Seconds per task, an exponentially weighted mean over this process's /predict requests. Thread-safe."""

    def __init__(self, budget_s: float, prior_s_per_task: float = PRIOR_S_PER_TASK):
        self.budget_s = budget_s
        self._per_task = prior_s_per_task
        self._measured = False
        self._lock = threading.Lock()

    @property
    def seconds_per_task(self) -> float:
        return self._per_task

    def estimate(self, n_tasks: int) -> float:
        """Seconds `n_tasks` will take, with the safety margin."""
        return n_tasks * self._per_task * SAFETY

    def fits(self, n_tasks: int) -> bool:
        """A single task always runs (interactive requests; Label Studio's per-task fallback)."""
        return n_tasks <= 1 or self.budget_s <= 0 or self.estimate(n_tasks) <= self.budget_s

    def observe(self, n_tasks: int, seconds: float) -> None:
        """Record a finished request of `n_tasks` that took `seconds` (wall time, downloads included)."""
        if n_tasks <= 0:
            return
        per_task = seconds / n_tasks
        with self._lock:
            self._per_task = per_task if not self._measured else (1 - EWMA_WEIGHT) * self._per_task + EWMA_WEIGHT * per_task
            self._measured = True
