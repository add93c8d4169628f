"""Retry or reject? The spool's one rule for a failed ingest, decided by the kind of error, not by where it happened.

- `TRANSIENT`: the world around the event is broken, not the event — Redis unreachable, loading, read-only, out of
  memory or refusing writes because its disk is full (MISCONF), a timeout, the local disk, Label Studio down while
  the image is fetched. The event stays pending and is retried with backoff; it never counts against the event.
- `INVALID`: the payload is wrong in itself (not JSON, missing ids, garbage RLE, an image that is gone). Retrying
  cannot help; the event goes to `rejected/` (kept, listed, replayable with `clipseg spool --replay-rejected`).
- `UNKNOWN`: anything else (MemoryError, an unexpected bug). Counted per event; after `MAX_ATTEMPTS` the event is
  quarantined so it never blocks the events behind it forever. A crash mid-ingest (the process killed for memory)
  counts too, because the attempt is recorded before the ingest starts.
"""
from __future__ import annotations

TRANSIENT = "transient"
INVALID = "invalid"
UNKNOWN = "unknown"

MAX_ATTEMPTS = 3

# Redis error replies that describe the server's state, not the command (MISCONF: a failed write to disk).
_TRANSIENT_REPLIES = ("MISCONF", "OOM ", "READONLY", "LOADING", "MASTERDOWN", "NOREPLICAS", "TRYAGAIN", "BUSY ",
                      "CLUSTERDOWN")


class TransientLoaderError(Exception):
    """A transient image-loader failure (Label Studio down, a timeout): the event is retried later."""

    def __init__(self, cause: BaseException) -> None:
        super().__init__(repr(cause))
        self.cause = cause


def classify(exc: BaseException) -> str:
    """TRANSIENT, INVALID or UNKNOWN for an exception raised while ingesting one event."""
    from redis import exceptions as rx

    if isinstance(exc, (rx.ConnectionError, rx.TimeoutError, rx.BusyLoadingError, rx.ReadOnlyError,
                        rx.OutOfMemoryError, rx.MasterDownError, rx.TryAgainError, rx.ClusterDownError,
                        TransientLoaderError, TimeoutError)):
        return TRANSIENT
    if isinstance(exc, rx.RedisError):
        message = str(exc)
        # Scripts wrap the reply ("ERR Error running script ...: OOM command not allowed"): look anywhere in it.
        if any(marker.strip() in message for marker in _TRANSIENT_REPLIES):
            return TRANSIENT
        return UNKNOWN
    if isinstance(exc, OSError):  # ENOSPC, EIO, EACCES on our own disk: not the event's fault
        return TRANSIENT
    if isinstance(exc, (ValueError, KeyError, TypeError, AttributeError, IndexError, OverflowError)):
        return INVALID  # includes json.JSONDecodeError and UnicodeDecodeError (ValueError subclasses)
    return UNKNOWN


def describe(exc: BaseException) -> str:
    """One line for logs and /health: the error's type and message, shortened."""
    cause = exc.cause if isinstance(exc, TransientLoaderError) else exc
    text = f"{type(cause).__name__}: {cause}".strip()
    return text if len(text) <= 300 else text[:297] + "..."
