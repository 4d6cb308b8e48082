"""The real daemon in a background thread of the test process, with a fake model.

What is real: `rmbgd.runtime.daemon.Daemon` and everything it drives (config objects from
`rmbgd.config.parse_config`, folders under the test's tmp_path, the inotify watcher, the work
area, the pipeline and its pools, the publisher). What is fake: the segmenter (the tiny model's mask
computed from the pixels without torch, see `FakeSegmenter`)
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
`segmenter=` replaces the fake model, `load_model=True` loads the configured model the real
way instead (torch, transformers; for model variants); `retry_delay=` the backoff; `cfg=` is a
config of its own (from `load_config(path)`, so that `daemon.hangup()` reloads that file as
SIGHUP does). Log events are the
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
from rmbgd.intake.watcher import Watcher
from rmbgd.runtime.daemon import Daemon
from tests.support.tinymodel import GAIN, OFFSET

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


Failure = Optional[BaseException]


class FakeSegmenter:
    """A segmenter the pipeline accepts (see rmbgd.model.segmenter.Segmenter), without torch.

    The mask is the tiny model's (tests/support/tinymodel.py: alpha from the red channel, so
    tests/support/photos.check_output holds for it), at the original's size. By default it takes the CPU path, as the real
    segmenter does on a machine without a GPU (`splits_work`): `resize_input` and `prepare` in
    the decode pool, `stack` in the stage thread, `predict_prepared` in the model thread,
    `finish` in the encode pool. `splits_work=False` gives the GPU path (`predict` only).

    Failures are injected per step: each `fail_*` callable returns the exception to raise, or
    None. `fail_predict` gets the batch as the RGB colour of each image's top-left pixel (a
    test marks an image by its colour, see `colour`), on either path; `fail_prepare` and
    `fail_resize` that colour for one image, `fail_finish` the (width, height) of one original.
    A RuntimeError saying "out of memory" is what the pipeline takes for the GPU running out.
    `call_seconds` is the time each model call takes (simulated accelerator time).
    """

    device = "cpu"
    dtype = "float32"
    resizes_on_device = False

    def __init__(self, *, splits_work: bool = True,
                 fail_predict: Callable[[List[tuple]], Failure] = lambda colours: None,
                 fail_prepare: Callable[[tuple], Failure] = lambda colour: None,
                 fail_resize: Callable[[tuple], Failure] = lambda colour: None,
                 fail_finish: Callable[[tuple], Failure] = lambda size: None,
                 call_seconds: float = 0.0) -> None:
        self.splits_work = splits_work
        self.call_seconds = call_seconds
        self.fail_predict = fail_predict
        self.fail_prepare = fail_prepare
        self.fail_resize = fail_resize
        self.fail_finish = fail_finish
        self.calls = 0
        # The colours of each model call's images, in call order.
        self.batches: List[List[tuple]] = []
        # Which step ran in which thread (prefix of its name), to check the pools do their part.
        self.threads: Dict[str, set] = {}
        self._lock = threading.Lock()

    @staticmethod
    def colour(pixels: np.ndarray) -> tuple:
        return tuple(int(v) for v in pixels[0, 0, :3])

    def _ran(self, step: str) -> None:
        name = threading.current_thread().name.rstrip("0123456789_-")
        with self._lock:
            self.threads.setdefault(step, set()).add(name)

    def _model_call(self, colours: List[tuple]) -> None:
        with self._lock:
            self.calls += 1
            self.batches.append(colours)
        error = self.fail_predict(colours)
        if error is not None:
            raise error
        if self.call_seconds:
            time.sleep(self.call_seconds)  # the accelerator's time, as the tiny model's delay_ms_per_call

    def batch_sizes(self) -> List[int]:
        with self._lock:
            return [len(batch) for batch in self.batches]

    def warmup(self) -> None:
        return None

    # -- the GPU path: one call ---------------------------------------------------------------
    def predict(self, images: Sequence[Any], sizes: Sequence[tuple], model_size: Any = None) -> List[np.ndarray]:
        self._ran("predict")
        arrays = [np.asarray(image) for image in images]
        self._model_call([self.colour(pixels) for pixels in arrays])
        return [self._mask(pixels, size) for pixels, size in zip(arrays, sizes)]

    @staticmethod
    def _logits(pixels: np.ndarray) -> np.ndarray:
        """The tiny model's logit per pixel (tests/support/tinymodel.py): from the red channel."""
        return (GAIN * (pixels[..., 0].astype(np.float32) / 255.0) + OFFSET).astype(np.float32)

    @staticmethod
    def _to_mask(logits: np.ndarray, size: tuple) -> np.ndarray:
        width, height = (int(v) for v in size)
        probs = (255.0 / (1.0 + np.exp(-logits))).astype(np.float32)
        full = np.asarray(Image.fromarray(probs, mode="F").resize((width, height), Image.BILINEAR))
        return np.clip(np.rint(full), 0, 255).astype(np.uint8)

    def _mask(self, pixels: np.ndarray, size: tuple) -> np.ndarray:
        return self._to_mask(self._logits(pixels), size)

    # -- the CPU path in steps (the contracts of Segmenter's methods of the same names) ---------
    def resize_input(self, rgb: np.ndarray, size: tuple) -> np.ndarray:
        self._ran("resize_input")
        error = self.fail_resize(self.colour(rgb))
        if error is not None:
            raise error
        width, height = (int(v) for v in size)
        if rgb.shape[:2] == (height, width):
            return rgb
        return np.asarray(Image.fromarray(rgb).resize((width, height), Image.BILINEAR))

    def prepare(self, image: np.ndarray) -> np.ndarray:
        """(H, W, 3) uint8 -> (3, H, W) float32, as the real one normalises into a tensor."""
        self._ran("prepare")
        if image.ndim != 3 or image.shape[2] != 3 or image.dtype != np.uint8:
            raise ValueError(f"expected an (H, W, 3) uint8 array, got {image.shape} {image.dtype}")
        error = self.fail_prepare(self.colour(image))
        if error is not None:
            raise error
        return np.ascontiguousarray(image.transpose(2, 0, 1), dtype=np.float32)

    def stack(self, prepared: Sequence[np.ndarray]) -> np.ndarray:
        self._ran("stack")
        return np.stack(list(prepared))

    def predict_prepared(self, prepared: Any) -> List[np.ndarray]:
        """`prepare`d inputs (or their `stack`) -> the (1, h, w) float32 logits of each."""
        self._ran("predict_prepared")
        pixels = prepared if isinstance(prepared, np.ndarray) else self.stack(prepared)
        self._model_call([tuple(int(v) for v in one[:, 0, 0]) for one in pixels])
        return [self._logits(one.transpose(1, 2, 0))[None] for one in pixels]

    def finish(self, logits: np.ndarray, size: tuple) -> np.ndarray:
        """(1, h, w) logits -> the (height, width) uint8 mask for `size` (width, height)."""
        self._ran("finish")
        error = self.fail_finish(tuple(size))
        if error is not None:
            raise error
        return self._to_mask(logits[0], size)


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

    def snapshot(self) -> List[dict]:
        with self._cond:
            return list(self.records)

    def next_record(self, timeout: float) -> None:
        """Block until anything new is logged, at most `timeout` seconds."""
        with self._cond:
            seen = len(self.records)
            self._cond.wait_for(lambda: len(self.records) > seen, timeout)

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


class QuickStopWatcher(Watcher):
    """The real watcher, except that `stop` does not wait for watchdog's threads to end.

    After any rename in the inbox tree (a claim, an intent, the status file), watchdog's
    inotify emitter may be asleep in its 0.5 s wait for the rename's other half, and cannot be
    joined before it wakes (watchdog issue #649). Measured: that wait was two thirds of each
    stop, and most of the fault-injection table's wall time. The harness checks on these threads
    at later teardowns instead (`stuck_watchers`) and joins them at the end of the session
    (conftest.py), so a watcher that never ends still fails a test. Events that arrive after
    `stop` are dropped, as they are once a real stop returns.
    """

    def __init__(self, inbox: Path, sink: Any, **options: Any) -> None:
        self._stopped = threading.Event()
        self.stopped_at = 0.0
        self._stopper: Optional[threading.Thread] = None

        def gated(kind: object, path: Path) -> None:
            if not self._stopped.is_set():
                sink(kind, path)

        super().__init__(inbox, gated, **options)

    def stop(self, timeout: float = 5.0) -> None:
        self._stopped.set()
        self.stopped_at = time.monotonic()
        self._stopper = threading.Thread(target=super().stop, args=(timeout,), name="inprocess-watcher-stop",
                                         daemon=True)
        self._stopper.start()
        STOPPED_WATCHERS.append(self)

    def join(self, timeout: float) -> bool:
        """True when the watcher's threads have ended (or it was never stopped)."""
        if self._stopper is not None:
            self._stopper.join(timeout)
            if self._stopper.is_alive():
                return False
        return not self.is_alive()


# Watchers stopped and not yet seen to end, in stop order (see QuickStopWatcher).
STOPPED_WATCHERS: List[QuickStopWatcher] = []


def stuck_watchers(grace: float = JOIN_S) -> int:
    """Forget the stopped watchers that have ended; how many were stopped over `grace`
    seconds ago and still run (without waiting: a test's teardown calls it)."""
    STOPPED_WATCHERS[:] = [w for w in STOPPED_WATCHERS if not w.join(0.0)]
    now = time.monotonic()
    return sum(now - w.stopped_at > grace for w in STOPPED_WATCHERS)


def join_stopped_watchers(timeout: float = JOIN_S) -> int:
    """Wait for every stopped watcher; how many would not end within `timeout`."""
    deadline = time.monotonic() + timeout
    for watcher in STOPPED_WATCHERS:
        watcher.join(max(0.0, deadline - time.monotonic()))
    return stuck_watchers(grace=0.0)


class _TestDaemon(Daemon):
    watcher_class = QuickStopWatcher

    def __init__(self, cfg: Config, log: Any, instance: str, segmenter: Any,
                 retry_delay: Callable[[int], float]) -> None:
        super().__init__(cfg, log, instance=instance)
        self._segmenter = segmenter
        self.retry_delay = retry_delay

    def _load_model(self) -> Any:
        if self._segmenter is None:
            return super()._load_model()
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

    def hangup(self) -> None:
        """Ask for a reload of the config file (`cfg.source`), as SIGHUP does."""
        self.daemon._on_hangup(signal.SIGHUP, None)

    # -- events -----------------------------------------------------------------------------
    def events(self, *names: str) -> List[dict]:
        return self.log.events(*names)

    def crashes(self) -> List[dict]:
        return self.log.events(*CRASH_EVENTS)

    @property
    def records(self) -> List[dict]:
        """Every event so far, in order (as DaemonProcess.records)."""
        return self.log.snapshot()

    def next_record(self, timeout: float) -> None:
        """As DaemonProcess.next_record: until anything new is logged, at most `timeout` s."""
        self.log.next_record(timeout)

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
              cfg: Optional[Config] = None, load_model: bool = False,
              **sections: Dict[str, Any]) -> InProcessDaemon:
        """`cfg` (e.g. `load_config(path)`, to reload from that file) instead of `sections`;
        `load_model`: load `model.name` as `rmbgd run` does (torch) instead of the fake."""
        if cfg is None:
            cfg = self.config(**sections)
        elif sections:
            raise TypeError("either cfg or config sections, not both")
        name = instance or f"inproc-{next(self._numbers)}"
        if load_model:
            if segmenter is not None:
                raise TypeError("either a segmenter or load_model, not both")
        else:
            segmenter = segmenter or FakeSegmenter()
        daemon = InProcessDaemon(cfg, name, segmenter, retry_delay)
        self.started.append(daemon)
        return daemon.start(wait_ready=wait_ready)

    def close(self) -> List[str]:
        """Stop every daemon; the names of those whose thread would not end (and of watchers
        stopped by earlier tests that would not end either)."""
        leaked = []
        for daemon in self.started:
            if daemon.thread.ident is None:
                continue
            try:
                daemon.stop()
            except AssertionError:
                leaked.append(daemon.instance)
        stuck = stuck_watchers()
        if stuck:
            leaked.append(f"{stuck} watcher(s) stopped over {JOIN_S:g} s ago and still running")
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
