"""The status file: atomic rewrites, throttling, liveness, and `rmbgd status`."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from rmbgd.config import parse_config
from rmbgd.ops import statusdoc, statusfile
from rmbgd.ops.liveness import judge, list_instances, prune
from rmbgd.ops.ratemeter import RateMeter
from rmbgd.ops.statusdoc import human_duration, read_status, summary_line
from rmbgd.ops.statusfile import StatusWriter, default_state_dir
from rmbgd.ops.statusreport import EXIT_NOT_RUNNING, EXIT_RUNNING, EXIT_UNKNOWN, report
from tests.support.daemon import REPO
from tests.support.logcapture import CapturedLog


class FakeClock:
    def __init__(self, start: float = 1000.0) -> None:
        self.now = start

    def __call__(self) -> float:
        return self.now


def dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def rmbgd(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "rmbgd", *args],
        capture_output=True, text=True, timeout=120, cwd=str(REPO),
    )


def other_doc(tmp_path: Path, name: str, **fields) -> Path:
    """A status file as another instance would have left it."""
    writer = StatusWriter(tmp_path, instance=name)
    doc = writer.snapshot()
    doc.update(fields)
    path = tmp_path / f"{name}.json"
    statusfile.write_atomically(path, doc)
    return path


# --------------------------------------------------------------------------- writing


def test_writes_a_complete_document_atomically(tmp_path):
    state = tmp_path / "state"
    w = StatusWriter(state, config=Path("/etc/rmbgd/config.yaml"))
    assert w.set_state("loading", model="ZhengPeng7/BiRefNet", device="cuda:0")
    doc = read_status(w.path)
    assert w.path.parent == state and w.path.name == f"{w.instance}.json"
    assert doc["state"] == "loading"
    assert doc["pid"] == os.getpid() and doc["host"] == statusdoc.short_hostname()
    assert doc["config"] == "/etc/rmbgd/config.yaml"
    assert doc["model"] == "ZhengPeng7/BiRefNet" and doc["device"] == "cuda:0"
    for key in ("started", "updated", "uptime_seconds", "processed", "failed", "queued", "in_flight",
                "rate", "last_error"):
        assert key in doc
    # Nothing but the document itself: the temporary file was renamed over it.
    assert sorted(p.name for p in state.iterdir()) == [w.path.name]
    assert oct(w.path.stat().st_mode & 0o777) in ("0o644", "0o640", "0o600")


def test_tick_rewrites_on_change_at_most_once_a_second_and_on_heartbeat(tmp_path):
    mono = FakeClock()
    w = StatusWriter(tmp_path, monotonic=mono)
    writes = []
    real_write = w.write

    def counting_write():
        writes.append(mono.now)
        return real_write()

    w.write = counting_write
    w.tick(0, 0, 0, 0)
    assert writes == [1000.0]
    mono.now += 0.5
    w.tick(1, 0, 0, 0)                       # changed, but too soon
    assert len(writes) == 1
    mono.now += 0.6
    w.tick(1, 0, 0, 0)                       # the change is now due
    assert len(writes) == 2 and read_status(w.path)["processed"] == 1
    mono.now += 5
    w.tick(1, 0, 0, 0)                       # unchanged: nothing to say yet
    assert len(writes) == 2
    mono.now += statusdoc.HEARTBEAT_SECONDS
    w.tick(1, 0, 0, 0)                       # heartbeat
    assert len(writes) == 3


def test_record_error_from_any_thread_shows_at_next_write(tmp_path):
    w = StatusWriter(tmp_path)
    w.set_state("ready")
    w.record_error(Path("/srv/in/a.jpg"), "decode", "cannot identify image file")
    w.write()
    error = read_status(w.path)["last_error"]
    assert error["input"] == "/srv/in/a.jpg" and error["stage"] == "decode"
    assert error["error"] == "cannot identify image file" and error["time"].endswith("Z")


def test_an_unwritable_folder_is_logged_once_and_never_raises(tmp_path):
    (tmp_path / "file").write_text("")
    log = CapturedLog()
    w = StatusWriter(tmp_path / "file" / "state", log=log)
    assert w.set_state("ready") is False
    w.tick(1, 2, 3, 4)
    assert w.write() is False
    assert w.close() is False
    assert log.names() == ["status_write_failed"]


def test_close_leaves_a_stopped_document(tmp_path):
    w = StatusWriter(tmp_path)
    w.set_state("ready")
    w.tick(5, 1, 0, 0)
    w.close()
    doc = read_status(w.path)
    assert doc["state"] == "stopped" and doc["processed"] == 5 and doc["failed"] == 1
    assert judge(doc)[0] is False


def test_read_status_rejects_other_files(tmp_path):
    (tmp_path / "x.json").write_text('{"hello": 1}')
    (tmp_path / "y.json").write_text("not json")
    with pytest.raises(ValueError):
        read_status(tmp_path / "x.json")
    with pytest.raises(ValueError):
        read_status(tmp_path / "y.json")
    with pytest.raises(OSError):
        read_status(tmp_path / "missing.json")
    assert list_instances(tmp_path) == []


# --------------------------------------------------------------------------- rate and summary


def test_rate_meter_over_a_sliding_window():
    clock = FakeClock(0.0)
    meter = RateMeter(window_seconds=60.0, clock=clock)
    meter.add(0)
    assert meter.rate() is None
    clock.now = 10.0
    meter.add(20)
    assert meter.rate() == pytest.approx(2.0)
    assert meter.eta_seconds(10) == pytest.approx(5.0)
    assert meter.eta_seconds(0) == 0.0
    # A burst long ago no longer counts once it has left the window.
    for t in range(11, 200):
        clock.now = float(t)
        meter.add(20)
    assert meter.rate() == 0.0
    assert meter.eta_seconds(5) is None


def test_summary_line():
    doc = {"processed": 120, "failed": 2, "queued": 14, "in_flight": 8, "rate": 3.21, "eta_seconds": 7.0}
    assert summary_line(doc) == (
        "processed 120, failed 2, queued 14, in flight 8, 3.2 img/s, backlog done in ~7 s"
    )
    assert summary_line({}) == "processed 0, failed 0, queued 0, in flight 0"


def test_writer_summary_includes_the_rate(tmp_path):
    mono = FakeClock(0.0)
    w = StatusWriter(tmp_path, monotonic=mono)
    w.tick(0, 0, 4, 2)
    mono.now = 2.0
    w.tick(3, 1, 4, 2)
    assert w.summary() == "processed 3, failed 1, queued 4, in flight 2, 2.0 img/s, backlog done in ~3 s"


@pytest.mark.parametrize(
    "seconds, shown",
    [(0, "0 s"), (59.4, "59 s"), (61, "1 min 01 s"), (600, "10 min"), (3 * 3600 + 5 * 60, "3 h 05 min"),
     (2 * 86400 + 4 * 3600, "2 d 4 h")],
)
def test_human_duration(seconds, shown):
    assert human_duration(seconds) == shown


# --------------------------------------------------------------------------- liveness


def test_judge_this_process_as_running(tmp_path):
    w = StatusWriter(tmp_path)
    assert judge(w.snapshot()) == (True, "")


def test_judge_a_dead_process(tmp_path):
    doc = read_status(other_doc(tmp_path, "x", pid=dead_pid(), proc_start=None))
    running, note = judge(doc)
    assert running is False and "without stopping cleanly" in note


def test_judge_a_reused_pid_as_dead(tmp_path):
    # Our own pid, but a start time that is not ours: the original process is gone.
    doc = read_status(other_doc(tmp_path, "x", proc_start=12345678901))
    assert judge(doc)[0] is False


def test_judge_after_a_reboot(tmp_path):
    if statusdoc.boot_id() is None:
        pytest.skip("no boot id on this system")
    doc = read_status(other_doc(tmp_path, "x", boot_id="00000000-0000-0000-0000-000000000000"))
    running, note = judge(doc)
    assert running is False and "rebooted" in note


def test_judge_a_hung_instance_on_this_host(tmp_path):
    doc = read_status(other_doc(tmp_path, "x"))
    running, note = judge(doc, now=doc["updated_unix"] + 600)
    assert running is True and "hung" in note


def test_judge_other_hosts_by_the_age_of_their_file(tmp_path):
    doc = read_status(other_doc(tmp_path, "x", host="elsewhere", pid=1))
    assert judge(doc, now=doc["updated_unix"] + 5) == (True, "on host elsewhere")
    running, note = judge(doc, now=doc["updated_unix"] + 600)
    assert running is None and "silent" in note


def test_prune_removes_only_this_hosts_finished_instances(tmp_path):
    dead = other_doc(tmp_path, "dead", pid=dead_pid(), proc_start=None)
    stopped = other_doc(tmp_path, "stopped", state="stopped")
    remote = other_doc(tmp_path, "remote", host="elsewhere", state="stopped")
    live = other_doc(tmp_path, "live")
    foreign = tmp_path / "notes.txt"
    foreign.write_text("keep me")
    assert sorted(prune(tmp_path)) == sorted([dead, stopped])
    assert remote.exists() and live.exists() and foreign.exists()


def test_a_new_instance_prunes_at_its_first_write(tmp_path):
    dead = other_doc(tmp_path, "dead", pid=dead_pid(), proc_start=None)
    w = StatusWriter(tmp_path)
    w.set_state("starting")
    assert not dead.exists() and w.path.exists()


def test_list_instances_puts_live_ones_first(tmp_path):
    other_doc(tmp_path, "old", state="stopped")
    other_doc(tmp_path, "live")
    assert [i.doc["instance"] for i in list_instances(tmp_path)] == ["live", "old"]
    assert list_instances(tmp_path / "missing") == []


# --------------------------------------------------------------------------- report and CLI


def test_default_state_dir(tmp_path):
    paths = {"paths": {"inbox": "in", "outbox": "out", "errors": "err", "done": None}}
    cfg = parse_config(paths, tmp_path)
    assert default_state_dir(cfg) == tmp_path / "in" / ".rmbgd" / "state"
    cfg = parse_config({**paths, "state": {"dir": "/var/lib/rmbgd"}}, tmp_path)
    assert default_state_dir(cfg) == Path("/var/lib/rmbgd")


def test_report_without_any_status_file(tmp_path):
    text, code = report(tmp_path / "state")
    assert code == EXIT_NOT_RUNNING
    assert text.startswith("rmbgd is not running: no status file in")


def test_report_of_a_running_instance(tmp_path):
    w = StatusWriter(tmp_path, config=Path("/etc/rmbgd/config.yaml"))
    w.set_state("ready", model="m", device="cuda:0")
    w.record_error("/srv/in/bad.jpg", "decode", "truncated")
    w.tick(10, 1, 3, 2)
    w.write()
    text, code = report(tmp_path)
    assert code == EXIT_RUNNING
    lines = text.splitlines()
    assert lines[0].startswith(f"rmbgd {w.instance}: running, ready (pid {os.getpid()}, up ")
    assert "  model:      m on cuda:0" in lines
    assert "  files:      10 processed, 1 failed, 3 queued, 2 in flight" in lines
    (error,) = [line for line in lines if line.startswith("  last error: ")]
    assert error.endswith(" /srv/in/bad.jpg (decode): truncated")


def test_report_shows_http_counts_only_when_the_api_is_on(tmp_path):
    w = StatusWriter(tmp_path)
    w.set_state("ready", model="m", device="cpu")
    w.write()
    assert "http:" not in report(tmp_path)[0]
    w.set_http({"requests": 5, "in_flight": 1, "by_status": {"200": 3, "422": 1, "503": 1},
                "images_done": 3, "images_failed": 1})
    w.write()
    text, _ = report(tmp_path)
    assert "  http:       5 requests (200: 3, 422: 1, 503: 1), 3 images done, 1 failed, 1 in flight" in text.splitlines()
    assert json.loads(report(tmp_path, as_json=True)[0])["instances"][0]["http"]["requests"] == 5


def test_report_when_the_last_instance_died(tmp_path):
    other_doc(tmp_path, "gone", pid=dead_pid(), proc_start=None, processed=7)
    text, code = report(tmp_path)
    assert code == EXIT_NOT_RUNNING
    lines = text.splitlines()
    assert lines[0].startswith("rmbgd is not running")
    assert lines[1].startswith("rmbgd gone: dead")
    assert "without stopping cleanly" in text and "7 processed" in text


def test_report_json(tmp_path):
    w = StatusWriter(tmp_path)
    w.set_state("ready")
    text, code = report(tmp_path, as_json=True)
    data = json.loads(text)
    assert code == EXIT_RUNNING and data["running"] is True
    (inst,) = data["instances"]
    assert inst["running"] is True and inst["pid"] == os.getpid() and inst["file"] == str(w.path)


def test_report_on_an_unreadable_folder(tmp_path):
    (tmp_path / "file").write_text("")
    text, code = report(tmp_path / "file")
    assert code == EXIT_UNKNOWN and "cannot read the state folder" in text


def test_status_command(tmp_path):
    state = tmp_path / "state"
    config = tmp_path / "config.yaml"
    config.write_text(yaml.safe_dump({
        "paths": {"inbox": str(tmp_path / "in"), "outbox": str(tmp_path / "out"),
                  "errors": str(tmp_path / "err"), "done": None},
        "state": {"dir": str(state)},
    }))
    result = rmbgd("status", "--config", str(config))
    assert result.returncode == 3 and "not running" in result.stdout

    # This test process plays the daemon: its pid is alive.
    w = StatusWriter(state, config=config)
    w.set_state("ready", model="m", device="cpu")
    result = rmbgd("status", "--config", str(config))
    assert result.returncode == 0, result.stdout + result.stderr
    assert f"running, ready (pid {os.getpid()}" in result.stdout

    result = rmbgd("status", "--state-dir", str(state), "--json")
    assert result.returncode == 0
    assert json.loads(result.stdout)["instances"][0]["model"] == "m"

    w.close()
    result = rmbgd("status", "--config", str(config))
    assert result.returncode == 3
    assert result.stdout.splitlines()[1].startswith(f"rmbgd {w.instance}: stopped")


def test_status_command_usage_errors(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("paths: {}\nstate:\n  dir: 5\n")
    result = rmbgd("status", "--config", str(bad))
    assert result.returncode == 2 and "state.dir: expected a string or null, got 5" in result.stderr
    assert "Traceback" not in result.stderr
    result = rmbgd("status")
    assert result.returncode == 2 and "--config" in result.stderr


def test_status_help():
    result = rmbgd("status", "--help")
    assert result.returncode == 0 and "usage: rmbgd status" in result.stdout


def test_tick_says_when_it_wrote(tmp_path):
    mono = FakeClock()
    w = StatusWriter(tmp_path, monotonic=mono)
    assert w.tick(0, 0, 0, 0) is True
    assert w.tick(0, 0, 0, 0) is False
    mono.now += statusdoc.HEARTBEAT_SECONDS
    assert w.tick(0, 0, 0, 0) is True


# --------------------------------------------------------------------------- a failed start


def test_regression_status_after_a_failed_start_shows_the_reason(tmp_path):
    """Finding 7: after a failed start `rmbgd status` said "dead ... gone without stopping
    cleanly" with state `loading`, and not why."""
    clock = FakeClock(1_000_000.0)
    w = StatusWriter(tmp_path, config=Path("/etc/rmbgd/config.yaml"), clock=clock)
    w.set_state("loading", model="/models/BiRefNet")
    error = "model.name: /models/BiRefNet is not a model directory (no config.json): the path does not exist"
    assert w.fail(error) is True
    doc = read_status(w.path)
    assert doc["state"] == "failed"
    assert doc["startup_error"] == {"time": statusdoc.iso(clock.now), "error": error}
    # Judged not running even though this (writing) process is alive: the state is final.
    assert judge(doc) == (False, f"failed to start: {error}")
    text, code = report(tmp_path)
    assert code == EXIT_NOT_RUNNING
    lines = text.splitlines()
    assert lines[1].startswith(f"rmbgd {w.instance}: failed (pid {os.getpid()}, ran for ")
    assert f"  note:       failed to start: {error}" in lines
    assert "  model:      /models/BiRefNet" in lines  # no device: the model never loaded
    assert "without stopping cleanly" not in text and not any(line.startswith("  files:") for line in lines)
    data = json.loads(report(tmp_path, as_json=True)[0])
    assert data["instances"][0]["startup_error"]["error"] == error


def test_a_failed_start_is_pruned_by_the_next_start(tmp_path):
    StatusWriter(tmp_path, instance="old").fail("paths.outbox: not writable")
    w = StatusWriter(tmp_path)
    w.write()
    assert sorted(p.name for p in tmp_path.iterdir()) == [w.path.name]


def test_a_failed_start_that_cannot_be_written_is_not_reported_again(tmp_path):
    (tmp_path / "file").write_text("")
    log = CapturedLog()
    w = StatusWriter(tmp_path / "file" / "state", log=log)
    assert w.fail("paths.inbox: cannot create") is False
    assert log.entries == []  # the startup_failed line that follows says it all


def test_judge_a_failed_start_without_a_reason(tmp_path):
    path = other_doc(tmp_path, "x", state="failed", startup_error=None)
    assert judge(read_status(path)) == (False, "failed to start: no reason recorded")


def test_status_and_intents_share_one_atomic_replace(tmp_path, monkeypatch):
    # One atomic-write helper (issue 13): the status file is replaced through
    # fsops.replace_atomically, temp file hidden beside it, nothing left behind.
    from rmbgd.output import fsops

    calls = []
    real = fsops.replace_atomically
    monkeypatch.setattr(statusfile, "replace_atomically", lambda path, data, temp=None: calls.append(path) or real(path, data, temp))
    path = tmp_path / "x.json"
    statusfile.write_atomically(path, {"a": 1})
    statusfile.write_atomically(path, {"a": 2})
    assert calls == [path, path]
    assert read_json_file(path) == {"a": 2}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["x.json"]


def read_json_file(path):
    import json

    return json.loads(path.read_text())
