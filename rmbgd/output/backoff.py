"""When to try a filesystem step again, and when to give up on it.

Writing a result can fail because of the machine (a full or read-only disk, an unmounted
outbox, an I/O error) or because of this one destination (a file where a folder should be, a
folder nobody may write to, a name the filesystem refuses). The first kind heals by itself or
by an operator fixing the machine, so the input waits for it, however long that takes; the
second kind never heals by waiting, so after a few quick attempts the input goes to errors/
and the files behind it keep flowing. `write_error_verdict` is that rule, in one place.
"""

from __future__ import annotations

import enum
import errno
import heapq
import itertools
import threading
import time
from typing import Any, Callable, List, Optional, Tuple

FIRST_DELAY_SECONDS = 1.0
MAX_DELAY_SECONDS = 60.0

# Attempts at a destination that a retry cannot heal before the input is failed. More than
# one because such errors can be passing states of a tree someone is changing right now (a
# folder being replaced, permissions being fixed); three take 1 s + 2 s with the default
# delays, quick enough that the files behind it barely notice.
UNHEALABLE_ATTEMPTS = 3

# The destination itself (this path, this name) is wrong: waiting does not fix it.
_UNHEALABLE = frozenset({
    errno.ENOTDIR,       # a file where a folder of the path should be
    errno.EEXIST,        # the same, met by mkdir; a taken file name is handled by link_unique
    errno.EISDIR,        # a folder where the file should be
    errno.ELOOP,         # a symlink loop in the path
    errno.EXDEV,         # the folders are on different filesystems, for good
    errno.EFBIG,         # the file is larger than this filesystem allows
    errno.EACCES,        # only below a writable root (see write_error_verdict)
    errno.EPERM,
})
# The name: the same name fails the same way every time, so one attempt says it all.
NAME_ERRNOS = frozenset({errno.ENAMETOOLONG, errno.EILSEQ, errno.EINVAL})
_PERMISSION = frozenset({errno.EACCES, errno.EPERM})


class Verdict(enum.Enum):
    RETRY = "retry"  # try again after retry_delay(attempt); the input stays claimed meanwhile
    FAIL = "fail"    # give up: the input goes to errors/


def write_error_verdict(err: Optional[int], attempt: int, roots_usable: bool = True) -> Verdict:
    """Retry or fail, after `attempt` (1, 2, …) failed attempts ended with errno `err`.

    Healable errors (ENOSPC, EDQUOT, EROFS, EIO, ENOENT for a vanished root, and any errno not
    known to be permanent) are retried for as long as they last. Name errors fail at once;
    other destination errors after UNHEALABLE_ATTEMPTS. A permission error counts as the
    destination's only while the configured root folders are usable (`roots_usable`: present
    and writable); otherwise the whole output side is down, which is the machine's state, not
    this file's, and waits like a full disk.
    """
    if attempt < 1:
        raise ValueError("attempts count from 1")
    if err in NAME_ERRNOS:
        return Verdict.FAIL
    if err in _PERMISSION and not roots_usable:
        return Verdict.RETRY
    if err in _UNHEALABLE:
        return Verdict.FAIL if attempt >= UNHEALABLE_ATTEMPTS else Verdict.RETRY
    return Verdict.RETRY


def retry_delay(attempt: int, first: float = FIRST_DELAY_SECONDS, cap: float = MAX_DELAY_SECONDS) -> float:
    """1 s, 2 s, 4 s, … capped at a minute: quick to notice a fixed disk, quiet while it is not."""
    if attempt < 1:
        raise ValueError("attempts count from 1")
    return min(cap, first * (2 ** (attempt - 1)))


class Scheduler:
    """Calls functions after a delay, all from one thread (a timer thread per waiting file
    would cost a thread per file while a disk is full).

    `on_error(exc)` receives what a call raises, so nothing vanishes; `close()` drops what is
    still waiting and returns it.
    """

    def __init__(self, on_error: Callable[[BaseException], None], clock: Callable[[], float] = time.monotonic,
                 name: str = "rmbgd-retry") -> None:
        self._on_error = on_error
        self._clock = clock
        self._name = name
        self._cond = threading.Condition()
        self._heap: List[Tuple[float, int, Callable[..., Any], tuple]] = []
        self._order = itertools.count()
        self._closed = False
        self._thread: Optional[threading.Thread] = None

    def __len__(self) -> int:
        with self._cond:
            return len(self._heap)

    def call_later(self, delay: float, fn: Callable[..., Any], *args: Any) -> bool:
        """Schedule fn(*args) in `delay` seconds; False (and nothing scheduled) once closed."""
        with self._cond:
            if self._closed:
                return False
            heapq.heappush(self._heap, (self._clock() + max(0.0, delay), next(self._order), fn, args))
            if self._thread is None:
                self._thread = threading.Thread(target=self._run, name=self._name, daemon=True)
                self._thread.start()
            self._cond.notify_all()
            return True

    def close(self) -> List[Tuple[Callable[..., Any], tuple]]:
        with self._cond:
            self._closed = True
            dropped = [(fn, args) for _, _, fn, args in sorted(self._heap)]
            self._heap.clear()
            self._cond.notify_all()
            thread = self._thread
        if thread is not None and thread is not threading.current_thread():
            thread.join()
        return dropped

    def _run(self) -> None:
        while True:
            with self._cond:
                while not self._closed:
                    if self._heap and self._heap[0][0] <= self._clock():
                        break
                    timeout = None if not self._heap else self._heap[0][0] - self._clock()
                    self._cond.wait(timeout)
                if self._closed:
                    return
                _, _, fn, args = heapq.heappop(self._heap)
            try:
                fn(*args)
            except Exception as exc:  # reported, never lost; the next calls still run
                self._on_error(exc)
