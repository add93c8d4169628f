"""The one atomic directory writer: readers see the old directory or the new one, never a half-written one."""
from __future__ import annotations

import os

import pytest

from clipseg_model.atomic import atomic_directory, remove_abandoned_temp_dirs


def test_new_directory_appears_whole(tmp_path):
    target = tmp_path / "ckpt"
    with atomic_directory(target) as tmp:
        (tmp / "a.txt").write_text("a")
        assert not target.exists()  # nothing visible until the writer is done
    assert (target / "a.txt").read_text() == "a"
    assert [p.name for p in tmp_path.iterdir()] == ["ckpt"]


def test_existing_directory_is_refused_unless_replace(tmp_path):
    target = tmp_path / "ckpt"
    target.mkdir()
    (target / "old.txt").write_text("old")
    with pytest.raises(FileExistsError):
        with atomic_directory(target):
            pass
    with atomic_directory(target, replace=True) as tmp:
        (tmp / "new.txt").write_text("new")
    assert sorted(p.name for p in target.iterdir()) == ["new.txt"]
    assert [p.name for p in tmp_path.iterdir()] == ["ckpt"]


def test_failed_write_keeps_the_old_directory_and_leaves_no_temp(tmp_path):
    target = tmp_path / "state"
    target.mkdir()
    (target / "old.txt").write_text("old")
    with pytest.raises(RuntimeError):
        with atomic_directory(target, replace=True) as tmp:
            (tmp / "half.txt").write_text("half")
            raise RuntimeError("killed mid-write")
    assert sorted(p.name for p in target.iterdir()) == ["old.txt"]
    assert [p.name for p in tmp_path.iterdir()] == ["state"]


def test_abandoned_temp_dirs_of_dead_writers_are_removed(tmp_path):
    dead = tmp_path / ".v1.tmp-999999999-x"
    alive = tmp_path / f".v2.tmp-{os.getpid()}-y"
    dead.mkdir()
    alive.mkdir()
    assert remove_abandoned_temp_dirs(tmp_path) == [dead]
    assert alive.exists() and not dead.exists()
