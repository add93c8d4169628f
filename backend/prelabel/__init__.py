"""Pre-label runs: predict a whole Label Studio project in the background and write the predictions through its API.

    queue_prelabel ──> plan job ──> chunks of task ids in Redis ──> one work job per chunk on PRELABEL_QUEUE
    (CLI, /predict         (checks the credentials,                    each work job claims chunks until none is left:
     over budget,           lists the tasks)                            read the chunk's tasks (with their predictions)
     a promotion)                                                       -> skip those that have one of this version
                                                                        -> download ahead in threads -> predict
                                                                        -> import the predictions in batches

Chunks are leased, not owned by an RQ job: a work job claims the first chunk that is not done and whose lease key
(`SET NX EX LEASE_S`) is free, and a thread renews the lease while it works. A SIGKILLed worker's lease runs out after
LEASE_S and any other work job of the run (or the restarted worker's) takes the chunk over; a job with nothing left to
claim waits for the leases of others, so the last live job picks up a dead one's chunk. Before writing, every chunk
re-reads its tasks' predictions from Label Studio, so a retried chunk skips what the dead one already wrote: no task
gets two predictions of one version. RQ's own retry (after the heartbeat TTL) is the backstop when every job died.

Modules: `spec` (what a run does, carried in its jobs), `runs` (the run records in Redis), `client` (Label
Studio's API), `worker` (what a worker supplies and keeps), `chunk` (one chunk's prediction), `jobs` (queueing and
the RQ jobs), `refresher` (fresh suggestions after a promotion).
"""
from __future__ import annotations

from backend.prelabel.client import connect, list_task_ids, post_json, read_tasks
from backend.prelabel.jobs import JOB_RETRIES, PLAN_JOB, WORK_JOB, _retry, plan_job, queue_prelabel, work_job
from backend.prelabel.refresher import PromotionRefresher
from backend.prelabel.runs import LEASE_S, RENEW_S, PrelabelError, PrelabelRuns, RunInfo, plan_job_id, work_job_id
from backend.prelabel.spec import PrelabelSpec
from backend.prelabel.worker import WorkerContext

# `plan_job` and `work_job` stay importable here: the previous release stored the job paths
# `backend.prelabel.plan_job` / `backend.prelabel.work_job` in Redis, and its queued jobs must still run.
__all__ = ["JOB_RETRIES", "LEASE_S", "PLAN_JOB", "RENEW_S", "WORK_JOB", "PrelabelError", "PrelabelRuns",
           "PrelabelSpec", "PromotionRefresher", "RunInfo", "WorkerContext", "_retry", "connect", "list_task_ids",
           "plan_job", "plan_job_id", "post_json", "queue_prelabel", "read_tasks", "work_job", "work_job_id"]
