"""Deciding when a file in the inbox has fully arrived.

Pure logic: the caller feeds observations (watch events, scan results) and polls with the
current time and a stat function, so every rule is testable with a fake clock and no disk.

A file is ready when
- a writer closed it after writing (inotify IN_CLOSE_WRITE), or
- it was renamed/moved into the inbox (the writer finished elsewhere), or
- it was only seen by a scan and its size and mtime stayed the same for `settle` seconds.

A file that we saw being written (created/modified events) but never closed is assumed to
still be held open by its writer, however long it pauses; only after `writer_timeout`
seconds of silence is it judged by the stability rule, so a lost close event (inotify queue
overflow) cannot strand a file forever.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass
from typing import Callable, Hashable, Iterator, Optional, Tuple

# (size, mtime_ns) of a file, or None when it is gone / not a file any more.
Signature = Optional[Tuple[int, int]]
StatFn = Callable[[Hashable], Signature]


class Seen(enum.Enum):
    WRITTEN = "written"      # created or modified: a writer is at work
    CLOSED = "closed"        # closed after writing
    MOVED_IN = "moved_in"    # renamed into the inbox
    SCANNED = "scanned"      # found by a scan, no event known
    GONE = "gone"            # deleted or moved away


@dataclass
class _Entry:
    writer_open: bool
    complete: bool
    signature: Signature
    last_change: float


class Readiness:
    def __init__(self, settle_seconds: float, writer_timeout_seconds: float) -> None:
        self._settle = settle_seconds
        self._writer_timeout = max(writer_timeout_seconds, settle_seconds)
        self._entries: dict[Hashable, _Entry] = {}

    def __len__(self) -> int:
        return len(self._entries)

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
        if seen is Seen.WRITTEN:
            entry.writer_open = True
            entry.complete = False
            entry.last_change = now
        elif seen in (Seen.CLOSED, Seen.MOVED_IN):
            entry.writer_open = False
            entry.complete = True
            entry.last_change = now
        elif seen is Seen.SCANNED and signature != entry.signature:
            entry.signature = signature
            entry.last_change = now

    def forget(self, path: Hashable) -> None:
        self._entries.pop(path, None)

    def poll(self, now: float, stat: StatFn) -> list:
        """Paths that are ready now; they are forgotten (the caller claims them).

        Files still waiting are re-stat'ed so that a change restarts their quiet period and a
        file that vanished is dropped.
        """
        ready = []
        for path, entry in list(self._entries.items()):
            if entry.complete:
                ready.append(path)
                continue
            signature = stat(path)
            if signature is None:
                del self._entries[path]
                continue
            if signature != entry.signature:
                entry.signature = signature
                entry.last_change = now
                continue
            quiet = now - entry.last_change
            limit = self._limit(entry)
            if quiet >= limit:
                ready.append(path)
        for path in ready:
            del self._entries[path]
        return ready

    def _limit(self, entry: _Entry) -> float:
        # An empty file with no close event is most likely created by a writer that has not
        # written yet; rejecting it as "empty" after a short pause would lose the real upload.
        if entry.writer_open or (entry.signature is not None and entry.signature[0] == 0):
            return self._writer_timeout
        return self._settle

    def next_due(self) -> Optional[float]:
        """Earliest time at which a waiting file could become ready without new events."""
        due = [e.last_change + self._limit(e) for e in self._entries.values() if not e.complete]
        if any(e.complete for e in self._entries.values()):
            return float("-inf")
        return min(due) if due else None

    def paths(self) -> Iterator[Hashable]:
        return iter(list(self._entries))
