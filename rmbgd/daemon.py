"""The daemon's life: start-up → main loop → orderly shutdown.

Signal handlers only record what was asked; the main loop notices within one tick and acts:
the first SIGTERM/SIGINT drains (the batch in flight is finished, everything else stays safely
claimed or in the inbox for the next start), a second one exits at once, which is still safe
because nothing is ever half-written in place.
"""

from __future__ import annotations

import collections
import os
import queue
import signal
import stat
import sys
import time
from pathlib import Path
from typing import Any, Deque, Optional, Set

from rmbgd import __version__
from rmbgd.config import Config, ConfigError, effective_max_in_flight, effective_workers, prepare_folders
from rmbgd.job import Counters, Job
from rmbgd.pipeline import Pipeline
from rmbgd.publisher import Publisher
from rmbgd.readiness import Readiness, Seen
from rmbgd.watcher import SCAN_DIR, Watcher, scan, signature_of
from rmbgd.workarea import Claim, WorkArea

TICK_SECONDS = 0.1
# How long a drain may take before the daemon gives up and exits anyway (the unclaimed and
# unfinished files are safe either way); systemd's TimeoutStopSec must stay above this.
DRAIN_TIMEOUT_SECONDS = 60.0

EXIT_OK = 0
EXIT_FAILURE = 1
EXIT_FORCED = 130


class StartupError(Exception):
    """A one-line reason the daemon cannot start (bad folders, model not loadable)."""


class Daemon:
    def __init__(self, cfg: Config, log: Any, clock=time.monotonic) -> None:
        self.cfg = cfg
        self.log = log
        self._clock = clock
        self._signals = 0
        self._signal_name: Optional[str] = None
        self._events: "queue.SimpleQueue[tuple]" = queue.SimpleQueue()
        self._readiness = Readiness(cfg.watch.settle_seconds, cfg.watch.writer_timeout_seconds)
        self._backlog: Deque[Path] = collections.deque()
        self._backlog_set: Set[Path] = set()
        self._ignored_logged: Set[Path] = set()
        self._counters = Counters()
        self._max_in_flight = max(effective_max_in_flight(cfg), cfg.batch.size)
        self._work = WorkArea(cfg.paths.inbox)
        self._pipeline: Optional[Pipeline] = None
        self._watcher: Optional[Watcher] = None

    # -- signals ----------------------------------------------------------------------------
    def install_signal_handlers(self) -> None:
        signal.signal(signal.SIGTERM, self._on_signal)
        signal.signal(signal.SIGINT, self._on_signal)

    def _on_signal(self, signum: int, frame: object) -> None:
        self._signals += 1
        self._signal_name = signal.Signals(signum).name

    @property
    def stop_requested(self) -> bool:
        return self._signals > 0

    def _check_forced(self) -> None:
        if self._signals >= 2:
            self.log.warning("stopped", reason="second signal, stopping at once", forced=True, **self._counters.snapshot())
            os._exit(EXIT_FORCED)

    # -- life cycle -------------------------------------------------------------------------
    def run(self) -> int:
        cfg = self.cfg
        self.log.info(
            "starting",
            version=__version__,
            pid=os.getpid(),
            config=str(cfg.source) if cfg.source else None,
            inbox=str(cfg.paths.inbox),
            outbox=str(cfg.paths.outbox),
        )
        try:
            prepare_folders(cfg)
        except ConfigError as exc:
            raise StartupError(str(exc)) from None
        segmenter = self._load_model()
        if self.stop_requested:
            self.log.info("stopping", reason=self._signal_name, during="startup")
            self.log.info("stopped", **self._counters.snapshot())
            return EXIT_OK

        self._work.open()
        publisher = Publisher(cfg.paths, owner=self._work.instance)
        self._pipeline = Pipeline(
            cfg, segmenter, publisher, self._counters, self.log, on_finished=self._job_finished
        )
        self._pipeline.start()
        recovered = self._work.recover()
        for claim in recovered:
            self._start_job(claim)
        if recovered:
            self.log.info("recovered", files=len(recovered))

        self._watcher = Watcher(cfg.paths.inbox, self._on_watch_event)
        self._watcher.start()
        self._scan(cfg.paths.inbox)
        self.log.info(
            "ready",
            model=cfg.model.name,
            device=segmenter.device,
            dtype=segmenter.dtype,
            batch_size=cfg.batch.size,
            max_wait_ms=cfg.batch.max_wait_ms,
            workers=effective_workers(cfg),
            instance=self._work.instance,
            waiting=len(self._readiness),
        )
        try:
            code = self._main_loop()
        except BaseException:
            # Still drain in order (the CLI logs the crash itself), so an unexpected error in
            # the loop does not also abandon the batch in flight.
            self._shutdown(EXIT_FAILURE)
            raise
        return self._shutdown(code)

    def _load_model(self) -> Any:
        # Imported here: torch and transformers take seconds to import, and `rmbgd check` or
        # `--help` should not pay for that.
        from rmbgd.model import ModelLoadError, load_segmenter

        try:
            segmenter = load_segmenter(self.cfg.model, log=self.log)
            started = time.monotonic()
            segmenter.warmup()
        except ModelLoadError as exc:
            raise StartupError(str(exc)) from None
        self.log.info("model_warm", ms=round((time.monotonic() - started) * 1000.0, 1))
        return segmenter

    def _main_loop(self) -> int:
        next_rescan = self._clock() + self.cfg.watch.rescan_seconds
        while not self.stop_requested:
            self._take_events(TICK_SECONDS)
            now = self._clock()
            self._queue_ready(self._readiness.poll(now, signature_of))
            self._claim_backlog()
            if now >= next_rescan:
                self._scan(self.cfg.paths.inbox)
                next_rescan = now + self.cfg.watch.rescan_seconds
            if not self._watcher.is_alive():
                self.log.error("watcher_died", reason="the inotify observer thread stopped")
                return EXIT_FAILURE
            if not self._pipeline.model_alive():
                self.log.error("model_worker_died", reason="the model thread stopped")
                return EXIT_FAILURE
        return EXIT_OK

    def _shutdown(self, code: int) -> int:
        self.log.info("stopping", reason=self._signal_name or "failure", **self._counters.snapshot())
        self._watcher.stop()
        self._pipeline.stop_intake()
        deadline = time.monotonic() + DRAIN_TIMEOUT_SECONDS
        while not self._pipeline.wait(TICK_SECONDS):
            self._check_forced()
            if time.monotonic() > deadline:
                self.log.error("drain_timeout", seconds=DRAIN_TIMEOUT_SECONDS, **self._counters.snapshot())
                return EXIT_FAILURE
        self._work.close()
        # in_flight now counts the files left claimed for the next start.
        self.log.info("stopped", **self._counters.snapshot())
        return code

    # -- watching and claiming --------------------------------------------------------------
    def _on_watch_event(self, kind: object, path: Path) -> None:
        self._events.put((kind, path))

    def _take_events(self, timeout: float) -> None:
        try:
            item = self._events.get(timeout=timeout)
        except queue.Empty:
            return
        while True:
            kind, path = item
            if kind == SCAN_DIR:
                self._scan(path)
            elif path not in self._backlog_set:
                self._readiness.observe(path, kind, self._clock())
            try:
                item = self._events.get_nowait()
            except queue.Empty:
                return

    def _scan(self, top: Path) -> None:
        now = self._clock()
        for path, st in scan(top, self.cfg.paths.inbox):
            if path in self._backlog_set:
                continue
            if stat.S_ISREG(st.st_mode) or stat.S_ISLNK(st.st_mode):
                self._readiness.observe(path, Seen.SCANNED, now, (st.st_size, st.st_mtime_ns))
            elif path not in self._ignored_logged:
                # FIFOs, sockets and device nodes are never opened: reading one could block forever.
                self._ignored_logged.add(path)
                self.log.warning("file_ignored", input=str(path), reason="not a regular file")

    def _queue_ready(self, paths: list) -> None:
        for path in paths:
            if path not in self._backlog_set:
                self._backlog.append(path)
                self._backlog_set.add(path)

    def _claim_backlog(self) -> None:
        while self._backlog and self._counters.in_flight < self._max_in_flight:
            path = self._backlog.popleft()
            self._backlog_set.discard(path)
            try:
                st = os.lstat(path)
                if not (stat.S_ISREG(st.st_mode) or stat.S_ISLNK(st.st_mode)):
                    continue
                claim = self._work.claim(path)
            except FileNotFoundError:
                continue
            except OSError as exc:
                self.log.error("claim_failed", input=str(path), error=f"{type(exc).__name__}: {exc}")
                continue
            if claim is None:
                # An earlier file of the same name is still in progress; look again later.
                self._readiness.observe(path, Seen.SCANNED, self._clock(), signature_of(path))
                continue
            job = self._start_job(claim, submit=not stat.S_ISLNK(st.st_mode))
            if stat.S_ISLNK(st.st_mode):
                self._pipeline.fail(
                    job,
                    "detect",
                    "symbolic link: rmbgd never follows links; copy or move the file itself into the inbox",
                )

    def _start_job(self, claim: Claim, submit: bool = True) -> Job:
        job = Job(claim=claim, input=self.cfg.paths.inbox / claim.rel, ready_at=time.monotonic())
        self._counters.started()
        self.log.debug("file_claimed", input=str(job.input))
        if submit:
            self._pipeline.submit(job)
        return job

    def _job_finished(self, job: Job) -> None:
        self._work.release_dirs(job.claim)


def describe_startup_failure(exc: BaseException) -> str:
    return str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__


def stderr_is_terminal() -> bool:
    try:
        return sys.stderr.isatty()
    except (AttributeError, ValueError):
        return False
