"""The real daemon in a background thread of the test process, with a fake model.

What is real: `rmbgd.runtime.daemon.Daemon` and everything it drives (config objects from
`rmbgd.config.parse_config`, folders under the test's tmp_path, the inotify watcher, the work
area, the pipeline and its pools, the publisher). What is fake: the segmenter (a mask computed
from the pixels, no torch: red-ish pixels opaque, blue-ish transparent, see `FakeSegmenter`)
and the retry delays (milliseconds instead of seconds). A daemon starts in well under a
second, so a test can run dozens, and can patch anything in-process (see faultfs.py).

Use it through the `inprocess` fixture (defined here; import it into the test module), which
stops every daemon a test started, even when the test fails, and fails the test if a daemon
thread does not end:

    from tests.support.inprocess import inprocess  # noqa: F401 (a fixture)

    def test_something(inprocess):
        daemon = inprocess.start(batch={"size": 4}, pipeline={"max_in_flight": 4})
        make_image(daemon.cfg.paths.inbox / "a.png")
        daemon.wait_for("file_done", lambda e: e["input"].endswith("a.png"))
        assert daemon.stop() == 0                 # SIGTERM-like drain; returns the exit code
        assert daemon.crashes() == []             # no crashed / thread_crashed / task_failed

`inprocess.start(**sections)` takes config sections as keyword arguments, merged over
`BASE_SECTIONS` (short settle and rescan times, batches of 2, 2 workers, debug logging); the
four folders live under the fixture's root (`inprocess.root`, tmp_path by default) and are
created by the daemon. `instance=` names the work-area folder (each start gets a new one by
default, so a restart adopts the previous instance's leftovers as a dead peer's);
`segmenter=` replaces the fake model; `retry_delay=` the backoff. Log events are the
structlog event dicts, captured in memory (`daemon.events(name)`, `daemon.wait_for`,
`daemon.wait_count`, `daemon.wait_until`): every wait has a timeout and fails with the last
events, never sleeps blindly.
"""

from __future__ import annotations

import copy
import itertools
import logging
import signal
import threading
import time
import traceback
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Sequence

import numpy as np
import pytest
import structlog
from PIL import Image

from rmbgd.config import Config, parse_config
from rmbgd.runtime.daemon import Daemon

WAIT_S = 30.0
JOIN_S = 30.0

BASE_SECTIONS: Dict[str, Dict[str, Any]] = {
    "watch": {"settle_seconds": 0.05, "rescan_seconds": 0.5, "writer_timeout_seconds": 5},
    "batch": {"size": 2, "max_wait_ms": 10},
    "model": {"name": "fake-segmenter", "device": "cpu", "input_size": 64},
    "pipeline": {"workers": 2},
    "logging": {"level": "debug", "progress_seconds": 0},
}

# Events that mean rmbgd itself went wrong (a bug), whatever the test does to it.
CRASH_EVENTS = ("crashed", "thread_crashed", "task_failed", "retry_failed", "model_worker_died", "watcher_died")


def fast_retry_delay(attempt: int) -> float:
    """The real backoff's shape (doubling, capped), in milliseconds instead of seconds."""
    return min(0.2, 0.02 * (2 ** (attempt - 1)))


class FakeSegmenter:
    """A segmenter the pipeline accepts (see rmbgd.model.segmenter.Segmenter): `predict` on the decoded
    model inputs, `warmup`, `device`, `dtype`. The mask is 255 where a pixel is more red than
    blue, at the original's size: deterministic, so outputs can be checked."""

    device = "cpu"
    dtype = "float32"
    splits_work = False
    resizes_on_device = False

    def __init__(self) -> None:
        self.calls = 0
        self._lock = threading.Lock()

    def warmup(self) -> None:
        return None

    def predict(self, images: Sequence[Any], sizes: Sequence[tuple], model_size: Any = None) -> List[np.ndarray]:
        with self._lock:
            self.calls += 1
        masks = []
        for image, (width, height) in zip(images, sizes):
            pixels = np.asarray(image).astype(np.int16)
            small = np.where(pixels[..., 0] > pixels[..., 2], 255, 0).astype(np.uint8)
            masks.append(np.asarray(Image.fromarray(small).resize((width, height), Image.NEAREST)))
        return masks


class LogCapture:
    """structlog events kept in memory, in order, safe to append to from any thread."""

    def __init__(self) -> None:
        self._cond = threading.Condition()
        self.records: List[dict] = []
        self.logger = structlog.wrap_logger(
            structlog.ReturnLogger(),
            processors=[
                structlog.processors.add_log_level,
                structlog.processors.format_exc_info,
                self._capture,
            ],
            wrapper_class=structlog.make_filtering_bound_logger(logging.DEBUG),
            cache_logger_on_first_use=False,
        )

    def _capture(self, logger: Any, method: str, event_dict: dict) -> dict:
        self.add(dict(event_dict))
        raise structlog.DropEvent

    def add(self, record: dict) -> None:
        with self._cond:
            self.records.append(record)
            self._cond.notify_all()

    def events(self, *names: str) -> List[dict]:
        with self._cond:
            return [r for r in self.records if r.get("event") in names]

    def wait_until(self, predicate: Callable[[], bool], timeout: float = WAIT_S, what: str = "condition",
                   alive: Callable[[], bool] = lambda: True) -> None:
        """Wait until `predicate()` holds, re-checking whenever an event is logged (and at
        least every 0.1 s, for conditions on the disk)."""
        deadline = time.monotonic() + timeout
        with self._cond:
            while not predicate():
                remaining = deadline - time.monotonic()
                if remaining <= 0 or not alive():
                    last = [r.get("event") for r in self.records[-20:]]
                    crashes = [r for r in self.records if r.get("event") in CRASH_EVENTS]
                    raise AssertionError(f"timed out after {timeout}s waiting for {what}; "
                                         f"daemon alive={alive()}; last events={last}; crashes={crashes}")
                self._cond.wait(min(remaining, 0.1))

    def wait_for(self, name: str, where: Callable[[dict], bool] = lambda r: True, timeout: float = WAIT_S,
                 alive: Callable[[], bool] = lambda: True) -> dict:
        """The first event called `name` matching `where` (already logged or still to come)."""
        found: List[dict] = []

        def seen() -> bool:
            found[:] = [r for r in self.records if r.get("event") == name and where(r)]
            return bool(found)

        self.wait_until(seen, timeout, f"event {name!r}", alive)
        return found[0]

    def wait_count(self, names: Sequence[str], count: int, timeout: float = WAIT_S,
                   alive: Callable[[], bool] = lambda: True) -> List[dict]:
        def enough() -> bool:
            return len([r for r in self.records if r.get("event") in names]) >= count

        self.wait_until(enough, timeout, f"{count} of {tuple(names)}", alive)
        return self.events(*names)


class _TestDaemon(Daemon):
    def __init__(self, cfg: Config, log: Any, instance: str, segmenter: Any,
                 retry_delay: Callable[[int], float]) -> None:
        super().__init__(cfg, log, instance=instance)
        self._segmenter = segmenter
        self.retry_delay = retry_delay

    def _load_model(self) -> Any:
        return self._segmenter


class InProcessDaemon:
    """One daemon run in a thread; see the module doc."""

    def __init__(self, cfg: Config, instance: str, segmenter: Any, retry_delay: Callable[[int], float]) -> None:
        self.cfg = cfg
        self.instance = instance
        self.log = LogCapture()
        self.segmenter = segmenter
        self.daemon = _TestDaemon(cfg, self.log.logger, instance, segmenter, retry_delay)
        self.exit_code: Optional[int] = None
        self.error: Optional[BaseException] = None
        self.thread = threading.Thread(target=self._run, name=f"inprocess-{instance}", daemon=True)

    def _run(self) -> None:
        try:
            self.exit_code = self.daemon.run()
        except BaseException as exc:  # what the CLI would log as `crashed`
            self.error = exc
            self.log.add({"event": "crashed", "level": "critical", "error": repr(exc),
                          "exception": traceback.format_exc()})

    # -- life cycle -------------------------------------------------------------------------
    def start(self, wait_ready: bool = True) -> "InProcessDaemon":
        self.thread.start()
        if wait_ready:
            self.wait_for("ready")
        return self

    def alive(self) -> bool:
        return self.thread.is_alive()

    def stop(self, timeout: float = JOIN_S) -> Optional[int]:
        """Ask for a drain, as SIGTERM does, and wait for the thread; returns the exit code."""
        if self.thread.is_alive():
            self.daemon._on_signal(signal.SIGTERM, None)
            self.thread.join(timeout)
        if self.thread.is_alive():
            raise AssertionError(f"daemon {self.instance} did not stop within {timeout}s")
        return self.exit_code

    # -- events -----------------------------------------------------------------------------
    def events(self, *names: str) -> List[dict]:
        return self.log.events(*names)

    def crashes(self) -> List[dict]:
        return self.log.events(*CRASH_EVENTS)

    def wait_for(self, name: str, where: Callable[[dict], bool] = lambda r: True, timeout: float = WAIT_S) -> dict:
        return self.log.wait_for(name, where, timeout, alive=self._still_expected(name))

    def wait_count(self, names: Sequence[str], count: int, timeout: float = WAIT_S) -> List[dict]:
        return self.log.wait_count(names, count, timeout, alive=self._still_expected(""))

    def wait_until(self, predicate: Callable[[], bool], timeout: float = WAIT_S, what: str = "condition") -> None:
        self.log.wait_until(predicate, timeout, what, alive=self._still_expected(""))

    def _still_expected(self, name: str) -> Callable[[], bool]:
        # A finished daemon logs nothing more: give up at once, unless the thread has not
        # been started (then the wait is pointless too) or the event is the last one.
        return lambda: self.thread.is_alive() or name in ("stopped", "stopping")


class InProcessDaemons:
    """Factory behind the `inprocess` fixture; stops what it started (see `close`)."""

    _numbers = itertools.count(1)

    def __init__(self, root: Path) -> None:
        self.root = root
        self.started: List[InProcessDaemon] = []

    def config(self, **sections: Dict[str, Any]) -> Config:
        data: Dict[str, Any] = copy.deepcopy(BASE_SECTIONS)
        for name, values in sections.items():
            if isinstance(values, dict) and isinstance(data.get(name), dict):
                data[name].update(values)
            else:
                data[name] = values
        data.setdefault("paths", {})
        for folder in ("inbox", "outbox", "errors", "done"):
            data["paths"].setdefault(folder, str(self.root / folder))
        return parse_config(data, self.root)

    def start(self, *, instance: Optional[str] = None, segmenter: Any = None,
              retry_delay: Callable[[int], float] = fast_retry_delay, wait_ready: bool = True,
              **sections: Dict[str, Any]) -> InProcessDaemon:
        cfg = self.config(**sections)
        name = instance or f"inproc-{next(self._numbers)}"
        daemon = InProcessDaemon(cfg, name, segmenter or FakeSegmenter(), retry_delay)
        self.started.append(daemon)
        return daemon.start(wait_ready=wait_ready)

    def close(self) -> List[str]:
        """Stop every daemon; the names of those whose thread would not end."""
        leaked = []
        for daemon in self.started:
            if daemon.thread.ident is None:
                continue
            try:
                daemon.stop()
            except AssertionError:
                leaked.append(daemon.instance)
        return leaked


def capture_thread_crashes(daemons: InProcessDaemons) -> Callable[[threading.ExceptHookArgs], None]:
    """A threading.excepthook that files a thread's uncaught exception as `thread_crashed` in
    every running daemon's log (as rmbgd.ops.logs does in production)."""

    def hook(args: threading.ExceptHookArgs) -> None:
        if args.exc_type is SystemExit:
            return
        for daemon in daemons.started:
            daemon.log.add({"event": "thread_crashed", "level": "critical",
                            "thread": getattr(args.thread, "name", None), "error": repr(args.exc_value)})

    return hook


@pytest.fixture
def inprocess(tmp_path):
    """In-process daemons under tmp_path; all stopped at the end, a leaked thread fails the
    test. Import it into a test module: `from tests.support.inprocess import inprocess`."""
    daemons = InProcessDaemons(tmp_path)
    previous = threading.excepthook
    threading.excepthook = capture_thread_crashes(daemons)
    try:
        yield daemons
    finally:
        leaked = daemons.close()
        threading.excepthook = previous
    if leaked:
        pytest.fail(f"in-process daemon threads still running after the test: {leaked}")
