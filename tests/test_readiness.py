"""Readiness rules with a fake clock and a fake stat: no sleeping, no disk."""

from rmbgd.intake.readiness import Readiness, Seen

A = "inbox/a.jpg"


class FakeDisk:
    def __init__(self):
        self.files = {}

    def write(self, path, size, mtime):
        self.files[path] = (size, mtime)

    def stat(self, path):
        return self.files.get(path)


def make(settle=1.0, writer_timeout=300.0):
    return Readiness(settle, writer_timeout), FakeDisk()


def test_closed_after_write_is_ready_immediately():
    r, disk = make()
    disk.write(A, 10, 1)
    r.observe(A, Seen.SCANNED, 0.0)
    r.observe(A, Seen.WRITTEN, 0.0)
    assert r.poll(0.1, disk.stat) == []
    r.observe(A, Seen.CLOSED, 0.2)
    assert r.poll(0.2, disk.stat) == [A]
    assert A not in r  # handed over exactly once
    assert r.poll(5.0, disk.stat) == []


def test_moved_in_is_ready_immediately():
    r, disk = make()
    disk.write(A, 10, 1)
    r.observe(A, Seen.MOVED_IN, 0.0)
    assert r.poll(0.0, disk.stat) == [A]


def test_scanned_file_needs_settle_seconds_of_stability():
    r, disk = make(settle=1.0)
    disk.write(A, 10, 1)
    r.observe(A, Seen.SCANNED, 0.0, (10, 1))
    assert r.poll(0.5, disk.stat) == []
    assert r.poll(0.99, disk.stat) == []
    assert r.poll(1.0, disk.stat) == [A]


def test_size_or_mtime_change_restarts_the_quiet_period():
    r, disk = make(settle=1.0)
    disk.write(A, 10, 1)
    r.observe(A, Seen.SCANNED, 0.0, (10, 1))
    disk.write(A, 20, 1)
    assert r.poll(0.9, disk.stat) == []  # growth seen at 0.9
    disk.write(A, 20, 2)
    assert r.poll(1.5, disk.stat) == []  # mtime changed at 1.5
    assert r.poll(2.4, disk.stat) == []
    assert r.poll(2.5, disk.stat) == [A]


def test_open_writer_pausing_longer_than_settle_is_not_ready():
    r, disk = make(settle=1.0, writer_timeout=300.0)
    disk.write(A, 10, 1)
    r.observe(A, Seen.SCANNED, 0.0)
    r.observe(A, Seen.WRITTEN, 0.0)
    for t in (1.0, 5.0, 60.0, 299.0):
        assert r.poll(t, disk.stat) == []
    r.observe(A, Seen.WRITTEN, 299.5)
    r.observe(A, Seen.CLOSED, 300.0)
    assert r.poll(300.0, disk.stat) == [A]


def test_lost_close_event_falls_back_to_writer_timeout():
    r, disk = make(settle=1.0, writer_timeout=30.0)
    disk.write(A, 10, 1)
    r.observe(A, Seen.WRITTEN, 0.0)
    assert r.poll(0.0, disk.stat) == []
    assert r.poll(29.0, disk.stat) == []
    assert r.poll(30.0, disk.stat) == [A]


def test_empty_file_without_close_waits_for_writer_timeout():
    r, disk = make(settle=1.0, writer_timeout=30.0)
    disk.write(A, 0, 1)
    r.observe(A, Seen.SCANNED, 0.0, (0, 1))
    assert r.poll(5.0, disk.stat) == []
    assert r.poll(30.0, disk.stat) == [A]


def test_empty_file_closed_is_ready():
    r, disk = make()
    disk.write(A, 0, 1)
    r.observe(A, Seen.CLOSED, 0.0)
    assert r.poll(0.0, disk.stat) == [A]


def test_vanished_file_is_dropped():
    r, disk = make()
    disk.write(A, 10, 1)
    r.observe(A, Seen.SCANNED, 0.0, (10, 1))
    del disk.files[A]
    assert r.poll(2.0, disk.stat) == []
    assert A not in r


def test_gone_event_forgets_even_a_completed_file():
    r, disk = make()
    disk.write(A, 10, 1)
    r.observe(A, Seen.CLOSED, 0.0)
    r.observe(A, Seen.GONE, 0.1)
    assert r.poll(0.2, disk.stat) == []


def test_rescan_of_unchanged_file_does_not_restart_quiet_period():
    r, disk = make(settle=1.0)
    disk.write(A, 10, 1)
    r.observe(A, Seen.SCANNED, 0.0, (10, 1))
    r.observe(A, Seen.SCANNED, 0.8, (10, 1))
    assert r.poll(1.0, disk.stat) == [A]


def test_next_due():
    r, disk = make(settle=1.0, writer_timeout=10.0)
    assert r.next_due() is None
    r.observe(A, Seen.SCANNED, 2.0, (10, 1))
    assert r.next_due() == 3.0
    disk.write("b", 5, 1)
    r.observe("b", Seen.WRITTEN, 1.0)
    assert r.next_due() == 1.0  # size unknown: looked at on the next poll
    assert r.poll(1.0, disk.stat) == []
    assert r.next_due() == 3.0  # b now waits for its writer until 11.0
    r.observe("c", Seen.CLOSED, 4.0)
    assert r.next_due() == float("-inf")


def test_poll_only_stats_files_that_are_due():
    r, disk = make(settle=1.0)
    calls = []

    def counting_stat(path):
        calls.append(path)
        return disk.stat(path)

    for i in range(1000):
        disk.write(i, 10, 1)
        r.observe(i, Seen.SCANNED, 0.0, (10, 1))
    for t in (0.1, 0.5, 0.9):
        assert r.poll(t, counting_stat) == []
    assert calls == [], "nothing is due before settle_seconds"
    assert len(r.poll(1.0, counting_stat)) == 1000
    assert len(calls) == 1000


def test_event_during_quiet_period_postpones_readiness():
    r, disk = make(settle=1.0)
    disk.write(A, 10, 1)
    r.observe(A, Seen.SCANNED, 0.0, (10, 1))
    disk.write(A, 10, 2)
    r.observe(A, Seen.SCANNED, 0.5, (10, 2))  # a rescan saw the change
    assert r.poll(1.0, disk.stat) == []
    assert r.poll(1.5, disk.stat) == [A]


def test_renamed_in_is_taken_at_once_while_a_hard_link_waits_out_settle():
    # What the watcher reports for each (issue 12): a rename into the inbox, from inside or
    # outside it, is MOVED_IN; a hard link (or mknod) is only a creation, seen as SCANNED.
    r, disk = make(settle=60.0)
    renamed, linked = "inbox/renamed.jpg", "inbox/linked.jpg"
    disk.write(renamed, 10, 1)
    disk.write(linked, 10, 1)
    r.observe(linked, Seen.SCANNED, 0.0)
    r.observe(renamed, Seen.MOVED_IN, 0.0)
    assert r.poll(0.0, disk.stat) == [renamed]
    for now in (0.0, 1.0, 30.0, 59.9):
        assert r.poll(now, disk.stat) == [], now
    assert r.poll(60.0, disk.stat) == [linked]
