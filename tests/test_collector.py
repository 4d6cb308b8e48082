"""Dynamic batching with a fake clock (pure rule) and with threads (the queue wrapper)."""

import threading

import pytest

from rmbgd.batching.collector import BatchQueue, CallCost, Collector


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


# --------------------------------------------------------------------------- batching by size (key)

SMALL, LARGE = (1024, 1024), (2048, 1536)


def test_items_of_different_sizes_never_share_a_batch():
    c = Collector(size=4, max_wait_seconds=0.1)
    for i, key in enumerate([SMALL, LARGE, SMALL, LARGE, SMALL]):
        c.add(i, ready_at=1.0 + i * 0.01, key=key)
    assert c.take(10.0) == [0, 2, 4]
    assert c.take(10.0) == [1, 3]
    assert c.take(10.0) is None
    assert len(c) == 0


def test_each_size_waits_for_its_own_oldest_item():
    c = Collector(size=4, max_wait_seconds=0.2)
    c.add("s1", 10.0, key=SMALL)
    c.add("l1", 10.1, key=LARGE)
    assert c.due_at() == pytest.approx(10.2)
    assert c.take(10.19) is None
    assert c.take(10.2) == ["s1"]
    assert c.due_at() == pytest.approx(10.3)
    assert c.take(10.25) is None
    assert c.take(10.3) == ["l1"]


def test_a_full_batch_goes_before_a_partial_one_not_yet_due():
    c = Collector(size=2, max_wait_seconds=1.0)
    c.add("s1", 10.0, key=SMALL)
    c.add("l1", 10.1, key=LARGE)
    c.add("l2", 10.2, key=LARGE)
    assert c.due_at() == float("-inf")
    assert c.take(10.3) == ["l1", "l2"]
    assert c.take(10.3) is None
    assert c.take(11.0) == ["s1"]


def test_when_several_sizes_are_due_the_oldest_item_decides():
    # After a long model call everything is due: served in arrival order, full or not.
    c = Collector(size=2, max_wait_seconds=0.1)
    c.add("l1", 2.0, key=LARGE)
    c.add("l2", 2.5, key=LARGE)
    c.add("s1", 1.0, key=SMALL)
    c.add("x1", 3.0, key=(64, 64))
    assert c.take(100.0) == ["s1"]
    assert c.take(100.0) == ["l1", "l2"]
    assert c.take(100.0) == ["x1"]


def test_a_lone_size_is_not_starved_by_a_stream_of_full_batches():
    c = Collector(size=2, max_wait_seconds=0.5)
    c.add("lone", 0.0, key=LARGE)
    released = []
    for step in range(10):
        now = 0.2 * step
        c.add(f"a{step}", now, key=SMALL)
        c.add(f"b{step}", now, key=SMALL)
        released.append(c.take(now))
    # Out at the first request after its 0.5 s wait (t=0.6), ahead of that full batch.
    assert released[:5] == [["a0", "b0"], ["a1", "b1"], ["a2", "b2"], ["lone"], ["a3", "b3"]]


def test_drain_returns_every_size_oldest_first():
    c = Collector(size=8, max_wait_seconds=1.0)
    c.add("l", 2.0, key=LARGE)
    c.add("s", 1.0, key=SMALL)
    c.add("n", 3.0)
    assert c.drain() == ["s", "l", "n"]
    assert len(c) == 0 and c.due_at() is None


def test_reconfigure_keeps_waiting_items_with_their_age_and_size():
    c = Collector(size=4, max_wait_seconds=1.0)
    c.add("s1", 1.0, key=SMALL)
    c.add("s2", 1.1, key=SMALL)
    c.add("s3", 1.2, key=SMALL)
    c.add("l1", 1.3, key=LARGE)
    assert c.take(1.5) is None
    c.reconfigure(size=2, max_wait_seconds=1.0)
    assert c.size == 2
    assert c.take(1.5) == ["s1", "s2"]
    assert c.take(1.5) is None
    assert c.take(2.2) == ["s3"]
    assert c.take(2.3) == ["l1"]
    with pytest.raises(ValueError):
        c.reconfigure(size=0, max_wait_seconds=1.0)


def test_queue_batches_by_key_with_a_fake_clock():
    clock = ManualClock(5.0)
    q = BatchQueue(size=2, max_wait_seconds=1.0, clock=clock)
    q.put("s1", key=SMALL)
    q.put("l1", key=LARGE)
    q.put("s2", key=SMALL)
    assert len(q) == 3
    assert q.get(timeout=0) == ["s1", "s2"]
    assert q.get(timeout=0) is None
    clock.t = 6.0
    assert q.get(timeout=0) == ["l1"]


def test_queue_reconfigure_lowers_the_size_for_every_key():
    clock = ManualClock()
    q = BatchQueue(size=8, max_wait_seconds=60.0, clock=clock)
    for i in range(3):
        q.put(("s", i), key=SMALL)
        q.put(("l", i), key=LARGE)
    assert q.get(timeout=0) is None
    q.reconfigure(size=3, max_wait_seconds=60.0)
    assert q.size == 3
    assert q.get(timeout=0) == [("s", 0), ("s", 1), ("s", 2)]
    assert q.get(timeout=0) == [("l", 0), ("l", 1), ("l", 2)]


def test_queue_wakes_consumer_when_one_size_fills():
    q = BatchQueue(size=2, max_wait_seconds=60.0)
    got = []
    consumer = threading.Thread(target=lambda: got.append(q.get(timeout=10)))
    consumer.start()
    q.put("s1", key=SMALL)
    q.put("l1", key=LARGE)
    q.put("l2", key=LARGE)
    consumer.join(10)
    assert not consumer.is_alive()
    assert got == [["l1", "l2"]]


def _model_worker(collector, arrivals, call_seconds, learn=False, busy=None):
    """A model that asks for the next batch whenever it is free, with a fake clock; items
    enter the collector at their `arrivals` times (when decoded). Returns batch sizes.
    `learn`: the collector is told each call's cost, as the pipeline does. `busy`: a list
    that receives (seconds the model ran, seconds from the first arrival to the end)."""
    arrivals = sorted(arrivals)
    now, taken, sizes, ran = 0.0, 0, [], 0.0
    while taken < len(arrivals) or len(collector):
        while taken < len(arrivals) and arrivals[taken] <= now:
            collector.add(taken, ready_at=arrivals[taken])
            taken += 1
        batch = collector.take(now)
        if batch:
            sizes.append(len(batch))
            cost = call_seconds(len(batch))
            now += cost
            ran += cost
            if learn:
                collector.observe(None, len(batch), cost)
            continue
        upcoming = [t for t in (collector.due_at(), arrivals[taken] if taken < len(arrivals) else None) if t is not None]
        now = max(now, min(upcoming))
    if busy is not None:
        busy.append((ran, now - arrivals[0]))
    return sizes


def test_backlog_decoded_one_by_one_faster_than_max_wait_fills_whole_batches():
    # 300 small images leave the decoders every 10 ms; the model is quicker than that.
    c = Collector(size=8, max_wait_seconds=0.2)
    sizes = _model_worker(c, [i * 0.01 for i in range(300)], lambda n: 0.005 + 0.002 * n)
    assert sizes == [8] * 37 + [4]


def test_images_arriving_while_the_model_is_busy_go_out_full():
    c = Collector(size=8, max_wait_seconds=0.2)
    sizes = _model_worker(c, [i * 0.01 for i in range(96)], lambda n: 0.005 + 0.04 * n)
    assert sum(sizes) == 96
    assert sizes[1:] == [8] * (len(sizes) - 1)


def test_lone_image_leaves_after_max_wait():
    c = Collector(size=8, max_wait_seconds=0.2)
    c.add("a", ready_at=5.0)
    assert c.take(5.0) is None
    assert c.take(5.1999) is None
    assert c.due_at() == pytest.approx(5.2)
    assert c.take(5.2) == ["a"]


def test_while_the_model_is_busy_only_a_full_batch_is_handed_out():
    c = Collector(size=3, max_wait_seconds=0.2)
    c.add("a", ready_at=1.0)
    assert c.take(5.0, full_only=True) is None  # long due, but the model could not run it yet
    assert c.due_at(full_only=True) is None
    c.add("b", ready_at=4.0)
    c.add("c", ready_at=4.9)
    assert c.due_at(full_only=True) == float("-inf")
    assert c.take(5.0, full_only=True) == ["a", "b", "c"]


def test_queue_holds_a_due_partial_batch_until_the_model_is_free():
    clock = ManualClock(10.0)
    q = BatchQueue(size=4, max_wait_seconds=0.2, clock=clock)
    q.model_busy(True)
    q.put("a", ready_at=1.0)
    assert q.get(timeout=0) is None
    got = []
    consumer = threading.Thread(target=lambda: got.append(q.get(timeout=30)))
    consumer.start()
    q.put("b", ready_at=9.0)  # wakes the consumer: still nothing to take while busy
    q.model_busy(False)       # the model is free: the due partial batch goes at once
    consumer.join(30)
    assert not consumer.is_alive()
    assert got == [["a", "b"]]


# -- how long a free model waits for company: the cost of a call, learnt -----------------------


def test_call_cost_knows_nothing_before_a_call():
    assert CallCost().fixed() is None


def test_call_cost_from_one_size_is_that_whole_call():
    # All that one size tells is that the fixed part is no larger than the whole call.
    cost = CallCost()
    cost.observe(8, 0.325)
    assert cost.fixed() == pytest.approx(0.325)


def test_call_cost_separates_fixed_and_per_image_parts():
    cost = CallCost()
    cost.observe(1, 0.045)
    cost.observe(8, 0.325)
    assert cost.fixed() == pytest.approx(0.005)
    cost.observe(3, 0.125)  # sizes in between do not change the line through the ends
    assert cost.fixed() == pytest.approx(0.005)


def test_call_cost_is_never_negative_nor_above_the_smallest_call():
    cost = CallCost()
    cost.observe(1, 0.010)
    cost.observe(2, 0.100)  # noisy: the line would cross zero well below size 1
    assert cost.fixed() == 0.0
    cost = CallCost()
    cost.observe(1, 0.100)
    cost.observe(4, 0.050)  # bigger batches faster than one image: all of it is fixed
    assert cost.fixed() == pytest.approx(0.100)


def test_one_slow_call_does_not_swing_the_cost():
    cost = CallCost()
    cost.observe(1, 0.045)
    cost.observe(8, 0.325)
    cost.observe(8, 3.0)  # another process took the GPU for a moment
    assert cost.fixed() == pytest.approx(0.0)  # clamped, not thrown to seconds
    for _ in range(20):
        cost.observe(8, 0.325)
    assert cost.fixed() == pytest.approx(0.005, abs=0.001)


def test_call_cost_ignores_nonsense():
    cost = CallCost()
    cost.observe(0, 1.0)
    cost.observe(2, float("nan"))
    cost.observe(3, -1.0)
    assert cost.fixed() is None


def test_free_model_waits_no_longer_than_a_calls_fixed_cost():
    c = Collector(size=8, max_wait_seconds=0.2)
    c.observe((1024, 1024), 1, 0.045)
    c.observe((1024, 1024), 8, 0.325)
    c.add("a", ready_at=5.0, key=(1024, 1024))
    assert c.due_at() == pytest.approx(5.005)
    assert c.take(5.004) is None
    assert c.take(5.005) == ["a"]


def test_call_cost_is_learnt_per_input_size():
    c = Collector(size=8, max_wait_seconds=0.2)
    c.observe("small", 1, 0.010)
    c.observe("small", 2, 0.015)  # 5 ms fixed
    c.add("big", ready_at=5.0, key="large")
    c.add("s", ready_at=5.0, key="small")
    assert c.take(5.006) == ["s"]
    assert c.take(5.1) is None  # nothing known of this size: max_wait
    assert c.take(5.2) == ["big"]


def test_a_costly_call_still_waits_max_wait_at_most():
    c = Collector(size=8, max_wait_seconds=0.2)
    c.observe(None, 1, 0.5)
    c.observe(None, 8, 0.6)  # mostly fixed cost: batching pays, so wait the whole window
    c.add("a", ready_at=5.0)
    assert c.due_at() == pytest.approx(5.2)


def test_learnt_cost_does_not_release_partial_batches_while_the_model_is_busy():
    c = Collector(size=3, max_wait_seconds=0.2)
    c.observe(None, 1, 0.045)
    c.observe(None, 3, 0.125)
    c.add("a", ready_at=1.0)
    assert c.take(5.0, full_only=True) is None
    assert c.take(5.0) == ["a"]


def test_queue_uses_the_learnt_cost():
    clock = ManualClock(10.0)
    q = BatchQueue(size=4, max_wait_seconds=60.0, clock=clock)
    q.observe(None, 1, 0.045)
    q.observe(None, 4, 0.165)  # 5 ms fixed
    q.put("a")
    assert q.get(timeout=0) is None
    clock.t = 10.005
    assert q.get(timeout=0) == ["a"]


def test_decode_bound_burst_keeps_the_model_busier_once_the_cost_is_known():
    # 96 photos decoded one every 42 ms (two cores just keeping up with the model), on a
    # simulated GPU of 5 ms per call + 40 ms per image: waiting max_wait for a full batch at
    # the start leaves the model idle; learning that a call's fixed cost is 5 ms does not.
    def call(n):
        return 0.005 + 0.040 * n

    arrivals = [0.05 + i * 0.042 for i in range(96)]
    waited, learnt = [], []
    plain = _model_worker(Collector(size=8, max_wait_seconds=0.2), arrivals, call, busy=waited)
    c = Collector(size=8, max_wait_seconds=0.2)
    c.observe(None, 1, call(1))
    c.observe(None, 2, call(2))  # what the warm-up measures
    sizes = _model_worker(c, arrivals, call, learn=True, busy=learnt)
    assert sum(plain) == sum(sizes) == 96
    (ran_plain, wall_plain), (ran_learnt, wall_learnt) = waited[0], learnt[0]
    assert sizes[0] == 1  # the first image starts at once
    assert wall_learnt < wall_plain
    assert ran_learnt / wall_learnt > ran_plain / wall_plain


def test_small_file_burst_still_fills_whole_batches_with_a_learnt_cost():
    # The model is slower than decoding: after the first call, every batch is full.
    def call(n):
        return 0.005 + 0.040 * n

    c = Collector(size=8, max_wait_seconds=0.2)
    c.observe(None, 1, call(1))
    c.observe(None, 2, call(2))
    sizes = _model_worker(c, [i * 0.003 for i in range(300)], call, learn=True)
    assert sum(sizes) == 300
    assert sizes[0] <= 2  # what arrived within the 5 ms a call costs on top of its images
    assert sizes[1:-1] == [8] * (len(sizes) - 2)


# -- urgent items (HTTP requests) go ahead ------------------------------------------------------


def test_urgent_item_goes_first_in_its_group():
    c = Collector(size=2, max_wait_seconds=0.2)
    c.add("a", 1.0)
    c.add("b", 1.1)
    c.add("req", 1.2, urgent=True)
    assert c.take(5.0) == ["req", "a"]
    assert c.take(5.0) == ["b"]


def test_due_group_holding_an_urgent_item_goes_before_older_groups():
    c = Collector(size=8, max_wait_seconds=0.2)
    c.add("inbox", 1.0, key="small")
    c.add("req", 2.0, key="large", urgent=True)
    assert c.take(5.0) == ["req"]
    assert c.take(5.0) == ["inbox"]


def test_an_urgent_item_does_not_change_when_its_group_is_due():
    c = Collector(size=8, max_wait_seconds=0.2)
    c.add("inbox", 1.0)
    c.add("req", 4.0, urgent=True)
    assert c.due_at() == pytest.approx(1.2)  # the oldest item still decides
    assert c.take(5.0) == ["req", "inbox"]


def test_a_request_behind_a_backlog_leaves_in_the_next_batch():
    # 10,000 inbox files (the in-flight limit keeps the collector's share small, but the rule
    # must not depend on it): the request rides in the very next model call.
    c = Collector(size=8, max_wait_seconds=0.2)
    for index in range(10_000):
        c.add(index, ready_at=index * 0.001)
    c.add("req", ready_at=10.5, urgent=True)
    batch = c.take(11.0, full_only=True)
    assert batch[0] == "req" and batch[1:] == list(range(7))


def test_urgent_items_keep_their_own_arrival_order():
    c = Collector(size=3, max_wait_seconds=0.2)
    for name, ready in (("r2", 2.0), ("r1", 1.0), ("r3", 3.0)):
        c.add(name, ready, urgent=True)
    assert c.take(5.0) == ["r1", "r2", "r3"]


def test_drain_returns_arrival_order_whatever_the_rank():
    c = Collector(size=8, max_wait_seconds=0.2)
    c.add("a", 1.0)
    c.add("req", 2.0, urgent=True)
    c.add("b", 3.0, key="other")
    assert c.drain() == ["a", "req", "b"]


def test_queue_puts_urgent_items_ahead():
    q = BatchQueue(size=2, max_wait_seconds=60.0, clock=ManualClock(10.0))
    q.put("a", ready_at=1.0)
    q.put("req", ready_at=9.0, urgent=True)
    assert q.get(timeout=0) == ["req", "a"]
