"""Faults injected into a real daemon: kills, signals, disks that fail, inputs that race or
attack. The promise under test: every input ends up exactly once in the outbox or in errors.

Kills and signals need a daemon process of its own (`daemons`); the rest runs the real daemon
in-process with a fake model (`inprocess`, tests/support/inprocess.py), which is faster."""

import errno
import os
import random
import shutil
import signal
import stat
import subprocess
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from tests.support.daemon import wait_until
from tests.support.inprocess import inprocess  # noqa: F401 (a fixture)
from tests.support.photos import check_output, pattern, save

ALL_DONE = ("file_done", "file_failed")


def drop_atomically(rgb, path: Path, fmt: str = "PNG") -> Path:
    """Write under a hidden name, then rename into place (like rsync does)."""
    hidden = path.with_name("." + path.name)
    save(rgb, hidden, fmt)
    hidden.rename(path)
    return path


def all_files(folder: Path):
    return sorted(str(p.relative_to(folder)) for p in folder.rglob("*") if not p.is_dir()) if folder.exists() else []


def claimed_count(folders) -> int:
    # os.walk tolerates folders vanishing under it while the daemon works.
    work = folders.inbox / ".rmbgd" / "work"
    return sum(1 for _, _, names in os.walk(work) for n in names if not n.startswith("."))


def assert_accounted_exactly_once(folders, names, rgb=None):
    outputs = all_files(folders.outbox)
    assert outputs == sorted(n.rsplit(".", 1)[0] + ".png" for n in names), "one output each, no -1 duplicates, no temps"
    assert all_files(folders.done) == sorted(names), "each original exactly once in done/"
    assert all_files(folders.errors) == []
    leftover = [p for p in folders.inbox.rglob("*")
                if p.is_file() and p.name != ".lock" and "state" not in p.relative_to(folders.inbox).parts[:2]]
    assert leftover == [], f"nothing may stay behind in the inbox or work area: {leftover}"
    if rgb is not None:
        for name in outputs:
            check_output(folders.outbox / name, rgb)


def test_sigkill_at_random_moments_loses_and_duplicates_nothing(daemons, inprocess, folders, slow_model):
    config = daemons.config(batch={"size": 2, "max_wait_ms": 30}, model={"name": str(slow_model)})
    rgb = pattern(160, 120, (0.1, 0.2, 0.7, 0.8))
    names = [f"k{i:02d}.png" for i in range(12)]
    for name in names:
        drop_atomically(rgb, folders.inbox / name)
    rng = random.Random(1234)
    for _ in range(3):
        daemon = daemons.start(config)
        done_before = len(daemon.events("file_done"))
        # Kill somewhere in the middle of real work: after a batch or two, mid-encode, mid-write.
        daemon.wait_count(("file_done",), done_before + rng.randint(1, 3), timeout=120)
        daemon.signal(signal.SIGKILL)
        daemon.wait_exit(30)
    # What the kills left behind is on disk: the start that finishes it can be in-process.
    final = inprocess.start(batch={"size": 2, "max_wait_ms": 30})
    wait_until(
        lambda: len(all_files(folders.outbox)) >= len(names) and claimed_count(folders) == 0
        and not any(folders.inbox.glob("*.png")),
        [final],
        timeout=180,
        what="all files finished after the kills",
    )
    assert final.stop() == 0
    assert final.crashes() == []
    assert_accounted_exactly_once(folders, names, rgb)


def test_second_signal_stops_at_once_and_nothing_is_lost(daemons, inprocess, folders, tmp_path):
    from tests.support.tinymodel import build_tiny_model

    # Per image, so the warm-up (one image) stays short but a batch of two takes 8 s.
    very_slow = build_tiny_model(tmp_path / "very-slow", delay_ms_per_image=4000.0)
    config = daemons.config(model={"name": str(very_slow)}, batch={"size": 2, "max_wait_ms": 10},
                            logging={"level": "debug"})
    daemon = daemons.start(config)
    rgb = pattern(80, 80, (0.2, 0.2, 0.8, 0.8))
    names = ["a.png", "b.png"]
    for name in names:
        drop_atomically(rgb, folders.inbox / name)
    daemon.wait_for("batch_started")
    daemon.signal(signal.SIGTERM)
    daemon.wait_for("stopping")
    daemon.signal(signal.SIGTERM)
    code = daemon.wait_exit(30)
    assert code == 130, "a drain (exit 0) would have waited for the 8 s model call"
    assert daemon.events("file_done") == []

    fast = inprocess.start()
    fast.wait_count(ALL_DONE, 2)
    assert fast.stop() == 0
    assert fast.crashes() == []
    assert_accounted_exactly_once(folders, names, rgb)


def test_outbox_deleted_at_runtime_is_waited_for_not_blamed(inprocess, folders):
    daemon = inprocess.start()
    shutil.rmtree(folders.outbox)
    rgb = pattern(60, 60, (0.0, 0.0, 0.5, 1.0))
    drop_atomically(rgb, folders.inbox / "x.png")
    retry = daemon.wait_for("file_retry")
    assert retry["stage"] == "write" and retry["attempt"] == 1
    assert not (folders.errors / "x.png").exists()
    folders.outbox.mkdir()
    record = daemon.wait_for("file_done", timeout=60)
    assert record["retries"] >= 1
    check_output(folders.outbox / "x.png", rgb)
    assert daemon.events("file_failed") == []
    assert daemon.stop() == 0
    assert daemon.crashes() == []


def test_errors_folder_missing_keeps_the_input_claimed_until_it_returns(inprocess, folders):
    daemon = inprocess.start()
    shutil.rmtree(folders.errors)
    bad = folders.inbox / "notes.jpg"
    hidden = folders.inbox / ".notes.jpg"
    hidden.write_bytes(b"not an image")
    hidden.rename(bad)
    retry = daemon.wait_for("file_retry")
    assert retry["stage"] == "reject"
    folders.errors.mkdir()
    failed = daemon.wait_for("file_failed", timeout=60)
    assert failed["stage"] == "decode"
    assert (folders.errors / "notes.jpg").read_bytes() == b"not an image"
    assert (folders.errors / "notes.jpg.error.json").exists()
    assert daemon.stop() == 0
    assert daemon.crashes() == []


@pytest.fixture
def small_mount(tmp_path):
    """A 256 KiB tmpfs to fill up; skipped where mounting is not allowed."""
    mounts = []

    def mount(path: Path, size_kb: int = 256) -> Path:
        path.mkdir(parents=True, exist_ok=True)
        result = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size_kb}k", "tmpfs", str(path)],
                                capture_output=True, text=True)
        if result.returncode != 0:
            pytest.skip(f"cannot mount a tmpfs here: {result.stderr.strip()}")
        mounts.append(path)
        return path

    yield mount
    for path in reversed(mounts):
        subprocess.run(["umount", "-l", str(path)], capture_output=True)


def test_full_outbox_is_retried_with_backoff_until_space_returns(inprocess, folders, small_mount):
    small_mount(folders.outbox)
    filler = folders.outbox / "filler.bin"
    fd = os.open(filler, os.O_WRONLY | os.O_CREAT)
    try:
        while True:
            os.write(fd, b"\0" * 4096)
    except OSError as exc:
        assert exc.errno == errno.ENOSPC
    finally:
        os.close(fd)
    daemon = inprocess.start()
    noise = np.random.default_rng(0).integers(0, 255, (200, 200, 3), dtype=np.uint8)
    noise[..., 0] = 255  # opaque everywhere, incompressible colours: a PNG far above free space
    drop_atomically(noise, folders.inbox / "big.png")
    retry = daemon.wait_for("file_retry")
    assert "ENOSPC" in retry["error"] or "No space" in retry["error"]
    filler.unlink()
    done = daemon.wait_for("file_done", timeout=60)
    assert done["retries"] >= 1
    with Image.open(folders.outbox / "big.png") as im:
        assert im.size == (200, 200)
    assert daemon.events("file_failed") == []
    assert not [p for p in folders.outbox.iterdir() if p.name.startswith(".")], "no temp file left"
    assert daemon.stop() == 0
    assert daemon.crashes() == []


def test_read_only_done_folder_is_retried_not_lost(inprocess, folders, small_mount):
    small_mount(folders.done)
    daemon = inprocess.start()  # a read-only folder at start-up is a config error; at runtime, a fault
    subprocess.run(["mount", "-o", "remount,ro", str(folders.done)], check=True)
    rgb = pattern(50, 50, (0.0, 0.0, 1.0, 0.5))
    drop_atomically(rgb, folders.inbox / "y.png")
    daemon.wait_for("file_retry")
    subprocess.run(["mount", "-o", "remount,rw", str(folders.done)], check=True)
    daemon.wait_for("file_done", timeout=60)
    assert all_files(folders.outbox) == ["y.png"], "published exactly once despite the retries"
    assert all_files(folders.done) == ["y.png"]
    assert daemon.stop() == 0
    assert daemon.crashes() == []


def test_inputs_that_vanish_or_move_cause_no_errors(inprocess, folders):
    daemon = inprocess.start(watch={"settle_seconds": 1.0})
    rgb = pattern(40, 40, (0.0, 0.0, 1.0, 1.0))
    source = save(rgb, folders.inbox.parent / "source.png", "PNG")
    sub = folders.inbox / "sub"
    sub.mkdir()
    # Hard links announce no close, so each waits out settle_seconds: time to pull it away.
    for i in range(10):
        os.link(source, folders.inbox / f"gone{i}.png")      # deleted before it settles
        os.link(source, sub / f"in_sub{i}.png")              # its folder is removed below
        os.link(source, folders.inbox / f"moved{i}.png")     # renamed away outside the inbox
    for i in range(10):
        (folders.inbox / f"gone{i}.png").unlink()
        os.rename(folders.inbox / f"moved{i}.png", folders.inbox.parent / f"moved{i}.png")
    shutil.rmtree(sub)
    keeper = drop_atomically(rgb, folders.inbox / "keeper.png")
    daemon.wait_for("file_done", lambda r: r["input"] == str(keeper))
    # One more rescan cycle passes without any spurious entry.
    sentinel = drop_atomically(rgb, folders.inbox / "sentinel.png")
    daemon.wait_for("file_done", lambda r: r["input"] == str(sentinel))
    assert daemon.events("file_failed") == []
    assert all_files(folders.errors) == []
    assert daemon.alive()
    assert daemon.stop() == 0
    assert daemon.crashes() == []


def test_hostile_entries_never_block_or_escape_the_inbox(inprocess, folders, tmp_path, capfd):
    outside = tmp_path / "outside"
    precious = save(pattern(30, 30, (0, 0, 1, 1)), outside / "precious.png", "PNG")
    precious_bytes = precious.read_bytes()
    daemon = inprocess.start()
    inbox = folders.inbox
    rgb = pattern(64, 48, (0.1, 0.1, 0.6, 0.9))

    os.mkfifo(inbox / "pipe.png")                                       # must never be opened
    os.mknod(inbox / "dev.png", 0o600 | stat.S_IFCHR, os.makedev(1, 3))  # a /dev/null twin
    (inbox / "folder.jpg").mkdir()                                      # a directory named like an image
    inside_target = drop_atomically(rgb, inbox / "target.png")
    (inbox / "link_inside.png").symlink_to(inside_target)
    (inbox / "link_outside.png").symlink_to(precious)
    (inbox / "linkdir").symlink_to(outside, target_is_directory=True)
    long_name = "L" * 240 + ".png"
    drop_atomically(rgb, inbox / long_name)
    raw_name = os.fsdecode(b"caf\xe9-latin1.png")                       # not valid UTF-8
    drop_atomically(rgb, inbox / raw_name)

    for fmt, ext in (("PNG", "png"), ("WEBP", "webp"), ("BMP", "bmp"), ("TIFF", "tiff"), ("GIF", "gif"), ("JPEG", "jpg")):
        full = save(pattern(90, 70, (0.1, 0.1, 0.9, 0.9)), tmp_path / f"full.{ext}", fmt)
        data = full.read_bytes()
        cut = inbox / f".trunc.{ext}"
        cut.write_bytes(data[: len(data) // 3])
        cut.rename(inbox / f"trunc.{ext}")

    expected_failed = {"link_inside.png", "link_outside.png", "linkdir"} | {f"trunc.{e}" for e in ("png", "webp", "bmp", "tiff", "gif", "jpg")}
    expected_done = {"target.png", long_name, raw_name}
    records = daemon.wait_count(ALL_DONE, len(expected_failed) + len(expected_done), timeout=120)
    failed = {Path(r["input"]).name for r in records if r["event"] == "file_failed"}
    done = {Path(r["input"]).name for r in records if r["event"] == "file_done"}
    assert failed == expected_failed
    assert done == expected_done

    ignored = {Path(r["input"]).name for r in daemon.events("file_ignored")}
    assert {"pipe.png", "dev.png"} <= ignored
    assert stat.S_ISFIFO(os.lstat(inbox / "pipe.png").st_mode), "the FIFO is left alone"
    assert (inbox / "folder.jpg").is_dir()
    assert precious.read_bytes() == precious_bytes and (outside / "precious.png").exists()
    assert (folders.errors / "link_outside.png").is_symlink()
    check_output(folders.outbox / ("L" * 240 + ".png"), rgb)
    assert os.path.exists(os.fsencode(folders.outbox) + b"/caf\xe9-latin1.png")
    out, err = capfd.readouterr()
    assert (out, err) == ("", ""), "nothing may bypass the log"
    assert daemon.stop() == 0
    assert daemon.crashes() == []


def test_many_files_keep_claims_bounded(inprocess, folders):
    rgb = pattern(32, 32, (0.0, 0.0, 0.5, 0.5))
    encoded = save(rgb, folders.inbox.parent / "one.png", "PNG").read_bytes()
    total = 300
    for i in range(total):
        (folders.inbox / f"d{i % 5}").mkdir(parents=True, exist_ok=True)
        (folders.inbox / f"d{i % 5}" / f"f{i:04d}.png").write_bytes(encoded)
    daemon = inprocess.start(pipeline={"max_in_flight": 6}, batch={"size": 4, "max_wait_ms": 20})
    most = 0

    def finished():
        nonlocal most
        claimed = claimed_count(folders)
        most = max(most, claimed)
        return len(daemon.events("file_done")) >= total

    daemon.wait_until(finished, timeout=240, what=f"{total} files processed")
    assert most <= 6, f"{most} files claimed at once with max_in_flight 6"
    assert daemon.events("file_failed") == []
    assert len(all_files(folders.outbox)) == total
    assert daemon.stop() == 0
    assert daemon.crashes() == []


def test_polling_mode_processes_files_by_stability(inprocess, folders):
    daemon = inprocess.start(watch={"polling": True, "settle_seconds": 0.3})
    rgb = pattern(120, 100, (0.2, 0.2, 0.8, 0.8))
    save(rgb, folders.inbox / "sub" / "p.png", "PNG")
    record = daemon.wait_for("file_done")
    assert record["input"].endswith("sub/p.png")
    check_output(folders.outbox / "sub" / "p.png", rgb)
    assert daemon.stop() == 0
    assert daemon.crashes() == []


def test_running_peer_adopts_the_files_of_a_killed_instance(daemons, inprocess, folders, tmp_path):
    from tests.support.tinymodel import build_tiny_model

    # The victim claims everything and holds it: its model takes 6 s a call, so nothing is
    # published for seconds after the claims (collector.CallCost waits out the fixed cost
    # first), and it is then frozen (SIGSTOP) so that a peer slow to start on a loaded machine
    # still finds every file in the victim's work area when the victim is killed.
    held = build_tiny_model(tmp_path / "six-seconds-a-call", delay_ms_per_call=6000.0)
    slow = daemons.config(name="slow.yaml", model={"name": str(held)}, batch={"size": 64, "max_wait_ms": 60000},
                          logging={"level": "debug"})
    victim = daemons.start(slow)
    rgb = pattern(120, 120, (0.1, 0.1, 0.9, 0.9))
    names = [f"v{i}.png" for i in range(6)]
    for name in names:
        drop_atomically(rgb, folders.inbox / name)
    victim.wait_count(("file_claimed",), len(names))
    victim.signal(signal.SIGSTOP)
    # The peer in-process: adopting is its watch on the work area, not anything of its model.
    peer = inprocess.start(watch={"rescan_seconds": 2.0})
    victim.signal(signal.SIGKILL)
    victim.wait_exit(30)
    adopted = peer.wait_for("adopted", timeout=60)  # within one rescan period (2 s here)
    assert adopted["files"] == len(names)
    wait_until(lambda: len(all_files(folders.outbox)) >= len(names), [peer], timeout=60, what="all outputs")
    assert peer.stop() == 0
    assert peer.crashes() == []
    assert_accounted_exactly_once(folders, names, rgb)
