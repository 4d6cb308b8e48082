"""A crash (os._exit, like SIGKILL: no cleanup runs) at every step of delivering or rejecting
a file, then recovery by a new instance: each input ends up exactly once, with no duplicate
output, no temp file and nothing left in the work area."""

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from rmbgd.config import PathsConfig
from rmbgd.fsops import TEMP_SUFFIX, remove_orphan_temps
from rmbgd.publisher import Publisher
from rmbgd.workarea import WorkArea

# Each entry: (name, python statements that arm the crash inside the child process).
# `pub` is the Publisher, `fsops`/`publisher` the modules; `die()` ends the process at once.
DELIVERY_CRASHES = {
    "after_temp_before_intent": "pub._write_intent = lambda *a, **k: die()",
    "after_intent_before_link": "publisher.link_unique = lambda *a, **k: die()",
    "after_link_before_temp_unlink": "publisher.link_unique = then_die(publisher.link_unique)",
    "after_publish_before_retire": "pub._retire = lambda *a, **k: die()",
    "before_original_removed": "fsops.remove_file = publisher.remove_file = lambda *a, **k: die()",
    "after_retire_before_intent_removed": "pub._retire = then_die(pub._retire)",
}

REJECT_CRASHES = {
    "after_place_before_sidecar": "publisher.publish_bytes = lambda *a, **k: die()",
    "after_sidecar_before_source_removed": "publisher.remove_file = lambda *a, **k: die()",
}

CHILD = textwrap.dedent(
    """
    import os, sys
    from pathlib import Path
    from rmbgd import fsops, publisher
    from rmbgd.config import PathsConfig
    from rmbgd.workarea import WorkArea

    def die():
        os._exit(9)

    def then_die(fn):
        def wrapped(*a, **k):
            fn(*a, **k)
            die()
        return wrapped

    root, action, arm = Path(sys.argv[1]), sys.argv[2], sys.argv[3]
    done = None if sys.argv[4] == "none" else root / "done"
    paths = PathsConfig(inbox=root / "inbox", outbox=root / "outbox", errors=root / "errors", done=done)
    work = WorkArea(paths.inbox, instance="victim")
    work.open()
    claim = work.claim(paths.inbox / "a" / "x.jpg")
    pub = publisher.Publisher(paths, owner="victim")
    exec(arm)
    if action == "deliver":
        pub.deliver(claim, b"PNG-BYTES")
    else:
        pub.reject(claim, stage="decode", error="broken")
    os._exit(0)
    """
)


def setup_root(tmp_path: Path) -> Path:
    for name in ("inbox/a", "outbox", "errors", "done"):
        (tmp_path / name).mkdir(parents=True)
    (tmp_path / "inbox" / "a" / "x.jpg").write_bytes(b"ORIGINAL")
    return tmp_path


def crash_child(root: Path, action: str, arm: str, done: str = "done") -> int:
    result = subprocess.run([sys.executable, "-c", CHILD, str(root), action, arm, done], timeout=60)
    return result.returncode


def recover(root: Path, done: str = "done"):
    paths = PathsConfig(
        inbox=root / "inbox", outbox=root / "outbox", errors=root / "errors",
        done=None if done == "none" else root / "done",
    )
    work = WorkArea(paths.inbox, instance="rescuer")
    work.open()
    pub = Publisher(paths, owner="rescuer")
    claims = work.recover()
    for base in (paths.outbox, paths.errors, root / "done"):
        remove_orphan_temps(base, work.is_dead)
    return work, pub, claims


def files_under(folder: Path):
    return sorted(str(p.relative_to(folder)) for p in folder.rglob("*") if not p.is_dir())


@pytest.mark.parametrize("point", sorted(DELIVERY_CRASHES))
@pytest.mark.parametrize("done", ["done", "none"])
def test_delivery_survives_a_crash_at(point, done, tmp_path):
    root = setup_root(tmp_path)
    assert crash_child(root, "deliver", DELIVERY_CRASHES[point], done) == 9, "the crash did not fire"

    work, pub, claims = recover(root, done)
    for claim in claims:
        delivered = pub.resume(claim)
        if delivered is None:  # nothing was published yet: process it again
            delivered = pub.deliver(claim, b"PNG-BYTES")
        work.release_dirs(claim)
    work.close()

    assert files_under(root / "outbox") == ["a/x.png"], "exactly one output, no temp, no x-1"
    assert (root / "outbox" / "a" / "x.png").read_bytes() == b"PNG-BYTES"
    if done == "done":
        assert files_under(root / "done") == ["a/x.jpg"], "the original exactly once"
        assert (root / "done" / "a" / "x.jpg").read_bytes() == b"ORIGINAL"
    else:
        assert files_under(root / "done") == []
    assert files_under(root / "errors") == []
    assert [p for p in (root / "inbox").rglob("*") if p.is_file()] == [], "work area left clean"


@pytest.mark.parametrize("point", sorted(REJECT_CRASHES))
def test_rejection_survives_a_crash_at(point, tmp_path):
    root = setup_root(tmp_path)
    assert crash_child(root, "reject", REJECT_CRASHES[point]) == 9, "the crash did not fire"

    work, pub, claims = recover(root)
    assert len(claims) == 1, "the input must still be claimed after the crash"
    rejection = pub.reject(claims[0], stage="decode", error="broken")
    work.release_dirs(claims[0])
    work.close()

    assert files_under(root / "errors") == ["a/x.jpg", "a/x.jpg.error.json"]
    assert (root / "errors" / "a" / "x.jpg").read_bytes() == b"ORIGINAL"
    sidecar = json.loads((root / "errors" / "a" / "x.jpg.error.json").read_text())
    assert sidecar["stage"] == "decode" and sidecar["error"] == "broken"
    assert Path(sidecar["moved_to"]) == rejection.moved_to
    assert files_under(root / "outbox") == []
    assert [p for p in (root / "inbox").rglob("*") if p.is_file()] == []


def test_orphan_temps_of_live_owners_are_kept(tmp_path):
    root = setup_root(tmp_path)
    live = WorkArea(root / "inbox", instance="alive")
    live.open()
    (root / "outbox" / f".alive.0123456789ab{TEMP_SUFFIX}").write_bytes(b"in progress")
    (root / "outbox" / f".dead.0123456789ab{TEMP_SUFFIX}").write_bytes(b"left over")
    me = WorkArea(root / "inbox", instance="me")
    me.open()
    assert remove_orphan_temps(root / "outbox", me.is_dead) == 1
    assert files_under(root / "outbox") == [f".alive.0123456789ab{TEMP_SUFFIX}"]
