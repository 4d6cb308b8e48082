"""Turning inotify events and directory scans into readiness observations.

The watchdog thread only translates events and hands them over through a callback (the
daemon's queue); all decisions are made by the main loop, which owns the readiness state.
"""

from __future__ import annotations

import logging
import os
import stat
import warnings
from pathlib import Path, PurePath
from typing import Callable, Iterator, Tuple

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
from watchdog.observers.polling import PollingObserver

from rmbgd.fsops import walk_files
from rmbgd.names import is_ignored
from rmbgd.readiness import Seen, Signature

# A directory appeared: its contents have to be scanned (events for them may predate our watch).
SCAN_DIR = "scan_dir"
# The kernel dropped events (inotify queue overflow): the whole inbox must be rescanned now.
RESCAN = "rescan"

Sink = Callable[[object, Path], None]

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
            dest = _as_path(event.dest_path)
            if self._wanted(src) and not event.is_directory:
                self._sink(Seen.GONE, src)
            if self._wanted(dest):
                self._sink(SCAN_DIR if event.is_directory else Seen.MOVED_IN, dest)
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
        self._observer = PollingObserver(timeout=poll_seconds) if polling else Observer()
        self._observer.daemon = True
        self._observer.name = "rmbgd-watcher"
        self._observer.schedule(
            _Handler(inbox, sink, polling=polling),
            str(inbox),
            recursive=True,
            event_filter=WANTED_EVENTS,
            follow_symlink=False,
        )
        # watchdog only logs an inotify queue overflow (the dropped events are gone), so its
        # log record is the one place to learn that a rescan is needed right away.
        self._overflow = _OverflowFilter(lambda: sink(RESCAN, inbox))

    def start(self) -> None:
        logging.getLogger("watchdog.observers.inotify").addFilter(self._overflow)
        self._observer.start()

    def is_alive(self) -> bool:
        return self._observer.is_alive()

    def stop(self, timeout: float = 5.0) -> None:
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


class _OverflowFilter(logging.Filter):
    def __init__(self, on_overflow: Callable[[], None]) -> None:
        super().__init__()
        self._on_overflow = on_overflow

    def filter(self, record: logging.LogRecord) -> bool:
        if "overflow" in record.getMessage().lower():
            self._on_overflow()
        return True


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
