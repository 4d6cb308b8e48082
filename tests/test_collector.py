"""Dynamic batching with a fake clock (pure rule) and with threads (the queue wrapper)."""

import threading

import pytest

from rmbgd.collector import BatchQueue, Collector


def test_full_batch_released_at_once():
    c = Collector(size=3, max_wait_seconds=0.2)
    for i in range(3):
        c.add(i, ready_at=10.0)
    assert c.take(10.0) == [0, 1, 2]
    assert len(c) == 0


def test_partial_batch_waits_for_max_wait_of_oldest():
    c = Collector(size=4, max_wait_seconds=0.2)
    c.add("a", 10.0)
    c.add("b", 10.15)
    assert c.take(10.1) is None
    assert c.take(10.199) is None
    assert c.due_at() == pytest.approx(10.2)
    assert c.take(10.2) == ["a", "b"]


def test_time_waited_while_model_was_busy_counts():
    # Items became ready long ago while the model was busy: released the moment it asks.
    c = Collector(size=8, max_wait_seconds=0.2)
    c.add("a", 1.0)
    c.add("b", 1.5)
    assert c.take(5.0) == ["a", "b"]


def test_backlog_goes_out_in_full_batches_oldest_first():
    c = Collector(size=2, max_wait_seconds=1.0)
    for i, t in enumerate([3.0, 1.0, 2.0, 4.0, 5.0]):
        c.add(i, t)
    assert c.take(5.0) == [1, 2]
    assert c.take(5.0) == [0, 3]
    assert c.take(5.0) is None  # one left, waiting since 5.0
    assert c.take(6.0) == [4]


def test_zero_wait_releases_whatever_is_there():
    c = Collector(size=8, max_wait_seconds=0.0)
    c.add("a", 1.0)
    assert c.take(1.0) == ["a"]


def test_empty_collector():
    c = Collector(size=2, max_wait_seconds=0.1)
    assert c.due_at() is None
    assert c.take(100.0) is None


def test_batch_size_must_be_positive():
    with pytest.raises(ValueError):
        Collector(size=0, max_wait_seconds=0.1)


class ManualClock:
    def __init__(self, t=0.0):
        self.t = t

    def __call__(self):
        return self.t


def test_queue_returns_full_batch_without_waiting():
    q = BatchQueue(size=2, max_wait_seconds=60.0, clock=ManualClock())
    q.put("a")
    q.put("b")
    assert q.get(timeout=0) == ["a", "b"]


def test_queue_get_times_out_without_batch():
    clock = ManualClock()
    q = BatchQueue(size=2, max_wait_seconds=60.0, clock=clock)
    q.put("a")
    assert q.get(timeout=0) is None
    clock.t = 60.0
    assert q.get(timeout=0) == ["a"]


def test_queue_wakes_consumer_when_batch_fills():
    q = BatchQueue(size=2, max_wait_seconds=60.0)
    got = []
    consumer = threading.Thread(target=lambda: got.append(q.get(timeout=10)))
    consumer.start()
    q.put("a")
    q.put("b")
    consumer.join(10)
    assert not consumer.is_alive()
    assert got == [["a", "b"]]


def test_queue_close_wakes_consumer_and_keeps_items_for_drain():
    q = BatchQueue(size=4, max_wait_seconds=60.0)
    q.put("a")
    got = []
    consumer = threading.Thread(target=lambda: got.append(q.get()))
    consumer.start()
    q.close()
    consumer.join(10)
    assert got == [None]
    assert q.drain() == ["a"]


def test_queue_reconfigure_keeps_items():
    clock = ManualClock()
    q = BatchQueue(size=4, max_wait_seconds=60.0, clock=clock)
    q.put("a")
    q.put("b")
    q.reconfigure(size=2, max_wait_seconds=60.0)
    assert q.get(timeout=0) == ["a", "b"]
