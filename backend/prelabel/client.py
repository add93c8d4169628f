"""Label Studio's API as a pre-label run uses it: check access, list and read tasks, write predictions fast.

Authentication is the SDK's (a legacy token, or a personal access token refreshed into access tokens); the URL and
key are the worker's own (`WorkerContext`), never stored in Redis.
"""
from __future__ import annotations

import json
from typing import Any, Mapping, Sequence

from backend.prelabel.runs import PrelabelError
from backend.studio.api import api_json, open_client


def connect(settings, project: str):
    """(SDK client, project label config) after checking URL, key and project; raises PrelabelError naming the
    setting to fix. Nothing is written before this passes."""
    import httpx
    from label_studio_sdk.core.api_error import ApiError

    url, key = settings.label_studio_url.rstrip("/"), settings.label_studio_api_key
    if not url:
        raise PrelabelError("LABEL_STUDIO_URL is not set: a pre-label run writes predictions through Label Studio's "
                            "API; set it (e.g. http://localhost:8080) in the worker's environment")
    if not key:
        raise PrelabelError("LABEL_STUDIO_API_KEY is not set: give the worker a legacy token or a personal access "
                            "token (Label Studio: Account & Settings)")
    try:
        client = open_client(url, key)
        config = client.projects.get(id=int(project)).label_config
    except ApiError as exc:
        if exc.status_code in (401, 403):
            raise PrelabelError(f"Label Studio at LABEL_STUDIO_URL={url} refused LABEL_STUDIO_API_KEY (HTTP "
                                f"{exc.status_code}): is it a valid token of a user who can see project {project}?") from None
        if exc.status_code == 404:
            raise PrelabelError(f"Label Studio at LABEL_STUDIO_URL={url} has no project {project}") from None
        raise PrelabelError(f"Label Studio at LABEL_STUDIO_URL={url} answered HTTP {exc.status_code}: {exc.body}") from None
    except (httpx.HTTPError, OSError) as exc:
        raise PrelabelError(f"cannot reach Label Studio at LABEL_STUDIO_URL={url}: {type(exc).__name__}: {exc}") from None
    if not config:
        raise PrelabelError(f"project {project} has no labeling config")
    return client, config


def _task_dict(task: Any) -> dict[str, Any]:
    return task if isinstance(task, dict) else task.dict()


def list_task_ids(client, project: str, unlabeled_only: bool) -> list[int]:
    """Every task id of the project (without an annotation, with `unlabeled_only`), in id order."""
    ids = []
    for task in client.tasks.list(project=int(project), fields="task_only", page_size=1000,
                                  include="id,total_annotations,cancelled_annotations"):
        t = _task_dict(task)
        if unlabeled_only and (t.get("total_annotations") or 0) + (t.get("cancelled_annotations") or 0) > 0:
            continue
        ids.append(int(t["id"]))
    return sorted(ids)


def read_tasks(client, project: str, task_ids: Sequence[int]) -> list[dict[str, Any]]:
    """The tasks (data, annotations, predictions) of `task_ids`, as Label Studio has them now, in id order."""
    query = json.dumps({"selectedItems": {"all": False, "included": list(task_ids)}})
    tasks = [_task_dict(t) for t in client.tasks.list(project=int(project), fields="all", query=query,
                                                        page_size=max(1, len(task_ids)))]
    wanted = set(task_ids)
    return sorted((t for t in tasks if t.get("id") in wanted), key=lambda t: t["id"])


def post_json(client, path: str, body: Any, params: Mapping[str, Any] | None = None) -> None:
    """POST `body` to Label Studio's `path` (orjson, the SDK's auth; see backend.studio.api.api_json)."""
    api_json(client, "POST", path, body, params)


def is_annotated(task: Mapping[str, Any]) -> bool:
    return bool(task.get("annotations")) or (task.get("total_annotations") or 0) > 0


def prediction_versions(task: Mapping[str, Any]) -> list[tuple[int | None, str | None]]:
    return [(p.get("id"), p.get("model_version")) for p in (task.get("predictions") or []) if isinstance(p, dict)]


