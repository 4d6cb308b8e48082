"""JSON logging: journald priority prefixes and the optional log file that survives logrotate."""

from __future__ import annotations

import io
import json
import logging
import os
import shutil
import subprocess
import sys
import warnings

import threading
from pathlib import Path

import pytest
import structlog
import yaml

from rmbgd.ops import logs
from tests.support.daemon import REPO, base_config, subprocess_env, write_config
from tests.support.photos import pattern, save

READER_GONE_LINE = "rmbgd: the log reader went away (stdout: broken pipe); stopping after the files in flight"


@pytest.fixture(autouse=True)
def restore_logging():
    root = logging.getLogger()
    handlers, level = list(root.handlers), root.level
    yield
    logs.set_file(None)
    logs._reader_gone.clear()  # a broken-pipe test must not stop the next test's daemon
    root.handlers = handlers
    root.setLevel(level)
    structlog.reset_defaults()
    logging.captureWarnings(False)


def journal_env(monkeypatch, fh) -> None:
    st = os.fstat(fh.fileno())
    monkeypatch.setenv("JOURNAL_STREAM", f"{st.st_dev}:{st.st_ino}")


def lines_of(path) -> list[str]:
    return path.read_text().splitlines()


def emit_one_of_each() -> None:
    log = logs.get_logger()
    log.debug("d")
    log.info("i", n=1)
    log.warning("w")
    log.error("e", error="boom")
    log.critical("c")
    logging.getLogger("somelib.module").warning("third party")


@pytest.mark.parametrize(
    "level, priority",
    [
        (logging.DEBUG, 7),
        (logging.INFO, 6),
        (logging.WARNING, 4),
        (logging.ERROR, 3),
        (logging.CRITICAL, 2),
    ],
)
def test_journal_priority(level, priority):
    assert logs.journal_priority(level) == priority


def test_is_journal_stream_needs_the_same_device_and_inode(tmp_path):
    with open(tmp_path / "a", "w") as a, open(tmp_path / "b", "w") as b:
        st = os.fstat(a.fileno())
        env = {"JOURNAL_STREAM": f"{st.st_dev}:{st.st_ino}"}
        assert logs.is_journal_stream(a, env)
        assert not logs.is_journal_stream(b, env)
        assert not logs.is_journal_stream(a, {})
        assert not logs.is_journal_stream(a, {"JOURNAL_STREAM": "garbage"})
        assert not logs.is_journal_stream(a, {"JOURNAL_STREAM": "x:y"})
        assert not logs.is_journal_stream(io.StringIO(), env)


def test_journal_stream_lines_carry_their_priority(tmp_path, monkeypatch):
    out_path = tmp_path / "stdout"
    with open(out_path, "w") as out:
        journal_env(monkeypatch, out)
        logs.configure("debug", stream=out)
        emit_one_of_each()
    lines = lines_of(out_path)
    prefixes = [line[:3] for line in lines]
    assert prefixes == ["<7>", "<6>", "<4>", "<3>", "<2>", "<4>"]
    # What journald keeps once it has stripped the prefix is the JSON, intact.
    records = [json.loads(line[3:]) for line in lines]
    assert [r["event"] for r in records] == ["d", "i", "w", "e", "c", "third party"]
    assert records[3]["level"] == "error" and records[3]["error"] == "boom"
    assert records[5]["logger"] == "somelib.module"


def test_an_inherited_journal_stream_is_not_believed(tmp_path, monkeypatch):
    with open(tmp_path / "elsewhere", "w") as other:
        journal_env(monkeypatch, other)
    out_path = tmp_path / "stdout"
    with open(out_path, "w") as out:
        logs.configure("info", stream=out)
        logs.get_logger().error("e")
    (line,) = lines_of(out_path)
    assert json.loads(line)["event"] == "e"


def test_python_warnings_get_the_warning_priority(tmp_path, monkeypatch):
    out_path = tmp_path / "stdout"
    with open(out_path, "w") as out:
        journal_env(monkeypatch, out)
        logs.configure("info", stream=out)
        warnings.warn("deprecated thing", UserWarning)
    (line,) = lines_of(out_path)
    assert line.startswith("<4>{")


def test_the_daemon_prefixes_its_startup_failure_on_a_journal_stream(tmp_path):
    """End to end: `rmbgd run` whose stdout is the stream named by $JOURNAL_STREAM."""
    config = tmp_path / "config.yaml"
    config.write_text(yaml.safe_dump({"batch": {"size": "eight"}}))
    read_fd, write_fd = os.pipe()
    st = os.fstat(write_fd)
    env = dict(os.environ, JOURNAL_STREAM=f"{st.st_dev}:{st.st_ino}")
    try:
        proc = subprocess.run(
            [sys.executable, "-m", "rmbgd", "run", "--config", str(config)],
            stdout=write_fd, stderr=subprocess.PIPE, stdin=subprocess.DEVNULL,
            env=env, cwd=str(REPO), timeout=120,
        )
    finally:
        os.close(write_fd)
    with os.fdopen(read_fd, "r") as r:
        output = r.read()
    assert proc.returncode == 2
    (line,) = output.splitlines()
    assert line.startswith("<3>{")
    record = json.loads(line[3:])
    assert record["event"] == "startup_failed" and record["level"] == "error"


def test_log_file_gets_the_same_json_without_prefix(tmp_path, monkeypatch):
    out_path = tmp_path / "stdout"
    log_path = tmp_path / "var" / "log" / "rmbgd.jsonl"
    with open(out_path, "w") as out:
        journal_env(monkeypatch, out)
        logs.configure("info", stream=out, file=log_path)
        assert logs.log_file() == log_path
        logs.get_logger().info("hello", x=1)
        logs.get_logger().error("bad")
    stdout_lines = lines_of(out_path)
    file_lines = lines_of(log_path)
    assert [line[3:] for line in stdout_lines] == file_lines
    assert json.loads(file_lines[0])["x"] == 1


def test_log_file_follows_logrotate_without_a_signal(tmp_path):
    log_path = tmp_path / "rmbgd.jsonl"
    logs.configure("info", stream=io.StringIO(), file=log_path)
    log = logs.get_logger()
    log.info("before")
    # logrotate's default: rename, then (create or not) the daemon must write a new file.
    log_path.rename(tmp_path / "rmbgd.jsonl.1")
    log.info("after rename")
    log_path.unlink()
    log.info("after delete")
    assert [json.loads(x)["event"] for x in lines_of(tmp_path / "rmbgd.jsonl.1")] == ["before"]
    assert [json.loads(x)["event"] for x in lines_of(log_path)] == ["after delete"]


def test_copytruncate_keeps_appending_at_the_start(tmp_path):
    log_path = tmp_path / "rmbgd.jsonl"
    logs.configure("info", stream=io.StringIO(), file=log_path)
    log = logs.get_logger()
    log.info("before")
    shutil.copy(log_path, tmp_path / "rmbgd.jsonl.1")
    with open(log_path, "r+") as fh:
        fh.truncate(0)
    log.info("after")
    # Opened for appending, so no hole of NUL bytes where the old lines were.
    assert [json.loads(x)["event"] for x in lines_of(log_path)] == ["after"]


def test_reopen_starts_a_new_file_at_once(tmp_path):
    log_path = tmp_path / "rmbgd.jsonl"
    logs.configure("info", stream=io.StringIO(), file=log_path)
    logs.get_logger().info("one")
    log_path.rename(tmp_path / "old.jsonl")
    logs.reopen()
    assert log_path.exists() and log_path.read_text() == ""
    logs.get_logger().info("two")
    assert [json.loads(x)["event"] for x in lines_of(log_path)] == ["two"]
    assert [json.loads(x)["event"] for x in lines_of(tmp_path / "old.jsonl")] == ["one"]


def test_reopen_without_a_file_does_nothing():
    logs.configure("info", stream=io.StringIO())
    logs.reopen()
    assert logs.log_file() is None


def test_set_file_switches_and_stops(tmp_path):
    out = io.StringIO()
    logs.configure("info", stream=out, file=tmp_path / "a.jsonl")
    logs.get_logger().info("to a")
    logs.set_file(tmp_path / "b.jsonl")
    logs.get_logger().info("to b")
    logs.set_file(None)
    logs.get_logger().info("stdout only")
    assert [json.loads(x)["event"] for x in lines_of(tmp_path / "a.jsonl")] == ["to a"]
    assert [json.loads(x)["event"] for x in lines_of(tmp_path / "b.jsonl")] == ["to b"]
    assert [json.loads(x)["event"] for x in out.getvalue().splitlines()] == ["to a", "to b", "stdout only"]
    assert len([h for h in logging.getLogger().handlers if isinstance(h, logging.FileHandler)]) == 0


def test_set_file_that_cannot_be_opened_keeps_the_old_one(tmp_path):
    logs.configure("info", stream=io.StringIO(), file=tmp_path / "a.jsonl")
    (tmp_path / "plain").write_text("")
    with pytest.raises(OSError):
        logs.set_file(tmp_path / "plain" / "x.jsonl")
    assert logs.log_file() == tmp_path / "a.jsonl"
    logs.get_logger().info("still here")
    assert [json.loads(x)["event"] for x in lines_of(tmp_path / "a.jsonl")] == ["still here"]


def test_an_unwritable_log_file_is_reported_once_and_never_raises(tmp_path):
    out = io.StringIO()
    folder = tmp_path / "logs"
    logs.configure("info", stream=out, file=folder / "rmbgd.jsonl")
    log = logs.get_logger()
    log.info("one")
    shutil.rmtree(folder)
    log.info("two")
    log.info("three")
    events = [json.loads(x)["event"] for x in out.getvalue().splitlines()]
    assert events == ["one", "two", "log_file_failed", "three"]
    failure = json.loads(out.getvalue().splitlines()[2])
    assert failure["level"] == "error" and failure["file"] == str(folder / "rmbgd.jsonl")
    # Once the folder is back, lines flow to the file again.
    folder.mkdir()
    log.info("four")
    assert [json.loads(x)["event"] for x in lines_of(folder / "rmbgd.jsonl")] == ["four"]


# A real daemon's logging.file (the same lines as its stdout): test_daemon.py's
# test_mix_of_images_batched_with_known_masks, which runs one anyway.


# --------------------------------------------------------------------------- the reader goes away


def test_a_broken_stdout_pipe_is_said_once_on_stderr_and_raises_the_flag(capsys):
    read_fd, write_fd = os.pipe()
    os.close(read_fd)
    with os.fdopen(write_fd, "w") as out:
        logs.configure("info", stream=out)
        assert not logs.reader_gone()
        log = logs.get_logger()
        log.info("one")
        log.error("two", error="boom")
        logging.getLogger("somelib").warning("three")
        warnings.warn("four", UserWarning)
        assert logs.reader_gone()
        # The descriptor now points at /dev/null: the final flush at exit cannot fail again.
        out.write("buffered remainder\n")
        out.flush()
    captured = capsys.readouterr()
    assert captured.err.splitlines() == [READER_GONE_LINE]
    assert captured.out == ""


def test_other_stdout_errors_are_not_taken_for_a_gone_reader(capsys):
    class Full(io.StringIO):
        def write(self, text):
            raise OSError(28, "No space left on device")

    logs.configure("info", stream=Full())
    logs.get_logger().info("one")
    assert not logs.reader_gone()
    assert READER_GONE_LINE not in capsys.readouterr().err


def rmbgd_popen(args: list, hf_home: Path) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-m", "rmbgd", *args],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, stdin=subprocess.DEVNULL,
        env=subprocess_env(hf_home), cwd=str(REPO),
    )


def read_until(proc: subprocess.Popen, event: str, timeout: float = 120.0) -> list:
    """The JSON records on `proc`'s stdout up to and including the first `event`."""
    records: list = []
    found = threading.Event()

    def reader() -> None:
        for raw in proc.stdout:
            records.append(json.loads(raw))
            if records[-1].get("event") == event:
                found.set()
                return

    thread = threading.Thread(target=reader, daemon=True)
    thread.start()
    thread.join(timeout)
    assert found.is_set(), (proc.poll(), [r.get("event") for r in records])
    return records


def stderr_after_exit(proc: subprocess.Popen, timeout: float = 60.0) -> tuple[int, str]:
    code = proc.wait(timeout)
    return code, proc.stderr.read().decode("utf-8", "replace")


def drop(inbox: Path, name: str) -> None:
    hidden = save(pattern(48, 48, (0.2, 0.2, 0.8, 0.8)), inbox / f".{name}", "PNG")
    hidden.rename(inbox / name)


def test_regression_closed_log_pipe_stops_the_daemon_quietly(tmp_path, tiny_model, hf_home):
    """Finding 6: `rmbgd run | head -n1` printed a "--- Logging error ---" traceback on stderr
    for every later line. Now: one line on stderr, a drain as for SIGTERM, exit 141."""
    config = write_config(tmp_path / "config.yaml", base_config(tmp_path, tiny_model))
    proc = rmbgd_popen(["run", "--config", str(config)], hf_home)
    try:
        read_until(proc, "ready")
        proc.stdout.close()  # the reader goes away
        names = ["a.png", "b.png"]
        for name in names:
            drop(tmp_path / "inbox", name)
        code, err = stderr_after_exit(proc)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(10)
    assert code == logs.EXIT_LOG_READER_GONE == 141
    assert err.splitlines() == [READER_GONE_LINE]
    assert "Traceback" not in err and "Logging error" not in err
    # Nothing lost: each file was finished, or stays safely claimed (or not yet taken).
    work = tmp_path / "inbox" / ".rmbgd" / "work"
    for name in names:
        finished = (tmp_path / "outbox" / name).exists() and (tmp_path / "done" / name).exists()
        claimed = list(work.glob(f"*/{name}"))
        waiting = (tmp_path / "inbox" / name).exists()
        assert [finished, bool(claimed), waiting].count(True) == 1, name
    assert not any((tmp_path / "errors").iterdir())


def test_regression_closed_log_pipe_stops_rmbgd_process_quietly(tmp_path, tiny_model, hf_home):
    """Finding 6, `rmbgd process`: the same one line, the files in flight finished, exit 141."""
    config = write_config(tmp_path / "config.yaml", base_config(tmp_path, tiny_model))
    photos = tmp_path / "photos"
    for i in range(6):
        save(pattern(48, 48, (0.1, 0.1, 0.7, 0.7)), photos / f"p{i}.png", "PNG")
    before = {path.name: path.read_bytes() for path in photos.iterdir()}
    proc = rmbgd_popen(["process", str(photos), "--out", str(tmp_path / "out"), "--config", str(config)], hf_home)
    try:
        read_until(proc, "ready")
        proc.stdout.close()
        code, err = stderr_after_exit(proc)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(10)
    assert code == logs.EXIT_LOG_READER_GONE
    assert err.splitlines() == [READER_GONE_LINE]
    # Inputs are never touched; whatever was finished is complete.
    assert {path.name: path.read_bytes() for path in photos.iterdir()} == before
    outputs = list((tmp_path / "out").iterdir())
    assert all(path.suffix == ".png" and path.stat().st_size > 0 for path in outputs)
