"""A Label Studio webhook event → the corrections store: parse it, fetch the task's image, store plain regions.

This is the step between the webhook spool (`backend.intake.spool`, which decides retry vs reject) and the corrections
store (`finetune.corrections`, which knows nothing of Label Studio). The project's labeling config comes from the
payload itself (`project.label_config`), else from the last /setup or /predict of that project in this process,
so prompts and the image key are resolved by the same rules /predict uses, also for a project this process has
never been set up for.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Any, Callable, Mapping

from backend.labelstudio.config import LabelConfigs
from backend.labelstudio.image_refs import task_image_ref
from backend.labelstudio.prompts import PromptSettings
from backend.labelstudio.webhooks import (CORRECTION_ACTIONS, annotation_event, event_label_config, event_project,
                                          prompt_context, regions_from_result)
from backend.intake.label_configs import StoredLabelConfigs
from finetune.corrections import CorrectionStore

log = logging.getLogger(__name__)

# (image reference, task id) -> image bytes; `backend.images.ImageFetcher.fetch_bytes` in the server.
ImageLoader = Callable[[str, Any], bytes]


def project_label_config(store: CorrectionStore, project: str) -> str | None:
    """The project's labeling config as its last webhook carried it (for re-prompting stored corrections)."""
    return StoredLabelConfigs(store.conn, store.ns).get(project)


@dataclass(frozen=True)
class IngestResult:
    """What an event did: status is stored, replaced, deleted, cancelled, empty, stale or ignored."""

    action: str
    status: str
    project: str | None = None
    task_id: int | None = None
    annotation_ids: tuple[int, ...] = ()
    n_samples: int = 0
    ious: Mapping[str, float] = field(default_factory=dict)


class CorrectionIngester:
    """Applies Label Studio webhook payloads to a `CorrectionStore`.

    Args:
        store: the corrections store.
        configs: parsed labeling configs of this process (shared with /setup and /predict).
        prompts: the prompt rule's settings (the server's PROMPT_FIELD and LABEL_PROMPTS, as /predict uses them).
        image_loader: default `(ref, task_id) -> bytes` used when `ingest_event` is given none.
    """

    def __init__(self, store: CorrectionStore, configs: LabelConfigs, prompts: PromptSettings,
                 image_loader: ImageLoader | None = None):
        self.store = store
        self.configs = configs
        self.prompts = prompts
        self.image_loader = image_loader

    def ingest_event(self, payload: Mapping[str, Any], image_loader: ImageLoader | None = None, *,
                     image_bytes: bytes | None = None) -> IngestResult:
        """Apply one webhook payload.

        ANNOTATION_CREATED/UPDATED store (or replace) the annotation's regions; the image comes from `image_bytes`
        if given, else `image_loader(ref, task_id)`. Cancelled or region-less annotations remove what was stored.
        ANNOTATIONS_DELETED / TASKS_DELETED / PROJECT_DELETED remove samples; other actions are ignored.
        Raises ValueError (and KeyError/TypeError) for a malformed payload, the loader's errors for the image,
        redis errors when Redis fails (the spool tells these apart).
        """
        action = str(payload.get("action") or "")
        project = event_project(payload)
        if action in CORRECTION_ACTIONS:
            return self._ingest_annotation(payload, image_loader or self.image_loader, image_bytes)
        if action == "ANNOTATIONS_DELETED":
            ids = [int(a["id"]) for a in payload.get("annotations") or [] if isinstance(a, Mapping) and "id" in a]
            gone = [i for i in ids if self.store.delete_annotation(i)]
            return IngestResult(action, "deleted", project, None, tuple(gone))
        if action == "TASKS_DELETED":
            gone = []
            for t in payload.get("tasks") or []:
                gone += self.store.delete_task(int(t["id"]), project=project)
            return IngestResult(action, "deleted", project, None, tuple(gone))
        if action == "PROJECT_DELETED":
            gone = self.store.delete_project(project) if project else []
            return IngestResult(action, "deleted", project, None, tuple(gone))
        return IngestResult(action, "ignored", project)

    def _ingest_annotation(self, payload: Mapping[str, Any], image_loader: ImageLoader | None,
                           image_bytes: bytes | None) -> IngestResult:
        event = annotation_event(payload)
        store, ids = self.store, (event.annotation_id,)
        if event.cancelled:
            store.delete_annotation(event.annotation_id, project=event.project, task_id=event.task_id)
            return IngestResult(event.action, "cancelled", event.project, event.task_id, ids)
        xml = event_label_config(payload)
        config = self.configs.for_project(event.project, xml)
        if xml and config is not None:
            StoredLabelConfigs(store.conn, store.ns).set(event.project, xml)
        if config is None:
            log.warning("project %s: no labeling config in the webhook and none seen here; prompts use PROMPT_FIELD "
                        "and the labels, the image is the first image reference in the task data", event.project)
        regions = regions_from_result(event.result, event.task, config, self.prompts)
        if not regions:
            store.delete_annotation(event.annotation_id, project=event.project, task_id=event.task_id)
            return IngestResult(event.action, "empty", event.project, event.task_id, ids)
        if image_bytes is None:
            ref = task_image_ref(event.task, config)
            if ref is None:
                raise ValueError(f"task {event.task_id} has no image reference in its data")
            if image_loader is None:
                raise ValueError("no image: pass image_bytes or an image_loader")
            image_bytes = image_loader(ref, event.task_id)
        put = store.put_annotation(
            event.project, event.task_id, event.annotation_id, regions, image_bytes, updated=event.updated,
            parent_prediction=event.parent_prediction, context=prompt_context(event, config),
        )
        return IngestResult(event.action, put.status, event.project, event.task_id, ids, len(regions), put.ious)
