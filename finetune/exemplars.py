"""Exemplars: example regions that stand for a concept (a visual prompt), stored beside the corrections.

| key                              | type | content                                                              |
|----------------------------------|------|----------------------------------------------------------------------|
| `ns:exemplar:{p}:{name}`         | hash | `meta` JSON (label, origin, shape, area, created), `mask` PNG, `image` bytes |
| `ns:exemplar:idx:{p}`            | zset | exemplar names by creation time                                      |

An exemplar keeps its own copy of the image (exemplars are few; the corrections' shared image store counts
references per annotation and would drop the bytes with the annotation). Redis persistence is the corrections'
(append-only in production), so exemplars survive restarts like corrections do.
"""
from __future__ import annotations

import io
import json
import time
from dataclasses import dataclass, field
from functools import cached_property
from typing import Any

import numpy as np

from finetune.corrections import mask_to_png, png_to_mask
from finetune.keyspace import NAMESPACE


@dataclass(frozen=True)
class Exemplar:
    """One stored example: (H, W) bool `mask` of the concept in the image `image_bytes`, for `label`."""

    project: str
    name: str
    label: str
    origin: str  # where it came from, e.g. "task 12 region abc (annotation 7)"
    created: float
    mask: np.ndarray = field(repr=False, compare=False)
    image_bytes: bytes = field(repr=False, compare=False)

    @cached_property
    def image(self):
        """The example's image as an RGB PIL image (decoded once)."""
        from PIL import Image

        return Image.open(io.BytesIO(self.image_bytes)).convert("RGB")


class ExemplarStore:
    """Exemplars of each project in Redis (keys in the module docstring), in the corrections store's namespace."""

    def __init__(self, redis_conn: Any, namespace: str = NAMESPACE) -> None:
        self.conn = redis_conn
        self.ns = namespace

    def _key(self, project: str, name: str) -> str:
        return f"{self.ns}:exemplar:{project}:{name}"

    def _index(self, project: str) -> str:
        return f"{self.ns}:exemplar:idx:{project}"

    def put(self, project: str | int, name: str, image_bytes: bytes, mask: np.ndarray, label: str,
            origin: str = "") -> Exemplar:
        """Store (or replace) exemplar `name` of `project`: (H, W) bool `mask` over the image `image_bytes`."""
        project = str(project)
        mask = np.asarray(mask, dtype=bool)
        if mask.ndim != 2 or not mask.any():
            raise ValueError("an exemplar needs a non-empty (H, W) mask")
        created = round(time.time(), 3)
        meta = {"label": label, "origin": origin, "shape": list(mask.shape), "area": int(mask.sum()), "created": created}
        with self.conn.pipeline(transaction=True) as pipe:
            pipe.hset(self._key(project, name), mapping={"meta": json.dumps(meta), "mask": mask_to_png(mask),
                                                         "image": image_bytes})
            pipe.zadd(self._index(project), {name: created})
            pipe.execute()
        return Exemplar(project, name, label, origin, created, mask, image_bytes)

    def get(self, project: str | int, name: str) -> Exemplar:
        """Exemplar `name` of `project`; KeyError when there is none."""
        row = self.conn.hgetall(self._key(str(project), name))
        if not row:
            raise KeyError(f"project {project} has no exemplar {name!r}")
        meta = json.loads(row[b"meta"])
        return Exemplar(str(project), name, meta["label"], meta.get("origin", ""), float(meta["created"]),
                        png_to_mask(row[b"mask"]), row[b"image"])

    def list(self, project: str | int) -> list[dict[str, Any]]:
        """The project's exemplars, oldest first, without masks or images: name, label, origin, shape, area, created."""
        names = [n.decode() for n in self.conn.zrange(self._index(str(project)), 0, -1)]
        out = []
        for name in names:
            raw = self.conn.hget(self._key(str(project), name), "meta")
            if raw is not None:
                out.append({"name": name, **json.loads(raw)})
        return out

    def delete(self, project: str | int, name: str) -> bool:
        """Remove exemplar `name`; True when it existed."""
        with self.conn.pipeline(transaction=True) as pipe:
            pipe.delete(self._key(str(project), name))
            pipe.zrem(self._index(str(project)), name)
            removed, _ = pipe.execute()
        return bool(removed)
