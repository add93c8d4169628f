"""Local spool for webhook events while Redis is unreachable, replayed in order when it is back.

Label Studio does not resend a webhook that failed (its timeout is 1 s), so an event that cannot reach Redis is
written to `<dir>/<time_ns>-<pid>-<n>.json`, one file per event, atomically (temp file, fsync, rename, fsync of
the directory): a crash leaves either the whole event or nothing. `replay()` ingests the files oldest first and
deletes each one only after its ingest succeeded. What happens on a failure is decided by the error's kind
(`backend.intake.errors.classify`): a transient one (Redis down, MISCONF/OOM/READONLY, a timeout, Label Studio down)
stops the replay, keeping that file and the later ones, so order is kept; a payload invalid in itself is moved to
`<dir>/rejected/`; an event that fails in any other way (or kills the process while being ingested) `MAX_ATTEMPTS`
times is moved to `<dir>/quarantine/`. Neither blocks the others, both are listed (`clipseg status`, /metrics) with
a `.reason` file each, and `replay_rejected()` (`clipseg spool --replay-rejected`) puts them back in line. While
files are pending, new events go to the spool as well, so an older update never lands after a newer one.
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

from backend.intake.errors import INVALID, MAX_ATTEMPTS, TRANSIENT, TransientLoaderError, classify, describe

if TYPE_CHECKING:
    from backend.intake.ingest import CorrectionIngester, ImageLoader

logger = logging.getLogger(__name__)

_counter = itertools.count()

# Image fetch statuses that will not change on a retry (bad reference, gone, not an image, too large).
_PERMANENT_FETCH_STATUSES = frozenset({400, 404, 410, 413, 415, 422})
REJECTED, QUARANTINE = "rejected", "quarantine"


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
            raise TransientLoaderError(exc) from exc

    return load


@dataclass(frozen=True)
class ReplayResult:
    """Outcome of one replay: events ingested, set aside (rejected/quarantined), still pending, and the transient
    error that stopped it (None when the spool was emptied)."""

    replayed: int
    rejected: int
    pending: int
    error: str | None = None
    quarantined: int = 0

    @property
    def transient(self) -> bool:
        """True when a transient fault stopped the replay: try again later, with backoff."""
        return self.error is not None and self.error not in ("deadline", "another process is replaying")


class Spool:
    """A directory of pending webhook events (JSON files, replayed oldest first)."""

    def __init__(self, directory: str | os.PathLike[str]) -> None:
        self.dir = Path(directory)
        self.dir.mkdir(parents=True, exist_ok=True)
        self._attempts_dir = self.dir / ".attempts"

    def append(self, payload: Mapping[str, Any] | bytes) -> Path:
        """Write one event (a mapping, or the JSON bytes as received) atomically; returns its file.

        Raises OSError if the disk refuses (full, read-only, no permission): the caller must not acknowledge.
        """
        name = f"{time.time_ns():020d}-{os.getpid()}-{next(_counter):06d}.json"
        data = payload if isinstance(payload, bytes) else json.dumps(payload, separators=(",", ":")).encode()
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
        logger.debug("event spooled", extra={"file": name})
        return path

    def pending(self) -> list[Path]:
        """Spooled event files, oldest first (temp files of writes in progress are not listed)."""
        return sorted(p for p in self.dir.glob("*.json") if not p.name.startswith("."))

    def set_aside(self, kind: str = REJECTED) -> list[Path]:
        """Event files in rejected/ or quarantine/, oldest first."""
        return sorted((self.dir / kind).glob("*.json"))

    def reason(self, path: Path) -> str:
        """Why a set-aside event was set aside (its `.reason` file), or ''."""
        try:
            return path.with_suffix(".reason").read_text().strip()
        except OSError:
            return ""

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

    # attempts survive a crash: they are counted before the ingest starts ---------------------------------------
    def _attempts(self, path: Path) -> int:
        try:
            return int((self._attempts_dir / path.name).read_text() or 0)
        except (OSError, ValueError):
            return 0

    def _set_attempts(self, path: Path, n: int) -> None:
        marker = self._attempts_dir / path.name
        if n <= 0:
            marker.unlink(missing_ok=True)
            return
        self._attempts_dir.mkdir(exist_ok=True)
        marker.write_text(str(n))  # no fsync: it must survive the process being killed, not the machine

    def _move_aside(self, path: Path, kind: str, reason: str) -> None:
        target = self.dir / kind
        target.mkdir(exist_ok=True)
        try:
            (target / path.name).with_suffix(".reason").write_text(reason + "\n")
        except OSError:
            pass  # the event matters more than its note
        os.replace(path, target / path.name)
        self._set_attempts(path, 0)
        logger.error("spooled event %s moved to %s/: %s", path.name, kind, reason)

    def replay(
        self,
        store: "CorrectionIngester",
        image_loader: "ImageLoader | None" = None,
        *,
        deadline_s: float | None = None,
        max_attempts: int = MAX_ATTEMPTS,
    ) -> ReplayResult:
        """Ingest pending events in order into `store`, deleting each file after its ingest succeeded.

        A transient error stops the replay (that file and later ones stay); an invalid payload is rejected; any
        other failure counts an attempt and quarantines the event after `max_attempts`. Also stops after
        `deadline_s` seconds. Returns at once (nothing replayed) when another process is replaying this spool.
        """
        start = time.monotonic()
        replayed = rejected = quarantined = 0
        with self._exclusive() as mine:
            if not mine:
                return ReplayResult(0, 0, len(self), "another process is replaying")
            loader = _tag_loader_errors(image_loader)
            for path in self.pending():
                if deadline_s is not None and time.monotonic() - start > deadline_s:
                    return ReplayResult(replayed, rejected, len(self), "deadline", quarantined)
                attempts = self._attempts(path)
                if attempts >= max_attempts:  # it killed the process that many times: do not try again
                    self._move_aside(path, QUARANTINE, f"{attempts} attempts did not finish (process killed?)")
                    quarantined += 1
                    continue
                self._set_attempts(path, attempts + 1)
                try:
                    payload = json.loads(path.read_bytes())
                    if not isinstance(payload, dict):
                        raise ValueError("not a JSON object")
                    store.ingest_event(payload, loader)
                except Exception as exc:  # noqa: BLE001 - sorted by kind below
                    kind = classify(exc)
                    if kind == TRANSIENT:
                        self._set_attempts(path, attempts)  # not the event's fault
                        logger.warning("replay paused at %s: %s", path.name, describe(exc))
                        return ReplayResult(replayed, rejected, len(self), describe(exc), quarantined)
                    if kind == INVALID:
                        self._move_aside(path, REJECTED, describe(exc))
                        rejected += 1
                    elif attempts + 1 >= max_attempts:
                        self._move_aside(path, QUARANTINE, f"failed {attempts + 1} times: {describe(exc)}")
                        quarantined += 1
                    else:
                        logger.warning("spooled event %s failed (attempt %d of %d): %s", path.name, attempts + 1,
                                       max_attempts, describe(exc))
                        return ReplayResult(replayed, rejected, len(self), describe(exc), quarantined)
                    continue
                path.unlink()
                self._set_attempts(path, 0)
                replayed += 1
            if replayed or rejected or quarantined:
                self._fsync_dir()
                logger.info("spool replayed", extra={"replayed": replayed, "rejected": rejected,
                                                     "quarantined": quarantined})
        return ReplayResult(replayed, rejected, len(self), None, quarantined)

    def replay_rejected(self) -> int:
        """Put every rejected and quarantined event back in line (by its original time); returns how many."""
        moved = 0
        for kind in (REJECTED, QUARANTINE):
            for path in self.set_aside(kind):
                path.with_suffix(".reason").unlink(missing_ok=True)
                self._set_attempts(path, 0)
                os.replace(path, self.dir / path.name)
                moved += 1
        if moved:
            self._fsync_dir()
            logger.info("%d set-aside events put back in the spool", moved)
        return moved


def accept_event(
    payload: Mapping[str, Any],
    store_factory: Callable[[], "CorrectionIngester"],
    spool: Spool,
    image_loader: "ImageLoader | None" = None,
    *,
    replay_budget_s: float = 0.5,
) -> str:
    """Store a correction webhook event, or spool it when the store fails transiently; never loses it.

    Returns "stored" or "spooled" ("ignored" for actions the store does not handle). When older events are
    spooled, they are replayed first (for at most `replay_budget_s`); if some remain, this one is spooled after them.
    Errors of the payload itself (a malformed payload, an image that is gone) propagate.
    """
    from backend.labelstudio.webhooks import HANDLED_ACTIONS

    if payload.get("action") not in HANDLED_ACTIONS:
        return "ignored"
    if spool.pending():
        try:
            spool.replay(store_factory(), image_loader, deadline_s=replay_budget_s)
        except Exception as exc:  # noqa: BLE001 - building the store failed
            if classify(exc) != TRANSIENT:
                raise
        if spool.pending():
            spool.append(payload)
            return "spooled"
    try:
        store_factory().ingest_event(payload, image_loader)
    except Exception as exc:  # noqa: BLE001 - sorted by kind
        if classify(exc) != TRANSIENT:
            raise
        logger.warning("store unavailable, spooling %s: %s", payload.get("action"), describe(exc))
        spool.append(payload)
        return "spooled"
    return "stored"
