"""Label Studio webhook payloads → plain events and regions (no Redis, no HTTP).

Label Studio 1.23 posts `ANNOTATION_CREATED`/`ANNOTATION_UPDATED` as `{action, annotation{id, result, task,
updated_at, was_cancelled, ...}, task{id, data, ...}, project{id, label_config, ...}}`, and deletions as
`ANNOTATIONS_DELETED {"annotations": [{"id"}]}` (ids only), `TASKS_DELETED {"tasks": [{"id"}]}`, `PROJECT_DELETED`.
An annotation's brush/polygon items become `finetune.corrections.Region`s with the phrase of the one prompt rule
(`backend.labelstudio.prompts.region_prompt`), resolved with the project's own config from the payload.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass
from datetime import datetime
from typing import Any, Mapping, Sequence

from backend.labelstudio.config import LabelConfig
from backend.labelstudio.prompts import SHAPE_TYPES, PromptSettings, region_prompt
from backend.labelstudio.protocol import project_id
from backend.labelstudio.results import result_to_mask
from backend.labelstudio.rle import check_mask_size
from finetune.corrections import Region

logger = logging.getLogger(__name__)

CORRECTION_ACTIONS = frozenset({"ANNOTATION_CREATED", "ANNOTATION_UPDATED"})
DELETE_ACTIONS = frozenset({"ANNOTATIONS_DELETED", "TASKS_DELETED", "PROJECT_DELETED"})
HANDLED_ACTIONS = CORRECTION_ACTIONS | DELETE_ACTIONS
# Task data values longer than this are not kept for re-prompting: a phrase is short, an embedded image is not.
_MAX_KEPT_TEXT = 4096


@dataclass(frozen=True)
class AnnotationEvent:
    """An ANNOTATION_CREATED/UPDATED payload, validated: which annotation, of which task, and its raw result."""

    action: str
    project: str
    task_id: int
    annotation_id: int
    task: Mapping[str, Any]  # {"id", "data", ...}
    result: Sequence[Mapping[str, Any]]
    updated: float  # unix seconds of updated_at (else created_at); orders versions of one annotation
    cancelled: bool
    parent_prediction: int | None


def parse_time(value: Any) -> float:
    """Label Studio ISO time (`2026-11-26T18:35:14.123456Z`) or a number -> unix seconds; 0.0 when absent."""
    if value in (None, ""):
        return 0.0
    if isinstance(value, (int, float)):
        return float(value)
    try:
        return datetime.fromisoformat(str(value).replace("Z", "+00:00")).timestamp()
    except ValueError:
        return 0.0


def event_project(payload: Mapping[str, Any]) -> str | None:
    """The project id of any webhook payload (`project` object or id, else the annotation's or task's)."""
    project = payload.get("project")
    if isinstance(project, Mapping):
        project = project.get("id")
    if project in (None, ""):
        ann, task = payload.get("annotation") or {}, payload.get("task") or {}
        project = ann.get("project") if isinstance(ann, Mapping) else None
        if project in (None, "") and isinstance(task, Mapping):
            project = task.get("project")
    return project_id(project)


def event_label_config(payload: Mapping[str, Any]) -> str | None:
    """The project's labeling config carried in the payload (`project.label_config`), if any."""
    project = payload.get("project")
    config = project.get("label_config") if isinstance(project, Mapping) else None
    return config if isinstance(config, str) and config.strip() else None


def annotation_event(payload: Mapping[str, Any]) -> AnnotationEvent:
    """Validate an ANNOTATION_CREATED/UPDATED payload. Raises ValueError/KeyError/TypeError for a malformed one."""
    action = str(payload.get("action") or "")
    ann = payload.get("annotation")
    if not isinstance(ann, Mapping):
        raise ValueError(f"{action} without an 'annotation' object")
    task = payload.get("task") or {}
    if not isinstance(task, Mapping):
        raise ValueError(f"{action}: 'task' is not an object")
    task_id = ann.get("task")
    task_id = int(task_id["id"] if isinstance(task_id, Mapping) else (task_id if task_id is not None else task["id"]))
    ann_id = int(ann["id"])
    project = event_project(payload)
    if project is None:
        raise ValueError(f"{action} for annotation {ann_id} names no project")
    result = ann.get("result") or []
    if not isinstance(result, list) or not all(isinstance(r, Mapping) for r in result):
        raise ValueError(f"annotation {ann_id}: 'result' is not a list of objects")
    if not isinstance(task.get("data") or {}, Mapping):
        raise ValueError(f"task {task_id}: 'data' is not an object")
    parent = ann.get("parent_prediction")
    return AnnotationEvent(
        action=action, project=project, task_id=task_id, annotation_id=ann_id, task=task, result=result,
        updated=parse_time(ann.get("updated_at")) or parse_time(ann.get("created_at")),
        cancelled=bool(ann.get("was_cancelled")), parent_prediction=parent if isinstance(parent, int) else None,
    )


def regions_from_result(result: Sequence[Mapping[str, Any]], task: Mapping[str, Any], config: LabelConfig | None,
                        prompts: PromptSettings) -> list[Region]:
    """An annotation's brush/polygon items as Regions: (H, W) bool masks at the image size, each with its phrase
    (`region_prompt` with the project's config, None when unknown, and `prompts`).

    Items without an original size, an empty mask or no phrase are skipped (logged). Raises ValueError for a region
    larger than the mask size limit (before allocating it) and for undecodable RLE.
    """
    regions = []
    for r in result:
        kind = r.get("type")
        if kind not in SHAPE_TYPES:
            continue
        value = r.get("value") or {}
        try:
            h, w = int(r["original_height"]), int(r["original_width"])
        except (KeyError, TypeError, ValueError):
            logger.warning("region %s without original size skipped", r.get("id"))
            continue
        h, w = check_mask_size(h, w)  # before allocating: a 100,000 x 100,000 region is 10 GB
        if kind in {"brushlabels", "brush"} and (value.get("format", "rle") != "rle" or not value.get("rle")):
            continue
        prompt = region_prompt(config, prompts, task, result, r)
        if prompt is None:
            logger.warning("region %s has no prompt (no TextArea, field or label); skipped", r.get("id"))
            continue
        mask = result_to_mask(r, w, h)  # the same rasterisation the backend's own results round-trip with
        if not mask.any():
            logger.debug("empty region %s skipped", r.get("id"))
            continue
        labels = value.get(kind) or []
        label = str(labels[0]) if isinstance(labels, list) and labels else None
        regions.append(Region(prompt=prompt[0], mask=mask, label=label, kind="brush" if "brush" in kind else "polygon",
                              source=prompt[1], key=str(r.get("id")) if r.get("id") is not None else None))
    return regions


def prompt_context(event: AnnotationEvent, config: LabelConfig | None) -> dict[str, Any]:
    """What a stored correction keeps so its prompts can be re-resolved after a settings change (plain JSON):
    the task's short data values (not the image), the annotation's textarea items and its regions' names."""
    data = event.task.get("data") or {}
    image_key = config.image_key if config is not None else None
    kept = {k: v for k, v in data.items() if k != image_key and len(str(v)) <= _MAX_KEPT_TEXT}
    texts = [{"id": r.get("id"), "from_name": r.get("from_name"), "type": "textarea", "value": {"text": (r.get("value") or {}).get("text")}}
             for r in event.result if r.get("type") == "textarea"]
    shapes = [{"id": r.get("id"), "from_name": r.get("from_name"), "type": r.get("type"),
               "value": {r.get("type"): (r.get("value") or {}).get(r.get("type"))},
               **({"meta": r["meta"]} if isinstance(r.get("meta"), Mapping) else {})}
              for r in event.result if r.get("type") in SHAPE_TYPES]
    return {"task": {"id": event.task_id, "data": kept}, "result": texts + shapes}


def reprompt(context: Mapping[str, Any], region_keys: Sequence[str | None], config: LabelConfig | None,
             prompts: PromptSettings) -> list[tuple[str, str] | None]:
    """The (phrase, source) each stored region would get now with `prompts`, from its `prompt_context`; None where
    none would."""
    task = context.get("task") or {}
    result = list(context.get("result") or [])
    by_id = {str(r.get("id")): r for r in result if r.get("type") in SHAPE_TYPES}
    out: list[tuple[str, str] | None] = []
    for key in region_keys:
        region = by_id.get(str(key))
        out.append(None if region is None else region_prompt(config, prompts, task, result, region))
    return out
