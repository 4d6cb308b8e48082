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
import threading
import time
from pathlib import Path
from typing import Any, Optional

from rmbgd.config import (
    Config,
    ConfigError,
    load_config,
    parse_config,
)
from rmbgd.output.fsops import OwnerLock
from rmbgd.batching.job import Counters, Job
from rmbgd.batching.pipeline import Pipeline
from rmbgd.intake.filekinds import SYMLINK_REASON, special_file_reason
from rmbgd.runtime.lifecycle import TICK_SECONDS, Lifecycle
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


class Runner(Lifecycle):
    """Load the model, feed the pipeline with at most the in-flight limit of files, wait, summarise.

    The first SIGINT/SIGTERM stops submitting (the files in flight are finished), a second
    one exits at once (lifecycle.py), which leaves nothing half-written visible since every
    output appears atomically.
    """

    signal_exit = EXIT_INTERRUPTED

    def __init__(self, cfg: Config, work: Plan, log: Any, report: Report, clock=time.monotonic) -> None:
        super().__init__(cfg, log, Counters())
        self._plan = work
        self._report = report
        self._clock = clock
        # Set by the pipeline's threads when a file is finished: the next one is submitted now.
        self._wake = threading.Event()
        self._started = clock()
        self._processing_started: Optional[float] = None
        self._pipeline: Optional[Pipeline] = None
        self._locks = contextlib.ExitStack()
        self._pending = iter(work.sources)
        self._upcoming: Optional[Source] = next(self._pending, None)

    @property
    def interrupted(self) -> bool:
        return self.stop_requested

    # -- start-up ---------------------------------------------------------------------------
    def _starting(self) -> None:
        work = self._plan
        self._started = self._clock()
        self._log_starting(
            files=len(work.sources),
            out=str(work.out),
            **({"done": str(work.done)} if work.done is not None else {}),
        )
        for path, reason in work.ignored:
            self.log.warning("file_ignored", input=path, reason=reason)

    def _wants_model(self) -> bool:
        return bool(self._plan.sources) and not self.stop_requested

    def _load_model(self) -> Any:
        self._report.loading(self.cfg.model.name)
        # The daemon's own loading; imported here, like the model itself: `--help` must stay quick.
        from rmbgd.runtime.daemon import load_model

        return self._watched(lambda: load_model(self.cfg, self.log))

    def _stop_during_startup(self) -> int:
        self.log.info("stopping", reason=self._stop_reason(), during="startup")
        return EXIT_OK

    def _open(self, segmenter: Any) -> None:
        owner = default_owner()
        # Our temps in --out and --done have no work folder to vouch for us: this lock keeps
        # a daemon that starts meanwhile (sharing those folders) from deleting them as orphans.
        for folder in (self._plan.out, self._plan.done):
            if folder is None:
                continue
            try:
                self._locks.enter_context(OwnerLock([folder], owner))
            except OSError as exc:
                # Writing there will most likely fail too, and say so per file.
                self.log.warning("owner_lock_failed", folder=str(folder), error=str(exc),
                                 note="a daemon starting now could remove this run's temp files there")
        try:
            publisher = OneShotPublisher(self._plan.out, self._plan.done, owner)
            self._pipeline = Pipeline(self.cfg, segmenter, publisher, self._counters, self.log,
                                      on_finished=self._finished, stages=image_stages())
            self._pipeline.start()
        except BaseException:
            self._locks.close()
            raise

    def _ready_fields(self, segmenter: Any) -> dict:
        return {**super()._ready_fields(segmenter), "files": len(self._plan.sources)}

    def _on_ready(self, segmenter: Any) -> None:
        self._processing_started = self._clock()
        self._report.begin(len(self._plan.sources))

    # -- running ----------------------------------------------------------------------------
    def _main_loop(self) -> int:
        """Submit every input until all are finished or a stop is asked for; EXIT_FAILED if
        the model died."""
        while not self.stop_requested:
            # Cleared before looking, so a file finishing after the look wakes the wait below.
            self._wake.clear()
            if not self._model_alive():
                return EXIT_FAILED
            while self._upcoming is not None and not self.stop_requested and self._has_room():
                self._submit(self._upcoming)
                self._upcoming = next(self._pending, None)
            if self._counters.in_flight == 0 and self._upcoming is None:
                return EXIT_OK
            self._wake.wait(TICK_SECONDS)
            self._tick()
        return EXIT_OK

    def _model_alive(self) -> bool:
        if self._pipeline.model_alive():
            return True
        self.log.error("model_worker_died", reason="the model thread stopped")
        return False

    def _submit(self, source: Source) -> None:
        job = Job(claim=source, input=source.path, ready_at=time.monotonic())
        self._counters.started()
        # Looked at, never opened: a link's target is never read, whether the link was
        # given on the command line or found in a folder.
        special = special_file_reason(source.path)
        if special is not None:
            self._pipeline.fail(job, "detect", _PROCESS_SYMLINK_REASON if special == SYMLINK_REASON else special)
        else:
            self._pipeline.submit(job)

    def _finished(self, job: Job) -> None:
        # Called from the pipeline's threads once a file is done or failed.
        self._report.file_finished(job)
        self._wake.set()

    def _tick(self) -> None:
        self._check_forced()
        counts = self._counters.snapshot()
        self._report.tick(counts["processed"], counts["failed"])

    # -- stopping ---------------------------------------------------------------------------
    def _shutdown(self, code: int) -> int:
        if self.stop_requested:
            self.log.info("stopping", reason=self._stop_reason(), **self._counters.snapshot())
            if code == EXIT_OK:
                code = self._finish_in_flight()
        self._crashed()
        return code

    def _finish_in_flight(self) -> int:
        """After a stop: the files already submitted are finished, not abandoned."""
        while True:
            self._wake.clear()
            if not self._model_alive():
                return EXIT_FAILED
            if self._counters.in_flight == 0:
                return EXIT_OK
            self._wake.wait(TICK_SECONDS)
            self._tick()

    def _crashed(self) -> None:
        try:
            self._drain(self._pipeline)
        finally:
            self._locks.close()

    def _draining(self) -> None:
        counts = self._counters.snapshot()
        self._report.tick(counts["processed"], counts["failed"])

    def _before_forced_exit(self) -> None:
        self._report.close()

    def _finish(self, code: int) -> int:
        counts = self._counters.snapshot()
        done = counts["processed"] + counts["failed"]
        busy = self._clock() - self._processing_started if self._processing_started is not None else 0.0
        summary = Summary(
            total=len(self._plan.sources),
            processed=counts["processed"],
            failed=counts["failed"],
            seconds=round(self._clock() - self._started, 2),
            images_per_s=round(done / busy, 2) if busy > 0 else 0.0,
            interrupted=self.interrupted,
            out=self._plan.out,
            done=self._plan.done,
        )
        self._report.tick(summary.processed, summary.failed, force=True)
        self.log.info("summary", **summary.fields())
        self._report.summary(summary)
        if self.interrupted:
            return self._stop_code()
        if code != EXIT_OK or summary.failed or summary.unfinished:
            return EXIT_FAILED
        return EXIT_OK
