"""The watcher on a real inbox: what reaches the main loop for each kind of writer."""

import os
import queue
import shutil
import threading
from pathlib import Path

import pytest
from watchdog.events import FileClosedNoWriteEvent, FileOpenedEvent

from rmbgd.readiness import Seen
from rmbgd.watcher import SCAN_DIR, WANTED_EVENTS, Watcher, scan


@pytest.fixture
def watched(tmp_path):
    inbox = tmp_path / "inbox"
    inbox.mkdir()
    events: "queue.Queue[tuple]" = queue.Queue()
    before = set(threading.enumerate())
    watcher = Watcher(inbox, lambda kind, path: events.put((kind, path)))
    watcher.start()
    yield inbox, events
    watcher.stop()
    assert not watcher.is_alive(), "the observer thread must stop"
    leaked = [t for t in threading.enumerate() if t not in before and t.is_alive()]
    for t in leaked:
        t.join(5)
    assert [t for t in leaked if t.is_alive()] == [], "watcher threads leaked"


def collect_until(events, predicate, timeout=10.0):
    seen = []
    while True:
        kind, path = events.get(timeout=timeout)  # raises queue.Empty: the test fails
        seen.append((kind, path))
        if predicate(kind, path):
            return seen


def test_reader_events_are_filtered_at_the_source():
    assert FileOpenedEvent not in WANTED_EVENTS
    assert FileClosedNoWriteEvent not in WANTED_EVENTS


def test_written_then_closed(watched):
    inbox, events = watched
    path = inbox / "a.jpg"
    with open(path, "wb") as fh:
        fh.write(b"x" * 1000)
        fh.flush()
        seen = collect_until(events, lambda k, p: k is Seen.WRITTEN and p == path)
    seen += collect_until(events, lambda k, p: k is Seen.CLOSED and p == path)
    assert seen[-1] == (Seen.CLOSED, path)


def test_rename_into_place_and_partial_names(watched):
    inbox, events = watched
    part = inbox / "dl.jpg.part"
    part.write_bytes(b"x")
    os.rename(part, inbox / "dl.jpg")
    seen = collect_until(events, lambda k, p: k is Seen.MOVED_IN)
    assert seen[-1] == (Seen.MOVED_IN, inbox / "dl.jpg")
    assert all(p != part for _, p in seen), "partial names never reach the main loop"


def test_reads_of_inbox_files_cause_no_events(watched):
    inbox, events = watched
    path = inbox / "a.jpg"
    path.write_bytes(b"data")
    collect_until(events, lambda k, p: k is Seen.CLOSED and p == path)
    for _ in range(3):
        path.read_bytes()
    (inbox / "sentinel.jpg").write_bytes(b"s")
    seen = collect_until(events, lambda k, p: p.name == "sentinel.jpg")
    assert all(p.name == "sentinel.jpg" for _, p in seen), seen


def test_hidden_folders_and_private_area_are_ignored(watched):
    inbox, events = watched
    private = inbox / ".rmbgd" / "work"
    private.mkdir(parents=True)
    (private / "x.jpg").write_bytes(b"x")
    (inbox / "b.jpg").write_bytes(b"b")
    seen = collect_until(events, lambda k, p: p.name == "b.jpg" and k is Seen.CLOSED)
    assert all(".rmbgd" not in p.parts for _, p in seen)


def test_folder_moved_in_asks_for_a_scan(watched, tmp_path):
    inbox, events = watched
    outside = tmp_path / "batch"
    outside.mkdir()
    (outside / "x.jpg").write_bytes(b"x")
    shutil.move(str(outside), str(inbox / "batch"))
    seen = collect_until(events, lambda k, p: k == SCAN_DIR)
    assert seen[-1] == (SCAN_DIR, inbox / "batch")


def test_claim_rename_out_of_inbox_reports_gone(watched):
    inbox, events = watched
    path = inbox / "a.jpg"
    path.write_bytes(b"x")
    collect_until(events, lambda k, p: k is Seen.CLOSED)
    (inbox / ".rmbgd").mkdir()
    os.rename(path, inbox / ".rmbgd" / "a.jpg")
    seen = collect_until(events, lambda k, p: k is Seen.GONE)
    assert seen[-1] == (Seen.GONE, path)


def test_scan_skips_hidden_partial_and_does_not_follow_links(tmp_path):
    inbox = tmp_path / "inbox"
    (inbox / "sub").mkdir(parents=True)
    (inbox / "sub" / "a.jpg").write_bytes(b"a")
    (inbox / ".hidden").mkdir()
    (inbox / ".hidden" / "b.jpg").write_bytes(b"b")
    (inbox / "c.jpg.part").write_bytes(b"c")
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "d.jpg").write_bytes(b"d")
    (inbox / "linkdir").symlink_to(outside, target_is_directory=True)
    os.mkfifo(inbox / "pipe.jpg")
    found = sorted(str(p.relative_to(inbox)) for p, _ in scan(inbox, inbox))
    assert found == ["linkdir", "pipe.jpg", "sub/a.jpg"]
