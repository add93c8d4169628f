"""Child processes that die with their parent: a SIGKILLed `clipseg serve` leaves no gunicorn, worker or
redis-server behind (Linux `prctl(PR_SET_PDEATHSIG)`)."""
from __future__ import annotations

import ctypes
import os
import signal
from typing import Callable

PR_SET_PDEATHSIG = 1


def die_with_parent(sig: int = signal.SIGKILL) -> Callable[[], None]:
    """A `preexec_fn` that makes the child receive `sig` when this process dies (Linux; a no-op elsewhere)."""
    parent = os.getpid()

    def preexec() -> None:
        try:
            ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, int(sig), 0, 0, 0)
        except (OSError, AttributeError):
            return
        if os.getppid() != parent:  # the parent died between fork and prctl
            os._exit(1)

    return preexec
