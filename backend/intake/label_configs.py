"""Each project's labeling config as its last webhook carried it, kept in Redis so that stored corrections can be
re-prompted later (`clipseg corrections --reprompt`) by any process. The key is this class's own:

| key            | type   | content                                   |
|----------------|--------|-------------------------------------------|
| `ns:lsconfig:P`| string | project P's labeling config (XML)         |
"""
from __future__ import annotations

from redis import Redis

from finetune.keyspace import NAMESPACE


class StoredLabelConfigs:
    """Get and set project labeling configs (XML strings) in Redis."""

    def __init__(self, conn: Redis, namespace: str = NAMESPACE):
        self.conn, self.ns = conn, namespace

    def key(self, project: str) -> str:
        return f"{self.ns}:lsconfig:{project}"

    def get(self, project: str) -> str | None:
        raw = self.conn.get(self.key(project))
        return raw.decode() if isinstance(raw, bytes) else raw

    def set(self, project: str, xml: str) -> None:
        self.conn.set(self.key(project), xml)
