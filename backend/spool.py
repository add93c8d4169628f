"""Local spool for webhook events while Redis is unreachable, replayed in order when it is back.

Label Studio does not resend a webhook that failed (its timeout is 1 s), so an event that cannot reach Redis is
written to `<dir>/<time_ns>-<pid>-<n>.json`, one file per event, atomically (temp file, fsync, rename, fsync of
the directory): a crash leaves either the whole event or nothing. `replay()` ingests the files oldest first and
deletes each one only after its ingest succeeded; it stops at the first Redis error or transient loader error
(Label Studio down, a timeout), keeping that file and the later ones, so order is kept. A file that can never be
ingested (not JSON, a malformed payload or RLE, an image that is gone or not an image) is moved to
`<dir>/rejected/` so it does not block the others. While files are pending, new events go to the spool as well
(after a short replay attempt), so an older update never lands after a newer one.
"""
from __future__ import annotations

import fcntl
import itertools
import json
import logging
import os
import tempfile
import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Iterator, Mapping

if TYPE_CHECKING:
    from backend.ingest import CorrectionIngester, ImageLoader

logger = logging.getLogger(__name__)

_counter = itertools.count()


def _redis_errors() -> tuple[type[BaseException], ...]:
    from redis.exceptions import ConnectionError as RedisConnectionError
    from redis.exceptions import TimeoutError as RedisTimeoutError

    return RedisConnectionError, RedisTimeoutError


# Image fetch statuses that will not change on a retry (bad reference, gone, not an image, too large).
_PERMANENT_FETCH_STATUSES = frozenset({400, 404, 410, 413, 415, 422})


class _LoaderError(Exception):
    """A transient image-loader failure (Label Studio down, a timeout): the event is retried later."""

    def __init__(self, cause: BaseException) -> None:
        super().__init__(repr(cause))
        self.cause = cause


def _tag_loader_errors(loader: "ImageLoader | None") -> "ImageLoader | None":
    """Wrap `loader` so its transient failures are told apart from errors in the payload itself."""
    if loader is None:
        return None

    def load(*args: Any) -> bytes:
        try:
            return loader(*args)
        except (ValueError, KeyError, TypeError, AttributeError):
            raise  # the task names no usable image (or its data is not an object): permanent
        except Exception as exc:  # noqa: BLE001 - sorted by the fetch status below
            if getattr(exc, "status", None) in _PERMANENT_FETCH_STATUSES:
                raise ValueError(f"image cannot be loaded: {exc}") from exc
            raise _LoaderError(exc) from exc

    return load


@dataclass(frozen=True)
class ReplayResult:
    """Outcome of one replay: events ingested, moved to rejected/, still pending, and the error that stopped it."""

    replayed: int
    rejected: int
    pending: int
    error: str | None = None


class Spool:
    """A directory of pending webhook events (JSON files, replayed oldest first)."""

    def __init__(self, directory: str | os.PathLike[str]) -> None:
        self.dir = Path(directory)
        self.dir.mkdir(parents=True, exist_ok=True)

    def append(self, payload: Mapping[str, Any]) -> Path:
        """Write one event atomically; returns its file. Raises OSError if the disk refuses."""
        name = f"{time.time_ns():020d}-{os.getpid()}-{next(_counter):06d}.json"
        data = json.dumps(payload, separators=(",", ":")).encode()
        fd, tmp = tempfile.mkstemp(dir=self.dir, prefix=".tmp-", suffix=".json")
        try:
            with os.fdopen(fd, "wb") as f:
                f.write(data)
                f.flush()
                os.fsync(f.fileno())
            path = self.dir / name
            os.rename(tmp, path)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise
        self._fsync_dir()
        logger.debug("event spooled", extra={"file": name, "action": payload.get("action")})
        return path

    def pending(self) -> list[Path]:
        """Spooled event files, oldest first (temp files of writes in progress are not listed)."""
        return sorted(p for p in self.dir.glob("*.json") if not p.name.startswith("."))

    def __len__(self) -> int:
        return len(self.pending())

    def _fsync_dir(self) -> None:
        fd = os.open(self.dir, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)

    @contextmanager
    def _exclusive(self) -> Iterator[bool]:
        """Non-blocking lock so only one process replays at a time; yields False if another one holds it."""
        with open(self.dir / ".replay.lock", "a+") as lock:
            try:
                fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                yield False
                return
            try:
                yield True
            finally:
                fcntl.flock(lock, fcntl.LOCK_UN)

    def replay(
        self,
        store: "CorrectionIngester",
        image_loader: "ImageLoader | None" = None,
        *,
        deadline_s: float | None = None,
    ) -> ReplayResult:
        """Ingest pending events in order into `store`, deleting each file after its ingest succeeded.

        Stops at the first Redis error or transient loader error (the file stays), or after `deadline_s` seconds;
        any other failure rejects that one event (moved to rejected/, logged) and replay goes on.
        Returns at once (nothing replayed) when another process is replaying this spool.
        """
        start = time.monotonic()
        replayed = rejected = 0
        with self._exclusive() as mine:
            if not mine:
                return ReplayResult(0, 0, len(self), "another process is replaying")
            for path in self.pending():
                if deadline_s is not None and time.monotonic() - start > deadline_s:
                    return ReplayResult(replayed, rejected, len(self), "deadline")
                try:
                    payload = json.loads(path.read_bytes())
                    if not isinstance(payload, dict):
                        raise ValueError("not a JSON object")
                    store.ingest_event(payload, _tag_loader_errors(image_loader))
                except _redis_errors() as exc:
                    logger.warning("replay stopped: Redis unreachable (%s)", exc)
                    return ReplayResult(replayed, rejected, len(self), f"redis: {exc}")
                except _LoaderError as exc:  # Label Studio down, a timeout...: try again later
                    logger.warning("replay stopped at %s: %r", path.name, exc.cause)
                    return ReplayResult(replayed, rejected, len(self), repr(exc.cause))
                except Exception as exc:  # noqa: BLE001 - a payload that can never be ingested
                    # Anything else comes from the payload itself (garbage RLE raising OverflowError, an
                    # "annotation" that is a string, ...): retrying it would block every later event forever.
                    rejected += 1
                    (self.dir / "rejected").mkdir(exist_ok=True)
                    os.replace(path, self.dir / "rejected" / path.name)
                    logger.error("spooled event %s rejected: %r", path.name, exc)
                    continue
                path.unlink()
                replayed += 1
            if replayed or rejected:
                self._fsync_dir()
                logger.info("spool replayed", extra={"replayed": replayed, "rejected": rejected})
        return ReplayResult(replayed, rejected, len(self))


def accept_event(
    payload: Mapping[str, Any],
    store_factory: Callable[[], "CorrectionIngester"],
    spool: Spool,
    image_loader: "ImageLoader | None" = None,
    *,
    replay_budget_s: float = 0.5,
) -> str:
    """Store a correction webhook event, or spool it when Redis is unreachable; never loses it.

    Returns "stored" or "spooled" ("ignored" for actions the store does not handle). When older events are
    spooled, they are replayed first (for at most `replay_budget_s`); if some remain, this one is spooled after them.
    Errors other than Redis being unreachable (a malformed payload, the image loader failing) propagate.
    """
    from backend.labelstudio.webhooks import HANDLED_ACTIONS

    if payload.get("action") not in HANDLED_ACTIONS:
        return "ignored"
    if spool.pending():
        try:
            spool.replay(store_factory(), image_loader, deadline_s=replay_budget_s)
        except _redis_errors():
            pass
        if spool.pending():
            spool.append(payload)
            return "spooled"
    try:
        store_factory().ingest_event(payload, image_loader)
    except _redis_errors() as exc:
        logger.warning("Redis unreachable, spooling %s: %s", payload.get("action"), exc)
        spool.append(payload)
        return "spooled"
    return "stored"
