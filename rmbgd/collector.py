"""Grouping ready images into model batches, with Triton's dynamic-batcher semantics.

The model worker asks for the next batch as soon as it is free. A batch is released when
`size` items are waiting, or when the oldest item has waited `max_wait` seconds since it
became ready; time spent waiting while the model was busy counts, so after a long model call
the backlog goes out at once instead of waiting again.

`Collector` is the pure rule (the caller passes the time); `BatchQueue` wraps it for threads.
"""

from __future__ import annotations

import bisect
import itertools
import threading
import time
from typing import Callable, Generic, List, Optional, TypeVar

T = TypeVar("T")


class Collector(Generic[T]):
    def __init__(self, size: int, max_wait_seconds: float) -> None:
        if size < 1:
            raise ValueError("batch size must be at least 1")
        self._size = size
        self._max_wait = max(0.0, max_wait_seconds)
        # Sorted by (ready time, arrival order): items may finish decoding out of order, but
        # the oldest one decides when the batch is due.
        self._items: List[tuple] = []
        self._order = itertools.count()

    def __len__(self) -> int:
        return len(self._items)

    def add(self, item: T, ready_at: float) -> None:
        bisect.insort(self._items, (ready_at, next(self._order), item), key=lambda e: e[:2])

    def due_at(self) -> Optional[float]:
        """When the next batch will be released if nothing else arrives (None: queue empty)."""
        if not self._items:
            return None
        if len(self._items) >= self._size:
            return float("-inf")
        return self._items[0][0] + self._max_wait

    def take(self, now: float) -> Optional[List[T]]:
        """The next batch, oldest first, if one is due at `now`; else None."""
        due = self.due_at()
        if due is None or now < due:
            return None
        batch, self._items = self._items[: self._size], self._items[self._size :]
        return [entry[2] for entry in batch]

    def drain(self) -> List[T]:
        items = [entry[2] for entry in self._items]
        self._items = []
        return items


class BatchQueue(Generic[T]):
    """Thread-safe collector: producers `put`, the model worker blocks in `get`."""

    def __init__(
        self,
        size: int,
        max_wait_seconds: float,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._collector: Collector[T] = Collector(size, max_wait_seconds)
        self._clock = clock
        self._cond = threading.Condition()
        self._closed = False

    def __len__(self) -> int:
        with self._cond:
            return len(self._collector)

    def put(self, item: T, ready_at: Optional[float] = None) -> None:
        with self._cond:
            self._collector.add(item, self._clock() if ready_at is None else ready_at)
            self._cond.notify_all()

    def reconfigure(self, size: int, max_wait_seconds: float) -> None:
        with self._cond:
            old = self._collector
            self._collector = Collector(size, max_wait_seconds)
            for ready_at, _, item in old._items:
                self._collector.add(item, ready_at)
            self._cond.notify_all()

    def close(self) -> None:
        """Wake the consumer; `get` returns None from now on."""
        with self._cond:
            self._closed = True
            self._cond.notify_all()

    def drain(self) -> List[T]:
        with self._cond:
            return self._collector.drain()

    def get(self, timeout: Optional[float] = None) -> Optional[List[T]]:
        """Block until a batch is due, the queue is closed (None) or `timeout` passes (None)."""
        give_up = None if timeout is None else self._clock() + timeout
        with self._cond:
            while not self._closed:
                now = self._clock()
                batch = self._collector.take(now)
                if batch:
                    return batch
                due = self._collector.due_at()
                wake = [t for t in (due, give_up) if t is not None]
                if give_up is not None and now >= give_up:
                    return None
                self._cond.wait(None if not wake else max(0.0, min(wake) - now))
            return None
