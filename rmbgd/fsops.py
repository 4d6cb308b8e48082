"""Filesystem primitives that never leave a half-written file or clobber an existing one."""

from __future__ import annotations

import errno
import os
import shutil
import uuid
from pathlib import Path
from typing import Callable, Iterator

TEMP_TAG = ".rmbgd-tmp"


def candidate_names(target: Path) -> Iterator[Path]:
    """target, then target-1, target-2, … (the suffix goes before the extension)."""
    yield target
    n = 1
    while True:
        # `name.tar.gz`-style double suffixes are not worth special-casing for photos.
        yield target.with_name(f"{target.stem}-{n}{target.suffix}")
        n += 1


def temp_path_for(target: Path, owner: str) -> Path:
    # Hidden, and tagged with the owner so a restart can tell its own leftovers from a peer's.
    return target.with_name(f".{target.name}.{owner}.{uuid.uuid4().hex[:8]}{TEMP_TAG}")


def fsync_dir(folder: Path) -> None:
    fd = os.open(folder, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_file_durably(path: Path, data: bytes) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o644)
    try:
        view = memoryview(data)
        while view:
            written = os.write(fd, view)
            view = view[written:]
        os.fsync(fd)
    finally:
        os.close(fd)


def link_unique(temp: Path, target: Path) -> Path:
    """Give the complete file `temp` the first free name among target, target-1, …

    link(2) fails instead of replacing, so two writers (threads or daemons) racing for one name
    both end up with a name of their own and readers only ever see complete files. Filesystems
    without hard links fall back to an existence check and rename, racy only between daemons.
    """
    for name in candidate_names(target):
        try:
            os.link(temp, name)
        except FileExistsError:
            continue
        except OSError as exc:
            if exc.errno not in (errno.EPERM, errno.EOPNOTSUPP, errno.ENOTSUP, errno.EMLINK):
                raise
            if os.path.lexists(name):
                continue
            os.replace(temp, name)
            return name
        os.unlink(temp)
        return name
    raise AssertionError("unreachable")


def publish_bytes(data: bytes, target: Path, owner: str) -> Path:
    """Write `data` so that it appears atomically at `target` (or target-N); returns the name."""
    target.parent.mkdir(parents=True, exist_ok=True)
    temp = temp_path_for(target, owner)
    try:
        write_file_durably(temp, data)
        final = link_unique(temp, target)
    except BaseException:
        temp.unlink(missing_ok=True)
        raise
    fsync_dir(target.parent)
    return final


def move_unique(source: Path, target: Path, owner: str) -> Path:
    """Move `source` to `target` (or target-N) without replacing anything; returns the new name.

    Works across filesystems by copying to a hidden temp name first, so the destination never
    shows a partial file. Symbolic links are moved as links: their targets are never touched.
    """
    target.parent.mkdir(parents=True, exist_ok=True)
    try:
        final = link_unique(source, target) if not source.is_symlink() else _rename_unique(source, target)
    except OSError as exc:
        if exc.errno != errno.EXDEV:
            raise
        final = _copy_then_remove(source, target, owner)
    fsync_dir(target.parent)
    return final


def _rename_unique(source: Path, target: Path) -> Path:
    for name in candidate_names(target):
        if os.path.lexists(name):
            continue
        os.rename(source, name)
        return name
    raise AssertionError("unreachable")


def _copy_then_remove(source: Path, target: Path, owner: str) -> Path:
    temp = temp_path_for(target, owner)
    try:
        if source.is_symlink():
            os.symlink(os.readlink(source), temp)
        else:
            shutil.copy2(source, temp, follow_symlinks=False)
            _fsync_file(temp)
        final = link_unique(temp, target) if not temp.is_symlink() else _rename_unique(temp, target)
    except BaseException:
        temp.unlink(missing_ok=True)
        raise
    source.unlink()
    return final


def _fsync_file(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def remove_file(path: Path, fsync_parent: Callable[[Path], None] = fsync_dir) -> None:
    path.unlink()
    fsync_parent(path.parent)
