"""Corrections store: annotators' final masks, kept in Redis for fine-tuning.

A *correction* is one annotation (one submit/update by an annotator); it yields one *sample* per region: (prompt,
mask, image). The store is handed plain regions (`Region`: prompt, label, mask) by `backend.intake.ingest`, which reads
Label Studio's webhooks; it knows nothing of Label Studio's formats. Samples are keyed by project, task and annotation, so a repeated or updated event
replaces the annotation's samples instead of adding more; every write is one Lua script (atomic).

Why image bytes by content hash rather than re-fetching from Label Studio by task id: the fine-tune worker may run
on another machine that cannot reach Label Studio, or not with a valid token (PATs expire, legacy tokens may be
off); task URLs can change or the upload can be deleted; and the mask belongs to the exact image the annotator saw.
Storing the bytes once per sha256 makes the worker self-sufficient, deduplicates several annotations of one task,
and a reference count frees the bytes atomically when the last annotation using them goes.

Redis keys (`ns` = the namespace, REDIS_NAMESPACE (finetune.keyspace); `p` project id, `t` task id, `a` annotation id):

| key                          | type   | content                                                                    |
|------------------------------|--------|----------------------------------------------------------------------------|
| `ns:corr:ann:{p}:{t}:{a}`    | hash   | `meta` JSON (regions: prompt/label/shape/area/source, image sha, times,    |
|                              |        | review pairs), `seq` (ingest sequence), `context` (the caller's JSON: task   |
|                              |        | data and typed texts the prompts came from), `m:{i}` region i's PNG mask    |
| `ns:corr:idx:{p}`            | zset   | member `{t}:{a}`, score = `seq`: the project's corrections in ingest order  |
| `ns:corr:seq:{p}`            | string | last `seq` handed out in the project (INCR)                                 |
| `ns:corr:trained:{p}`        | string | watermark: corrections with `seq` <= this were used by a finished fine-tune |
| `ns:corr:projects`           | set    | project ids with at least one correction                                    |
| `ns:corr:where`              | hash   | annotation id -> `{p}:{t}` (ANNOTATIONS_DELETED carries only ids)           |
| `ns:img:{sha256}`            | string | image bytes as downloaded (JPEG/PNG...)                                     |
| `ns:img:refs`                | hash   | sha256 -> number of annotations using the image                             |
| `ns:pred:{p}:{t}`            | hash   | our prediction per label: `{label}` -> JSON (version, score, shape, prompt),|
|                              |        | `{label}:mask` -> PNG bytes; expires after `prediction_ttl`                 |
| `ns:review:{p}`              | hash   | `{version}|n`, `{version}|sum`: IoU of our prediction vs the final mask     |

Memory (MEMORY USAGE, Redis 7.0.15, one 640x480 q90 JPEG of a generated scene with one brush mask): the image key
82,040 B for 69,171 B of JPEG (jemalloc rounds large strings up to a size class); the annotation hash 1,480 B (its
1-bit PNG mask is 882 B; the LS RLE as raw bytes would be 1,417 B, so masks are stored as PNG); the index, `where`
and `refs` entries under 100 B each. So ~1.5 KB per extra annotation of an already stored image, plus the image once.
`tests/test_corrections.py::test_memory_per_sample` logs the numbers.
"""
from __future__ import annotations

import hashlib
import json
import logging
import time
from typing import Any, Mapping, Sequence

import numpy as np

from finetune.correction_scripts import _DELETE, _MARK, _PUT, _SET_PROMPTS
from finetune.correction_types import (
    CorrectionSample,
    PutResult,
    Region,
    StoredAnnotation,
    _as_mask,
    mask_iou,
    mask_to_png,
    png_to_mask,
)
from finetune.keyspace import NAMESPACE

__all__ = ["CorrectionSample", "CorrectionStore", "PutResult", "Region", "StoredAnnotation", "mask_iou",
           "mask_to_png", "png_to_mask"]

logger = logging.getLogger(__name__)


# ---------------------------------------------------------------------------------------------------------------


class CorrectionStore:
    """Corrections and their images in Redis (see the module docstring for the keys).

    Args:
        redis_conn: a redis-py client (bytes responses, i.e. decode_responses=False).
        namespace: key prefix.
        prediction_ttl: seconds our recorded predictions are kept.

    The store persists plain regions (prompt, label, mask) it is handed; turning Label Studio's webhooks into
    regions is `backend.intake.ingest`'s job.
    """

    def __init__(self, redis_conn: Any, namespace: str = NAMESPACE, *, prediction_ttl: int = 30 * 24 * 3600) -> None:
        self.conn = redis_conn
        self.ns = namespace
        self.prediction_ttl = prediction_ttl
        self._put = redis_conn.register_script(_PUT)
        self._delete = redis_conn.register_script(_DELETE)
        self._mark = redis_conn.register_script(_MARK)
        self._prompts = redis_conn.register_script(_SET_PROMPTS)

    # keys ----------------------------------------------------------------------------------------------------
    def _k(self, *parts: Any) -> str:
        return ":".join([self.ns, *map(str, parts)])

    def _ann_key(self, project: Any, task: Any, ann: Any) -> str:
        return self._k("corr", "ann", project, task, ann)

    def image_key(self, sha: str) -> str:
        """Redis key holding the image bytes with this sha256 (hex)."""
        return self._k("img", sha)

    # write -------------------------------------------------------------------------------------------------
    def put_annotation(
        self,
        project: int | str,
        task_id: int,
        annotation_id: int,
        regions: Sequence[Region],
        image_bytes: bytes,
        *,
        updated: float = 0.0,
        parent_prediction: int | None = None,
        context: Mapping[str, Any] | None = None,
    ) -> PutResult:
        """Store (or replace) one annotation's regions with its image bytes; atomic.

        `updated` (unix seconds, the annotation's updated_at) orders versions: an older version than the stored one
        is dropped ("stale"); the same version again keeps its sequence number (not counted as new). `context` is
        kept with the annotation as given (JSON-serialisable), e.g. what the prompts were resolved from.
        """
        project = str(project)
        sha = hashlib.sha256(image_bytes).hexdigest()
        review = self._review_pairs(project, task_id, regions)
        meta = {
            "project": project,
            "task": int(task_id),
            "annotation": int(annotation_id),
            "image": sha,
            # milliseconds: Lua's cjson keeps 14 significant digits, so finer times would not compare equal
            "updated": round(float(updated), 3),
            "created": 0,
            "parent_prediction": parent_prediction,
            "regions": [
                {"prompt": r.prompt, "label": r.label, "kind": r.kind, "shape": list(r.mask.shape),
                 "area": int(np.count_nonzero(r.mask)), "source": r.source, "key": r.key} for r in regions
            ],
            # [[version, iou, label]]: one pair per label with a recorded prediction
            "review": [[v, iou, label] for label, (v, iou) in review.items()],
        }
        masks = [mask_to_png(r.mask) for r in regions]
        member = f"{task_id}:{annotation_id}"
        status, seq = self._put(
            keys=[
                self._ann_key(project, task_id, annotation_id),
                self._k("corr", "idx", project),
                self._k("corr", "seq", project),
                self._k("corr", "projects"),
                self._k("corr", "where"),
                self._k("img", "refs"),
                self.image_key(sha),
                self._k("review", project),
            ],
            args=[member, project, annotation_id, f"{project}:{task_id}", sha, image_bytes,
                  json.dumps(meta), self._k("img", ""), round(time.time(), 3), json.dumps(dict(context or {})), *masks],
        )
        status = status.decode() if isinstance(status, bytes) else status
        logger.info(
            "correction %s", status,
            extra={"project": project, "task": task_id, "annotation": annotation_id, "samples": len(regions), "seq": seq},
        )
        return PutResult(status, int(seq), {label: iou for label, (_, iou) in review.items()})

    def set_prompts(self, project: int | str, task_id: int, annotation_id: int, prompts: Sequence[str]) -> bool:
        """Replace the prompts of a stored annotation's regions (one per region, in order); atomic.

        Returns False when the annotation is gone or its number of regions differs (it was replaced meanwhile).
        """
        return bool(self._prompts(keys=[self._ann_key(project, task_id, annotation_id)], args=[json.dumps(list(prompts))]))

    # predictions and review ----------------------------------------------------------------------------------
    def record_prediction(
        self,
        project: int | str,
        task_id: int,
        label: str,
        mask: np.ndarray | bytes,
        model_version: str,
        score: float | None = None,
        *,
        prompt: str | None = None,
    ) -> None:
        """Remember the mask this backend predicted for (task, label): an (H, W) bool array or PNG bytes, and the
        phrase it was predicted for. Replaces the previous prediction for that label."""
        mask = _as_mask(mask)
        key = self._k("pred", project, task_id)
        meta = {"model_version": model_version, "score": score, "shape": list(mask.shape), "time": time.time(),
                "prompt": prompt}
        with self.conn.pipeline(transaction=True) as pipe:
            pipe.hset(key, mapping={label: json.dumps(meta), f"{label}:mask": mask_to_png(mask)})
            pipe.expire(key, self.prediction_ttl)
            pipe.execute()

    def prediction(self, project: int | str, task_id: int, label: str) -> tuple[np.ndarray, dict] | None:
        """Our recorded prediction for (task, label): ((H, W) np.bool_ mask, meta) or None."""
        raw_meta, raw_mask = self.conn.hmget(self._k("pred", project, task_id), [label, f"{label}:mask"])
        if raw_meta is None or raw_mask is None:
            return None
        return png_to_mask(raw_mask), json.loads(raw_meta)

    def _review_pairs(self, project: str, task_id: int, regions: Sequence[Region]) -> dict[str, tuple[str, float]]:
        by_label: dict[str, np.ndarray] = {}
        for r in regions:
            if r.label is not None:
                by_label[r.label] = r.mask | by_label[r.label] if r.label in by_label else r.mask
        out = {}
        for label, final in by_label.items():
            pred = self.prediction(project, task_id, label)
            if pred is not None:
                out[label] = (str(pred[1]["model_version"]), round(mask_iou(final, pred[0]), 6))
        return out

    def review_stats(self, project: int | str | None = None) -> dict[str, dict[str, float]]:
        """Per model version: {"n": corrections compared, "mean_iou": mean IoU of our prediction vs final mask}.

        Counts one entry per (annotation, label) with a recorded prediction; all projects when `project` is None.
        """
        projects = [str(project)] if project is not None else self.projects()
        n: dict[str, int] = {}
        total: dict[str, float] = {}
        for p in projects:
            for k, v in self.conn.hgetall(self._k("review", p)).items():
                version, _, what = k.decode().rpartition("|")
                if what == "n":
                    n[version] = n.get(version, 0) + int(v)
                else:
                    total[version] = total.get(version, 0.0) + float(v)
        return {v: {"n": c, "mean_iou": total.get(v, 0.0) / c} for v, c in n.items() if c > 0}

    # delete --------------------------------------------------------------------------------------------------
    def delete_annotation(self, annotation_id: int, *, project: int | str | None = None, task_id: int | None = None) -> bool:
        """Remove one annotation's samples (and its image when unused); True if something was removed."""
        if project is None or task_id is None:
            where = self.conn.hget(self._k("corr", "where"), str(annotation_id))
            if where is None:
                return False
            project, task = where.decode().split(":", 1)
            task_id = int(task)
        project = str(project)
        return bool(self._delete(
            keys=[
                self._ann_key(project, task_id, annotation_id),
                self._k("corr", "idx", project),
                self._k("corr", "where"),
                self._k("img", "refs"),
                self._k("review", project),
                self._k("corr", "projects"),
            ],
            args=[f"{task_id}:{annotation_id}", annotation_id, self._k("img", ""), project],
        ))

    def delete_task(self, task_id: int, project: int | str | None = None) -> list[int]:
        """Remove every stored annotation of a task; returns the annotation ids removed."""
        gone = []
        for p in [str(project)] if project is not None else self.projects():
            for member, _ in self.conn.zscan_iter(self._k("corr", "idx", p), match=f"{task_id}:*"):
                ann = int(member.decode().split(":")[1])
                if self.delete_annotation(ann, project=p, task_id=task_id):
                    gone.append(ann)
        return gone

    def delete_project(self, project: int | str) -> list[int]:
        """Remove every stored annotation of a project (and its counters); returns the annotation ids removed."""
        project = str(project)
        gone = []
        for member in self.conn.zrange(self._k("corr", "idx", project), 0, -1):
            task, ann = map(int, member.decode().split(":"))
            if self.delete_annotation(ann, project=project, task_id=task):
                gone.append(ann)
        self.conn.delete(self._k("corr", "seq", project), self._k("corr", "trained", project), self._k("review", project))
        return gone

    # read ----------------------------------------------------------------------------------------------------
    def projects(self) -> list[str]:
        """Project ids with at least one stored correction, sorted."""
        return sorted(p.decode() for p in self.conn.smembers(self._k("corr", "projects")))

    def count(self, project: int | str) -> int:
        """Number of stored corrections (annotations) in the project."""
        return int(self.conn.zcard(self._k("corr", "idx", project)))

    def watermark(self, project: int | str) -> int:
        """The project's latest correction sequence number (pass it to `mark_trained` after training)."""
        return int(self.conn.get(self._k("corr", "seq", project)) or 0)

    def trained_upto(self, project: int | str) -> int:
        """Sequence number up to which corrections were used by a finished fine-tune."""
        return int(self.conn.get(self._k("corr", "trained", project)) or 0)

    def new_since_last_finetune(self, project: int | str) -> int:
        """Corrections stored or updated after the last `mark_trained` of the project."""
        return int(self.conn.zcount(self._k("corr", "idx", project), f"({self.trained_upto(project)}", "+inf"))

    def mark_trained(self, project: int | str, upto: int | None = None) -> int:
        """Record that corrections with seq <= `upto` (default: the current watermark) were trained on.

        Read `watermark()` before reading samples and pass it here after training, so corrections arriving
        during training stay "new". The mark never moves backwards; returns the mark now in effect.
        """
        if upto is None:
            upto = self.watermark(project)
        return int(self._mark(keys=[self._k("corr", "trained", project)], args=[int(upto)]))

    def image_bytes(self, sha: str) -> bytes:
        """Image bytes stored under this sha256; KeyError if gone."""
        data = self.conn.get(self.image_key(sha))
        if data is None:
            raise KeyError(f"image {sha} is not in the store")
        return data

    def image_refs(self) -> dict[str, int]:
        """sha256 -> number of annotations using that image."""
        return {k.decode(): int(v) for k, v in self.conn.hgetall(self._k("img", "refs")).items()}

    def samples(self, project: int | str | None = None, *, min_seq: int = 0) -> list[CorrectionSample]:
        """All samples (one per region) of a project, or of every project, in ingest order.

        `min_seq` > 0 keeps only corrections with seq > min_seq. Masks are decoded ((H, W) np.bool_); images are
        loaded lazily by `sample.load_image()`.
        """
        out: list[CorrectionSample] = []
        for p in [str(project)] if project is not None else self.projects():
            members = self.conn.zrangebyscore(self._k("corr", "idx", p), f"({min_seq}", "+inf")
            for start in range(0, len(members), 256):
                chunk = members[start:start + 256]
                with self.conn.pipeline(transaction=False) as pipe:
                    for m in chunk:
                        task, ann = m.decode().split(":")
                        pipe.hgetall(self._ann_key(p, task, ann))
                    rows = pipe.execute()
                for row in rows:
                    if row:
                        out.extend(self._samples_of(row))
        return out

    def annotations(self, project: int | str) -> list[StoredAnnotation]:
        """The project's stored annotations in ingest order, without decoding masks (for listings and re-prompting)."""
        out: list[StoredAnnotation] = []
        members = self.conn.zrange(self._k("corr", "idx", project), 0, -1)
        for start in range(0, len(members), 256):
            with self.conn.pipeline(transaction=False) as pipe:
                for m in members[start:start + 256]:
                    task, ann = m.decode().split(":")
                    pipe.hmget(self._ann_key(project, task, ann), ["meta", "seq", "context"])
                rows = pipe.execute()
            for raw_meta, raw_seq, raw_context in rows:
                if raw_meta is None:
                    continue
                meta = json.loads(raw_meta)
                out.append(StoredAnnotation(
                    project=str(meta["project"]), task_id=int(meta["task"]), annotation_id=int(meta["annotation"]),
                    seq=int(raw_seq or 0), image_sha256=meta["image"], updated=float(meta["updated"]),
                    regions=list(meta["regions"]), context=json.loads(raw_context) if raw_context else {},
                ))
        return out

    def _samples_of(self, row: Mapping[bytes, bytes]) -> list[CorrectionSample]:
        meta = json.loads(row[b"meta"])
        seq = int(row[b"seq"])
        sha = meta["image"]
        review = {label: (version, iou) for version, iou, label in meta.get("review", [])}
        out = []
        for i, reg in enumerate(meta["regions"]):
            version, iou = review.get(reg["label"], (None, None))
            out.append(CorrectionSample(
                project=meta["project"], task_id=meta["task"], annotation_id=meta["annotation"], region=i,
                prompt=reg["prompt"], label=reg["label"], mask=png_to_mask(row[f"m:{i}".encode()]),
                image_sha256=sha, created=float(meta["created"]), updated=float(meta["updated"]), seq=seq,
                iou=iou, model_version=version, load_image=lambda sha=sha: self.image_bytes(sha),
            ))
        return out
