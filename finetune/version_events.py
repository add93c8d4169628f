"""The version-activated event: its one shape, and one listener per process that any part subscribes to.

`VersionRegistry.activate` publishes a `VersionActivated` on the registry's channel whenever a pointer changes (a
promotion, a rollback, a new default). In a server the serving model (load the new state at once), the promotion
refresher (queue fresh suggestions) and the Label Studio sync all subscribe to the same `VersionEvents`, so there is
one subscription and one parser.
"""
from __future__ import annotations

import json
import logging
import threading
from dataclasses import asdict, dataclass
from typing import Any, Callable, Mapping

log = logging.getLogger(__name__)

ACTIVATED = "activated"


@dataclass(frozen=True)
class VersionActivated:
    """`version` (its artefact at `path`) is now served to `project`; project None: the default of all projects."""

    version: str
    project: str | None
    path: str = ""

    def to_json(self) -> str:
        return json.dumps({"event": ACTIVATED, **asdict(self)})

    @classmethod
    def parse(cls, raw: str | bytes | Mapping[str, Any]) -> "VersionActivated | None":
        """The event in a pub/sub message body; None for anything else (other events, garbage)."""
        try:
            data = json.loads(raw) if isinstance(raw, (str, bytes)) else dict(raw)
        except (ValueError, TypeError):
            return None
        if not isinstance(data, dict) or data.get("event") != ACTIVATED or not data.get("version"):
            return None
        project = data.get("project")
        return cls(str(data["version"]), None if project in (None, "") else str(project), str(data.get("path") or ""))


class VersionEvents:
    """One subscription to the registry's channel, in a daemon thread; every subscriber gets each event in order.
    Redis restarts are survived by subscribing again (pointer polling backs up what is missed meanwhile)."""

    def __init__(self, registry_factory: Callable[[], Any]):
        self.registry_factory = registry_factory  # -> a VersionRegistry (its .conn and .channel)
        self._subscribers: list[Callable[[VersionActivated], None]] = []
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.subscribed = threading.Event()  # set while the subscription is live (tests wait on it)

    def subscribe(self, callback: Callable[[VersionActivated], None]) -> "VersionEvents":
        self._subscribers.append(callback)
        return self

    def publish_local(self, event: VersionActivated) -> None:
        """Hand `event` to every subscriber in this thread; one subscriber's failure never stops the others."""
        for callback in list(self._subscribers):
            try:
                callback(event)
            except Exception:  # noqa: BLE001 - logged; the listener goes on
                log.exception("a version-activated subscriber failed on %s", event)

    def start(self) -> "VersionEvents":
        if self._thread is None:
            self._thread = threading.Thread(target=self._listen, name="version-events", daemon=True)
            self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()

    def _listen(self) -> None:
        while not self._stop.is_set():
            try:
                registry = self.registry_factory()
                pubsub = registry.conn.pubsub(ignore_subscribe_messages=True)
                pubsub.subscribe(registry.channel)
                self.subscribed.set()
                while not self._stop.is_set():
                    message = pubsub.get_message(timeout=1.0)
                    if message and message.get("type") == "message":
                        event = VersionActivated.parse(message["data"])
                        if event is not None:
                            self.publish_local(event)
                pubsub.close()
            except Exception as exc:  # noqa: BLE001 - Redis restarts: subscribe again
                self.subscribed.clear()
                log.debug("version events: %s; subscribing again", exc)
                self._stop.wait(2.0)
