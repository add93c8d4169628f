"""One chunk of a pre-label run: re-read its tasks, skip what has this version, download ahead, predict, write."""
from __future__ import annotations

import logging
import time
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, Iterable, Mapping, Sequence

from backend.prelabel.client import is_annotated, post_json, prediction_versions, read_tasks
from backend.prelabel.runs import PrelabelError
from finetune.prototypes import served_version

log = logging.getLogger(__name__)

PREFETCH_THREADS = 4  # image downloads overlapped with inference
BATCH_CPU, BATCH_CUDA = 8, 32  # images per predict call


@dataclass
class ChunkResult:
    total: int = 0
    done: int = 0
    written: int = 0
    skipped: int = 0
    replaced: int = 0
    failed_tasks: list[dict[str, Any]] = field(default_factory=list)

    def as_dict(self) -> dict[str, Any]:
        return {"total": self.total, "done": self.done, "written": self.written, "skipped": self.skipped,
                "replaced": self.replaced, "failed": len(self.failed_tasks), "failed_tasks": self.failed_tasks}


class ChunkPredictor:
    """Predicts one chunk: re-read its tasks, skip what already has this version, download ahead, predict in
    batches, import predictions in batches on a writer thread (so API writes overlap the next batch's inference)."""

    def __init__(self, client, project: str, config, prompts, segmenter, service, *, our_versions: Iterable[str] = (),
                 unlabeled_only: bool = False, replace_older: bool = True, batch: int = BATCH_CPU,
                 still_mine=lambda: True, on_progress=lambda result: None, exemplars=()):
        # config: the project's LabelConfig; prompts: the run's PromptSettings (its spec's, not this worker's)
        self.client, self.project, self.config, self.prompts = client, project, config, prompts
        self.segmenter, self.service = segmenter, service
        self.our_versions = set(our_versions)
        self.unlabeled_only, self.replace_older, self.batch = unlabeled_only, replace_older, batch
        self.still_mine, self.on_progress = still_mine, on_progress
        self.exemplars = list(exemplars)  # finetune.exemplars.Exemplar: a visual-prompt run (PrelabelSpec.exemplar_names)
        self.timings = {"read": 0.0, "wait_downloads": 0.0, "predict": 0.0, "write": 0.0, "wait_writes": 0.0}
        self._prefetch = ThreadPoolExecutor(PREFETCH_THREADS, thread_name_prefix="prelabel-fetch")
        self._writer = ThreadPoolExecutor(1, thread_name_prefix="prelabel-write")

    def close(self) -> None:
        self._prefetch.shutdown(wait=False, cancel_futures=True)
        self._writer.shutdown(wait=True)

    def _older_ours(self, task: Mapping[str, Any], version: str) -> list[int]:
        """Ids of the task's predictions this run replaces: older versions of ours (with or without label prototypes),
        on unannotated tasks only."""
        if not self.replace_older or is_annotated(task):
            return []
        return [pid for pid, v in prediction_versions(task)
                if pid is not None and v != version and served_version(v) in self.our_versions]

    def _write(self, rows: list[tuple[dict[str, Any], dict[str, Any]]], result: ChunkResult) -> None:
        if not rows:
            return
        if not self.still_mine():
            raise PrelabelError("lost the chunk's lease to another worker; stopping without writing")
        started = time.perf_counter()
        version = rows[0][1]["model_version"]
        old = {task["id"]: self._older_ours(task, version) for task, _ in rows}
        # Tasks whose every prediction is an older one of ours: one bulk delete before the import (the action deletes
        # all of a task's predictions). Tasks that also hold others' predictions: one DELETE per old one, after.
        whole = [t["id"] for t, _ in rows if old[t["id"]] and len(old[t["id"]]) == len(prediction_versions(t))]
        if whole:
            post_json(self.client, "api/dm/actions", {"selectedItems": {"all": False, "included": whole}},
                      params={"id": "delete_tasks_predictions", "project": int(self.project)})
        post_json(self.client, f"api/projects/{int(self.project)}/import/predictions", [
            {"task": task["id"], "result": answer["result"], "score": answer["score"],
             "model_version": answer["model_version"]} for task, answer in rows])
        result.written += len(rows)
        for task, _ in rows:
            if task["id"] not in whole:
                for pid in old[task["id"]]:
                    self.client.predictions.delete(id=pid)
            result.replaced += len(old[task["id"]])
        self.timings["write"] += time.perf_counter() - started

    def run(self, task_ids: Sequence[int]) -> ChunkResult:
        version = self.segmenter.version + "".join(f"+{ex.name}" for ex in self.exemplars)
        result = ChunkResult(total=len(task_ids))
        t0 = time.perf_counter()
        tasks = read_tasks(self.client, self.project, task_ids)
        self.timings["read"] += time.perf_counter() - t0
        found = {t["id"] for t in tasks}
        for missing in sorted(set(task_ids) - found):  # deleted from Label Studio since the plan
            result.skipped += 1
        todo = []
        for task in tasks:
            if any(v == version for _, v in prediction_versions(task)) or (self.unlabeled_only and is_annotated(task)):
                result.skipped += 1
            else:
                todo.append(task)
        result.done = result.skipped
        downloads: list[Future] = [self._prefetch.submit(self.service.download, self.config, t) for t in todo]
        writes: list[Future] = []
        for start in range(0, len(todo), self.batch):
            batch, ok = todo[start:start + self.batch], []
            t0 = time.perf_counter()
            for task, fut in zip(batch, downloads[start:start + self.batch]):
                error = fut.result()
                if error is not None:
                    result.failed_tasks.append({"task": task["id"], "error": str(error)})
                    log.warning("task %s: no prediction: %s", task["id"], error)
                else:
                    ok.append(task)
            t1 = time.perf_counter()
            self.timings["wait_downloads"] += t1 - t0
            rows = []
            for task, answer in zip(ok, self.service.answer(self.segmenter, self.config, self.prompts, ok, None,
                                                            self.project, exemplars=self.exemplars)):
                if answer.error:  # the bytes did not decode
                    result.failed_tasks.append({"task": task["id"], "error": answer.error})
                else:
                    rows.append((task, answer.to_json(version)))
            self.timings["predict"] += time.perf_counter() - t1
            writes.append(self._writer.submit(self._write, rows, result))
            for w in [w for w in writes if w.done()]:
                w.result()  # surface a failed write at once
            result.done += len(batch)
            self.on_progress(result)
        t0 = time.perf_counter()
        for w in writes:
            w.result()
        self.timings["wait_writes"] += time.perf_counter() - t0
        result.done = result.total
        log.info("chunk of %d tasks: %s", len(task_ids), {k: round(v, 2) for k, v in self.timings.items()})
        return result


