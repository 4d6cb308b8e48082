"""Grouping ready images into model batches, with Triton's dynamic-batcher semantics.

The model worker asks for the next batch as soon as it is free. A batch is released when
`size` items are waiting, or when the oldest item has waited `max_wait` seconds since it
became ready, i.e. since it was added (the pipeline adds an image once it is decoded, so
the time it queued for a decoder does not count, as Triton's delay counts from a request's
entry into its queue). Time spent waiting while the model was busy does count, so after a
long model call the backlog goes out at once instead of waiting again; and while images
keep arriving faster than `max_wait`, they leave in full batches.

Images in one batch must share one size, so items carry a key (the model input size) and
only items with the same key are batched together. The rule above applies to each key on
its own. When several keys are due at once, the one holding the oldest item goes first:
a backlog is served in arrival order and no size can starve another. A full batch of one
key does go out before a partial batch of another key that is not yet due, since waiting
for that one would only delay both.

While the model is busy only full batches are handed out (to be staged beside the running
call); a partial batch that comes due meanwhile waits for the model to be free and keeps
gathering images until then, so a backlog does not leave in fragments.

While the model is free, a partial batch waits for company no longer than one extra model
call would cost: the fixed part of a call's time, measured from the calls so far (`observe`).
That is the ski-rental rule: waiting longer than what running now and again later would
cost only leaves the accelerator idle. On a GPU running BiRefNet at 1024² the fixed part is
a few milliseconds against ~40 ms per image, so a burst's first images start at once instead
of after `max_wait`; a model whose calls cost mostly per call waits up to `max_wait` as
before. Until calls have been seen, `max_wait` applies.

Urgent items (HTTP requests, where someone waits for the answer) go ahead of the others: in
their group they come first, and a due group holding one goes before other due groups, so a
backlog of inbox files never makes a request wait behind it. Their group's timing is the same
rule as any other's.

`Collector` is the pure rule (the caller passes the time); `BatchQueue` wraps it for threads.
"""

from __future__ import annotations

import bisect
import itertools
import threading
import time
from typing import Callable, Dict, Generic, Hashable, List, Optional, Tuple, TypeVar

T = TypeVar("T")

# (rank, ready time, arrival order, item), ordered by the first three only; rank 0 is urgent.
_Entry = Tuple[int, float, int, object]
_URGENT, _NORMAL = 0, 1


def _order(entry: _Entry) -> Tuple[int, float, int]:
    return entry[0], entry[1], entry[2]


def _arrival(entry: _Entry) -> Tuple[float, int]:
    return entry[1], entry[2]


class CallCost:
    """What a model call costs, learnt from the calls made: `fixed` seconds per call on top of
    a per-image share, for one input size (key)."""

    # Weight of the newest call in each batch size's running mean: a few calls settle it,
    # and one slow call (a page fault storm, another process) does not swing it.
    SMOOTHING = 0.3

    def __init__(self) -> None:
        self._seconds: Dict[int, float] = {}

    def observe(self, size: int, seconds: float) -> None:
        if size < 1 or not seconds >= 0.0:
            return
        old = self._seconds.get(size)
        self._seconds[size] = seconds if old is None else old + self.SMOOTHING * (seconds - old)

    def fixed(self) -> Optional[float]:
        """Seconds a call costs whatever its size; None before any call was seen.

        From two batch sizes, the line through the smallest and the largest; from one size
        only, that size's whole time, which is as much as the fixed part can be."""
        if not self._seconds:
            return None
        small, large = min(self._seconds), max(self._seconds)
        t_small = self._seconds[small]
        if small == large:
            return t_small
        per_image = (self._seconds[large] - t_small) / (large - small)
        return min(t_small, max(0.0, t_small - per_image * small))


class Collector(Generic[T]):
    def __init__(self, size: int, max_wait_seconds: float) -> None:
        self._size = 1
        self._max_wait = 0.0
        self.reconfigure(size, max_wait_seconds)
        self._costs: Dict[Hashable, CallCost] = {}
        # Each group is sorted by (rank, ready time, arrival order): items may finish decoding
        # out of order, and the oldest one, urgent or not, decides when the batch is due.
        self._groups: Dict[Hashable, List[_Entry]] = {}
        self._order = itertools.count()
        self._count = 0

    @property
    def size(self) -> int:
        return self._size

    def __len__(self) -> int:
        return self._count

    def reconfigure(self, size: int, max_wait_seconds: float) -> None:
        """Change the batch size and wait; waiting items keep their place and age."""
        if size < 1:
            raise ValueError("batch size must be at least 1")
        self._size = size
        self._max_wait = max(0.0, max_wait_seconds)

    def observe(self, key: Hashable, size: int, seconds: float) -> None:
        """A model call of `size` images of `key` took `seconds`."""
        self._costs.setdefault(key, CallCost()).observe(size, seconds)

    def _wait(self, key: Hashable) -> float:
        """How long a partial batch of `key` waits for company while the model is free."""
        fixed = self._costs[key].fixed() if key in self._costs else None
        return self._max_wait if fixed is None else min(self._max_wait, fixed)

    def add(self, item: T, ready_at: float, key: Hashable = None, urgent: bool = False) -> None:
        entries = self._groups.setdefault(key, [])
        rank = _URGENT if urgent else _NORMAL
        bisect.insort(entries, (rank, ready_at, next(self._order), item), key=_order)
        self._count += 1

    def _group_due(self, key: Hashable, entries: List[_Entry], full_only: bool = False) -> float:
        if len(entries) >= self._size:
            return float("-inf")
        return float("inf") if full_only else _oldest(entries) + self._wait(key)

    def due_at(self, full_only: bool = False) -> Optional[float]:
        """When the next batch will be released if nothing else arrives (None: queue empty,
        or, with `full_only`, no full batch)."""
        due = min(
            (self._group_due(key, entries, full_only) for key, entries in self._groups.items()),
            default=None,
        )
        return None if due == float("inf") else due

    def take(self, now: float, full_only: bool = False) -> Optional[List[T]]:
        """The next batch, oldest first, all of one key, if one is due at `now`; else None.

        `full_only`: only a full batch (the model is busy, so a partial one would not run
        any sooner than the model is free, and may still grow until then)."""
        due = [
            ((entries[0][0], _oldest(entries)), key)
            for key, entries in self._groups.items()
            if self._group_due(key, entries, full_only) <= now
        ]
        if not due:
            return None
        _, key = min(due, key=lambda pair: pair[0])
        entries = self._groups[key]
        batch, rest = entries[: self._size], entries[self._size :]
        if rest:
            self._groups[key] = rest
        else:
            del self._groups[key]
        self._count -= len(batch)
        return [entry[3] for entry in batch]

    def drain(self) -> List[T]:
        """Every waiting item, oldest first whatever its key or rank; the collector is then empty."""
        entries = sorted(
            (entry for group in self._groups.values() for entry in group), key=_arrival
        )
        self._groups = {}
        self._count = 0
        return [entry[3] for entry in entries]


def _oldest(entries: List[_Entry]) -> float:
    # Groups are short: the in-flight limit bounds them.
    return min(entry[1] for entry in entries)


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
        self._model_busy = False

    def __len__(self) -> int:
        with self._cond:
            return len(self._collector)

    @property
    def size(self) -> int:
        with self._cond:
            return self._collector.size

    def put(self, item: T, ready_at: Optional[float] = None, key: Hashable = None, urgent: bool = False) -> None:
        with self._cond:
            self._collector.add(item, self._clock() if ready_at is None else ready_at, key, urgent)
            self._cond.notify_all()

    def reconfigure(self, size: int, max_wait_seconds: float) -> None:
        with self._cond:
            self._collector.reconfigure(size, max_wait_seconds)
            self._cond.notify_all()

    def observe(self, key: Hashable, size: int, seconds: float) -> None:
        """A model call's cost, which sets how long the free model waits for company."""
        with self._cond:
            self._collector.observe(key, size, seconds)
            self._cond.notify_all()

    def model_busy(self, busy: bool) -> None:
        """While the model is busy, `get` hands out full batches only: a partial batch taken
        early would not start any sooner, and the images that arrive meanwhile can join it.
        When it becomes free, a partial batch that is due goes out at once."""
        with self._cond:
            self._model_busy = busy
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
                batch = self._collector.take(now, full_only=self._model_busy)
                if batch:
                    return batch
                due = self._collector.due_at(full_only=self._model_busy)
                wake = [t for t in (due, give_up) if t is not None]
                if give_up is not None and now >= give_up:
                    return None
                self._cond.wait(None if not wake else max(0.0, min(wake) - now))
            return None
