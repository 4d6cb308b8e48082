"""`rmbgd process`'s terminal display, fed by the runner's events and the log's records directly."""

from __future__ import annotations

import io
import logging
import types
from pathlib import Path

import pytest
import structlog

from rmbgd.ops import logs
from rmbgd.runtime.progress import Report, Summary, TerminalReport


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def job(shown: str, error=None, stage=None):
    return types.SimpleNamespace(claim=types.SimpleNamespace(shown=shown), error=error, stage=stage)


def summary(**fields) -> Summary:
    base = dict(total=3, processed=2, failed=1, seconds=2.5, images_per_s=1.2, interrupted=False,
                out=Path("/results"), done=None)
    base.update(fields)
    return Summary(**base)


@pytest.fixture
def restore_logging():
    root = logging.getLogger()
    handlers, level = list(root.handlers), root.level
    yield
    root.handlers = handlers
    root.setLevel(level)
    structlog.reset_defaults()
    logging.captureWarnings(False)


def test_terminal_report_draws_the_runners_events():
    screen, clock = io.StringIO(), Clock()
    report = TerminalReport(screen, clock=clock)
    report.loading("tiny")
    report.begin(3)
    clock.now += 2.0
    report.file_finished(job("photos/bad.jpg", error="not an image", stage="decode"))
    report.file_finished(job("photos/ok.png"))
    report.tick(2, 1, force=True)
    report.summary(summary())
    text = screen.getvalue()
    assert "loading model tiny" in text
    assert "3/3  1 failed  1.5 images/s" in text, text
    assert "failed: photos/bad.jpg: not an image (stage: decode)" in text
    assert "failed: photos/ok.png" not in text
    assert "Processed 2 of 3 files in 2.5 s (1.2 images/s)." in text
    assert "1 failed (listed above); their inputs were left in place." in text
    assert "Results are in /results" in text
    assert "\r" in text and "{" not in text


def test_terminal_report_close_is_safe_before_and_after_drawing():
    report = TerminalReport(io.StringIO())
    report.close()
    report.begin(1)
    report.close()
    report.close()


def test_plain_report_shows_nothing_and_leaves_the_log_on_stdout():
    assert Report.log_sink is None


def test_regression_terminal_lines_come_from_log_records_not_reparsed_json(restore_logging):
    # Issue 13: the terminal display re-parsed rmbgd's own JSON log to find warnings and
    # errors. The log now hands it the event dicts themselves.
    screen = io.StringIO()
    report = TerminalReport(screen)
    logs.configure("info", sink=report.log_sink)
    log = logs.get_logger()
    log.warning("file_retry", input="/in/a.png", error="No space left on device")
    log.info("file_done", input="/in/b.png")
    log.error("file_failed", input="/in/c.png", error="shown from the runner's event instead")
    logging.getLogger("watchdog").warning("something %s", "odd")
    text = screen.getvalue()
    assert "warning: file_retry /in/a.png: No space left on device" in text
    assert "/in/b.png" not in text and "/in/c.png" not in text
    assert "warning: something odd" in text


def test_log_sink_gets_the_fields_a_json_line_would_hold(restore_logging):
    records = []
    logs.configure("info", sink=records.append)
    logs.get_logger().warning("owner_lock_failed", folder="/out", note="a note")
    logging.getLogger("watchdog").warning("from a library")
    try:
        raise RuntimeError("boom")
    except RuntimeError:
        logs.get_logger().critical("crashed", exc_info=True)
    ours, foreign, crash = records
    assert ours["event"] == "owner_lock_failed" and ours["level"] == "warning" and ours["folder"] == "/out"
    assert "timestamp" in ours and not any(key.startswith("_") for key in ours)
    assert foreign["event"] == "from a library" and foreign["logger"] == "watchdog" and foreign["level"] == "warning"
    assert "RuntimeError: boom" in crash["exception"]
