"""Filesystem primitives that never leave a half-written file or clobber an existing one.

Every operation here is safe to repeat after a crash: placing a file under a name that
already holds the very same file (same inode, or for copies across filesystems the same
size, mtime and bytes) reuses that name instead of adding a `-1` duplicate.
"""

from __future__ import annotations

import errno
import fcntl
import filecmp
import hashlib
import os
import re
import shutil
import uuid
from pathlib import Path
from typing import Callable, Iterator, List, Optional, Sequence

from rmbgd.output.backoff import NAME_ERRNOS as _NAME_ERRNOS

TEMP_SUFFIX = ".rmbgd-tmp"
# `.<owner tag>.rmbgd-owner`, flock()ed by an owner that has no work folder (`rmbgd process`)
# at the top of each folder tree it writes temps into, for as long as it runs.
OWNER_LOCK_SUFFIX = ".rmbgd-owner"
OWNER_TAG_MAX = 64
_TAG_SAFE = re.compile(r"[A-Za-z0-9_-]+")
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


def owner_tag(owner: str) -> str:
    """A bounded, file-name-safe tag that names `owner` in temp file names.

    A short plain name is its own tag; anything longer or with other characters becomes a
    readable prefix plus a hash of the whole name, so two owners never share a tag and the
    tag of a folder's name can always be computed again to find whose temp it is.
    """
    if len(owner) <= OWNER_TAG_MAX and _TAG_SAFE.fullmatch(owner):
        return owner
    digest = hashlib.sha256(os.fsencode(owner)).hexdigest()[:20]
    prefix = re.sub(r"[^A-Za-z0-9_-]", "_", owner)[: OWNER_TAG_MAX - len(digest) - 1]
    return f"{prefix}~{digest}"


def temp_path_for(folder: Path, owner: str) -> Path:
    # Short on purpose (the final name may already be NAME_MAX long), hidden so readers and
    # watchers skip it, and tagged with the owner so only a dead owner's leftovers get removed.
    return folder / f".{owner_tag(owner)}.{uuid.uuid4().hex[:12]}{TEMP_SUFFIX}"


def owner_of_temp(name: str) -> Optional[str]:
    """The owner tag (see owner_tag) of a temp file's name; None for other names."""
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


def replace_atomically(path: Path, data: bytes, temp: Optional[Path] = None) -> None:
    """Replace `path` with `data`, so that a reader (or a crash) sees the old file or the new
    one, never half of one: written to `temp` (default `.<name>.<pid>.tmp` beside it) and
    fsynced, renamed over `path`, and the folder fsynced."""
    temp = path.with_name(f".{path.name}.{os.getpid()}.tmp") if temp is None else temp
    temp.unlink(missing_ok=True)  # a crashed writer's leftover
    write_file_durably(temp, data)
    try:
        os.replace(temp, path)
    except BaseException:
        temp.unlink(missing_ok=True)
        raise
    fsync_dir(path.parent)


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
    try:
        fsync_dir(path.parent)
    except FileNotFoundError:
        # The emptied folder was removed right after (release_dirs, for another file of the
        # same folder): the removal cannot be undone by a crash any more, nothing to sync.
        return


def walk_files(top: Path, skip: Callable[[os.DirEntry], bool] = lambda entry: False) -> Iterator[os.DirEntry]:
    """Every non-directory entry below `top`, never following symlinks.

    `skip` prunes entries (a skipped folder is not entered). Folders that vanish or cannot be
    read while the walk goes on (gone, replaced by a file or link, no permission, a path past
    PATH_MAX) are passed over: others (the daemon, users) change these trees at the same time,
    and one odd folder must not end the walk of the rest.
    """
    stack = [top]
    while stack:
        folder = stack.pop()
        try:
            entries = list(os.scandir(folder))
        except OSError:
            continue
        for entry in entries:
            if skip(entry):
                continue
            try:
                is_folder = entry.is_dir(follow_symlinks=False)
            except OSError:
                continue
            if is_folder:
                stack.append(Path(entry.path))
            else:
                yield entry


def owner_lock_name(tag: str) -> str:
    return f".{tag}{OWNER_LOCK_SUFFIX}"


class OwnerLock:
    """Proof of life for an owner without a work folder: a locked file at the top of each
    folder it writes temps into, so a daemon starting meanwhile keeps those temps.

    Removed again on release; one left by a crash is unlocked, which is what proves its
    owner dead.
    """

    def __init__(self, folders: Sequence[Path], owner: str) -> None:
        self._paths = [folder / owner_lock_name(owner_tag(owner)) for folder in folders]
        self._fds: List[int] = []

    def __enter__(self) -> "OwnerLock":
        try:
            for path in self._paths:
                fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o644)
                self._fds.append(fd)
                fcntl.flock(fd, fcntl.LOCK_EX)
        except BaseException:
            self.__exit__()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        # Unlinked while still locked, so nobody can judge the name dead in between.
        fds, self._fds = self._fds, []
        for path, fd in zip(self._paths, fds):
            try:
                path.unlink(missing_ok=True)
            except OSError:
                continue  # left behind it is harmless: unlocked, it proves nothing alive
            finally:
                os.close(fd)


def owner_lock_held(tag: str, temp: Path) -> bool:
    """True when an OwnerLock of `tag` is held in a folder above `temp` (or next to it)."""
    name = owner_lock_name(tag)
    for folder in temp.parents:
        try:
            fd = os.open(folder / name, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
        except FileNotFoundError:
            continue
        except OSError:
            return True  # something is there that we cannot check: keep the temp
        try:
            fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except OSError as exc:
            if exc.errno in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                return True
            raise
        finally:
            os.close(fd)
    return False


def remove_orphan_temps(root: Path, is_dead: Callable[[str], bool]) -> int:
    """Delete temp files left under `root` by owners proven to be no longer running.

    `is_dead` judges an owner tag by its work folder's lock; an owner without one (`rmbgd
    process`) is alive while it holds its OwnerLock above the temp.
    """
    removed = 0
    for entry in walk_files(root):
        tag = owner_of_temp(entry.name)
        if tag is None:
            continue
        path = Path(entry.path)
        if not owner_lock_held(tag, path) and is_dead(tag):
            path.unlink(missing_ok=True)
            removed += 1
    return removed
