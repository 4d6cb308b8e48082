"""Turning inotify events and directory scans into readiness observations.

The watchdog thread only translates events and hands them over through a callback (the
daemon's queue); all decisions are made by the main loop, which owns the readiness state.
"""

from __future__ import annotations

import errno
import logging
import os
import stat
import sys
import warnings
from pathlib import Path, PurePath
from typing import Callable, Iterator, Optional, Tuple

from watchdog.events import (
    DirCreatedEvent,
    DirDeletedEvent,
    DirMovedEvent,
    FileClosedEvent,
    FileCreatedEvent,
    FileDeletedEvent,
    FileModifiedEvent,
    FileMovedEvent,
    FileSystemEvent,
    FileSystemEventHandler,
)
from watchdog.observers import Observer
from watchdog.observers.api import BaseObserver
from watchdog.observers.polling import PollingObserver

from rmbgd.output.fsops import walk_files
from rmbgd.intake.names import is_ignored
from rmbgd.intake.readiness import Seen, Signature

# A directory appeared: its contents have to be scanned (events for them may predate our watch).
SCAN_DIR = "scan_dir"
# The kernel dropped events (inotify queue overflow): the whole inbox must be rescanned now.
RESCAN = "rescan"

Sink = Callable[[object, Path], None]

_INOTIFY_LIMITS = Path("/proc/sys/fs/inotify")


class WatchUnavailable(Exception):
    """The inbox cannot be watched (an inotify limit, a vanished folder); the message is one
    line that says how to fix it."""

# Opens and close-without-write are left out at the inotify level: they are what readers
# (including our own claim checks) cause, never what a writer finishing a file causes.
WANTED_EVENTS = [
    FileCreatedEvent,
    FileModifiedEvent,
    FileClosedEvent,
    FileMovedEvent,
    FileDeletedEvent,
    DirCreatedEvent,
    DirMovedEvent,
    DirDeletedEvent,
]


def _as_path(raw: object) -> Path:
    return Path(os.fsdecode(raw))


class _Handler(FileSystemEventHandler):
    def __init__(self, inbox: Path, sink: Sink, polling: bool = False) -> None:
        self._inbox = inbox
        self._sink = sink
        # A polling observer never reports closes, so a write proves no writer is at work
        # that will announce its end: such files are judged by size+mtime stability alone.
        self._written = Seen.SCANNED if polling else Seen.WRITTEN

    def _wanted(self, path: Path) -> bool:
        try:
            rel = path.relative_to(self._inbox)
        except ValueError:
            return False
        return bool(rel.parts) and not is_ignored(rel)

    def on_any_event(self, event: FileSystemEvent) -> None:
        src = _as_path(event.src_path)
        if isinstance(event, (FileMovedEvent, DirMovedEvent)):
            # A move with one side outside the watched tree comes with that side empty:
            # renamed in from elsewhere (no source) or moved out of the inbox (no destination).
            if event.src_path and self._wanted(src) and not event.is_directory:
                self._sink(Seen.GONE, src)
            if event.dest_path and self._wanted(_as_path(event.dest_path)):
                # A file renamed in is complete: its writer finished it before the rename.
                self._sink(SCAN_DIR if event.is_directory else Seen.MOVED_IN, _as_path(event.dest_path))
            return
        if not self._wanted(src):
            return
        if isinstance(event, DirCreatedEvent):
            self._sink(SCAN_DIR, src)
        elif isinstance(event, FileClosedEvent):
            self._sink(Seen.CLOSED, src)
        elif isinstance(event, FileModifiedEvent):
            self._sink(self._written, src)
        elif isinstance(event, FileCreatedEvent):
            # Creation alone promises no close event (hard links, symlinks, mknod, and the
            # events watchdog synthesises for folders that appear), so it only starts the
            # quiet-period clock; a following write marks a writer at work.
            self._sink(Seen.SCANNED, src)
        elif isinstance(event, FileDeletedEvent):
            self._sink(Seen.GONE, src)


class Watcher:
    def __init__(self, inbox: Path, sink: Sink, polling: bool = False, poll_seconds: float = 1.0) -> None:
        # watchdog warns when folders are created faster than it adds watches (mkdir -p, our
        # own claim folders); it re-registers the watch itself, so the warning is only noise.
        warnings.filterwarnings("ignore", message=r"Callback with id .* already exists", category=RuntimeWarning)
        self._inbox = inbox
        self._handler = _Handler(inbox, sink, polling=polling)
        self._polling = polling
        self._poll_seconds = poll_seconds
        self._observer: Optional[BaseObserver] = None
        # watchdog only logs an inotify queue overflow (the dropped events are gone), so its
        # log record is the one place to learn that a rescan is needed right away.
        self._overflow = _OverflowFilter(lambda: sink(RESCAN, inbox))

    def start(self) -> None:
        """Raises WatchUnavailable when the kernel refuses the watches."""
        logging.getLogger("watchdog.observers.inotify").addFilter(self._overflow)
        observer = None
        try:
            # Each step can meet an inotify limit: the observer opens an inotify instance
            # (EMFILE), start() adds a watch per folder below the inbox (ENOSPC).
            observer = PollingObserver(timeout=self._poll_seconds) if self._polling else _native_observer()
            observer.daemon = True
            observer.name = "rmbgd-watcher"
            observer.schedule(
                self._handler,
                str(self._inbox),
                recursive=True,
                event_filter=WANTED_EVENTS,
                follow_symlink=False,
            )
            observer.start()
        except OSError as exc:
            if observer is not None:
                observer.stop()  # the inotify reader thread it already started
            logging.getLogger("watchdog.observers.inotify").removeFilter(self._overflow)
            raise WatchUnavailable(describe_watch_error(exc, self._inbox, _read_limit)) from exc
        self._observer = observer

    def is_alive(self) -> bool:
        return self._observer is not None and self._observer.is_alive()

    def stop(self, timeout: float = 5.0) -> None:
        if self._observer is None:
            return  # never started
        # Stopping races watchdog's own emitter thread, which then logs a harmless ERROR
        # ("queue_events() called when the thread is inactive"); an operator must not see a
        # false error on every clean stop.
        inotify_log = logging.getLogger("watchdog.observers.inotify")
        inotify_log.addFilter(_drop_inactive_emitter_noise)
        try:
            self._observer.stop()
            self._observer.join(timeout)
        finally:
            inotify_log.removeFilter(_drop_inactive_emitter_noise)
            inotify_log.removeFilter(self._overflow)


def _native_observer() -> BaseObserver:
    # By default watchdog reports a rename into the inbox from a folder it does not watch
    # (IN_MOVED_TO without its IN_MOVED_FROM) as a mere creation, which looks like a hard
    # link and would wait out the settle time. With full events it stays a move, with an
    # empty source, so the file is taken at once. A polling observer cannot tell the two
    # apart and keeps the settle rule.
    if sys.platform.startswith("linux"):
        from watchdog.observers.inotify import InotifyObserver

        if Observer is InotifyObserver:
            return InotifyObserver(generate_full_events=True)
    return Observer()


class _OverflowFilter(logging.Filter):
    def __init__(self, on_overflow: Callable[[], None]) -> None:
        super().__init__()
        self._on_overflow = on_overflow

    def filter(self, record: logging.LogRecord) -> bool:
        if "overflow" in record.getMessage().lower():
            self._on_overflow()
        return True


def describe_watch_error(exc: OSError, inbox: Path, limit: Callable[[str], Optional[int]]) -> str:
    """The one-line start-up failure for an OSError from starting inotify, with the fix.

    `limit(name)` reads /proc/sys/fs/inotify/<name> (None when unreadable).
    """
    if exc.errno == errno.ENOSPC:
        return _limit_reached(
            inbox, limit, "max_user_watches", 524288, "the inotify watch limit is reached",
            "one watch per folder below the inbox, shared with every other program of this user",
        )
    if exc.errno == errno.EMFILE:
        return _limit_reached(
            inbox, limit, "max_user_instances", 1024, "the inotify instance limit is reached",
            "one per watching program of this user (file managers, IDEs, other daemons)",
        )
    return f"paths.inbox: cannot watch {inbox}: {exc.strerror or exc}"


def _limit_reached(
    inbox: Path, limit: Callable[[str], Optional[int]], name: str, suggested: int, what: str, counts: str
) -> str:
    now = limit(name)
    setting = f"fs.inotify.{name}"
    shown = f"{setting} = {now}" if now is not None else setting
    raise_to = max(suggested, 2 * now) if now is not None else suggested
    return (
        f"cannot watch {inbox}: {what} ({shown}; {counts}): raise it with "
        f"`sysctl {setting}={raise_to}` (and in /etc/sysctl.d/ to keep it), "
        "or set watch.polling: true"
    )


def _read_limit(name: str) -> Optional[int]:
    try:
        return int((_INOTIFY_LIMITS / name).read_text().strip())
    except (OSError, ValueError):
        return None  # not Linux, or /proc hidden: the message names the setting alone


def _drop_inactive_emitter_noise(record: logging.LogRecord) -> bool:
    return "called when the thread is inactive" not in record.getMessage()


def signature_of(path: Path) -> Signature:
    """(size, mtime_ns) of a regular file or a symlink itself; None if gone or anything else."""
    try:
        st = os.lstat(path)
    except (FileNotFoundError, NotADirectoryError):
        return None
    if not (stat.S_ISREG(st.st_mode) or stat.S_ISLNK(st.st_mode)):
        return None
    return (st.st_size, st.st_mtime_ns)


def scan(top: Path, inbox: Path) -> Iterator[Tuple[Path, os.stat_result]]:
    """Every candidate entry below `top` (inside the inbox), without following symlinks.

    Yields regular files, symlinks and other non-directories with their lstat; hidden and
    partial names (and the private work area) are skipped.
    """
    def outside_or_ignored(entry: os.DirEntry) -> bool:
        try:
            return is_ignored(PurePath(entry.path).relative_to(inbox))
        except ValueError:
            return True

    for entry in walk_files(top, skip=outside_or_ignored):
        try:
            st = entry.stat(follow_symlinks=False)
        except FileNotFoundError:
            continue
        yield Path(entry.path), st
