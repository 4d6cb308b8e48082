"""The watcher on a real inbox: what reaches the main loop for each kind of writer."""

import errno
import os
import queue
import shutil
import subprocess
import threading
from pathlib import Path

import pytest
from PIL import Image
from watchdog.events import FileClosedNoWriteEvent, FileOpenedEvent

from rmbgd.intake.readiness import Seen
from rmbgd.intake.watcher import SCAN_DIR, WANTED_EVENTS, Watcher, scan
from tests.support.inprocess import inprocess  # noqa: F401 (a fixture)


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


# -- files renamed in from outside the inbox (issue 12) -------------------------------------------


def first_event_for(events, path):
    return collect_until(events, lambda k, p: p == path)[-1][0]


def test_regression_rename_from_sibling_folder_is_moved_in(watched, tmp_path):
    # inotify reports it as IN_MOVED_TO with no IN_MOVED_FROM; watchdog's default turned it
    # into a creation, which waited out settle_seconds as if it were a hard link.
    inbox, events = watched
    staging = tmp_path / "staging"
    staging.mkdir()
    (staging / "x.jpg").write_bytes(b"x" * 100)
    os.rename(staging / "x.jpg", inbox / "x.jpg")
    assert first_event_for(events, inbox / "x.jpg") is Seen.MOVED_IN


def test_rename_from_inbox_subfolder_stays_moved_in(watched):
    inbox, events = watched
    (inbox / ".staging").mkdir()
    (inbox / "sub").mkdir()
    for folder, name in ((".staging", "a.jpg"), ("sub", "b.jpg")):
        (inbox / folder / name).write_bytes(b"x")
        os.rename(inbox / folder / name, inbox / name)
        assert first_event_for(events, inbox / name) is Seen.MOVED_IN


def test_moved_out_of_the_inbox_is_gone(watched, tmp_path):
    inbox, events = watched
    path = inbox / "a.jpg"
    path.write_bytes(b"x")
    collect_until(events, lambda k, p: k is Seen.CLOSED and p == path)
    os.rename(path, tmp_path / "a.jpg")
    assert collect_until(events, lambda k, p: p == path)[-1][0] is Seen.GONE


def test_hard_link_is_not_moved_in(watched, tmp_path):
    # A hard link promises nothing about its writer: it keeps the settle rule.
    inbox, events = watched
    (tmp_path / "x.jpg").write_bytes(b"x")
    os.link(tmp_path / "x.jpg", inbox / "x.jpg")
    assert first_event_for(events, inbox / "x.jpg") is Seen.SCANNED


def test_polling_cannot_tell_a_rename_and_keeps_the_settle_rule(tmp_path):
    inbox = tmp_path / "inbox"
    inbox.mkdir()
    staging = tmp_path / "staging"
    staging.mkdir()
    events: "queue.Queue[tuple]" = queue.Queue()
    watcher = Watcher(inbox, lambda kind, path: events.put((kind, path)), polling=True, poll_seconds=0.1)
    watcher.start()
    try:
        (staging / "x.jpg").write_bytes(b"x")
        os.rename(staging / "x.jpg", inbox / "x.jpg")
        assert first_event_for(events, inbox / "x.jpg") is Seen.SCANNED
    finally:
        watcher.stop()


@pytest.fixture
def bind_mount(tmp_path):
    """`tmp_path` seen a second time through a bind mount (root only)."""
    if os.geteuid() != 0 or shutil.which("mount") is None:
        pytest.skip("making a bind mount needs root and mount(8)")
    view = tmp_path.parent / f"{tmp_path.name}-view"
    view.mkdir()
    made = subprocess.run(["mount", "--bind", str(tmp_path), str(view)], capture_output=True, text=True)
    if made.returncode != 0:
        view.rmdir()
        pytest.skip(f"mount --bind is not permitted here: {made.stderr.strip()}")
    try:
        yield view
    finally:
        if subprocess.run(["umount", str(view)], capture_output=True).returncode != 0:
            subprocess.run(["umount", "-l", str(view)], capture_output=True)
        view.rmdir()


def test_rename_through_a_bind_mount_is_moved_in(watched, tmp_path, bind_mount):
    # The watch is on the inbox's inodes, whatever path a writer reaches them by.
    inbox, events = watched
    (bind_mount / "staging").mkdir()
    (bind_mount / "staging" / "x.jpg").write_bytes(b"x")
    os.rename(bind_mount / "staging" / "x.jpg", bind_mount / "inbox" / "x.jpg")
    assert first_event_for(events, inbox / "x.jpg") is Seen.MOVED_IN


def test_move_across_a_bind_mount_is_a_copy_that_closes(watched, tmp_path, bind_mount):
    # rename(2) refuses to cross mount points even on one filesystem (EXDEV), so mv copies:
    # the copy's close after writing makes it ready at once.
    inbox, events = watched
    (tmp_path / "staging").mkdir()
    (tmp_path / "staging" / "x.jpg").write_bytes(b"x" * 100)
    with pytest.raises(OSError) as refused:
        os.rename(tmp_path / "staging" / "x.jpg", bind_mount / "inbox" / "x.jpg")
    assert refused.value.errno == errno.EXDEV
    shutil.move(str(tmp_path / "staging" / "x.jpg"), str(bind_mount / "inbox" / "x.jpg"))
    collect_until(events, lambda k, p: k is Seen.CLOSED and p == inbox / "x.jpg")


def test_handler_translates_one_sided_moves():
    from watchdog.events import DirMovedEvent, FileCreatedEvent, FileMovedEvent

    from rmbgd.intake.watcher import _Handler

    inbox = Path("/in")
    got = []
    handler = _Handler(inbox, lambda kind, path: got.append((kind, path)))
    handler.on_any_event(FileMovedEvent("", "/in/a.jpg"))       # renamed in from outside
    handler.on_any_event(FileMovedEvent("/in/b.jpg", ""))       # moved out of the inbox
    handler.on_any_event(DirMovedEvent("", "/in/batch"))        # a folder renamed in
    handler.on_any_event(FileCreatedEvent("/in/c.jpg"))         # hard link, mknod, scan
    assert got == [
        (Seen.MOVED_IN, inbox / "a.jpg"),
        (Seen.GONE, inbox / "b.jpg"),
        (SCAN_DIR, inbox / "batch"),
        (Seen.SCANNED, inbox / "c.jpg"),
    ]


def test_regression_renamed_in_files_are_processed_without_waiting_for_settle(inprocess, folders, tmp_path):
    # settle_seconds is far longer than the waits below: a file that had to settle could not
    # be done in time. Renames from a sibling folder and from inside the inbox are complete.
    staging = tmp_path / "staging"
    staging.mkdir()
    (folders.inbox / "sub").mkdir(parents=True)
    Image.new("RGB", (40, 30), (200, 50, 40)).save(staging / "outside.png")
    Image.new("RGB", (40, 30), (200, 50, 40)).save(folders.inbox / "sub" / "inside.png")
    daemon = inprocess.start(watch={"settle_seconds": 60.0, "rescan_seconds": 60.0, "writer_timeout_seconds": 60.0})
    os.rename(staging / "outside.png", folders.inbox / "outside.png")
    os.rename(folders.inbox / "sub" / "inside.png", folders.inbox / "inside.png")
    records = daemon.wait_count(("file_done", "file_failed"), 2, timeout=30)
    assert sorted(Path(r["input"]).name for r in records if r["event"] == "file_done") == ["inside.png", "outside.png"]
    assert daemon.stop() == 0
