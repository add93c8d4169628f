"""Errors whose message is meant for the user as is (the CLI prints them on one line)."""


class ModelNotAvailableError(RuntimeError):
    """Weights or tokenizer files could not be found (typically: offline and not cached)."""


class CheckpointMismatchError(ValueError):
    """A checkpoint does not fit the model it is loaded into (architecture or tensor names/shapes)."""
