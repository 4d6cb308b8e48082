"""Filesystem primitives that never leave a half-written file or clobber an existing one.

Every operation here is safe to repeat after a crash: placing a file under a name that
already holds the very same file (same inode, or for copies across filesystems the same
size, mtime and bytes) reuses that name instead of adding a `-1` duplicate.
"""

from __future__ import annotations

import errno
import filecmp
import os
import shutil
import uuid
from pathlib import Path
from typing import Callable, Iterator, Optional

from rmbgd.backoff import NAME_ERRNOS as _NAME_ERRNOS

TEMP_SUFFIX = ".rmbgd-tmp"
NAME_MAX = 255  # bytes per path component on Linux filesystems

# Errors that say the destination cannot hold this name, whatever the disk's state: retrying
# will not help, so the input is failed instead of retried (backoff.py has the full rule).
NAME_ERRNOS = tuple(sorted(_NAME_ERRNOS))


def _fits(name: str) -> bool:
    return len(os.fsencode(name)) <= NAME_MAX


def shorten_name(stem: str, tail: str) -> str:
    """stem + tail, cutting the stem (never the tail) so the result fits NAME_MAX."""
    name = stem + tail
    while not _fits(name) and stem:
        stem = stem[:-1]
        name = stem + tail
    return name


def candidate_names(target: Path) -> Iterator[Path]:
    """target, then target-1, target-2, … (before the extension; the stem is shortened if the
    suffix would push the name past NAME_MAX)."""
    yield target
    n = 1
    while True:
        yield target.with_name(shorten_name(target.stem, f"-{n}{target.suffix}"))
        n += 1


def temp_path_for(folder: Path, owner: str) -> Path:
    # Short on purpose (the final name may already be NAME_MAX long), hidden so readers and
    # watchers skip it, and tagged with the owner so only a dead owner's leftovers get removed.
    return folder / f".{owner[:64]}.{uuid.uuid4().hex[:12]}{TEMP_SUFFIX}"


def owner_of_temp(name: str) -> Optional[str]:
    if not (name.startswith(".") and name.endswith(TEMP_SUFFIX)):
        return None
    owner, _, rand = name[1 : -len(TEMP_SUFFIX)].rpartition(".")
    return owner or None


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
    except BaseException:
        os.close(fd)
        path.unlink(missing_ok=True)
        raise
    os.close(fd)


def write_temp(data: bytes, folder: Path, owner: str) -> Path:
    temp = temp_path_for(folder, owner)
    write_file_durably(temp, data)
    return temp


def same_inode(a: os.stat_result, b: os.stat_result) -> bool:
    return (a.st_ino, a.st_dev) == (b.st_ino, b.st_dev)


def find_linked(target: Path, ino: int, dev: int, misses: int = 8) -> Optional[Path]:
    """The name among target, target-1, … that is the file (ino, dev), if any."""
    missing = 0
    for name in candidate_names(target):
        try:
            st = os.lstat(name)
        except FileNotFoundError:
            missing += 1
            if missing >= misses:
                return None
            continue
        if (st.st_ino, st.st_dev) == (ino, dev):
            return name


def link_unique(source: Path, target: Path, same: Optional[Callable[[Path], bool]] = None) -> Path:
    """Give the complete file `source` the first free name among target, target-1, …; the
    source keeps its own name too.

    link(2) fails instead of replacing, so two writers (threads or daemons) racing for one name
    both end up with a name of their own and readers only ever see complete files. A name that
    already holds this very file is reused, which makes a repeat after a crash harmless.
    Filesystems without hard links fall back to an existence check and rename (racy only
    between daemons; the source then loses its name).
    """
    src = os.lstat(source)
    for name in candidate_names(target):
        try:
            os.link(source, name, follow_symlinks=False)
        except FileExistsError:
            try:
                existing = os.lstat(name)
            except FileNotFoundError:
                continue
            if same_inode(existing, src) or (same is not None and same(name)):
                return name
            continue
        except OSError as exc:
            if exc.errno not in (errno.EPERM, errno.EOPNOTSUPP, errno.ENOTSUP, errno.EMLINK):
                raise
            if os.path.lexists(name):
                continue
            os.replace(source, name)
            return name
        return name
    # candidate_names never ends; this only keeps the function total.
    raise RuntimeError(f"no free name for {target}")


def place_unique(source: Path, target: Path, owner: str) -> Path:
    """Make `source` appear at target (or target-N), atomically, without replacing anything.

    On one filesystem this is a hard link; across filesystems a copy to a hidden temp name,
    fsynced, then linked into place. The source is left where it is: the caller removes it
    once everything that depends on the new name (a sidecar) is written. Symbolic links are
    placed as links: their targets are never read or touched.
    """
    target.parent.mkdir(parents=True, exist_ok=True)
    try:
        final = link_unique(source, target)
    except OSError as exc:
        if exc.errno != errno.EXDEV:
            raise
        final = _copy_unique(source, target, owner)
    fsync_dir(final.parent)
    return final


def _copy_unique(source: Path, target: Path, owner: str) -> Path:
    temp = temp_path_for(target.parent, owner)
    try:
        if source.is_symlink():
            os.symlink(os.readlink(source), temp)
        else:
            shutil.copy2(source, temp, follow_symlinks=False)
            _fsync_file(temp)
        final = link_unique(temp, target, same=lambda name: _same_copy(source, name))
    finally:
        temp.unlink(missing_ok=True)
    return final


def _same_copy(source: Path, other: Path) -> bool:
    # A copy made before a crash has the source's size and mtime (copy2) and its bytes.
    if source.is_symlink() or other.is_symlink():
        return source.is_symlink() and other.is_symlink() and os.readlink(source) == os.readlink(other)
    a, b = os.stat(source), os.stat(other)
    return a.st_size == b.st_size and a.st_mtime_ns == b.st_mtime_ns and filecmp.cmp(source, other, shallow=False)


def _fsync_file(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def move_unique(source: Path, target: Path, owner: str) -> Path:
    """place_unique, then remove the source: the file ends up under exactly one new name."""
    final = place_unique(source, target, owner)
    remove_file(source)
    return final


def publish_bytes(data: bytes, target: Path, owner: str) -> Path:
    """Write `data` so that it appears atomically at `target` (or target-N); returns the name."""
    target.parent.mkdir(parents=True, exist_ok=True)
    temp = write_temp(data, target.parent, owner)
    try:
        final = link_unique(temp, target)
    finally:
        temp.unlink(missing_ok=True)
    fsync_dir(target.parent)
    return final


def remove_file(path: Path) -> None:
    try:
        path.unlink()
    except FileNotFoundError:
        return  # already gone: a repeat after a crash
    fsync_dir(path.parent)


def walk_files(top: Path, skip: Callable[[os.DirEntry], bool] = lambda entry: False) -> Iterator[os.DirEntry]:
    """Every non-directory entry below `top`, never following symlinks.

    `skip` prunes entries (a skipped folder is not entered). Folders that vanish or cannot be
    read while the walk goes on are passed over: others (the daemon, users) change these
    trees at the same time.
    """
    stack = [top]
    while stack:
        folder = stack.pop()
        try:
            entries = list(os.scandir(folder))
        except (FileNotFoundError, NotADirectoryError, PermissionError):
            continue
        for entry in entries:
            if skip(entry):
                continue
            if entry.is_dir(follow_symlinks=False):
                stack.append(Path(entry.path))
            else:
                yield entry


def remove_orphan_temps(root: Path, is_dead: Callable[[str], bool]) -> int:
    """Delete temp files left under `root` by owners that are no longer running."""
    removed = 0
    for entry in walk_files(root):
        owner = owner_of_temp(entry.name)
        if owner is not None and is_dead(owner):
            Path(entry.path).unlink(missing_ok=True)
            removed += 1
    return removed
