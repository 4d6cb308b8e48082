"""Fault injection at the filesystem calls of every stage, while a stream of files flows.

Each case runs the real daemon in-process (tests/support/inprocess.py), makes one kind of
filesystem call fail with one errno (tests/support/faultfs.py) during one stage, then restarts
the daemon on the same folders with the fault gone, and checks the promise:

- every input ends exactly once: its output in the outbox and its original in done/, or the
  input (with its sidecar) in errors/; a file hit by a permanent fault may stay claimed until
  the restart, and then finishes;
- nothing else is left: no temp file, no intent, nothing in the work area or the inbox;
- files the fault does not concern are not held up by it (permanent faults hit one folder,
  `sub/`; everything outside it finishes while the fault lasts);
- rmbgd never crashes (no crashed/thread_crashed/task_failed event; the daemon runs until told
  to stop, and stops cleanly).

Transient faults fail the N-th matching call once; permanent ones every call from the first
on, below `sub/` of the stage's folder. The table lists, per stage, the calls it makes and
the errnos each can really return; every case asserts its fault fired, so no row is idle.
"""

from __future__ import annotations

import errno
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, List, Optional, Tuple

import pytest

from rmbgd.output.fsops import TEMP_SUFFIX
from tests.support.faultfs import faultfs  # noqa: F401 (a fixture)
from tests.support.inprocess import inprocess  # noqa: F401 (a fixture)
from tests.support.photos import pattern, save

E = errno
GOOD = ["a0.png", "a1.png", "a2.png", "sub/s0.png", "sub/s1.png", "sub/s2.png"]
BAD = ["bad0.png", "sub/bad1.png"]  # not images: they are rejected to errors/
INPUTS = GOOD + BAD
TERMINAL = ("file_done", "file_failed")
FIRST, SECOND = "first", "second"


@dataclass(frozen=True)
class Case:
    stage: str
    kind: str
    root: str            # the folder the fault applies below (see folder())
    err: int
    permanent: bool
    nth: int = 1

    @property
    def id(self) -> str:
        mode = "permanent" if self.permanent else f"transient{self.nth}"
        return f"{self.stage}-{self.kind}@{self.root}-{E.errorcode[self.err]}-{mode}"


# stage -> [(kind, root, errnos)]; root is "outbox", "errors", "done" or "work" (the
# instance's work folder, where claims, decodes and intents happen).
TABLE: Dict[str, List[Tuple[str, str, Tuple[int, ...]]]] = {
    "claim": [
        ("rename", "work", (E.ENOSPC, E.EACCES, E.EXDEV, E.ENAMETOOLONG)),
        ("mkdir", "work", (E.EIO, E.ENOTDIR)),
    ],
    "decode-open": [
        ("open_read", "work", (E.EIO, E.EACCES)),
    ],
    "publish": [
        ("mkdir", "outbox", (E.EROFS, E.EEXIST)),
        ("open_write", "outbox", (E.ENOSPC, E.ENOTDIR, E.ENAMETOOLONG)),
        ("write", "outbox", (E.ENOSPC, E.EIO)),
        ("fsync", "outbox", (E.EIO,)),
        ("link", "outbox", (E.EROFS, E.EACCES, E.EXDEV)),
        ("unlink", "outbox", (E.EIO,)),
        ("open_write", "work", (E.ENOSPC,)),                   # the intent
        ("replace", "work", (E.EIO, E.EXDEV)),
    ],
    "retire": [
        ("mkdir", "done", (E.ENOSPC, E.ENOTDIR)),
        ("link", "done", (E.EIO, E.EACCES, E.EXDEV)),
        ("open_dir", "done", (E.EIO,)),
        ("unlink", "work", (E.EROFS,)),                        # the original leaving the work area
    ],
    "reject": [
        ("mkdir", "errors", (E.EROFS, E.ENOTDIR)),
        ("link", "errors", (E.ENOSPC, E.EXDEV, E.ENAMETOOLONG)),
        ("open_write", "errors", (E.EIO,)),                    # the sidecar
        ("write", "errors", (E.ENOSPC,)),
        ("unlink", "errors", (E.EIO,)),
    ],
}

# What the promise says of each errno, written here rather than taken from rmbgd so that the
# test checks the rule: a machine's state heals, a destination's does not, a name never.
HEALABLE = {E.ENOSPC, E.EROFS, E.EIO}
NAME = {E.ENAMETOOLONG}

# Recovery: the first daemon leaves every good file claimed with its outputs published and
# its original not yet moved (done/ fails for good, see test_recovery_fault); the second one
# starts with these faults armed during its start-up. "work" is the second instance's own
# folder, which it adopts the first one's claims into.
RECOVERY: List[Tuple[str, str, Tuple[int, ...]]] = [
    ("open_read", "work", (E.EIO, E.EACCES)),                  # reading the intents
    ("link", "done", (E.EIO, E.ENOTDIR)),                      # finishing: the original to done/
    ("unlink", "work", (E.EROFS,)),                            # the original and intent leaving
    ("rename", "work", (E.EIO, E.EXDEV)),                      # adopting the dead instance's claims
]


# Each result comes with its mask (output.mask: true), so a delivery links two files and a
# fault can fall between them; a small in-flight limit makes a held slot visible at once. A
# failed claim or adoption is tried again at the next rescan: every 0.1 s rather than the
# harness's 0.5 s, which a third of the cases would otherwise spend waiting.
SECTIONS = {"output": {"mask": True}, "pipeline": {"max_in_flight": 2}, "watch": {"rescan_seconds": 0.1}}
# Rows whose second call (the mask's) is worth failing too.
SECOND_CALL = {("publish", "link"), ("publish", "open_write"), ("publish", "write")}


def cases() -> List[Case]:
    made = []
    for stage, rows in TABLE.items():
        for kind, root, errnos in rows:
            for err in errnos:
                made.append(Case(stage, kind, root, err, permanent=False))
            if (stage, kind) in SECOND_CALL and root == "outbox":
                made.append(Case(stage, kind, root, errnos[0], permanent=False, nth=2))
            # Permanent: one healable and one unhealable errno per row where it has both.
            healable = [e for e in errnos if e in HEALABLE]
            unhealable = [e for e in errnos if e not in HEALABLE]
            for err in (healable[:1] + unhealable[:1]):
                made.append(Case(stage, kind, root, err, permanent=True))
    return made


# --------------------------------------------------------------------------- helpers


def drop(inbox: Path, names: List[str]) -> None:
    rgb = pattern(48, 32, (0.25, 0.25, 0.75, 0.75))
    for name in names:
        final = inbox / name
        hidden = final.with_name("." + final.name)
        if name in BAD:
            hidden.parent.mkdir(parents=True, exist_ok=True)
            hidden.write_bytes(b"not an image at all")
        else:
            save(rgb, hidden, "PNG")
        hidden.rename(final)


def folder(daemon, root: str) -> Path:
    paths = daemon.cfg.paths
    if root == "work":
        return paths.inbox / ".rmbgd" / "work" / daemon.instance
    return getattr(paths, root)


def rel_input(daemon, record: dict) -> str:
    return os.path.relpath(record["input"], daemon.cfg.paths.inbox)


def finished(*daemons) -> Dict[str, str]:
    """input -> the event that ended it (file_done / file_failed), over all runs."""
    ended: Dict[str, str] = {}
    for daemon in daemons:
        for record in daemon.events(*TERMINAL):
            ended[rel_input(daemon, record)] = record["event"]
    return ended


def finished_or_waiting(daemon) -> bool:
    ended = finished(daemon)
    waiting = {rel_input(daemon, r) for r in daemon.events("file_retry", "claim_failed")}
    return all(n in ended or n in waiting for n in INPUTS)


def files_below(top: Path) -> List[str]:
    return sorted(os.path.relpath(os.path.join(d, n), top) for d, _, names in os.walk(top) for n in names)


def assert_each_input_exactly_once(paths, may_fail_good: bool) -> None:
    outputs = files_below(paths.outbox)
    done = files_below(paths.done)
    errors = files_below(paths.errors)
    rejected = sorted(n for n in errors if not n.endswith(".error.json"))
    assert sorted(n + ".error.json" for n in rejected) == sorted(n for n in errors if n.endswith(".error.json")), \
        f"every rejected input has its sidecar: {errors}"
    assert sorted(done + rejected) == sorted(INPUTS), f"each input once in done/ or errors/: done={done} errors={errors}"
    expected = sorted([n for n in done] + [n[: -len(".png")] + ".mask.png" for n in done])
    assert outputs == expected, f"one result and mask per finished input, no temps, no -N duplicates: {outputs}"
    assert set(BAD) <= set(rejected)
    if not may_fail_good:
        assert sorted(done) == sorted(GOOD), f"good inputs were failed: {rejected}"
    for name in rejected:
        sidecar = json.loads((paths.errors / (name + ".error.json")).read_text())
        assert sidecar["error"] and sidecar["stage"]


def assert_nothing_left(paths) -> None:
    leftovers = []
    for top in (paths.outbox, paths.errors, paths.done):
        leftovers += [n for n in files_below(top) if TEMP_SUFFIX in n or os.path.basename(n).startswith(".")]
    inbox = [n for n in files_below(paths.inbox) if not n.startswith(os.path.join(".rmbgd", "state"))]
    assert leftovers == [] and inbox == [], f"left behind: temps={leftovers} inbox/work={inbox}"


def assert_healthy(daemon) -> None:
    assert daemon.crashes() == [], daemon.crashes()
    assert daemon.alive(), "the daemon stopped on its own"


def may_fail_good(case: Case) -> bool:
    """Whether a good input may legitimately end in errors/ in this case."""
    if case.stage == "decode-open":
        return True  # an unreadable input is the input's failure
    if case.stage != "publish":
        return False  # claims are retried, finishing and rejections wait: nothing is blamed
    if case.err in NAME:
        return True
    # A destination a retry cannot heal fails after a few attempts, if the fault outlasts them.
    return case.permanent and case.err not in HEALABLE


# --------------------------------------------------------------------------- the table


@pytest.mark.parametrize("case", cases(), ids=lambda c: c.id)
def test_fault(case: Case, inprocess, faultfs):
    first = inprocess.start(instance=FIRST, **SECTIONS)
    paths = first.cfg.paths
    under = folder(first, case.root) / ("sub" if case.permanent else "")
    fault = faultfs.fail(case.kind, under, case.err, nth=case.nth, times=None if case.permanent else 1)
    drop(paths.inbox, INPUTS)

    if case.permanent:
        # Files outside sub/ are not held up; those inside are finished, or tried and waiting.
        first.wait_until(lambda: all(n in finished(first) for n in INPUTS if "/" not in n),
                         what="the files outside the faulty folder")
        first.wait_until(lambda: finished_or_waiting(first), what="every file finished or waiting")
    else:
        first.wait_until(lambda: len(finished(first)) == len(INPUTS), what="every file finished")
    assert fault.fired >= 1, "the fault never fired: this case tests nothing"
    assert_healthy(first)
    assert first.stop() == 0
    ended = finished(first)
    claimed = [n for n in INPUTS if n not in ended and not os.path.lexists(paths.inbox / n)]
    assert first.events("stopped")[-1]["in_flight"] == len(claimed), "stopped.in_flight counts what stays claimed"

    faultfs.clear()
    second = inprocess.start(instance=SECOND, **SECTIONS)
    second.wait_until(lambda: len(finished(first, second)) == len(INPUTS), what="every file after the restart")
    assert_healthy(second)
    assert second.stop() == 0
    assert second.events("stopped")[-1]["in_flight"] == 0
    assert_each_input_exactly_once(paths, may_fail_good(case))
    assert_nothing_left(paths)


def recovery_cases() -> List[Case]:
    return [Case("recovery", kind, root, err, permanent=False)
            for kind, root, errnos in RECOVERY for err in errnos]


@pytest.mark.parametrize("case", recovery_cases(), ids=lambda c: c.id)
def test_recovery_fault(case: Case, inprocess, faultfs):
    # Leave every good file claimed, published but not moved to done/ (a full done/).
    first = inprocess.start(instance=FIRST, **SECTIONS)
    paths = first.cfg.paths
    stuck = faultfs.fail("link", paths.done, E.ENOSPC, times=None)
    drop(paths.inbox, INPUTS)
    first.wait_until(lambda: finished_or_waiting(first), what="every file finished or waiting")
    assert first.stop() == 0
    assert stuck.fired >= len(GOOD)
    assert len(files_below(paths.outbox)) == 2 * len(GOOD), "published before the stop"
    faultfs.clear()

    # The second instance adopts them and finishes them while its start-up meets the fault.
    under = paths.inbox / ".rmbgd" / "work" / SECOND if case.root == "work" else getattr(paths, case.root)
    fault = faultfs.fail(case.kind, under, case.err, times=1)
    second = inprocess.start(instance=SECOND, **SECTIONS)
    second.wait_until(lambda: len(finished(first, second)) == len(INPUTS), what="every file after the restart")
    assert fault.fired == 1
    assert_healthy(second)
    assert second.stop() == 0
    assert second.events("stopped")[-1]["in_flight"] == 0
    assert_each_input_exactly_once(paths, may_fail_good=False)
    assert_nothing_left(paths)


# --------------------------------------------------------------------------- named regressions


def test_regression_unhealable_output_error_does_not_stall_other_files(inprocess):
    """Finding 2: a file at outbox/blocked makes outbox/blocked/x.png unwritable for good; the
    inputs bound for it used to hold every in-flight slot, retried forever."""
    daemon = inprocess.start(pipeline={"max_in_flight": 4})
    paths = daemon.cfg.paths
    (paths.outbox / "blocked").write_bytes(b"a file where a folder should be")
    blocked = [f"blocked/b{i:02d}.png" for i in range(10)]
    ok = [f"ok/k{i:02d}.png" for i in range(12)]
    drop_good(paths.inbox, blocked + ok)

    daemon.wait_until(lambda: {rel_input(daemon, r) for r in daemon.events("file_done")} >= set(ok),
                      what="every file whose destination works")
    failed = daemon.wait_count(("file_failed",), len(blocked))
    assert sorted(rel_input(daemon, r) for r in failed) == blocked
    for record in failed:
        assert record["stage"] == "write"
        assert "File exists" in record["error"] or "Not a directory" in record["error"], record["error"]
        assert "(tried 3 times)" in record["error"]
        sidecar = json.loads(Path(record["sidecar"]).read_text())
        assert sidecar["stage"] == "write" and sidecar["error"] == record["error"]
    assert daemon.stop() == 0
    stopped = daemon.events("stopped")[-1]
    assert (stopped["processed"], stopped["failed"], stopped["in_flight"]) == (12, 10, 0)
    assert daemon.crashes() == []
    assert files_below(paths.outbox) == ["blocked"] + sorted(n for n in ok)
    assert sorted(n for n in files_below(paths.errors) if not n.endswith(".json")) == blocked


def test_regression_healable_write_error_parks_and_other_files_flow(inprocess, faultfs):
    """Finding 2, the healable side: a full filesystem under outbox/full keeps its files
    waiting (not failed), but they give back their slots, so the rest flows meanwhile."""
    daemon = inprocess.start(pipeline={"max_in_flight": 4})
    paths = daemon.cfg.paths
    full = faultfs.fail("open_write", paths.outbox / "full", E.ENOSPC, times=None)
    waiting = [f"full/f{i}.png" for i in range(6)]
    ok = [f"ok/k{i:02d}.png" for i in range(12)]
    drop_good(paths.inbox, waiting)
    daemon.wait_until(lambda: {rel_input(daemon, r) for r in daemon.events("file_retry")} >= set(waiting),
                      what="every file of the full folder waiting")
    drop_good(paths.inbox, ok)
    daemon.wait_until(lambda: {rel_input(daemon, r) for r in daemon.events("file_done")} >= set(ok),
                      what="the other files, while the full folder is still full")
    assert daemon.events("file_failed") == []
    # At most max_in_flight (4) waiting files keep their result parked; the other two keep
    # their slots, and two slots still carry the rest.
    assert {rel_input(daemon, r) for r in daemon.events("file_retry") if r["parked"]}
    assert full.fired >= len(waiting)

    faultfs.clear()  # space again
    daemon.wait_count(("file_done",), len(waiting) + len(ok))
    assert daemon.stop() == 0
    stopped = daemon.events("stopped")[-1]
    assert (stopped["processed"], stopped["failed"], stopped["in_flight"]) == (18, 0, 0)
    assert daemon.crashes() == []
    assert files_below(paths.outbox) == sorted(waiting + ok)
    assert_nothing_left(paths)


def drop_good(inbox: Path, names: List[str]) -> None:
    rgb = pattern(40, 30, (0.2, 0.2, 0.8, 0.8))
    for name in names:
        final = inbox / name
        hidden = final.with_name("." + final.name)
        save(rgb, hidden, "PNG")
        hidden.rename(final)


def malformed_intents(root: Path) -> Dict[str, object]:
    secret = root / "outside" / "secret.png"
    secret.parent.mkdir(parents=True, exist_ok=True)
    save(pattern(8, 8, (0, 0, 1, 1)), secret, "PNG")
    st = secret.stat()
    outbox = root / "outbox"
    return {
        "a-list": [1, 2, 3],
        "no-target": {"files": [{"temp": "x", "suffix": ".png", "ino": 1, "dev": 2}]},
        "target-not-a-string": {"target": 5, "files": []},
        "files-not-a-list": {"target": str(outbox / "x.png"), "files": "x"},
        "entry-missing-keys": {"target": str(outbox / "x.png"), "files": [{}]},
        "ino-not-a-number": {"target": str(outbox / "x.png"),
                             "files": [{"temp": str(outbox / ".d.0123.rmbgd-tmp"), "suffix": ".png", "ino": "1", "dev": 2}]},
        # Points at a file outside the outbox: never linked into it, never removed.
        "temp-outside-the-outbox": {"target": str(outbox / "x.png"),
                                    "files": [{"temp": str(secret), "suffix": ".png", "ino": st.st_ino, "dev": st.st_dev}]},
        "old-format-missing-ino": {"target": str(outbox / "x.png"), "temp": str(outbox / ".d.0123.rmbgd-tmp")},
    }


@pytest.mark.parametrize("shape", sorted(malformed_intents(Path("/nonexistent-root"))))
def test_regression_malformed_intent_is_ignored_and_the_file_processed_again(shape, inprocess, tmp_path):
    """Finding 8: an intent that is valid JSON of the wrong shape raised KeyError at start-up."""
    from rmbgd.intake.workarea import Claim

    inbox = tmp_path / "inbox"
    dead = inbox / ".rmbgd" / "work" / "dead-instance"
    claim = Claim(rel=Path("x.png"), path=dead / "x.png")
    save(pattern(40, 30, (0.2, 0.2, 0.8, 0.8)), claim.path, "PNG")
    claim.intent.write_text(json.dumps(malformed_intents(tmp_path)[shape]))
    secret = tmp_path / "outside" / "secret.png"
    secret_bytes = secret.read_bytes()

    daemon = inprocess.start()
    done = daemon.wait_for("file_done", lambda r: r["input"].endswith("/x.png"))
    assert "recovered" not in done, "nothing was finished from the intent"
    assert daemon.events("intent_malformed")
    assert daemon.stop() == 0
    assert daemon.crashes() == []
    paths = daemon.cfg.paths
    assert files_below(paths.outbox) == ["x.png"] and files_below(paths.done) == ["x.png"]
    assert (paths.outbox / "x.png").read_bytes() != secret_bytes
    assert secret.read_bytes() == secret_bytes and secret.stat().st_nlink == 1
    assert_nothing_left(paths)


def test_regression_temps_removed_before_linking_are_retried_not_an_assertion(tmp_path, monkeypatch):
    """Finding 8: publisher.py asserted that its temps still existed when it linked them; a
    foreign clean-up in between raised AssertionError. Now it is an OSError the pipeline
    retries, and the next attempt publishes normally."""
    from rmbgd.config import PathsConfig
    from rmbgd.output.publisher import Publisher
    from rmbgd.output.files import OutputFile
    from rmbgd.intake.workarea import WorkArea

    paths = PathsConfig(inbox=tmp_path / "inbox", outbox=tmp_path / "outbox", errors=tmp_path / "errors",
                        done=tmp_path / "done")
    for folder_ in (paths.inbox, paths.outbox, paths.errors, paths.done):
        folder_.mkdir()
    (paths.inbox / "x.jpg").write_bytes(b"ORIGINAL")
    work = WorkArea(paths.inbox, instance="me")
    work.open()
    claim = work.claim(paths.inbox / "x.jpg")
    publisher = Publisher(paths, owner="me")
    outputs = [OutputFile(".png", b"PNG-BYTES"), OutputFile(".mask.png", b"MASK-BYTES")]
    write_intent = publisher._write_intent

    def intent_then_foreign_cleanup(claim_, intent):
        write_intent(claim_, intent)
        for entry in intent["files"]:
            os.unlink(entry["temp"])

    monkeypatch.setattr(publisher, "_write_intent", intent_then_foreign_cleanup)
    with pytest.raises(OSError):
        publisher.deliver(claim, outputs)
    assert files_below(paths.outbox) == [] and claim.path.exists()
    monkeypatch.undo()
    delivered = publisher.deliver(claim, outputs)
    assert (delivered.output.name, [p.name for p in delivered.extra]) == ("x.png", ["x.mask.png"])
    assert files_below(paths.outbox) == ["x.mask.png", "x.png"]
    assert files_below(paths.done) == ["x.jpg"]
    assert not claim.intent.exists()
