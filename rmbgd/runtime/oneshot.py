"""One-shot runs: `rmbgd process PATH... --out DIR` through the daemon's own pipeline.

The files named (and every file below the folders named) go through the same decode pool,
model thread and encode pool as the daemon's, with the same model loading and output options,
but nothing is watched or claimed: inputs stay where they are (unless `--done` asks to move
them after success), results are published atomically into `--out`, mirroring each input's
path below the folder it was found in, and the command exits when all are done.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import signal
import threading
import time
from pathlib import Path
from typing import Any, Optional

from rmbgd import __version__
from rmbgd.ops import logs
from rmbgd.config.settings import (
    Config,
    ConfigError,
    effective_max_in_flight,
    effective_workers,
    load_config,
    parse_config,
)
from rmbgd.output.fsops import OwnerLock
from rmbgd.batching.job import Counters, Job
from rmbgd.batching.pipeline import Pipeline
from rmbgd.intake.workarea import SYMLINK_REASON, special_file_reason
from rmbgd.runtime.oneshot_publisher import OneShotPublisher, default_owner
from rmbgd.runtime.plan import Plan, Source, UsageError, plan, remove_created
from rmbgd.runtime.progress import Report, Summary, TerminalReport
from rmbgd.runtime.stages import image_stages

__all__ = [
    "EXIT_FAILED",
    "EXIT_INTERRUPTED",
    "EXIT_OK",
    "EXIT_USAGE",
    "OneShotPublisher",
    "Plan",
    "Report",
    "Runner",
    "Source",
    "TerminalReport",
    "UsageError",
    "default_owner",
    "load_settings",
    "plan",
    "remove_created",
]

EXIT_OK = 0
EXIT_FAILED = 1
EXIT_USAGE = 2
EXIT_INTERRUPTED = 130

TICK_SECONDS = 0.1
_OPTION_OF_KEY = {"model.name": "--model", "model.device": "--device"}
_PROCESS_SYMLINK_REASON = "symbolic link: rmbgd never follows links; give the file itself"


# --------------------------------------------------------------------------- settings


def load_settings(config: Optional[str], model: Optional[str] = None, device: Optional[str] = None) -> Config:
    """The config file's settings (the defaults without one), with --model/--device applied.

    Raises ConfigError, with `--model`/`--device` named for problems in those options.
    """
    if config:
        cfg = load_config(config, with_paths=False)
    else:
        cfg = parse_config({}, Path.cwd(), with_paths=False)
    if model is not None and os.path.isdir(os.path.expanduser(model)):
        # On the command line a folder that exists is meant, even without a slash in its name.
        model = os.path.abspath(os.path.expanduser(model))
    given = {key: value for key, value in (("name", model), ("device", device)) if value is not None}
    if not given:
        return cfg
    try:
        # Validated and resolved (a local model folder against the working directory) by the
        # config's own rules, so `--device gpu` fails like `model.device: gpu` would.
        parsed = parse_config({"model": given}, Path.cwd(), with_paths=False).model
    except ConfigError as exc:
        raise ConfigError([_as_option(problem) for problem in exc.problems]) from None
    chosen = {key: getattr(parsed, key) for key in given}
    return dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, **chosen))


def _as_option(problem: str) -> str:
    for key, option in _OPTION_OF_KEY.items():
        if problem.startswith(key + ":"):
            return option + problem[len(key):]
    return problem


# --------------------------------------------------------------------------- the run


class Runner:
    """Load the model, feed the pipeline with at most max_in_flight files, wait, summarise.

    Signal handlers only count: the first SIGINT/SIGTERM stops submitting (the files in
    flight are finished), a second one exits at once, which leaves nothing half-written
    visible since every output appears atomically. While the model loads, a signal stops
    the run at once: nothing has been started yet.
    """

    def __init__(self, cfg: Config, work: Plan, log: Any, report: Report, clock=time.monotonic) -> None:
        self._cfg = cfg
        self._plan = work
        self._log = log
        self._report = report
        self._clock = clock
        self._counters = Counters()
        self._wake = threading.Event()
        self._signals = 0
        self._signal_name: Optional[str] = None
        self._max_in_flight = max(effective_max_in_flight(cfg), cfg.batch.size)
        self._processing_started: Optional[float] = None

    # -- signals ----------------------------------------------------------------------------
    def install_signal_handlers(self) -> None:
        signal.signal(signal.SIGTERM, self._on_signal)
        signal.signal(signal.SIGINT, self._on_signal)

    def _on_signal(self, signum: int, frame: object) -> None:
        self._signals += 1
        self._signal_name = signal.Signals(signum).name
        self._wake.set()

    def _check_forced(self) -> None:
        if self._signals >= 2:
            self._log.warning(
                "stopped", reason="second signal, stopping at once", forced=True, **self._counters.snapshot()
            )
            self._report.close()
            os._exit(EXIT_INTERRUPTED)

    @property
    def interrupted(self) -> bool:
        # A broken stdout pipe stops the run like a Ctrl-C (logs.py).
        return self._signals > 0 or logs.reader_gone()

    # -- life cycle -------------------------------------------------------------------------
    def run(self) -> int:
        """The exit code; raises daemon.StartupError when the model cannot be loaded."""
        started = self._clock()
        work = self._plan
        self._log.info(
            "starting",
            version=__version__,
            pid=os.getpid(),
            config=str(self._cfg.source) if self._cfg.source else None,
            files=len(work.sources),
            out=str(work.out),
            **({"done": str(work.done)} if work.done is not None else {}),
        )
        for path, reason in work.ignored:
            self._log.warning("file_ignored", input=path, reason=reason)
        healthy = True
        if work.sources and not self.interrupted:
            self._report.loading(self._cfg.model.name)
            # Imported here, like the model itself: `--help` must stay quick.
            from rmbgd.runtime.daemon import load_model_watching

            segmenter = load_model_watching(self._cfg, self._log, lambda: self._while_loading(started))
            if not self.interrupted:
                healthy = self._process(segmenter)
        return self._finish(started, healthy)

    def _while_loading(self, started: float) -> None:
        # Nothing has been read or written yet, so a stop loses nothing by not waiting for the
        # load (a download can take minutes); os._exit because the load thread may be deep in
        # torch, which a normal interpreter shutdown around it could crash.
        self._check_forced()
        if self.interrupted:
            self._log.info("stopping", reason=self._signal_name, during="startup")
            os._exit(self._finish(started, True))

    def _process(self, segmenter: Any) -> bool:
        owner = default_owner()
        # Our temps in --out and --done have no work folder to vouch for us: this lock keeps
        # a daemon that starts meanwhile (sharing those folders) from deleting them as orphans.
        with contextlib.ExitStack() as stack:
            for folder in (self._plan.out, self._plan.done):
                if folder is None:
                    continue
                try:
                    stack.enter_context(OwnerLock([folder], owner))
                except OSError as exc:
                    # Writing there will most likely fail too, and say so per file.
                    self._log.warning("owner_lock_failed", folder=str(folder), error=str(exc),
                                      note="a daemon starting now could remove this run's temp files there")
            return self._process_as(segmenter, owner)

    def _process_as(self, segmenter: Any, owner: str) -> bool:
        publisher = OneShotPublisher(self._plan.out, self._plan.done, owner)
        pipeline = Pipeline(self._cfg, segmenter, publisher, self._counters, self._log, on_finished=self._finished,
                            stages=image_stages())
        pipeline.start()
        self._log.info(
            "ready",
            model=self._cfg.model.name,
            device=segmenter.device,
            dtype=segmenter.dtype,
            precision=getattr(segmenter, "precision", None),
            loader=getattr(segmenter, "loader", None),
            batch_size=self._cfg.batch.size,
            max_wait_ms=self._cfg.batch.max_wait_ms,
            workers=effective_workers(self._cfg),
            files=len(self._plan.sources),
        )
        self._processing_started = self._clock()
        self._report.begin(len(self._plan.sources))
        try:
            healthy = self._feed(pipeline)
        finally:
            pipeline.stop_intake()
            while not pipeline.wait(TICK_SECONDS):
                self._tick()
        return healthy

    def _feed(self, pipeline: Pipeline) -> bool:
        """Submit every input, never more than max_in_flight at once; False if the model died."""
        pending = iter(self._plan.sources)
        upcoming = next(pending, None)
        announced = False
        while True:
            # Cleared before looking, so a file finishing after the look wakes the wait below.
            self._wake.clear()
            if not pipeline.model_alive():
                self._log.error("model_worker_died", reason="the model thread stopped")
                return False
            while upcoming is not None and not self.interrupted and self._counters.in_flight < self._max_in_flight:
                self._submit(pipeline, upcoming)
                upcoming = next(pending, None)
            if self.interrupted and not announced:
                announced = True
                self._log.info("stopping", reason=self._signal_name or "log_reader_gone", **self._counters.snapshot())
            if self._counters.in_flight == 0 and (upcoming is None or self.interrupted):
                return True
            self._wake.wait(TICK_SECONDS)
            self._tick()

    def _submit(self, pipeline: Pipeline, source: Source) -> None:
        job = Job(claim=source, input=source.path, ready_at=time.monotonic())
        self._counters.started()
        # Looked at, never opened: a link's target is never read, whether the link was
        # given on the command line or found in a folder.
        special = special_file_reason(source.path)
        if special is not None:
            pipeline.fail(job, "detect", _PROCESS_SYMLINK_REASON if special == SYMLINK_REASON else special)
        else:
            pipeline.submit(job)

    def _finished(self, job: Job) -> None:
        # Called from the pipeline's threads once a file is done or failed.
        self._report.file_finished(job)
        self._wake.set()

    def _tick(self) -> None:
        self._check_forced()
        counts = self._counters.snapshot()
        self._report.tick(counts["processed"], counts["failed"])

    def _finish(self, started: float, healthy: bool) -> int:
        counts = self._counters.snapshot()
        done = counts["processed"] + counts["failed"]
        busy = self._clock() - self._processing_started if self._processing_started is not None else 0.0
        summary = Summary(
            total=len(self._plan.sources),
            processed=counts["processed"],
            failed=counts["failed"],
            seconds=round(self._clock() - started, 2),
            images_per_s=round(done / busy, 2) if busy > 0 else 0.0,
            interrupted=self.interrupted,
            out=self._plan.out,
            done=self._plan.done,
        )
        self._report.tick(summary.processed, summary.failed, force=True)
        self._log.info("summary", **summary.fields())
        self._report.summary(summary)
        if self.interrupted:
            return EXIT_INTERRUPTED if self._signals else logs.EXIT_LOG_READER_GONE
        if not healthy or summary.failed or summary.unfinished:
            return EXIT_FAILED
        return EXIT_OK
