"""The in-process harness's own promises (tests/support/inprocess.py): its watcher stops
without waiting, yet drops what comes after the stop, and one that never ends is reported."""

from __future__ import annotations

import threading
import time
from pathlib import Path

from tests.support import inprocess as harness


def test_quick_stop_watcher_drops_late_events_and_its_threads_end(tmp_path):
    seen = []
    reported = threading.Event()

    def sink(kind, path):
        seen.append(Path(path).name)
        reported.set()

    watcher = harness.QuickStopWatcher(tmp_path, sink)
    watcher.start()
    (tmp_path / "before.png").write_bytes(b"x")
    assert reported.wait(10), "the watcher reported nothing"
    watcher.stop()
    (tmp_path / "after.png").write_bytes(b"y")
    assert watcher.join(10), "the watcher's threads did not end"
    assert "after.png" not in seen
    assert harness.stuck_watchers() == 0


class _NeverEnds:
    def __init__(self, stopped_ago: float) -> None:
        self.stopped_at = time.monotonic() - stopped_ago

    def join(self, timeout: float) -> bool:
        return False


def test_a_watcher_that_outlives_the_grace_is_counted_as_stuck():
    old, recent = _NeverEnds(stopped_ago=60.0), _NeverEnds(stopped_ago=0.0)
    harness.STOPPED_WATCHERS.extend([old, recent])
    try:
        assert harness.stuck_watchers(grace=30.0) == 1
        assert harness.stuck_watchers(grace=0.0) == 2
    finally:
        harness.STOPPED_WATCHERS[:] = [w for w in harness.STOPPED_WATCHERS if w not in (old, recent)]
