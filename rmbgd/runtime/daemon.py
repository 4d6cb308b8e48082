"""`rmbgd run`: the daemon's phases, filled into the shared lifecycle (lifecycle.py).

The first SIGTERM/SIGINT drains: the batch in flight is finished, everything else stays
safely claimed or in the inbox for the next start. SIGHUP re-reads the config (`_reload`).
The inbox side (watching, readiness, claiming) is inbox.py; finishing what a crashed
predecessor or a dead peer left is recovery.py.
"""

from __future__ import annotations

import dataclasses
import signal
import sys
import time
from typing import Any, Optional

from rmbgd.batching.collector import CallCost
from rmbgd.batching.job import Counters, Job
from rmbgd.batching.pipeline import Pipeline
from rmbgd.config import (
    Config,
    ConfigError,
    check_folders,
    load_config,
    prepare_folders,
)
from rmbgd.intake.readiness import Readiness
from rmbgd.intake.watcher import WatchUnavailable, Watcher
from rmbgd.intake.filekinds import special_file_reason
from rmbgd.intake.workarea import Claim, WorkArea, WorkAreaLocked
from rmbgd.ops import logs
from rmbgd.ops.metrics import MetricsUnavailable
from rmbgd.ops.service import Service
from rmbgd.output import backoff
from rmbgd.output.publisher import Publisher
from rmbgd.runtime.httpapi import HttpSide
from rmbgd.runtime.inbox import InboxFeed
from rmbgd.runtime.lifecycle import (
    EXIT_FAILURE,
    EXIT_FORCED,
    EXIT_OK,
    TICK_SECONDS,
    Lifecycle,
    StartupError,
    in_flight_limit,
)
from rmbgd.runtime.recovery import Recovery
from rmbgd.runtime.stages import image_stages

__all__ = ["DRAIN_TIMEOUT_SECONDS", "EXIT_FAILURE", "EXIT_FORCED", "EXIT_OK", "Daemon", "StartupError", "load_model"]

# How long a drain may take before the daemon gives up and exits anyway (the unclaimed and
# unfinished files are safe either way); systemd's TimeoutStopSec must stay above this.
DRAIN_TIMEOUT_SECONDS = 60.0


def load_model(cfg: Config, log: Any) -> Any:
    """Load and warm up `cfg.model`; raises StartupError with the one-line reason."""
    # Imported here: torch and transformers take seconds to import, and `rmbgd check` or
    # `--help` should not pay for that.
    from rmbgd.model.hub import ModelLoadError
    from rmbgd.model.loading import load_segmenter

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


class Daemon(HttpSide, Lifecycle):
    # How long a file waits before its write is retried (the in-process tests shorten it).
    retry_delay = staticmethod(backoff.retry_delay)
    # What watches the inbox (the in-process tests swap in one that stops without waiting).
    watcher_class = Watcher

    def __init__(self, cfg: Config, log: Any, clock=time.monotonic, instance: Optional[str] = None) -> None:
        super().__init__(cfg, log, Counters())
        self._clock = clock
        self._work = WorkArea(cfg.paths.inbox, instance)
        self._service = Service(cfg, log, instance=self._work.instance)
        self._reload_requested = False
        readiness = Readiness(cfg.watch.settle_seconds, cfg.watch.writer_timeout_seconds)
        self._feed = InboxFeed(cfg.paths.inbox, self._work, readiness, log, clock, self._has_room, self._start_job)
        self._pipeline: Optional[Pipeline] = None
        self._publisher: Optional[Publisher] = None
        self._recovery: Optional[Recovery] = None
        self._watcher: Optional[Watcher] = None

    def install_signal_handlers(self) -> None:
        super().install_signal_handlers()
        signal.signal(signal.SIGHUP, self._on_hangup)

    def _on_hangup(self, signum: int, frame: object) -> None:
        self._reload_requested = True

    def run(self) -> int:
        """The exit code; raises StartupError, after recording it for `rmbgd status`."""
        try:
            return super().run()
        except StartupError as exc:
            self._http_abort()
            self._service.failed(str(exc))
            raise

    # -- start-up ---------------------------------------------------------------------------
    def _starting(self) -> None:
        cfg = self.cfg
        self._log_starting(inbox=str(cfg.paths.inbox), outbox=str(cfg.paths.outbox))
        try:
            prepare_folders(cfg)
            self._service.starting(cfg)
        except (ConfigError, MetricsUnavailable) as exc:
            raise StartupError(str(exc)) from None
        self._http_serve(self._work.instance)

    def _load_model(self) -> Any:
        with self._service.loading_model(self.cfg.model.name):
            return self._watched(lambda: load_model(self.cfg, self.log))

    def _stop_during_startup(self) -> int:
        self._http_abort()
        self.log.info("stopping", reason=self._stop_reason(), during="startup")
        self._service.stopping()
        self.log.info("stopped", **self._counters.snapshot())
        self._service.stopped(self._counters.snapshot())
        return self._stop_code()

    def _open(self, segmenter: Any) -> None:
        cfg = self.cfg
        self._open_work_area()
        # Before recovery and the pipeline: when the kernel refuses the watches, nothing has
        # been taken on yet that would have to be drained.
        self._watcher = self.watcher_class(cfg.paths.inbox, self._feed.on_watch_event, polling=cfg.watch.polling)
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
        self._recovery = Recovery(cfg.paths, self._work, self._publisher, self.log, self._start_job)
        self._recovery.at_start()
        self._feed.scan(cfg.paths.inbox)
        # Just before `ready` is logged: a client that saw it must not get 503 `starting`.
        self._http_ready()

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

    def _ready_fields(self, segmenter: Any) -> dict:
        return {**super()._ready_fields(segmenter), "instance": self._work.instance,
                "waiting": len(self._feed.readiness)}

    def _on_ready(self, segmenter: Any) -> None:
        self._service.ready(model=self.cfg.model.name, device=segmenter.device, batch_size=self.cfg.batch.size)

    # -- running ----------------------------------------------------------------------------
    def _main_loop(self) -> int:
        next_rescan = self._clock() + self.cfg.watch.rescan_seconds
        while not self.stop_requested:
            if self._reload_requested:
                self._reload_requested = False
                self._reload()
            self._feed.take_events(TICK_SECONDS)
            now = self._clock()
            self._feed.poll(now)
            self._feed.claim_backlog()
            if now >= next_rescan:
                self._feed.scan(self.cfg.paths.inbox)
                self._recovery.adopt_dead_peers()
                next_rescan = now + self.cfg.watch.rescan_seconds
            if not self._watcher.is_alive():
                self.log.error("watcher_died", reason="the inotify observer thread stopped")
                return EXIT_FAILURE
            if not self._pipeline.model_alive():
                self.log.error("model_worker_died", reason="the model thread stopped")
                return EXIT_FAILURE
            if not self._http_alive():
                return EXIT_FAILURE
            self._http_tick()
            counts = self._counters.snapshot()
            self._service.tick(
                processed=counts["processed"],
                failed=counts["failed"],
                queued=self._feed.queued,
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
                 "metrics": old.metrics, "input": new.input, "http": old.http}
        needs_restart = sorted(k for k in ("paths", "model", "pipeline", "state", "metrics", "http")
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
        self._feed.readiness.reconfigure(applied.watch.settle_seconds, applied.watch.writer_timeout_seconds)
        self._pipeline.apply(applied)
        self._max_in_flight = in_flight_limit(applied)
        self.cfg = applied
        if self._http is not None:
            self._http.cfg = applied  # the output section requests start from
        changed = sorted(k for k in ("watch", "batch", "input", "output", "profiles", "logging") if getattr(new, k) != getattr(old, k))
        self.log.info("reloaded", changed=changed, needs_restart=needs_restart,
                      **({"note": "restart rmbgd to apply " + ", ".join(needs_restart)} if needs_restart else {}))
        self._service.reloaded(applied.logging.progress_seconds)

    # -- stopping ---------------------------------------------------------------------------
    def _shutdown(self, code: int) -> int:
        self._http_refuse()
        self.log.info("stopping", reason=self._stop_reason() or "failure", **self._counters.snapshot())
        self._service.stopping()
        self._watcher.stop()
        started = time.monotonic()
        self._http_drain(DRAIN_TIMEOUT_SECONDS)
        drained = self._drain(self._pipeline, DRAIN_TIMEOUT_SECONDS - (time.monotonic() - started))
        self._http_close()
        if not drained:
            self.log.error("drain_timeout", seconds=DRAIN_TIMEOUT_SECONDS, **self._counters.snapshot())
            self._service.stopped(self._counters.snapshot())
            return EXIT_FAILURE
        self._work.close()
        # in_flight now counts the files left claimed for the next start.
        self.log.info("stopped", **self._counters.snapshot())
        self._service.stopped(self._counters.snapshot())
        return code

    # -- jobs -------------------------------------------------------------------------------
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
        self._feed.wake()
        if job.error is None:
            self._service.file_done()
        else:
            self._service.file_failed(job.input, job.stage, job.error)


def stderr_is_terminal() -> bool:
    try:
        return sys.stderr.isatty()
    except (AttributeError, ValueError):
        return False
