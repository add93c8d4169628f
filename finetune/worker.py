"""The RQ worker classes of `clipseg worker`: RQ's, with a cold shutdown that loses no job and an exit that does not
wait 60 s on RQ's pub/sub thread (`QuickUnsubscribe`); and the worker's own context of fine-tune jobs
(`WorkerContext`).

RQ's own shutdown: the first SIGINT/SIGTERM is warm (finish the running job, then exit), a second one is cold (take the
job down with the worker). The job is then left "started" until its worker is found gone, and is failed or retried
at the cost of one of its retries. `clipseg serve` has to stop within seconds, so here the second signal *abandons*
the running job instead: `JobAbandoned` is raised into the job's code (a `SimpleWorker`: the job runs in the worker
process), or the work horse is killed (a `SpawnWorker`), and the job goes back to the front of its queue, its
retries untouched, `meta["abandoned"]` counting how often. The next worker to start takes it first.

What the jobs do about it: a fine-tune keeps its project's lock (`finetune.triggers.release_on_failure` ignores an
abandonment), so no second fine-tune is queued behind it; a pre-label chunk is given back at once
(`backend.prelabel.jobs.work_job`), so the requeued job claims it again without waiting for the lease to run out.
A job that cannot be interrupted in time (stuck in one long C call) is SIGKILLed by serve and recovered from its
heartbeat on the next start (`finetune.triggers.recover_abandoned`).

What a fine-tune takes from its worker, not from its spec: DATA_DIR (checkpoints, feature cache) and DEVICE, the
`WorkerContext` that `clipseg worker` installs from its settings (read in backend.settings) before taking jobs. A
`SpawnWorker`'s work horse is a fresh interpreter that inherits no module state: the worker hands the context down in
the horse's environment (`CONTEXT_ENV`, as RQ itself hands down RQ_WORKER_ID and RQ_JOB_ID), and the horse reads it
back on first use. That variable is a hand-off between the two processes of one worker, written and read only here;
it is no setting. A process with neither (a plain `rq worker`) refuses fine-tunes instead of guessing a directory.
"""
from __future__ import annotations

import json
import logging
import os
from dataclasses import asdict, dataclass
from datetime import timedelta
from pathlib import Path
from typing import Any, ClassVar

from rq import worker as rq_worker
from rq.job import Job
from rq.queue import Queue
from rq.utils import now

log = logging.getLogger(__name__)


CONTEXT_ENV = "CLIPSEG_WORKER_CONTEXT"  # worker -> spawned work horse (JSON of a WorkerContext)


@dataclass(frozen=True)
class WorkerContext:
    """What the worker, not the job, decides: where files go (its DATA_DIR) and which device trains (its DEVICE)."""

    data_dir: str
    device: str

    _current: ClassVar["WorkerContext | None"] = None

    @classmethod
    def install(cls, data_dir: str | Path, device: str) -> "WorkerContext":
        """Make (data_dir, device) this process's context: `clipseg worker` with its settings, tests, `--inline`."""
        cls._current = cls(str(data_dir), device)
        return cls._current

    @classmethod
    def current(cls) -> "WorkerContext":
        """This process's context: the installed one, else the one a spawning worker handed down (read on first use).
        Raises RuntimeError where there is neither."""
        if cls._current is None:
            raw = os.environ.get(CONTEXT_ENV)
            if not raw:
                raise RuntimeError("this process has no fine-tune worker context (its DATA_DIR and DEVICE): "
                                   "run fine-tunes with `clipseg worker`")
            data = json.loads(raw)
            cls._current = cls(str(data["data_dir"]), str(data["device"]))
        return cls._current

    @classmethod
    def hand_down(cls, environ: Any = os.environ) -> None:
        """Put the installed context into `environ` for a work horse about to be spawned (nothing if none is)."""
        if cls._current is not None:
            environ[CONTEXT_ENV] = json.dumps(asdict(cls._current))


class JobAbandoned(BaseException):
    """Raised into a job's code when its worker shuts down: the job is put back in its queue, not failed.

    A BaseException, so that a job's `except Exception` does not swallow it."""


class AbandonOnShutdown:
    """Mixin for RQ worker classes: the second SIGINT/SIGTERM abandons the running job (see the module docstring)."""

    _abandoned_job_id: str | None = None

    def request_force_stop(self, signum: int, frame: Any) -> None:
        """RQ's cold shutdown, except that the running job is requeued instead of left started."""
        since = self._shutdown_requested_date
        if since is not None and now() - since < timedelta(seconds=1):
            return  # the same Ctrl-C delivered twice (RQ ignores it too)
        job_id = self.get_current_job_id()
        if job_id is None:
            raise SystemExit()
        self._abandoned_job_id = job_id
        self.log.warning("Worker %s: shutting down now; job %s goes back to the front of its queue", self.name, job_id)
        if self.horse_pid:  # a forked or spawned work horse: its monitor sees it die and calls handle_job_failure
            self.kill_horse()
            return
        raise JobAbandoned(f"worker {self.name} shut down during job {job_id}")

    def handle_job_failure(self, job: Job, queue: Queue, started_job_registry=None, exc_string: str = "",
                           execution=None) -> None:
        """RQ's failure handling, except for the job abandoned at shutdown: that one is requeued."""
        if job.id != self._abandoned_job_id:
            return super().handle_job_failure(job, queue, started_job_registry, exc_string, execution)  # type: ignore[misc]
        self._abandoned_job_id = None
        requeue_abandoned(self, job, queue, execution)
        return None


def requeue_abandoned(worker, job: Job, queue: Queue, execution=None) -> None:
    """Put `job` (abandoned by `worker` at shutdown) back at the front of `queue`, its retries untouched."""
    job.meta.update({"abandoned": int(job.meta.get("abandoned", 0)) + 1, "stage": "queued", "progress": 0.0,
                     "message": "abandoned when its worker shut down; queued again"})
    with worker.connection.pipeline() as pipe:
        worker.cleanup_execution(job, pipeline=pipe, execution=execution)
        queue._enqueue_job(job, pipeline=pipe, at_front=True)  # saves the job (meta included) as queued
        pipe.execute()
    log.warning("job %s abandoned at shutdown: back at the front of queue %s (abandoned %d times)", job.id, queue.name,
                job.meta["abandoned"])


class QuickUnsubscribe:
    """Mixin for RQ worker classes: leaving the worker's command channel takes milliseconds, not up to 60 s.

    RQ 3.0 listens on `rq:pubsub:<worker>` in redis-py's PubSubWorkerThread, blocked in `get_message(timeout=60)`,
    and on the way out sends UNSUBSCRIBE before stopping the thread. When the reply wakes the thread before the stop
    flag is set, it blocks another 60 s, and redis-py 8.2's `stop()` joins it without a timeout: measured, 1 in 5
    `--burst` workers took 60.4 s instead of 0.5 s to exit after their last job (and so did shutdowns). Here the flag
    is cleared first, so the UNSUBSCRIBE reply ends the thread's wait."""

    def unsubscribe(self) -> None:
        thread = getattr(self, "pubsub_thread", None)
        if thread is None:
            return
        self.log.info("Worker %s: unsubscribing from channel %s", self.name, self.pubsub_channel_name)
        try:
            thread.stop(timeout=0)  # clears its running flag; waits for nothing
        except TypeError:  # redis-py before 8.2: stop() only clears the flag
            thread.stop()
        self.pubsub.unsubscribe()  # the reply wakes its get_message, which now ends the loop
        thread.join(timeout=2)
        self.pubsub.close()


class SimpleWorker(QuickUnsubscribe, AbandonOnShutdown, rq_worker.SimpleWorker):
    """Jobs run in the worker process (never forks after CUDA is initialised)."""


class SpawnWorker(QuickUnsubscribe, AbandonOnShutdown, rq_worker.SpawnWorker):
    """A fresh process per job; it gets this worker's `WorkerContext` through its environment."""

    def fork_work_horse(self, job: Job, queue: Queue) -> None:
        WorkerContext.hand_down(os.environ)  # RQ spawns the horse with os.environ (RQ_JOB_ID is passed the same way)
        super().fork_work_horse(job, queue)
