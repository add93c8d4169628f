"""An exemplar taken from a Label Studio annotation (`clipseg prelabel --exemplar TASK[:REGION]`): the region's
mask over the task's image, its label, stored with `finetune.exemplars.ExemplarStore`."""
from __future__ import annotations

import io
from typing import Any, Mapping

from backend.labelstudio.config import parse_label_config
from backend.labelstudio.image_refs import task_image_ref
from backend.labelstudio.interactive import context_regions
from backend.labelstudio.results import result_to_mask
from backend.prelabel.client import read_tasks
from backend.prelabel.runs import PrelabelError
from finetune.exemplars import Exemplar, ExemplarStore

_REGION_TYPES = ("brushlabels", "polygonlabels", "rectanglelabels", "keypointlabels")


def parse_exemplar_ref(ref: str) -> tuple[int, str | None]:
    """"12" -> (12, None); "12:abc" -> (12, "abc"). Raises PrelabelError for anything else."""
    task, _, region = str(ref).partition(":")
    if not task.strip().isdigit():
        raise PrelabelError(f"--exemplar wants TASK or TASK:REGION (a task id, a region id), not {ref!r}")
    return int(task), (region.strip() or None)


def _latest_annotation(task: Mapping[str, Any]) -> Mapping[str, Any] | None:
    done = [a for a in task.get("annotations") or [] if not a.get("was_cancelled") and a.get("result")]
    return max(done, key=lambda a: (str(a.get("updated_at") or a.get("created_at") or ""), a.get("id") or 0), default=None)


def exemplar_from_task(store: ExemplarStore, client, fetcher, project: str, label_config: str, ref: str) -> Exemplar:
    """Store the example region `ref` (TASK[:REGION]; default: the first brush, polygon, box or click of the task's
    latest annotation) of `project` and return it. Raises PrelabelError saying what is missing."""
    task_id, region_id = parse_exemplar_ref(ref)
    tasks = read_tasks(client, project, [task_id])
    if not tasks:
        raise PrelabelError(f"project {project} has no task {task_id}")
    task = tasks[0]
    annotation = _latest_annotation(task)
    if annotation is None:
        raise PrelabelError(f"task {task_id} has no submitted annotation to take an example region from")
    regions = [r for r in annotation["result"] if r.get("type") in _REGION_TYPES]
    region = next((r for r in regions if region_id is None or str(r.get("id")) == region_id), None)
    if region is None:
        ids = ", ".join(str(r.get("id")) for r in regions) or "none"
        raise PrelabelError(f"task {task_id}'s annotation {annotation.get('id')} has no region "
                            f"{region_id or 'of a usable type'} (its regions: {ids})")
    config = parse_label_config(label_config)
    image_ref = task_image_ref(task, config)
    if image_ref is None:
        raise PrelabelError(f"task {task_id} has no '{config.image_key}' field")
    fetched = fetcher.fetch(image_ref, task_id)  # decoded and EXIF-transposed: the size the editor's regions have
    width, height = fetched.width, fetched.height
    buf = io.BytesIO()
    fetched.image.save(buf, "PNG")
    image_bytes = buf.getvalue()
    if region["type"] in ("brushlabels", "polygonlabels"):
        mask = result_to_mask(region, width, height)
    else:
        found = context_regions({"result": [region]}, width, height)
        mask = found[0].mask if found else None
    if mask is None or not mask.any():
        raise PrelabelError(f"region {region.get('id')} of task {task_id} is empty")
    labels = (region.get("value") or {}).get(region["type"]) or []
    label = str(labels[0]) if labels else ""
    name = f"task{task_id}-{region.get('id')}"
    origin = f"task {task_id} region {region.get('id')} (annotation {annotation.get('id')})"
    return store.put(project, name, image_bytes, mask, label, origin)
