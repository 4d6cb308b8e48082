"""A crash (os._exit, like SIGKILL: no cleanup runs) at every step of delivering or rejecting
a file, then recovery by a new instance: each input ends up exactly once, with no duplicate
output, no temp file and nothing left in the work area."""

import json
import os
import traceback
from pathlib import Path

import pytest

from rmbgd.config import PathsConfig
from rmbgd.output import fsops, publisher
from rmbgd.output.fsops import TEMP_SUFFIX, remove_orphan_temps
from rmbgd.output.publisher import Publisher
from rmbgd.output.files import OutputFile
from rmbgd.intake.workarea import WorkArea

# Each entry: (name, python statements that arm the crash inside the forked child).
# `pub` is the Publisher, `fsops`/`publisher` the modules; `die()` ends the process at once.
DELIVERY_CRASHES = {
    "after_temp_before_intent": "pub._write_intent = lambda *a, **k: die()",
    "after_intent_before_link": "publisher.link_unique = lambda *a, **k: die()",
    # With a mask file this falls between the result's link and the mask's.
    "after_link_before_temp_unlink": "publisher.link_unique = then_die(publisher.link_unique)",
    "after_second_link": "publisher.link_unique = then_die(publisher.link_unique, calls=2)",
    "after_publish_before_retire": "pub._retire = lambda *a, **k: die()",
    "before_original_removed": "fsops.remove_file = publisher.remove_file = lambda *a, **k: die()",
    "after_retire_before_intent_removed": "pub._retire = then_die(pub._retire)",
}

REJECT_CRASHES = {
    "after_place_before_sidecar": "publisher.publish_bytes = lambda *a, **k: die()",
    "after_sidecar_before_source_removed": "publisher.remove_file = lambda *a, **k: die()",
}

def die():
    os._exit(9)


def then_die(fn, calls=1):
    seen = []

    def wrapped(*a, **k):
        result = fn(*a, **k)
        seen.append(1)
        if len(seen) >= calls:
            die()
        return result

    return wrapped


def _crash_in_child(root: Path, action: str, arm: str, done: str, files: int) -> None:
    """The victim: arms the crash (patching this process's modules only) and delivers or rejects."""
    done_dir = None if done == "none" else root / "done"
    outputs = [OutputFile(".png", b"PNG-BYTES"), OutputFile(".mask.png", b"MASK-BYTES")][:files]
    paths = PathsConfig(inbox=root / "inbox", outbox=root / "outbox", errors=root / "errors", done=done_dir)
    work = WorkArea(paths.inbox, instance="victim")
    work.open()
    claim = work.claim(paths.inbox / "a" / "x.jpg")
    pub = publisher.Publisher(paths, owner="victim")
    exec(arm, {"pub": pub, "publisher": publisher, "fsops": fsops, "die": die, "then_die": then_die})
    if action == "deliver":
        pub.deliver(claim, outputs)
    else:
        pub.reject(claim, stage="decode", error="broken")


def setup_root(tmp_path: Path) -> Path:
    for name in ("inbox/a", "outbox", "errors", "done"):
        (tmp_path / name).mkdir(parents=True)
    (tmp_path / "inbox" / "a" / "x.jpg").write_bytes(b"ORIGINAL")
    return tmp_path


def crash_child(root: Path, action: str, arm: str, done: str = "done", files: int = 1) -> int:
    """Run the victim in a forked child (a fork costs milliseconds, a new interpreter a third
    of a second, times some fifty cases); its exit status, 9 when the crash fired."""
    pid = os.fork()
    if pid == 0:  # the child: never returns into pytest, whatever happens
        status = 1
        try:
            _crash_in_child(root, action, arm, done, files)
            status = 0
        except BaseException:  # reported as a non-9 status; the traceback goes to stderr
            traceback.print_exc()
        finally:
            os._exit(status)
    _, status = os.waitpid(pid, 0)
    return os.waitstatus_to_exitcode(status)


def recover(root: Path, done: str = "done", temps_first: bool = False):
    """What a restarted daemon does before `ready`: resume the claims, then remove the dead
    owner's temp files (`temps_first` swaps the two, as another instance's clean-up may)."""
    paths = PathsConfig(
        inbox=root / "inbox", outbox=root / "outbox", errors=root / "errors",
        done=None if done == "none" else root / "done",
    )
    work = WorkArea(paths.inbox, instance="rescuer")
    work.open()
    pub = Publisher(paths, owner="rescuer")
    claims = work.recover()

    def remove_temps():
        for base in (paths.outbox, paths.errors, root / "done"):
            remove_orphan_temps(base, work.is_dead)

    if temps_first:
        remove_temps()
        return work, pub, claims, lambda: None
    return work, pub, claims, remove_temps


def files_under(folder: Path):
    return sorted(str(p.relative_to(folder)) for p in folder.rglob("*") if not p.is_dir())


OUTPUTS = [OutputFile(".png", b"PNG-BYTES"), OutputFile(".mask.png", b"MASK-BYTES")]


# A delivery of one file has no second link to crash after: that pair is never generated.
DELIVERY_CASES = [
    pytest.param(point, files, id=f"{point}-{'result' if files == 1 else 'result+mask'}")
    for point in sorted(DELIVERY_CRASHES)
    for files in (1, 2)
    if not (point == "after_second_link" and files == 1)
]


@pytest.mark.parametrize("point, files", DELIVERY_CASES)
@pytest.mark.parametrize("done", ["done", "none"])
@pytest.mark.parametrize("temps_first", [False, True], ids=["resume-first", "temps-removed-first"])
def test_delivery_survives_a_crash_at(point, done, files, temps_first, tmp_path):
    root = setup_root(tmp_path)
    code = crash_child(root, "deliver", DELIVERY_CRASHES[point], done, files)
    assert code == 9, "the crash did not fire"

    work, pub, claims, remove_temps = recover(root, done, temps_first)
    for claim in claims:
        delivered = pub.resume(claim)
        if delivered is None:  # nothing was published yet: process it again
            delivered = pub.deliver(claim, OUTPUTS[:files])
        assert [p.name for p in delivered.extra] == ["x.mask.png"][: files - 1]
        work.release_dirs(claim)
    remove_temps()
    work.close()

    expected = ["a/x.mask.png", "a/x.png"] if files == 2 else ["a/x.png"]
    assert files_under(root / "outbox") == expected, "each output once, no temp, no x-1"
    assert (root / "outbox" / "a" / "x.png").read_bytes() == b"PNG-BYTES"
    if files == 2:
        assert (root / "outbox" / "a" / "x.mask.png").read_bytes() == b"MASK-BYTES"
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

    work, pub, claims, remove_temps = recover(root)
    assert len(claims) == 1, "the input must still be claimed after the crash"
    rejection = pub.reject(claims[0], stage="decode", error="broken")
    work.release_dirs(claims[0])
    remove_temps()
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


def test_an_intent_from_the_one_file_format_is_still_resumed(tmp_path):
    """An upgrade across a crash: the intent the previous version wrote is finished."""
    root = setup_root(tmp_path)
    paths = PathsConfig(inbox=root / "inbox", outbox=root / "outbox", errors=root / "errors", done=root / "done")
    work = WorkArea(paths.inbox, instance="old")
    work.open()
    claim = work.claim(paths.inbox / "a" / "x.jpg")
    (root / "outbox" / "a").mkdir()
    temp = root / "outbox" / "a" / f".old.0123456789ab{TEMP_SUFFIX}"
    temp.write_bytes(b"PNG-BYTES")
    st = temp.stat()
    target = root / "outbox" / "a" / "x.png"
    claim.intent.write_text(json.dumps({"temp": str(temp), "target": str(target), "ino": st.st_ino, "dev": st.st_dev}))

    delivered = Publisher(paths, owner="old").resume(claim)
    assert delivered is not None and delivered.output == target and delivered.extra == ()
    assert target.read_bytes() == b"PNG-BYTES" and not temp.exists()
    assert files_under(root / "done") == ["a/x.jpg"]


def test_a_taken_name_moves_the_mask_along_with_the_result(tmp_path):
    root = setup_root(tmp_path)
    paths = PathsConfig(inbox=root / "inbox", outbox=root / "outbox", errors=root / "errors", done=None)
    (root / "outbox" / "a").mkdir()
    (root / "outbox" / "a" / "x.png").write_bytes(b"someone else's")
    work = WorkArea(paths.inbox, instance="me")
    work.open()
    delivered = Publisher(paths, owner="me").deliver(work.claim(paths.inbox / "a" / "x.jpg"), OUTPUTS)
    assert delivered.output.name == "x-1.png"
    assert [p.name for p in delivered.extra] == ["x-1.mask.png"]
    assert (root / "outbox" / "a" / "x.png").read_bytes() == b"someone else's"
    assert delivered.extra[0].read_bytes() == b"MASK-BYTES"
