"""The private work area: claiming inbox files so that exactly one worker processes each.

Layout, on the inbox's own filesystem so that claiming is a single atomic rename:

    inbox/.rmbgd/work/<instance>/<relative path of the file>
    inbox/.rmbgd/work/<instance>/.lock        flock()ed for the instance's whole life

Two daemons on one inbox race only on rename(2): exactly one rename of a given inbox file
succeeds, the other sees ENOENT and moves on. A crashed instance leaves its folder behind with
nobody holding its lock; whoever takes that lock next (the same service restarting, or any
peer at start-up) adopts the files and processes them. On a network filesystem the lock is
released by the server when the dead client's lease expires, so a peer recovers the files then.
"""

from __future__ import annotations

import errno
import fcntl
import hashlib
import os
import socket
from dataclasses import dataclass
from pathlib import Path, PurePath
from typing import Callable, Iterator, List, Optional

from rmbgd.output.fsops import owner_tag, walk_files
from rmbgd.intake.names import PRIVATE_DIR

LOCK_NAME = ".lock"
INTENT_SUFFIX = ".intent"
# How often a move into our folder is retried when the folder it needs is removed under it
# (release_dirs, run from the encode pool, removes emptied folders while claims come in).
MOVE_ATTEMPTS = 8

# Called with the path and the error for each dead peer's file that could not be taken over.
OnAdoptError = Callable[[Path, OSError], None]


class WorkAreaLocked(RuntimeError):
    """Another running process holds this instance's work area (it has the same name)."""


@dataclass(frozen=True)
class Claim:
    rel: PurePath   # path relative to the inbox, as the user dropped it
    path: Path      # where the file lives while we own it

    @property
    def intent(self) -> Path:
        """The publish journal of this claim (see publisher.py), next to it in the work area.

        Hidden, so it can never be mistaken for a claim (claimed names are never hidden), and
        named by a hash because the claim's own name may already be NAME_MAX long.
        """
        digest = hashlib.sha1(os.fsencode(self.path.name)).hexdigest()[:16]
        return self.path.with_name(f".{digest}{INTENT_SUFFIX}")


def default_instance_name() -> str:
    # Host + pid keeps concurrent instances apart, on one host and across hosts sharing a
    # filesystem; a restarted instance gets a new folder and adopts its old one through the lock.
    host = socket.gethostname().split(".")[0] or "host"
    return f"{host}-{os.getpid()}"


class WorkArea:
    def __init__(self, inbox: Path, instance: Optional[str] = None) -> None:
        self.inbox = inbox
        self.root = inbox / PRIVATE_DIR / "work"
        self.instance = instance or default_instance_name()
        self.dir = self.root / self.instance
        self._lock_fd: Optional[int] = None

    # -- life cycle -------------------------------------------------------------------------
    def open(self) -> None:
        self.dir.mkdir(parents=True, exist_ok=True)
        fd = _lock(self.dir / LOCK_NAME)
        if fd is None:
            raise WorkAreaLocked(f"work area {self.dir} is locked by another running instance")
        self._lock_fd = fd

    def close(self) -> None:
        """Release the lock; the folder stays if it still holds files (the next start adopts them)."""
        if self._lock_fd is None:
            return
        if not any(self._files(self.dir)):
            _remove_tree_if_empty(self.dir, keep_lock=False)
        os.close(self._lock_fd)
        self._lock_fd = None

    # -- claiming ---------------------------------------------------------------------------
    def claim(self, source: Path) -> Optional[Claim]:
        """Atomically take `source` (a path in the inbox); None if it is gone or not claimable now.

        Raises FileNotFoundError when a folder on the way to it is now a symbolic link: what
        that path names is no longer in the inbox and must not be moved.
        """
        rel = PurePath(source.relative_to(self.inbox))
        target = self.dir / rel
        if os.path.lexists(target):
            # Same relative name still in progress from an earlier drop: rename(2) would replace
            # it, so this one waits in the inbox until the earlier one is finished.
            return None
        try:
            self._move_in(self.inbox, rel, target)
        except FileNotFoundError as exc:
            if exc.errno == errno.ENOENT and exc.filename is None:
                return None  # another instance (or the user) took it first
            raise
        return Claim(rel=rel, path=target)

    def _move_in(self, top: Path, rel: PurePath, target: Path) -> None:
        """rename(top/rel → target) without following a symlink anywhere below `top`.

        The source folder is opened component by component with O_NOFOLLOW, so a folder
        swapped for a link after it was scanned can never make us move a file from outside.
        A source that is gone raises FileNotFoundError without a filename.
        """
        folder_fd = _open_folder_nofollow(top, rel.parent)
        try:
            for attempt in range(MOVE_ATTEMPTS):
                try:
                    target.parent.mkdir(parents=True, exist_ok=True)
                    os.rename(rel.name, target, src_dir_fd=folder_fd)
                    return
                except FileNotFoundError:
                    # Either the source is gone, or release_dirs removed the (empty) folder
                    # we just made before the rename landed in it: then make it again.
                    if os.path.isdir(target.parent):
                        raise FileNotFoundError(errno.ENOENT, "gone") from None
                    if attempt == MOVE_ATTEMPTS - 1:
                        raise
        finally:
            os.close(folder_fd)

    def release_dirs(self, claim: Claim) -> None:
        """Remove folders left empty under our area after a claim is finished."""
        parent = claim.path.parent
        while parent != self.dir and self.dir in parent.parents:
            try:
                parent.rmdir()
            except OSError:
                return
            parent = parent.parent

    # -- recovery ---------------------------------------------------------------------------
    def recover(self, on_error: Optional[OnAdoptError] = None) -> List[Claim]:
        """At start-up: our own leftovers (a reused instance name) and dead instances' claims."""
        if not self.root.is_dir():
            return []
        # Our own folder first, before it receives adopted files.
        adopted = self._own_leftovers() + self.adopt_dead_peers(on_error)
        self._drop_orphan_intents()
        return adopted

    def _other_folders(self) -> List[Path]:
        try:
            return [Path(e.path) for e in os.scandir(self.root)
                    if e.path != os.fspath(self.dir) and e.is_dir(follow_symlinks=False)]
        except FileNotFoundError:
            return []

    def adopt_dead_peers(self, on_error: Optional[OnAdoptError] = None) -> List[Claim]:
        """Claims of instances whose lock is free; safe to call while we are working.

        A file (or a whole folder) that cannot be taken over is reported to `on_error` and
        left where it is for a later try; it never stops the others.
        """
        adopted: List[Claim] = []
        if not self.root.is_dir():
            return adopted
        for other in sorted(self.root.iterdir()):
            if other == self.dir or not other.is_dir() or other.is_symlink():
                continue
            try:
                fd = _lock(other / LOCK_NAME)
            except FileNotFoundError:
                continue  # another instance adopted and removed it meanwhile
            except OSError as exc:
                # A lock that is a symlink (never followed) or unreadable proves nothing.
                if on_error is not None:
                    on_error(other / LOCK_NAME, exc)
                continue
            if fd is None:
                continue  # alive: its owner is still working on those files
            try:
                adopted.extend(self._adopt(other, on_error))
            finally:
                os.close(fd)
        return adopted

    def _adopt(self, other: Path, on_error: Optional[OnAdoptError] = None) -> List[Claim]:
        """Move a dead instance's claims (and their intents) into our folder.

        Entries are moved as they are, links and FIFOs included (never opened or followed):
        the daemon sends whatever is not a regular file to errors/. A claim and its intent
        move together, the intent first: a claim without its journal would be processed
        again and published a second time (x-1.png).
        """
        adopted: List[Claim] = []
        entries = list(self._files(other, hidden=True))
        claims = [path for path in entries if not path.name.startswith(".")]
        journals = {Claim(rel=PurePath(), path=path).intent for path in claims}
        for path in claims:
            claim = self._adopt_one(other, path, on_error)
            if claim is not None:
                adopted.append(claim)
        # What else is hidden there (an intent whose file was finished, a half-written one)
        # comes along and is dropped with our own orphans (_drop_orphan_intents).
        for path in entries:
            if path.name.startswith(".") and path not in journals:
                self._move_entry(other, path, on_error)
        try:
            _remove_tree_if_empty(other, keep_lock=False)
        except OSError as exc:
            # The files moved above are ours now and must be returned, or they would wait
            # in our folder until the next start; the emptied folder is tidied up later.
            if on_error is not None:
                on_error(other, exc)
        return adopted

    def _adopt_one(self, other: Path, path: Path, on_error: Optional[OnAdoptError]) -> Optional[Claim]:
        """Move one claim of `other`, with its intent, into our folder; None if left there."""
        rel = PurePath(path.relative_to(other))
        target = self.dir / rel
        intent = Claim(rel=rel, path=path).intent
        if os.path.lexists(target) or os.path.lexists(self.dir / intent.relative_to(other)):
            return None  # left for a later recovery; never overwrite a claim or its journal
        moved_intent = os.path.lexists(intent) and self._move_entry(other, intent, on_error)
        if os.path.lexists(intent) and not moved_intent:
            return None  # its journal could not come along: both stay for a later try
        if self._move_entry(other, path, on_error):
            return Claim(rel=rel, path=target)
        if moved_intent:
            # The journal goes back to its claim, so the pair is adopted together later.
            self._move_back(other, intent, on_error)
        return None

    def _move_entry(self, other: Path, path: Path, on_error: Optional[OnAdoptError]) -> bool:
        """Move `path` (below `other`) to the same place in our folder; False if it did not move."""
        rel = PurePath(path.relative_to(other))
        try:
            self._move_in(other, rel, self.dir / rel)
        except OSError as exc:
            if not (isinstance(exc, FileNotFoundError) and exc.filename is None) and on_error is not None:
                on_error(path, exc)
            return False  # gone meanwhile, or left for a later adoption
        return True

    def _move_back(self, other: Path, path: Path, on_error: Optional[OnAdoptError]) -> None:
        ours = self.dir / path.relative_to(other)
        try:
            os.rename(ours, path)
        except OSError as exc:
            # Left in our folder without its claim; _drop_orphan_intents keeps it until the
            # claim follows.
            if on_error is not None:
                on_error(ours, exc)

    def _drop_orphan_intents(self) -> None:
        # An intent whose claim is gone belongs to a file that was fully finished just before
        # a crash, and a half-written intent never took effect: nothing is left to do for them.
        keep = {c.intent for c in self._own_leftovers()}
        # Also those whose claim is still in a dead peer's folder (it could not follow its
        # journal here): the claim comes at a later adoption and needs it then.
        for other in self._other_folders():
            if _held_by_someone(other / LOCK_NAME):
                continue
            for path in self._files(other):
                keep.add(self.dir / Claim(rel=PurePath(), path=path).intent.relative_to(other))
        for path in list(self._files(self.dir, hidden=True)):
            if path.name.startswith(".") and path not in keep:
                path.unlink(missing_ok=True)

    def is_dead(self, tag: str) -> bool:
        """True when no running instance has this owner tag (fsops.owner_tag of its name).

        A daemon's work folder exists, locked, for its whole life, so an owner with no
        folder here, or whose folders' locks are all free, is dead. Tags of other kinds of
        owners (`rmbgd process`) have no folder and are judged dead here: their own liveness
        lock is checked before this (fsops.remove_orphan_temps).
        """
        if tag == owner_tag(self.instance):
            return False
        try:
            folders = [entry for entry in os.scandir(self.root) if owner_tag(entry.name) == tag]
        except FileNotFoundError:
            return True
        for entry in folders:
            if entry.is_symlink() or not entry.is_dir():
                continue
            try:
                fd = _lock(Path(entry.path) / LOCK_NAME)
            except FileNotFoundError:
                continue  # removed meanwhile: that owner is gone
            except OSError:
                return False  # cannot tell: never delete what might be in use
            if fd is None:
                return False
            os.close(fd)
        return True

    def _own_leftovers(self) -> List[Claim]:
        return [Claim(rel=PurePath(p.relative_to(self.dir)), path=p) for p in self._files(self.dir)]

    @staticmethod
    def _files(top: Path, hidden: bool = False) -> Iterator[Path]:
        """Every non-directory entry below `top` except the lock, without following links;
        hidden entries (intents) only when asked for."""
        top_dir = os.fspath(top)

        def skip(entry: os.DirEntry) -> bool:
            if entry.is_dir(follow_symlinks=False):
                return False
            if entry.name == LOCK_NAME and os.path.dirname(entry.path) == top_dir:
                return True
            return not hidden and entry.name.startswith(".")

        for entry in walk_files(top, skip):
            yield Path(entry.path)


def _lock(path: Path) -> Optional[int]:
    """Open and exclusively flock `path`; None when someone else holds it.

    O_NOFOLLOW: a dead peer's folder may hold a `.lock` that is a symlink to anything.
    """
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC | os.O_NOFOLLOW | os.O_NONBLOCK, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as exc:
        os.close(fd)
        if exc.errno in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
            return None
        raise
    return fd


def _held_by_someone(lock: Path) -> bool:
    try:
        fd = _lock(lock)
    except OSError:
        return False  # gone, a link, unreadable: no live owner proven
    if fd is None:
        return True
    os.close(fd)
    return False


def _remove_tree_if_empty(top: Path, keep_lock: bool) -> None:
    """Remove empty folders bottom-up, and the lock file unless asked to keep it."""
    for folder, dirnames, filenames in os.walk(top, topdown=False):
        here = Path(folder)
        if here == top and not keep_lock and filenames == [LOCK_NAME]:
            (here / LOCK_NAME).unlink(missing_ok=True)
        try:
            here.rmdir()
        except OSError as exc:
            if exc.errno not in (errno.ENOTEMPTY, errno.EEXIST, errno.ENOENT):
                raise


def _open_folder_nofollow(top: Path, rel: PurePath) -> int:
    """A descriptor of top/rel, reached without following any symlink below `top`.

    A component that is a link (or no folder) raises FileNotFoundError naming the path: what
    the path names now lies outside `top`, as far as we are concerned.
    """
    fd = os.open(top, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        for part in rel.parts:
            try:
                inner = os.open(part, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=fd)
            except OSError as exc:
                if exc.errno in (errno.ENOTDIR, errno.ELOOP, errno.ENOENT):
                    raise FileNotFoundError(errno.ENOENT, "not a folder inside the inbox", os.fspath(top / rel)) from None
                raise
            os.close(fd)
            fd = inner
    except BaseException:
        os.close(fd)
        raise
    return fd
