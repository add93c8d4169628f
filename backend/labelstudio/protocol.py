"""Label Studio's ML-backend wire protocol (label-studio-ml-backend 2.x, as Label Studio 1.23 speaks it).

Label Studio posts `/setup {"project": "<id>.<ts>", "schema", "hostname", "access_token"}` and `/predict {"tasks",
"project", "label_config", "params": {"context"}}`, and reads `{"results": [{"result", "score", "model_version"}]}`
with exactly one item per task, in order.
"""
from __future__ import annotations

from typing import Any, Mapping


class BadRequest(ValueError):
    """The request itself is malformed (answered with 400 and this message)."""


def project_id(value: Any) -> str | None:
    """Label Studio sends `project` as "<id>.<timestamp>" (or an int); the id part."""
    if value is None or value == "":
        return None
    return str(value).split(".", 1)[0]


def parse_predict_request(body: Any) -> tuple[list[Mapping[str, Any]], str | None, Mapping[str, Any] | None]:
    """(tasks, label_config, context) of a /predict body, validated; raises BadRequest."""
    if not isinstance(body, Mapping):
        raise BadRequest("the request body must be a JSON object")
    tasks = body.get("tasks")
    if not isinstance(tasks, list):
        raise BadRequest("'tasks' must be a list of tasks")
    for i, task in enumerate(tasks):
        if not isinstance(task, Mapping) or not isinstance(task.get("data", {}), Mapping):
            raise BadRequest(f"task {i} must be an object with a 'data' object")
    config = body.get("label_config")
    if config is not None and not isinstance(config, str):
        raise BadRequest("'label_config' must be a string")
    params = body.get("params") or {}
    if not isinstance(params, Mapping):
        raise BadRequest("'params' must be an object")
    context = params.get("context")
    if context is not None and not isinstance(context, Mapping):
        raise BadRequest("'params.context' must be an object")
    return tasks, config, context


def prediction_json(result: list[dict[str, Any]], score: float, version: str) -> dict[str, Any]:
    """One item of /predict's `results` (also the body of a prediction created through Label Studio's API)."""
    return {"result": result, "score": score, "model_version": version}
