"""Claiming and recovery on real folders, including a second instance holding its lock."""

import errno
import os
import subprocess
import sys
from pathlib import Path, PurePath

import pytest

from rmbgd.output.fsops import OwnerLock, owner_of_temp, owner_tag, remove_orphan_temps, temp_path_for, write_temp
from rmbgd.intake.filekinds import special_file_reason
from rmbgd.intake.workarea import Claim, WorkArea
from tests.support.hostile import make_socket


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
        "from rmbgd.intake.workarea import WorkArea\n"
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


# --------------------------------------------------------------------------- races (finding 8)


def racing_rename(monkeypatch, before_first_rename):
    """os.rename that runs `before_first_rename(dst)` once, just before the real rename: the
    moment at which release_dirs (on the encode pool) can remove the folder just made."""
    real = os.rename
    fired = []

    def rename(src, dst, *args, **kwargs):
        if not fired:
            fired.append(dst)
            before_first_rename(Path(dst))
        return real(src, dst, *args, **kwargs)

    monkeypatch.setattr(os, "rename", rename)
    return fired


def test_regression_release_dirs_between_mkdir_and_rename_of_a_claim(tmp_path, monkeypatch):
    inbox = tmp_path / "inbox"
    work = WorkArea(inbox, instance="one")
    work.open()
    finished = work.claim(drop(inbox, "a/b/one.jpg"))
    os.unlink(finished.path)  # its delivery is done; release_dirs is about to run for it
    second = drop(inbox, "a/b/two.jpg", b"two")
    fired = racing_rename(monkeypatch, lambda dst: work.release_dirs(finished))

    claim = work.claim(second)

    assert fired, "the interleaving was injected"
    assert claim is not None, "a vanished claim folder is made again, not read as 'same name in progress'"
    assert claim.path.read_bytes() == b"two" and not second.exists()


def test_regression_release_dirs_between_mkdir_and_rename_of_an_adoption(tmp_path, monkeypatch):
    inbox = tmp_path / "inbox"
    dead = WorkArea(inbox, instance="dead")
    dead.open()
    dead.claim(drop(inbox, "a/b/x.jpg", b"x"))
    dead.close()
    me = WorkArea(inbox, instance="me")
    me.open()
    (me.dir / "a" / "b").mkdir(parents=True)  # left empty by a file just finished
    racing_rename(monkeypatch, lambda dst: (me.dir / "a" / "b").rmdir() or (me.dir / "a").rmdir())

    adopted = me.adopt_dead_peers()

    assert [str(c.rel) for c in adopted] == ["a/b/x.jpg"]
    assert adopted[0].path.read_bytes() == b"x"


def test_one_file_that_cannot_be_adopted_never_stops_the_others(tmp_path, monkeypatch):
    inbox = tmp_path / "inbox"
    dead = WorkArea(inbox, instance="dead")
    dead.open()
    for name in ("a.jpg", "b.jpg", "c.jpg"):
        dead.claim(drop(inbox, name))
    dead.close()
    me = WorkArea(inbox, instance="me")
    me.open()
    real = os.rename

    def rename(src, dst, *args, **kwargs):
        if os.fspath(src) == "b.jpg":
            raise PermissionError(errno.EACCES, "Permission denied", src)
        return real(src, dst, *args, **kwargs)

    monkeypatch.setattr(os, "rename", rename)
    problems = []
    adopted = me.adopt_dead_peers(on_error=lambda path, exc: problems.append((path.name, exc.errno)))

    assert sorted(str(c.rel) for c in adopted) == ["a.jpg", "c.jpg"]
    assert problems == [("b.jpg", errno.EACCES)]
    assert (dead.dir / "b.jpg").exists(), "left where it was for a later try"
    monkeypatch.setattr(os, "rename", real)
    assert [str(c.rel) for c in me.adopt_dead_peers()] == ["b.jpg"]


def test_adopted_files_are_returned_when_the_dead_folder_cannot_be_tidied(tmp_path, monkeypatch):
    # Removing the dead instance's emptied folder (or its lock) can fail; the files already
    # moved into our folder must still be handed back, or they would wait for the next start.
    inbox = tmp_path / "inbox"
    dead = WorkArea(inbox, instance="dead")
    dead.open()
    for name in ("a.jpg", "sub/b.jpg"):
        dead.claim(drop(inbox, name))
    dead.close()
    me = WorkArea(inbox, instance="me")
    me.open()
    real = Path.unlink

    def unlink(self, *args, **kwargs):
        if self.name == ".lock" and self.parent == dead.dir:
            raise OSError(errno.EIO, "Input/output error", str(self))
        return real(self, *args, **kwargs)

    monkeypatch.setattr(Path, "unlink", unlink)
    problems = []
    adopted = me.adopt_dead_peers(on_error=lambda path, exc: problems.append((path, exc.errno)))

    assert sorted(str(c.rel) for c in adopted) == ["a.jpg", "sub/b.jpg"]
    assert all(c.path.exists() for c in adopted)
    assert problems == [(dead.dir, errno.EIO)]


def dead_claim_with_intent(inbox: Path) -> WorkArea:
    dead = WorkArea(inbox, instance="dead")
    dead.open()
    claim = dead.claim(drop(inbox, "a/x.jpg", b"x"))
    claim.intent.write_text('{"target": "t", "files": []}')
    dead.close()
    return dead


def failing_rename_of(monkeypatch, name: str, times: int = 1):
    real = os.rename
    left = [times]

    def rename(src, dst, *args, **kwargs):
        if os.path.basename(os.fspath(src)) == name and left[0] > 0:
            left[0] -= 1
            raise OSError(errno.EIO, "Input/output error", src)
        return real(src, dst, *args, **kwargs)

    monkeypatch.setattr(os, "rename", rename)


@pytest.mark.parametrize("failing", ["intent", "claim"])
def test_regression_a_claim_and_its_intent_are_adopted_together(tmp_path, monkeypatch, failing):
    # Found by the fault-injection table: an adopted claim whose journal stayed behind was
    # processed again and published twice (x.png and x-1.png).
    inbox = tmp_path / "inbox"
    dead = dead_claim_with_intent(inbox)
    claim_path = dead.dir / "a" / "x.jpg"
    intent_name = Claim(rel=PurePath("a/x.jpg"), path=claim_path).intent.name
    failing_rename_of(monkeypatch, intent_name if failing == "intent" else "x.jpg")
    me = WorkArea(inbox, instance="me")
    me.open()
    problems = []

    assert me.adopt_dead_peers(on_error=lambda path, exc: problems.append(path.name)) == []
    assert len(problems) == 1
    assert sorted(p.name for p in (dead.dir / "a").iterdir()) == sorted([intent_name, "x.jpg"]), \
        "both stay in the dead folder, together"

    (adopted,) = me.adopt_dead_peers()
    assert adopted.path.read_bytes() == b"x" and adopted.intent.exists()


def test_an_intent_whose_claim_stayed_behind_is_kept_at_start_up(tmp_path):
    inbox = tmp_path / "inbox"
    dead = dead_claim_with_intent(inbox)
    claim_path = dead.dir / "a" / "x.jpg"
    intent = Claim(rel=PurePath("a/x.jpg"), path=claim_path).intent
    me = WorkArea(inbox, instance="me")
    me.open()
    # As left by a claim that could not follow its journal, nor the journal go back.
    (me.dir / "a").mkdir(parents=True)
    os.rename(intent, me.dir / "a" / intent.name)
    me._drop_orphan_intents()
    assert (me.dir / "a" / intent.name).exists()


def test_claim_of_a_file_renamed_away_at_the_last_moment_is_none(tmp_path, monkeypatch):
    inbox = tmp_path / "inbox"
    work = WorkArea(inbox, instance="one")
    work.open()
    src = drop(inbox, "sub/x.jpg")
    racing_rename(monkeypatch, lambda dst: os.replace(src, tmp_path / "away.jpg"))
    assert work.claim(src) is None
    assert (tmp_path / "away.jpg").exists() and not any(work._files(work.dir))


def test_claim_never_moves_a_file_through_a_folder_swapped_for_a_link(tmp_path):
    inbox = tmp_path / "inbox"
    secret = tmp_path / "secret"
    (secret / "b").mkdir(parents=True)
    (secret / "b" / "x.jpg").write_bytes(b"secret")
    src = drop(inbox, "a/b/x.jpg")
    work = WorkArea(inbox, instance="one")
    work.open()
    # Scanned as inbox/a/b/x.jpg; before the claim, `a` becomes a link leading outside.
    os.rename(inbox / "a", tmp_path / "moved-away")
    (inbox / "a").symlink_to(secret, target_is_directory=True)

    with pytest.raises(FileNotFoundError):
        work.claim(src)
    assert (secret / "b" / "x.jpg").read_bytes() == b"secret"
    assert not any(work._files(work.dir))


def test_dead_peer_lock_that_is_a_symlink_is_never_followed(tmp_path):
    inbox = tmp_path / "inbox"
    outside = tmp_path / "outside"
    outside.write_bytes(b"keep")
    dead = inbox / ".rmbgd" / "work" / "evil"
    dead.mkdir(parents=True)
    (dead / ".lock").symlink_to(outside)
    drop(dead, "x.jpg")
    me = WorkArea(inbox, instance="me")
    me.open()
    problems = []
    assert me.recover(on_error=lambda path, exc: problems.append(exc.errno)) == []
    assert problems == [errno.ELOOP]
    assert outside.read_bytes() == b"keep"


def test_special_entries_are_named_without_being_opened(tmp_path):
    (tmp_path / "f").write_bytes(b"x")
    (tmp_path / "l").symlink_to(tmp_path / "f")
    os.mkfifo(tmp_path / "p")
    make_socket(tmp_path / "s")
    assert special_file_reason(tmp_path / "f") is None
    assert special_file_reason(tmp_path / "gone") is None
    assert special_file_reason(tmp_path / "l").startswith("symbolic link")
    assert "FIFO" in special_file_reason(tmp_path / "p")
    assert "socket" in special_file_reason(tmp_path / "s")


# --------------------------------------------------------------------------- temp ownership (finding 8)


def test_regression_long_instance_name_keeps_its_live_temps(tmp_path):
    inbox, outbox = tmp_path / "inbox", tmp_path / "outbox"
    outbox.mkdir()
    # A 64-character hostname plus the pid: longer than the old 64-character owner tag.
    live = WorkArea(inbox, instance="h" * 64 + "-4194304")
    live.open()
    temp = write_temp(b"half published", outbox, live.instance)
    me = WorkArea(inbox, instance="me-1")
    me.open()

    assert remove_orphan_temps(outbox, me.is_dead) == 0
    assert temp.exists(), "a running instance's temp file is never removed"
    live.close()
    assert remove_orphan_temps(outbox, me.is_dead) == 1, "once its owner is dead it is"


def test_owner_tags_are_bounded_and_never_shared():
    long_a, long_b = "x" * 100 + "-1", "x" * 100 + "-2"
    assert owner_tag("host-123") == "host-123"
    assert owner_tag(long_a) != owner_tag(long_b)
    for name in (long_a, "weird.name/with:odd", "é" * 40):
        tag = owner_tag(name)
        assert len(tag) <= 64 and "." not in tag and "/" not in tag
        assert owner_of_temp(temp_path_for(Path("/x"), name).name) == tag


def test_regression_process_temps_survive_while_its_owner_lock_is_held(tmp_path):
    # `rmbgd process` has no work folder: its OwnerLock at the top of --out is its proof of life.
    inbox, out = tmp_path / "inbox", tmp_path / "outbox"
    (out / "sub").mkdir(parents=True)
    daemon = WorkArea(inbox, instance="daemon-1")
    daemon.open()
    owner = "process-somehost-77"
    with OwnerLock([out], owner):
        temp = write_temp(b"being written", out / "sub", owner)
        assert remove_orphan_temps(out, daemon.is_dead) == 0
        assert temp.exists()
    assert remove_orphan_temps(out, daemon.is_dead) == 1
    assert list(out.rglob("*")) == [out / "sub"], "the lock file is gone with its owner"
