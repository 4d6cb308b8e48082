"""The daemon's side of the inbox: watch events and scans → readiness → backlog → claims.

Watch events arrive from the watcher's thread through a queue; everything else happens on
the main loop's thread, which is the only one that claims.
"""

from __future__ import annotations

import collections
import os
import queue
import stat
from pathlib import Path
from typing import Any, Callable, Deque, Set

from rmbgd.errors import describe
from rmbgd.intake.readiness import Readiness, Seen
from rmbgd.intake.watcher import RESCAN, SCAN_DIR, scan, signature_of
from rmbgd.intake.workarea import Claim, WorkArea

# Posted by worker threads when a job finishes, so the main loop claims the next file at once.
WAKE = "wake"


class InboxFeed:
    def __init__(
        self,
        inbox: Path,
        work: WorkArea,
        readiness: Readiness,
        log: Any,
        clock: Callable[[], float],
        has_room: Callable[[], bool],
        start_job: Callable[[Claim], Any],
    ) -> None:
        self._inbox = inbox
        self._work = work
        self.readiness = readiness
        self._log = log
        self._clock = clock
        self._has_room = has_room
        self._start_job = start_job
        self._events: "queue.SimpleQueue[tuple]" = queue.SimpleQueue()
        self._backlog: Deque[Path] = collections.deque()
        self._backlog_set: Set[Path] = set()
        self._ignored_logged: Set[Path] = set()

    @property
    def queued(self) -> int:
        return len(self._backlog)

    def on_watch_event(self, kind: object, path: Path) -> None:
        self._events.put((kind, path))

    def wake(self) -> None:
        # A slot is free: wake the main loop to claim the next file now, not at the next tick.
        self._events.put((WAKE, None))

    def take_events(self, timeout: float) -> None:
        try:
            item = self._events.get(timeout=timeout)
        except queue.Empty:
            return
        while True:
            kind, path = item
            if kind == RESCAN:
                self._log.warning("events_lost", reason="inotify queue overflow; rescanning the inbox")
                self.scan(self._inbox)
            elif kind == SCAN_DIR:
                self.scan(path)
            elif kind != WAKE and path not in self._backlog_set:
                self.readiness.observe(path, kind, self._clock())
            try:
                item = self._events.get_nowait()
            except queue.Empty:
                return

    def scan(self, top: Path) -> None:
        now = self._clock()
        for path, st in scan(top, self._inbox):
            if path in self._backlog_set:
                continue
            if stat.S_ISREG(st.st_mode) or stat.S_ISLNK(st.st_mode):
                self.readiness.observe(path, Seen.SCANNED, now, (st.st_size, st.st_mtime_ns))
            else:
                self._ignore_special(path)

    def poll(self, now: float) -> None:
        """Queue the files that became ready."""
        for path in self.readiness.poll(now, self._signature):
            if path not in self._backlog_set:
                self._backlog.append(path)
                self._backlog_set.add(path)

    def _signature(self, path: Path):
        signature = signature_of(path)
        if signature is None and os.path.lexists(path):
            self._ignore_special(path)
        return signature

    def _ignore_special(self, path: Path) -> None:
        # FIFOs, sockets and device nodes are never opened: reading one could block forever.
        if path not in self._ignored_logged:
            self._ignored_logged.add(path)
            self._log.warning("file_ignored", input=str(path), reason="not a regular file")

    def claim_backlog(self) -> None:
        while self._backlog and self._has_room():
            path = self._backlog.popleft()
            self._backlog_set.discard(path)
            try:
                st = os.lstat(path)
                if not (stat.S_ISREG(st.st_mode) or stat.S_ISLNK(st.st_mode)):
                    continue
                claim = self._work.claim(path)
            except FileNotFoundError:
                continue  # gone, or its folder is now a link leading out of the inbox
            except OSError as exc:
                self._log.error("claim_failed", input=str(path), error=describe(exc))
                continue
            if claim is None:
                # An earlier file of the same name is still in progress; look again later.
                self.readiness.observe(path, Seen.SCANNED, self._clock(), signature_of(path))
                continue
            self._start_job(claim)
