"""One life for `rmbgd run` and `rmbgd process`: start-up → main loop → drain → shutdown.

Signal handlers only record what was asked; the loops notice within one tick and act (the
shape of uvicorn's Server). The first SIGTERM/SIGINT asks for an orderly stop, a second one
exits at once with EXIT_FORCED, which is still safe because nothing is ever half-written in
place. While the model loads (in a worker thread, so the main thread keeps noticing), a stop
ends the process at once: nothing has been claimed or written yet.

`Lifecycle.run` owns the order of the phases; `Daemon` (daemon.py) and `Runner` (oneshot.py)
fill them in. A broken stdout pipe stops either like a signal (ops/logs.py).
"""

from __future__ import annotations

import os
import signal
import threading
import time
from concurrent.futures import Future
from concurrent.futures import TimeoutError as FutureTimeout
from typing import Any, Callable, Dict, Optional, TypeVar

from rmbgd import __version__
from rmbgd.batching.job import Counters
from rmbgd.config import Config, effective_max_in_flight, effective_workers
from rmbgd.ops import logs

TICK_SECONDS = 0.1

EXIT_OK = 0
EXIT_FAILURE = 1
EXIT_FORCED = 130

T = TypeVar("T")


class StartupError(Exception):
    """A one-line reason a run cannot start (bad folders, model not loadable)."""


def in_flight_limit(cfg: Config) -> int:
    """How many files may be taken on at once: never fewer than one batch holds."""
    return max(effective_max_in_flight(cfg), cfg.batch.size)


def watched(work: Callable[[], T], tick: Callable[[], None]) -> T:
    """`work()` in a worker thread, calling `tick` every TICK_SECONDS meanwhile.

    A model download or load can take minutes, mostly inside torch, transformers or the
    network, where the main thread would not get back to rmbgd's own code. Waiting here
    instead keeps the signal handling live: `tick` may end the process (os._exit), which
    abandons the work safely, since nothing in the folders has been touched yet.
    """
    outcome: Future = Future()

    def run() -> None:
        try:
            outcome.set_result(work())
        except BaseException as exc:  # noqa: BLE001 - handed to the waiting thread, raised there
            outcome.set_exception(exc)

    # A daemon thread: a process leaving through os._exit must not wait for it either way.
    threading.Thread(target=run, name="rmbgd-model-load", daemon=True).start()
    while True:
        try:
            return outcome.result(timeout=TICK_SECONDS)
        except FutureTimeout:
            tick()


class Lifecycle:
    """The phases of a run, in order; subclasses fill in the hooks marked below."""

    # The exit code of a stop a signal asked for: a daemon told to stop did its job.
    signal_exit = EXIT_OK

    def __init__(self, cfg: Config, log: Any, counters: Counters) -> None:
        self.cfg = cfg
        self.log = log
        self._counters = counters
        self._signals = 0
        self._signal_name: Optional[str] = None
        self._max_in_flight = in_flight_limit(cfg)

    # -- signals ----------------------------------------------------------------------------
    def install_signal_handlers(self) -> None:
        signal.signal(signal.SIGTERM, self._on_signal)
        signal.signal(signal.SIGINT, self._on_signal)

    def _on_signal(self, signum: int, frame: object) -> None:
        self._signals += 1
        self._signal_name = signal.Signals(signum).name

    @property
    def stop_requested(self) -> bool:
        return self._signals > 0 or logs.reader_gone()

    def _stop_reason(self) -> Optional[str]:
        return self._signal_name or ("log_reader_gone" if logs.reader_gone() else None)

    def _stop_code(self) -> int:
        if self._signals:
            return self.signal_exit
        return logs.EXIT_LOG_READER_GONE if logs.reader_gone() else EXIT_OK

    def _check_forced(self) -> None:
        if self._signals >= 2:
            self.log.warning("stopped", reason="second signal, stopping at once", forced=True, **self._counters.snapshot())
            self._before_forced_exit()
            os._exit(EXIT_FORCED)

    def _has_room(self) -> bool:
        # Files parked for a retry do not count: they must not stall the rest (see pipeline.py).
        return self._counters.busy + self._held_elsewhere() < self._max_in_flight

    def _held_elsewhere(self) -> int:
        """In-flight slots taken by other work than files (the daemon's HTTP requests)."""
        return 0

    # -- the phases -------------------------------------------------------------------------
    def run(self) -> int:
        """The exit code; raises StartupError when the run cannot start."""
        self._starting()
        if not self._wants_model():
            return self._finish(EXIT_OK)
        segmenter = self._load_model()
        if self.stop_requested:
            return self._finish(self._stop_during_startup())
        self._open(segmenter)
        self.log.info("ready", **self._ready_fields(segmenter))
        self._on_ready(segmenter)
        try:
            code = self._main_loop()
        except BaseException:
            # Still drained in order (the CLI logs the crash itself), so an unexpected error
            # in the loop does not also abandon the work in flight.
            self._crashed()
            raise
        return self._finish(self._shutdown(code))

    def _log_starting(self, **fields: Any) -> None:
        self.log.info(
            "starting",
            version=__version__,
            pid=os.getpid(),
            config=str(self.cfg.source) if self.cfg.source else None,
            **fields,
        )

    def _ready_fields(self, segmenter: Any) -> Dict[str, Any]:
        cfg = self.cfg
        return {
            "model": cfg.model.name,
            "device": segmenter.device,
            "dtype": segmenter.dtype,
            "precision": getattr(segmenter, "precision", None),
            "loader": getattr(segmenter, "loader", None),
            "batch_size": cfg.batch.size,
            "max_wait_ms": cfg.batch.max_wait_ms,
            "workers": effective_workers(cfg),
        }

    def _watched(self, work: Callable[[], T]) -> T:
        return watched(work, self._while_loading)

    def _while_loading(self) -> None:
        # Nothing is claimed or written before the model is ready, so a stop during the load
        # (a download can take minutes) loses nothing by not waiting for it. os._exit, as for
        # a forced stop: the load thread may be deep inside torch, which a normal interpreter
        # shutdown around it could crash.
        self._check_forced()
        if self.stop_requested:
            os._exit(self._finish(self._stop_during_startup()))

    def _drain(self, pipeline: Any, timeout: Optional[float] = None) -> bool:
        """Stop the pipeline's intake and wait for what it has in hand; False when that took
        longer than `timeout`. A second signal still exits at once meanwhile."""
        pipeline.stop_intake()
        deadline = None if timeout is None else time.monotonic() + timeout
        while not pipeline.wait(TICK_SECONDS):
            self._check_forced()
            self._draining()
            if deadline is not None and time.monotonic() > deadline:
                return False
        return True

    def _crashed(self) -> None:
        self._shutdown(EXIT_FAILURE)

    # -- hooks ------------------------------------------------------------------------------
    def _starting(self) -> None:
        """Log `starting` and prepare; raise StartupError when the run cannot go ahead."""
        raise NotImplementedError

    def _wants_model(self) -> bool:
        return True

    def _load_model(self) -> Any:
        """The warmed-up segmenter, loaded through `_watched`; raises StartupError."""
        raise NotImplementedError

    def _stop_during_startup(self) -> int:
        raise NotImplementedError

    def _open(self, segmenter: Any) -> None:
        """Start the pipeline and what feeds it; raises StartupError."""
        raise NotImplementedError

    def _on_ready(self, segmenter: Any) -> None:
        pass

    def _main_loop(self) -> int:
        """Feed the pipeline until done or a stop is asked for; returns the exit code so far."""
        raise NotImplementedError

    def _shutdown(self, code: int) -> int:
        """Drain and close what `_open` opened; returns the exit code."""
        raise NotImplementedError

    def _draining(self) -> None:
        pass

    def _finish(self, code: int) -> int:
        return code

    def _before_forced_exit(self) -> None:
        pass
