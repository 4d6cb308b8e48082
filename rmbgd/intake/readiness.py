"""Deciding when a file in the inbox has fully arrived.

Pure logic: the caller feeds observations (watch events, scan results) and polls with the
current time and a stat function, so every rule is testable with a fake clock and no disk.

A file is ready when
- a writer closed it after writing (inotify IN_CLOSE_WRITE), or
- it was renamed/moved into the inbox, from inside or outside it (the writer finished
  elsewhere; a hard link or mknod is only a creation and waits as for a scan), or
- it was only seen by a scan and its size and mtime stayed the same for `settle` seconds.

A file that we saw being written (created/modified events) but never closed is assumed to
still be held open by its writer, however long it pauses; only after `writer_timeout`
seconds of silence is it judged by the stability rule, so a lost close event (inotify queue
overflow) cannot strand a file forever.
"""

from __future__ import annotations

import enum
import heapq
import itertools
from dataclasses import dataclass
from typing import Callable, Hashable, Iterator, Optional, Tuple

# (size, mtime_ns) of a file, or None when it is gone / not a file any more.
Signature = Optional[Tuple[int, int]]
StatFn = Callable[[Hashable], Signature]


class Seen(enum.Enum):
    WRITTEN = "written"      # created or modified: a writer is at work
    CLOSED = "closed"        # closed after writing
    MOVED_IN = "moved_in"    # renamed into the inbox, from inside or outside it
    SCANNED = "scanned"      # found by a scan, no event known
    GONE = "gone"            # deleted or moved away


@dataclass
class _Entry:
    writer_open: bool
    complete: bool
    signature: Signature
    last_change: float
    version: int = 0


class Readiness:
    """Per-file state plus a heap of check times, so that a poll only stats files whose quiet
    period may have ended: with 100,000 files waiting, a poll costs nothing until they are due.
    A change that happens during a quiet period is still caught: it shows as a different
    signature at the check and restarts the period from there.
    """

    def __init__(self, settle_seconds: float, writer_timeout_seconds: float) -> None:
        self._settle = settle_seconds
        self._writer_timeout = max(writer_timeout_seconds, settle_seconds)
        self._entries: dict[Hashable, _Entry] = {}
        self._heap: list[tuple[float, int, Hashable]] = []
        self._complete: list[Hashable] = []
        self._versions = itertools.count(1)

    def __len__(self) -> int:
        return len(self._entries)

    def reconfigure(self, settle_seconds: float, writer_timeout_seconds: float) -> None:
        """New quiet periods (a reload); files already waiting are re-checked under them."""
        self._settle = settle_seconds
        self._writer_timeout = max(writer_timeout_seconds, settle_seconds)
        for path, entry in self._entries.items():
            if not entry.complete:
                self._schedule(path, entry)

    def __contains__(self, path: Hashable) -> bool:
        return path in self._entries

    def observe(self, path: Hashable, seen: Seen, now: float, signature: Signature = None) -> None:
        if seen is Seen.GONE:
            self._entries.pop(path, None)
            return
        entry = self._entries.get(path)
        if entry is None:
            entry = _Entry(writer_open=False, complete=False, signature=signature, last_change=now)
            self._entries[path] = entry
            self._schedule(path, entry)
        if seen is Seen.WRITTEN:
            entry.writer_open = True
            entry.complete = False
            entry.last_change = now
            self._schedule(path, entry)
        elif seen in (Seen.CLOSED, Seen.MOVED_IN):
            entry.writer_open = False
            if not entry.complete:
                entry.complete = True
                self._complete.append(path)
            entry.last_change = now
        elif seen is Seen.SCANNED and signature is not None and signature != entry.signature:
            entry.signature = signature
            entry.last_change = now
            self._schedule(path, entry)

    def forget(self, path: Hashable) -> None:
        self._entries.pop(path, None)

    def _limit(self, entry: _Entry) -> float:
        # An empty file with no close event is most likely created by a writer that has not
        # written yet; rejecting it as "empty" after a short pause would lose the real upload.
        if entry.writer_open or (entry.signature is not None and entry.signature[0] == 0):
            return self._writer_timeout
        return self._settle

    def _schedule(self, path: Hashable, entry: _Entry) -> None:
        entry.version = next(self._versions)
        # Nothing known about its size yet: look at it on the next poll.
        due = entry.last_change if entry.signature is None else entry.last_change + self._limit(entry)
        heapq.heappush(self._heap, (due, entry.version, path))

    def poll(self, now: float, stat: StatFn) -> list:
        """Paths that are ready now; they are forgotten (the caller claims them)."""
        ready = []
        for path in self._complete:
            entry = self._entries.get(path)
            if entry is not None and entry.complete:
                ready.append(path)
                del self._entries[path]
        self._complete = []
        while self._heap and self._heap[0][0] <= now:
            _, version, path = heapq.heappop(self._heap)
            entry = self._entries.get(path)
            if entry is None or entry.version != version or entry.complete:
                continue  # superseded by a later event
            signature = stat(path)
            if signature is None:
                del self._entries[path]
            elif signature != entry.signature:
                entry.signature = signature
                entry.last_change = now
                self._schedule(path, entry)
            elif now - entry.last_change >= self._limit(entry):
                ready.append(path)
                del self._entries[path]
            else:
                self._schedule(path, entry)
        return ready

    def next_due(self) -> Optional[float]:
        """Earliest time at which a waiting file could become ready without new events."""
        if self._complete:
            return float("-inf")
        while self._heap:
            due, version, path = self._heap[0]
            entry = self._entries.get(path)
            if entry is not None and entry.version == version and not entry.complete:
                return due
            heapq.heappop(self._heap)
        return None

    def paths(self) -> Iterator[Hashable]:
        return iter(list(self._entries))
