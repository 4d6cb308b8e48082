"""The daemon's life: start-up → main loop → orderly shutdown.

Signal handlers only record what was asked; the main loop notices within one tick and acts:
the first SIGTERM/SIGINT drains (the batch in flight is finished, everything else stays safely
claimed or in the inbox for the next start), a second one exits at once, which is still safe
because nothing is ever half-written in place. While the model loads (in a worker thread, so
the main thread keeps noticing), a signal stops at once: nothing is claimed yet.
"""

from __future__ import annotations

import collections
import dataclasses
import os
import queue
import signal
import stat
import sys
import threading
import time
from concurrent.futures import Future
from concurrent.futures import TimeoutError as FutureTimeout
from pathlib import Path
from typing import Any, Callable, Deque, List, Optional, Set

from rmbgd import __version__
from rmbgd.output import backoff
from rmbgd.ops import logs
from rmbgd.batching.collector import CallCost
from rmbgd.config import (
    Config,
    ConfigError,
    check_folders,
    effective_max_in_flight,
    effective_workers,
    load_config,
    prepare_folders,
)
from rmbgd.output.fsops import remove_orphan_temps
from rmbgd.batching.job import Counters, Job
from rmbgd.batching.pipeline import Pipeline
from rmbgd.output.publisher import Publisher
from rmbgd.ops.metrics import MetricsUnavailable
from rmbgd.intake.readiness import Readiness, Seen
from rmbgd.ops.service import Service
from rmbgd.runtime.stages import image_stages
from rmbgd.intake.watcher import RESCAN, SCAN_DIR, WatchUnavailable, Watcher, scan, signature_of
from rmbgd.intake.workarea import Claim, WorkArea, WorkAreaLocked, special_file_reason

TICK_SECONDS = 0.1
# Posted by worker threads when a job finishes, so the main loop claims the next file at once.
WAKE = "wake"
# How long a drain may take before the daemon gives up and exits anyway (the unclaimed and
# unfinished files are safe either way); systemd's TimeoutStopSec must stay above this.
DRAIN_TIMEOUT_SECONDS = 60.0

EXIT_OK = 0
EXIT_FAILURE = 1
EXIT_FORCED = 130


class StartupError(Exception):
    """A one-line reason the daemon cannot start (bad folders, model not loadable)."""


def load_model(cfg: Config, log: Any) -> Any:
    """Load and warm up `cfg.model`; raises StartupError with the one-line reason."""
    # Imported here: torch and transformers take seconds to import, and `rmbgd check` or
    # `--help` should not pay for that.
    from rmbgd.model.segmenter import ModelLoadError, load_segmenter

    try:
        segmenter = load_segmenter(cfg.model, log=log)
        started = time.monotonic()
        segmenter.warmup()
    except ModelLoadError as exc:
        raise StartupError(str(exc)) from None
    log.info("model_warm", ms=round((time.monotonic() - started) * 1000.0, 1), **call_cost_fields(segmenter))
    return segmenter


def call_cost_fields(segmenter: Any) -> dict:
    """`call_ms` (one image) and `fixed_ms` (the part of a call that does not grow with its
    size, which bounds how long a free model waits to fill a batch; see collector.py)."""
    cost = CallCost()
    fields = {}
    for _key, size, seconds in getattr(segmenter, "call_timings", ()):
        cost.observe(size, seconds)
        if size == 1:
            fields["call_ms"] = round(seconds * 1000.0, 1)
    fixed = cost.fixed()
    if fixed is not None:
        fields["fixed_ms"] = round(fixed * 1000.0, 1)
    return fields


def load_model_watching(cfg: Config, log: Any, tick: Callable[[], None]) -> Any:
    """`load_model` in a worker thread, calling `tick` every TICK_SECONDS meanwhile.

    A download or load can take minutes, mostly inside torch, transformers or the network,
    where the main thread would not get back to the daemon's own code. Waiting here instead
    keeps the signal handling live: `tick` may end the process (os._exit), which abandons
    the load safely, since nothing in the folders has been touched yet.
    """
    outcome: Future = Future()

    def work() -> None:
        try:
            outcome.set_result(load_model(cfg, log))
        except BaseException as exc:  # noqa: BLE001 - handed to the waiting thread, raised there
            outcome.set_exception(exc)

    # A daemon thread: a process leaving through os._exit must not wait for it either way.
    threading.Thread(target=work, name="rmbgd-model-load", daemon=True).start()
    while True:
        try:
            return outcome.result(timeout=TICK_SECONDS)
        except FutureTimeout:
            tick()


class Daemon:
    # How long a file waits before its write is retried (the in-process tests shorten it).
    retry_delay = staticmethod(backoff.retry_delay)

    def __init__(self, cfg: Config, log: Any, clock=time.monotonic, instance: Optional[str] = None) -> None:
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
        self._work = WorkArea(cfg.paths.inbox, instance)
        self._service = Service(cfg, log, instance=self._work.instance)
        self._reload_requested = False
        self._pipeline: Optional[Pipeline] = None
        self._publisher: Optional[Publisher] = None
        self._watcher: Optional[Watcher] = None

    # -- signals ----------------------------------------------------------------------------
    def install_signal_handlers(self) -> None:
        signal.signal(signal.SIGTERM, self._on_signal)
        signal.signal(signal.SIGINT, self._on_signal)
        signal.signal(signal.SIGHUP, self._on_hangup)

    def _on_signal(self, signum: int, frame: object) -> None:
        self._signals += 1
        self._signal_name = signal.Signals(signum).name

    def _on_hangup(self, signum: int, frame: object) -> None:
        self._reload_requested = True

    @property
    def stop_requested(self) -> bool:
        # A broken stdout pipe stops the daemon like a SIGTERM (logs.py).
        return self._signals > 0 or logs.reader_gone()

    def _stop_reason(self) -> Optional[str]:
        return self._signal_name or ("log_reader_gone" if logs.reader_gone() else None)

    def _stop_code(self) -> int:
        return EXIT_OK if self._signals or not logs.reader_gone() else logs.EXIT_LOG_READER_GONE

    def _check_forced(self) -> None:
        if self._signals >= 2:
            self.log.warning("stopped", reason="second signal, stopping at once", forced=True, **self._counters.snapshot())
            os._exit(EXIT_FORCED)

    # -- life cycle -------------------------------------------------------------------------
    def run(self) -> int:
        """The exit code; raises StartupError, after recording it for `rmbgd status`."""
        try:
            return self._run()
        except StartupError as exc:
            self._service.failed(str(exc))
            raise

    def _run(self) -> int:
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
            self._service.starting(cfg)
        except (ConfigError, MetricsUnavailable) as exc:
            raise StartupError(str(exc)) from None
        with self._service.loading_model(cfg.model.name):
            segmenter = self._load_model()
        if self.stop_requested:
            return self._stop_during_startup()

        self._open_work_area()
        # Before recovery and the pipeline: when the kernel refuses the watches, nothing has
        # been taken on yet that would have to be drained.
        self._watcher = Watcher(cfg.paths.inbox, self._on_watch_event, polling=cfg.watch.polling)
        try:
            self._watcher.start()
        except WatchUnavailable as exc:
            self._work.close()
            raise StartupError(str(exc)) from None
        self._publisher = Publisher(cfg.paths, owner=self._work.instance, log=self.log)
        self._pipeline = Pipeline(
            cfg,
            segmenter,
            self._publisher,
            self._counters,
            self.log,
            on_finished=self._job_finished,
            on_batch=self._service.batch_done,
            retry_delay=self.retry_delay,
            stages=image_stages(),
        )
        self._pipeline.start()
        self._recover()
        self._scan(cfg.paths.inbox)
        self.log.info(
            "ready",
            model=cfg.model.name,
            device=segmenter.device,
            dtype=segmenter.dtype,
            precision=getattr(segmenter, "precision", None),
            loader=getattr(segmenter, "loader", None),
            batch_size=cfg.batch.size,
            max_wait_ms=cfg.batch.max_wait_ms,
            workers=effective_workers(cfg),
            instance=self._work.instance,
            waiting=len(self._readiness),
        )
        self._service.ready(model=cfg.model.name, device=segmenter.device, batch_size=cfg.batch.size)
        try:
            code = self._main_loop()
        except BaseException:
            # Still drain in order (the CLI logs the crash itself), so an unexpected error in
            # the loop does not also abandon the batch in flight.
            self._shutdown(EXIT_FAILURE)
            raise
        return self._shutdown(code)

    def _open_work_area(self) -> None:
        try:
            self._work.open()
        except WorkAreaLocked:
            # The lock is per instance name (short host name + pid), so its holder has ours.
            raise StartupError(
                f"the work area {self._work.dir} is locked by another running process named "
                f"{self._work.instance} (short host name and pid): hosts sharing this inbox "
                "have the same short host name, or containers with one host name run rmbgd as "
                "the same pid; give each host or container its own host name"
            ) from None
        except OSError as exc:
            raise StartupError(
                f"paths.inbox: cannot create the work area {self._work.dir}: {exc.strerror or exc}"
            ) from None

    def _recover(self) -> None:
        """Before `ready`: finish what a crashed predecessor (or dead peer) left half done."""
        started = time.monotonic()
        try:
            claims = self._work.recover(on_error=self._adopt_failed)
        except OSError as exc:
            # The work area's filesystem failed mid-way: start anyway; what is left in a dead
            # instance's folder is adopted at the next rescan.
            self.log.error("recover_failed", error=f"{type(exc).__name__}: {exc}")
            claims = []
        finished = self._take_over(claims)
        removed = 0
        for root in (self.cfg.paths.outbox, self.cfg.paths.errors, self.cfg.paths.done):
            if root is not None:
                removed += remove_orphan_temps(root, self._work.is_dead)
        if claims or removed:
            self.log.info(
                "recovered",
                files=len(claims),
                finished=finished,
                requeued=len(claims) - finished,
                temp_files_removed=removed,
                ms=round((time.monotonic() - started) * 1000.0, 1),
            )

    def _take_over(self, claims: List[Claim]) -> int:
        """Complete interrupted deliveries, queue the rest; returns how many were completed."""
        finished = 0
        for claim in claims:
            if special_file_reason(claim.path) is not None:
                # No delivery of ours ever started from a link or a FIFO: its intent, if
                # any, was not written by us; the entry goes to errors/ as it is.
                self._start_job(claim)
                continue
            try:
                delivery = self._publisher.resume(claim)
            except OSError as exc:
                # Folders unusable right now: process it normally; the pipeline retries.
                self.log.warning("resume_failed", input=str(self.cfg.paths.inbox / claim.rel), error=str(exc))
                delivery = None
            except Exception:  # per-file boundary: one odd leftover must not stop the start
                self.log.error("resume_failed", input=str(self.cfg.paths.inbox / claim.rel), exc_info=True)
                delivery = None
            if delivery is None:
                self._start_job(claim)
                continue
            finished += 1
            self._work.release_dirs(claim)
            self.log.info(
                "file_done",
                input=str(self.cfg.paths.inbox / claim.rel),
                output=str(delivery.output),
                original=str(delivery.original) if delivery.original is not None else "deleted",
                **({"also": [str(path) for path in delivery.extra]} if delivery.extra else {}),
                recovered=True,
            )
        return finished

    def _load_model(self) -> Any:
        return load_model_watching(self.cfg, self.log, self._while_loading)

    def _while_loading(self) -> None:
        # Nothing is claimed or written before the model is ready, so a stop during the load
        # (a download can take minutes) loses nothing by not waiting for it. os._exit, as for
        # a forced stop: the load thread may be deep inside torch, which a normal interpreter
        # shutdown around it could crash.
        self._check_forced()
        if self.stop_requested:
            os._exit(self._stop_during_startup())

    def _stop_during_startup(self) -> int:
        self.log.info("stopping", reason=self._stop_reason(), during="startup")
        self._service.stopping()
        self.log.info("stopped", **self._counters.snapshot())
        self._service.stopped(self._counters.snapshot())
        return self._stop_code()

    def _main_loop(self) -> int:
        next_rescan = self._clock() + self.cfg.watch.rescan_seconds
        while not self.stop_requested:
            if self._reload_requested:
                self._reload_requested = False
                self._reload()
            self._take_events(TICK_SECONDS)
            now = self._clock()
            self._queue_ready(self._readiness.poll(now, self._signature))
            self._claim_backlog()
            if now >= next_rescan:
                self._scan(self.cfg.paths.inbox)
                self._adopt_dead_peers()
                next_rescan = now + self.cfg.watch.rescan_seconds
            if not self._watcher.is_alive():
                self.log.error("watcher_died", reason="the inotify observer thread stopped")
                return EXIT_FAILURE
            if not self._pipeline.model_alive():
                self.log.error("model_worker_died", reason="the model thread stopped")
                return EXIT_FAILURE
            counts = self._counters.snapshot()
            self._service.tick(
                processed=counts["processed"],
                failed=counts["failed"],
                queued=len(self._backlog),
                in_flight=counts["in_flight"],
                healthy=self._healthy(),
            )
        return self._stop_code()

    def _healthy(self) -> bool:
        # A model call that hangs (a wedged GPU) stops the watchdog pings, and systemd restarts
        # the service after WatchdogSec; an idle or progressing model is fine.
        busy = self._pipeline.busy_seconds()
        interval = self._service.watchdog.interval
        stuck = interval is not None and busy > 2 * interval
        return self._watcher.is_alive() and self._pipeline.model_alive() and not stuck

    def _reload(self) -> None:
        """SIGHUP: re-read the config; apply what can change live, keep the old on errors."""
        self._service.reloading()
        try:
            new = load_config(self.cfg.source)
            problems = check_folders(new)
            if problems:
                raise ConfigError(problems)
        except ConfigError as exc:
            more = {"more_errors": exc.problems[1:]} if len(exc.problems) > 1 else {}
            self.log.error("reload_failed", error=exc.problems[0], kept="the running config", **more)
            self._service.reloaded(self.cfg.logging.progress_seconds)
            return
        except Exception as exc:  # a bug in rmbgd's validation must not stop a running daemon
            reason = " ".join(f"{type(exc).__name__}: {exc}".split())
            self.log.error("reload_failed", error=f"{self.cfg.source}: cannot be checked: {reason}",
                           kept="the running config", exc_info=True)
            self._service.reloaded(self.cfg.logging.progress_seconds)
            return
        old = self.cfg
        # Sections bound at start-up (folders, the loaded model, pools, endpoints) keep their
        # running values until a restart; the rest takes effect now.
        fixed = {"paths": old.paths, "model": old.model, "pipeline": old.pipeline, "state": old.state,
                 "metrics": old.metrics, "input": new.input}
        needs_restart = sorted(k for k in ("paths", "model", "pipeline", "state", "metrics")
                               if getattr(new, k) != getattr(old, k))
        if new.watch.polling != old.watch.polling:
            needs_restart.append("watch.polling")
        applied = dataclasses.replace(new, **fixed)
        try:
            logs.set_file(applied.logging.file)
        except OSError as exc:
            self.log.error("reload_failed", error=f"logging.file: {exc}", kept="the running config")
            self._service.reloaded(old.logging.progress_seconds)
            return
        logs.reopen()
        logs.set_level(applied.logging.level)
        self._readiness.reconfigure(applied.watch.settle_seconds, applied.watch.writer_timeout_seconds)
        self._pipeline.apply(applied)
        self._max_in_flight = max(effective_max_in_flight(applied), applied.batch.size)
        self.cfg = applied
        changed = sorted(k for k in ("watch", "batch", "input", "output", "profiles", "logging") if getattr(new, k) != getattr(old, k))
        self.log.info("reloaded", changed=changed, needs_restart=needs_restart,
                      **({"note": "restart rmbgd to apply " + ", ".join(needs_restart)} if needs_restart else {}))
        self._service.reloaded(applied.logging.progress_seconds)

    def _shutdown(self, code: int) -> int:
        self.log.info("stopping", reason=self._stop_reason() or "failure", **self._counters.snapshot())
        self._service.stopping()
        self._watcher.stop()
        self._pipeline.stop_intake()
        deadline = time.monotonic() + DRAIN_TIMEOUT_SECONDS
        while not self._pipeline.wait(TICK_SECONDS):
            self._check_forced()
            if time.monotonic() > deadline:
                self.log.error("drain_timeout", seconds=DRAIN_TIMEOUT_SECONDS, **self._counters.snapshot())
                self._service.stopped(self._counters.snapshot())
                return EXIT_FAILURE
        self._work.close()
        # in_flight now counts the files left claimed for the next start.
        self.log.info("stopped", **self._counters.snapshot())
        self._service.stopped(self._counters.snapshot())
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
            if kind == RESCAN:
                self.log.warning("events_lost", reason="inotify queue overflow; rescanning the inbox")
                self._scan(self.cfg.paths.inbox)
            elif kind == SCAN_DIR:
                self._scan(path)
            elif kind != WAKE and path not in self._backlog_set:
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
            else:
                self._ignore_special(path)

    def _signature(self, path: Path):
        signature = signature_of(path)
        if signature is None and os.path.lexists(path):
            self._ignore_special(path)
        return signature

    def _ignore_special(self, path: Path) -> None:
        # FIFOs, sockets and device nodes are never opened: reading one could block forever.
        if path not in self._ignored_logged:
            self._ignored_logged.add(path)
            self.log.warning("file_ignored", input=str(path), reason="not a regular file")

    def _queue_ready(self, paths: list) -> None:
        for path in paths:
            if path not in self._backlog_set:
                self._backlog.append(path)
                self._backlog_set.add(path)

    def _claim_backlog(self) -> None:
        # Files parked for a retry do not count: they must not stall the rest (see pipeline.py).
        while self._backlog and self._counters.busy < self._max_in_flight:
            path = self._backlog.popleft()
            self._backlog_set.discard(path)
            try:
                st = os.lstat(path)
                if not (stat.S_ISREG(st.st_mode) or stat.S_ISLNK(st.st_mode)):
                    continue
                claim = self._work.claim(path)
            except FileNotFoundError:
                continue  # gone, or its folder is now a link leading out of the inbox
            except OSError as exc:
                self.log.error("claim_failed", input=str(path), error=f"{type(exc).__name__}: {exc}")
                continue
            if claim is None:
                # An earlier file of the same name is still in progress; look again later.
                self._readiness.observe(path, Seen.SCANNED, self._clock(), signature_of(path))
                continue
            self._start_job(claim)

    def _adopt_dead_peers(self) -> None:
        # A peer sharing this inbox died (its lock is free): take over its claimed files now
        # rather than waiting for some instance to restart.
        try:
            adopted = self._work.adopt_dead_peers(on_error=self._adopt_failed)
        except OSError as exc:
            # The work area itself is unreadable right now; the next rescan tries again.
            self._adopt_failed(self._work.root, exc)
            return
        if adopted:
            finished = self._take_over(adopted)
            self.log.info("adopted", files=len(adopted), finished=finished)

    def _adopt_failed(self, path: Path, exc: OSError) -> None:
        self.log.warning("adopt_failed", path=str(path), error=f"{type(exc).__name__}: {exc}",
                         note="left where it is; tried again at the next rescan")

    def _start_job(self, claim: Claim) -> Job:
        job = Job(claim=claim, input=self.cfg.paths.inbox / claim.rel, ready_at=time.monotonic())
        self._counters.started()
        self.log.debug("file_claimed", input=str(job.input))
        # Whatever came into the work area (claimed, recovered or adopted from a dead peer)
        # is looked at, never opened, before decoding: a link's target is never read.
        special = special_file_reason(claim.path)
        if special is not None:
            self._pipeline.fail(job, "detect", special)
        else:
            self._pipeline.submit(job)
        return job

    def _job_finished(self, job: Job) -> None:
        self._work.release_dirs(job.claim)
        # A slot is free: wake the main loop to claim the next file now, not at the next tick.
        self._events.put((WAKE, None))
        if job.error is None:
            self._service.file_done()
        else:
            self._service.file_failed(job.input, job.stage, job.error)


def describe_startup_failure(exc: BaseException) -> str:
    return str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__


def stderr_is_terminal() -> bool:
    try:
        return sys.stderr.isatty()
    except (AttributeError, ValueError):
        return False
