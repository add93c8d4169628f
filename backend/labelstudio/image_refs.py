"""Which task data value is the image, and what kind of reference it is: the one home of these rules.

`backend.images.ImageFetcher` turns a reference into bytes (auth, SSRF guards); this module only reads Label
Studio's task data: the config's `<Image value="$key">` names the key. A webhook of a project whose config is not
known (no `project.label_config` in the payload, no /setup seen) falls back to the first data value that is an
image reference of a kind Label Studio writes.
"""
from __future__ import annotations

from typing import Any, Literal, Mapping
from urllib.parse import urlsplit

from backend.labelstudio.config import LabelConfig

ReferenceKind = Literal["data", "cloud", "http", "label_studio"]

CLOUD_SCHEMES = ("s3", "gs", "azure-blob")
LS_PATH_PREFIXES = ("/data/", "/storage-data/")


def reference_kind(ref: str) -> ReferenceKind | None:
    """What an image reference is: a `data:` URI, a cloud storage URI, an http(s) URL, a Label Studio media path
    (`/data/upload/...`, `/data/local-files/?d=...`, `/storage-data/...`, or `upload/...` of older exports);
    None for anything else."""
    if not isinstance(ref, str) or not ref.strip():
        return None
    ref = ref.strip()
    if ref[:5].lower() == "data:":
        return "data"
    scheme = urlsplit(ref).scheme.lower()
    if scheme in CLOUD_SCHEMES or ref.startswith(tuple(s + ":" for s in CLOUD_SCHEMES)):
        return "cloud"
    if scheme in ("http", "https"):
        return "http"
    if scheme:
        return None
    path = ref if ref.startswith("/") else "/" + ref
    if path.startswith("/upload/"):
        path = "/data" + path
    return "label_studio" if path.startswith(LS_PATH_PREFIXES) else None


def task_image_ref(task: Mapping[str, Any], config: LabelConfig | None) -> str | None:
    """The task's image reference: `data[config.image_key]`, or without a config the first value that is one."""
    data = task.get("data") or {}
    if not isinstance(data, Mapping):
        return None
    if config is not None:
        value = data.get(config.image_key)
        return value if isinstance(value, str) and value.strip() else None
    return next((v for v in data.values() if isinstance(v, str) and reference_kind(v) is not None), None)
