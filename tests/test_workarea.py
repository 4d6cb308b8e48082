"""Claiming and recovery on real folders, including a second instance holding its lock."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

from rmbgd.workarea import WorkArea


def drop(inbox: Path, rel: str, data: bytes = b"x") -> Path:
    path = inbox / rel
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    return path


def test_claim_moves_file_into_private_area(tmp_path):
    inbox = tmp_path / "inbox"
    src = drop(inbox, "a/b/photo.jpg", b"data")
    work = WorkArea(inbox, instance="one")
    work.open()
    claim = work.claim(src)
    assert claim is not None
    assert str(claim.rel) == "a/b/photo.jpg"
    assert not src.exists()
    assert claim.path.read_bytes() == b"data"
    assert claim.path.is_relative_to(inbox / ".rmbgd")


def test_second_claim_of_same_file_loses(tmp_path):
    inbox = tmp_path / "inbox"
    src = drop(inbox, "x.jpg")
    one, two = WorkArea(inbox, instance="one"), WorkArea(inbox, instance="two")
    one.open()
    two.open()
    assert one.claim(src) is not None
    assert two.claim(src) is None


def test_same_name_waits_while_earlier_one_in_progress(tmp_path):
    inbox = tmp_path / "inbox"
    work = WorkArea(inbox, instance="one")
    work.open()
    first = work.claim(drop(inbox, "x.jpg", b"first"))
    second_src = drop(inbox, "x.jpg", b"second")
    assert work.claim(second_src) is None
    assert second_src.read_bytes() == b"second"  # not clobbered, not lost
    assert first.path.read_bytes() == b"first"


def test_restart_recovers_files_of_dead_instance(tmp_path):
    inbox = tmp_path / "inbox"
    old = WorkArea(inbox, instance="old")
    old.open()
    claim = old.claim(drop(inbox, "sub/x.jpg", b"payload"))
    old.close()  # releases the lock like a dead process would; files stay
    assert claim.path.exists()

    new = WorkArea(inbox, instance="new")
    new.open()
    recovered = new.recover()
    assert [str(c.rel) for c in recovered] == ["sub/x.jpg"]
    assert recovered[0].path.read_bytes() == b"payload"
    assert not (inbox / ".rmbgd" / "work" / "old").exists()


def test_live_instance_files_are_not_adopted(tmp_path):
    inbox = tmp_path / "inbox"
    (inbox / "x.jpg").parent.mkdir(parents=True)
    (inbox / "x.jpg").write_bytes(b"x")
    # A real second process holds its lock while we try to recover.
    script = (
        "import sys, time\n"
        "from pathlib import Path\n"
        "from rmbgd.workarea import WorkArea\n"
        "w = WorkArea(Path(sys.argv[1]), instance='peer')\n"
        "w.open()\n"
        "w.claim(Path(sys.argv[1]) / 'x.jpg')\n"
        "print('claimed', flush=True)\n"
        "sys.stdin.read()\n"
    )
    peer = subprocess.Popen(
        [sys.executable, "-c", script, str(inbox)],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
    )
    try:
        assert peer.stdout.readline().strip() == "claimed"
        me = WorkArea(inbox, instance="me")
        me.open()
        assert me.recover() == []
        assert (inbox / ".rmbgd" / "work" / "peer" / "x.jpg").exists()
    finally:
        peer.stdin.close()
        peer.wait(10)
    # Once the peer is gone, its files are adopted.
    assert [str(c.rel) for c in me.recover()] == ["x.jpg"]


def test_open_refuses_a_locked_instance_folder(tmp_path):
    inbox = tmp_path / "inbox"
    WorkArea(inbox, instance="same").open()
    with pytest.raises(RuntimeError):
        WorkArea(inbox, instance="same").open()


def test_close_removes_empty_area(tmp_path):
    inbox = tmp_path / "inbox"
    work = WorkArea(inbox, instance="one")
    work.open()
    claim = work.claim(drop(inbox, "a/b/x.jpg"))
    os.unlink(claim.path)
    work.release_dirs(claim)
    work.close()
    assert not work.dir.exists()


def test_claim_of_symlink_moves_the_link_not_the_target(tmp_path):
    inbox = tmp_path / "inbox"
    outside = tmp_path / "outside.jpg"
    outside.write_bytes(b"precious")
    inbox.mkdir()
    (inbox / "link.jpg").symlink_to(outside)
    work = WorkArea(inbox, instance="one")
    work.open()
    claim = work.claim(inbox / "link.jpg")
    assert claim.path.is_symlink()
    assert outside.read_bytes() == b"precious"


def test_adopted_files_are_recovered_exactly_once(tmp_path):
    # The dead folder sorts before ours, so its files land in our folder before we list it.
    inbox = tmp_path / "inbox"
    old = WorkArea(inbox, instance="a-old")
    old.open()
    for name in ("x.jpg", "y/z.jpg"):
        old.claim(drop(inbox, name))
    old.close()
    new = WorkArea(inbox, instance="z-new")
    new.open()
    recovered = sorted(str(c.rel) for c in new.recover())
    assert recovered == ["x.jpg", "y/z.jpg"]
