"""The RQ worker classes of `clipseg worker`: RQ's, with a cold shutdown that loses no job.

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
"""
from __future__ import annotations

import logging
from datetime import timedelta
from typing import Any

from rq import worker as rq_worker
from rq.job import Job
from rq.queue import Queue
from rq.utils import now

log = logging.getLogger(__name__)


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


class SimpleWorker(AbandonOnShutdown, rq_worker.SimpleWorker):
    """Jobs run in the worker process (never forks after CUDA is initialised)."""


class SpawnWorker(AbandonOnShutdown, rq_worker.SpawnWorker):
    """A fresh process per job."""
