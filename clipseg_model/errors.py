"""Errors whose message is meant for the user as is (the CLI prints them on one line, without a traceback)."""


class ClipsegError(Exception):
    """Base class: the message is the whole story for the user."""


class ModelNotAvailableError(ClipsegError, RuntimeError):
    """Weights or tokenizer files could not be found (typically: offline and not cached)."""


class CheckpointMismatchError(ClipsegError, ValueError):
    """A checkpoint does not fit the model it is loaded into (architecture or tensor names/shapes)."""
