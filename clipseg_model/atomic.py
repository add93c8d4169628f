"""Atomic directory writes: the one place that knows the write-beside-then-rename pattern.

A reader (a server loading a checkpoint, `train --resume`) must see either the old directory whole or the new one
whole, never a half-written one, also when the writer is SIGKILLed. `atomic_directory` yields a temporary
directory next to the target; on a clean exit its files are fsynced and it is renamed into place (replacing the
old directory only when asked, via a rename to `.NAME.old` first, so a crash in between still leaves one whole
directory). A killed writer leaves `.NAME.tmp-PID-*`, which `remove_abandoned_temp_dirs` deletes.
"""
from __future__ import annotations

import os
import shutil
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator


def fsync_tree(directory: str | os.PathLike) -> None:
    """fsync every regular file below `directory`, then the directory itself."""
    directory = Path(directory)
    for path in directory.rglob("*"):
        if path.is_file() and not path.is_symlink():
            with open(path, "rb") as fh:
                os.fsync(fh.fileno())
    fsync_dir(directory)


def fsync_dir(directory: str | os.PathLike) -> None:
    """fsync a directory entry list (makes a rename inside it durable)."""
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


@contextmanager
def atomic_directory(target: str | os.PathLike, *, replace: bool = False) -> Iterator[Path]:
    """Yield a temp directory beside `target`; on success it becomes `target` in one rename.

    Args:
        target: the directory to create.
        replace: allow an existing `target` to be replaced (else FileExistsError, before anything is written).
    Raises:
        FileExistsError: `target` exists and `replace` is False, or another writer created it first.
    """
    target = Path(target)
    if target.exists() and not replace:
        raise FileExistsError(f"directory {target} already exists")
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.tmp-{os.getpid()}-", dir=target.parent))
    try:
        yield tmp
        fsync_tree(tmp)
        if replace and target.exists():
            old = target.with_name(f".{target.name}.old-{os.getpid()}")
            shutil.rmtree(old, ignore_errors=True)
            os.rename(target, old)
            os.rename(tmp, target)
            shutil.rmtree(old, ignore_errors=True)
        else:
            try:
                os.rename(tmp, target)
            except OSError as exc:  # ENOTEMPTY/EEXIST: another writer got there first
                raise FileExistsError(f"directory {target} already exists") from exc
        fsync_dir(target.parent)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def pid_running(pid: int) -> bool:
    """Whether a process with this pid runs on this machine (a pid we may not signal counts as running)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def remove_abandoned_temp_dirs(parent: str | os.PathLike) -> list[Path]:
    """Delete temp directories that a killed writer left in `parent` (its pid no longer runs on this machine)."""
    removed = []
    for tmp in Path(parent).glob(".*.tmp-*-*"):
        try:
            pid = int(tmp.name.rsplit(".tmp-", 1)[1].split("-", 1)[0])
        except (IndexError, ValueError):
            continue
        if pid_running(pid):
            continue  # its write is in progress
        shutil.rmtree(tmp, ignore_errors=True)
        removed.append(tmp)
    return removed
