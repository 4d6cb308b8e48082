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
import json
import os
import shutil
import signal
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path, PurePath
from typing import IO, Any, Dict, List, Optional, Sequence, Tuple

from rmbgd import __version__
from rmbgd.ops import logs
from rmbgd.config import (
    Config,
    ConfigError,
    effective_max_in_flight,
    effective_workers,
    load_config,
    parse_config,
)
from rmbgd.output.fsops import NAME_ERRNOS, OwnerLock, move_unique, publish_bytes, shorten_name, walk_files
from rmbgd.batching.job import Counters, Job
from rmbgd.intake.names import is_ignored_name
from rmbgd.batching.pipeline import Pipeline, PublishError
from rmbgd.output.publisher import Delivery
from rmbgd.intake.workarea import SYMLINK_REASON, default_instance_name, special_file_reason
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
    "load_settings",
    "plan",
]

EXIT_OK = 0
EXIT_FAILED = 1
EXIT_USAGE = 2
EXIT_INTERRUPTED = 130

TICK_SECONDS = 0.1
# A write that keeps failing (disk full, a file where a folder should be) fails the file after
# this many tries instead of being retried forever as in the daemon: nobody may be watching.
WRITE_ATTEMPTS = 3

_OPTION_OF_KEY = {"model.name": "--model", "model.device": "--device"}
_PROCESS_SYMLINK_REASON = "symbolic link: rmbgd never follows links; give the file itself"


class UsageError(Exception):
    """The command line asks for something impossible (exit 2, before the model loads)."""


# --------------------------------------------------------------------------- inputs


@dataclass(eq=False)
class Source:
    """One input: what the pipeline reads as a Claim (`path`, `rel`), plus delivery state.

    `rel` is the path below the folder it was found in (just its name for a file given
    directly): outputs mirror it and `profiles:` globs match it, as they do inbox paths.
    """

    rel: PurePath
    path: Path
    shown: str  # the path as the user would type it, for terminal messages
    write_failures: int = 0
    outputs: Optional[List[Path]] = None  # once published, a retry only retires the original


@dataclass
class Plan:
    sources: List[Source]
    out: Path
    done: Optional[Path]
    ignored: List[Tuple[str, str]] = field(default_factory=list)  # (path, reason)
    # Folders `plan` made for --out/--done (deepest last), removed again if the run never starts.
    created: List[Path] = field(default_factory=list)


def plan(paths: Sequence[str], out: str, done: Optional[str] = None) -> Plan:
    """Expand the arguments into inputs and check the destinations; raises UsageError."""
    roots = []
    for raw in paths:
        path = Path(os.path.abspath(os.path.expanduser(raw)))
        if not os.path.lexists(path):
            raise UsageError(f"no such file or folder: {raw}")
        if not (path.is_dir() or path.is_file()):
            raise UsageError(f"not a regular file or folder: {raw}")
        roots.append((raw, path))
    out_dir = _destination("--out", out, roots)
    done_dir = _destination("--done", done, roots) if done is not None else None
    # Created only once every argument is known to be usable.
    created: List[Path] = []
    for option, raw, path in (("--out", out, out_dir), ("--done", done, done_dir)):
        if path is not None:
            created += _create(option, raw, path)
    result = Plan(sources=[], out=out_dir, done=done_dir, created=created)
    seen = set()
    for raw, path in roots:
        found = _below(raw, path, result.ignored) if path.is_dir() else [Source(PurePath(path.name), path, raw)]
        for source in found:
            # The same file named twice (or given and also found in a folder) is done once.
            # Its own name is not resolved: a link is an input of its own (that fails), never
            # a stand-in for its target.
            real = os.path.join(os.path.realpath(source.path.parent), source.path.name)
            if real not in seen:
                seen.add(real)
                result.sources.append(source)
    return result


def _destination(option: str, raw: str, roots: List[Tuple[str, Path]]) -> Path:
    path = Path(os.path.abspath(os.path.expanduser(raw)))
    if os.path.lexists(path) and not path.is_dir():
        raise UsageError(f"{option} {raw}: exists and is not a folder")
    real = Path(os.path.realpath(path))
    for shown, root in roots:
        if root.is_dir() and real.is_relative_to(os.path.realpath(root)):
            # Results (or moved originals) inside an input folder would be inputs next time.
            raise UsageError(f"{option} {raw}: must not be inside the input folder {shown}")
    return path


def _create(option: str, raw: str, path: Path) -> List[Path]:
    """Make `path` (and missing parents); return the folders this made, outermost first."""
    missing = []
    for folder in (path, *path.parents):
        if os.path.lexists(folder):
            break
        missing.append(folder)
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise UsageError(f"{option} {raw}: cannot create: {exc.strerror or exc}") from None
    if not os.access(path, os.W_OK | os.X_OK):
        raise UsageError(f"{option} {raw}: folder is not writable by this user")
    return missing[::-1]


def remove_created(work: Plan) -> None:
    """Remove the folders `plan` made, if still empty: a run that never started leaves none."""
    for folder in reversed(work.created):
        try:
            folder.rmdir()
        except OSError:
            # Not empty (someone put something there meanwhile) or already gone: leave it.
            continue


def _below(raw: str, top: Path, ignored: List[Tuple[str, str]]) -> List[Source]:
    """Every file under `top`, hidden and partial names skipped, symlinked folders not entered."""
    sources = []
    for entry in walk_files(top, skip=lambda entry: is_ignored_name(entry.name)):
        path = Path(entry.path)
        rel = path.relative_to(top)
        shown = os.path.join(raw, str(rel))
        if entry.is_symlink() and entry.is_dir():
            ignored.append((shown, "symbolic link to a folder: not followed"))
        elif entry.is_file() or entry.is_symlink():
            # A dangling link stays in, to fail with its reason rather than vanish unreported.
            sources.append(Source(rel, path, shown))
        else:
            # FIFOs, sockets and devices are never opened, as in the daemon.
            ignored.append((shown, "not a regular file"))
    sources.sort(key=lambda source: source.rel.as_posix())
    return sources


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


# --------------------------------------------------------------------------- publishing


@dataclass(frozen=True)
class Kept:
    """A failed input: left where it was; the reason is in the log and the summary."""

    moved_to: Path
    sidecar: Optional[Path] = None


class WriteFailed(PublishError):
    """Writing a result kept failing: the pipeline fails the file (it retries OSErrors forever)."""


class OneShotPublisher:
    """Results into `out` (mirroring `rel`), originals left alone or moved to `done`.

    Each file appears atomically under a name nothing else holds (x.png, x-1.png, …), so a
    second run, or two inputs x.jpg and x.png, never overwrite a result.
    """

    def __init__(self, out: Path, done: Optional[Path], owner: str) -> None:
        self._out = out
        self._done = done
        self._owner = owner

    def deliver(self, source: Source, files: Sequence[Any]) -> Delivery:
        if not files:
            raise ValueError("nothing to deliver")
        try:
            if source.outputs is None:
                source.outputs = self._publish(source.rel, files)
            original = self._retire(source)
        except OSError as exc:
            source.write_failures += 1
            if exc.errno in NAME_ERRNOS or source.write_failures < WRITE_ATTEMPTS:
                raise  # the pipeline fails a bad name at once and retries the rest
            raise WriteFailed(f"{_describe_os_error(exc)} (tried {WRITE_ATTEMPTS} times)") from exc
        return Delivery(output=source.outputs[0], original=original, extra=tuple(source.outputs[1:]))

    def reject(self, source: Source, *, stage: str, error: str) -> Kept:
        return Kept(moved_to=source.path)

    def _publish(self, rel: PurePath, files: Sequence[Any]) -> List[Path]:
        first = files[0]
        target = self._out / rel.parent / shorten_name(PurePath(rel.name).stem, first.suffix)
        result = publish_bytes(first.data, target, self._owner)
        outputs = [result]
        # Named after the name the result got (x-1.png → x-1.mask.png), as the daemon does,
        # so a result and its mask stay recognisably a pair.
        stem = result.name[: len(result.name) - len(first.suffix)] if first.suffix else result.name
        for item in files[1:]:
            outputs.append(publish_bytes(item.data, result.with_name(shorten_name(stem, item.suffix)), self._owner))
        return outputs

    def _retire(self, source: Source) -> Path:
        if self._done is None:
            return source.path
        return move_unique(source.path, self._done / source.rel, self._owner)


def _describe_os_error(exc: OSError) -> str:
    where = f": {exc.filename}" if exc.filename else ""
    return f"cannot write{where}: {exc.strerror or exc}"


def default_owner() -> str:
    # Tags temp files like the daemon's, so a crashed run's leftovers are recognisable.
    return f"process-{default_instance_name()}"


# --------------------------------------------------------------------------- reporting


@dataclass(frozen=True)
class Summary:
    total: int
    processed: int
    failed: int
    seconds: float
    images_per_s: float
    interrupted: bool
    out: Path
    done: Optional[Path]

    @property
    def unfinished(self) -> int:
        return self.total - self.processed - self.failed

    def fields(self) -> Dict[str, Any]:
        return {
            "processed": self.processed,
            "failed": self.failed,
            "total": self.total,
            "unfinished": self.unfinished,
            "seconds": self.seconds,
            "images_per_s": self.images_per_s,
            "interrupted": self.interrupted,
            "out": str(self.out),
            **({"done": str(self.done)} if self.done is not None else {}),
        }


class Report:
    """What a run shows besides its JSON log; this one adds nothing (the log says it all)."""

    log_stream: Optional[IO[str]] = None

    def loading(self, model: str) -> None:
        pass

    def begin(self, total: int) -> None:
        pass

    def file_finished(self, job: Job) -> None:
        pass

    def tick(self, processed: int, failed: int, force: bool = False) -> None:
        pass

    def summary(self, summary: Summary) -> None:
        pass

    def close(self) -> None:
        pass


class TerminalReport(Report):
    """For a person at a terminal: a one-line progress bar, a line per failure, a summary.

    The JSON log is read here instead of printed: warnings and errors become readable lines
    above the bar, everything else (one line per file) would only scroll it away.
    """

    REDRAW_SECONDS = 0.1
    # Shown from their own line (failures) or by the CLI (start-up failures) instead.
    _SHOWN_ELSEWHERE = frozenset({"file_failed", "startup_failed", "file_done", "summary"})

    def __init__(self, stream: IO[str], clock=time.monotonic) -> None:
        self._stream = stream
        self._clock = clock
        self._lock = threading.RLock()
        self._bar = ""
        self._total = 0
        self._started: Optional[float] = None
        self._last_draw = 0.0
        self.log_stream = _LogReader(self._log_record)

    # -- phases -----------------------------------------------------------------------------
    def loading(self, model: str) -> None:
        self._set_bar(f"loading model {model} …")

    def begin(self, total: int) -> None:
        with self._lock:
            self._total = total
            self._started = self._clock()
        self.tick(0, 0, force=True)

    def file_finished(self, job: Job) -> None:
        if job.error is not None:
            self._line(f"failed: {job.claim.shown}: {job.error} (stage: {job.stage})")

    def tick(self, processed: int, failed: int, force: bool = False) -> None:
        now = self._clock()
        with self._lock:
            if self._started is None or (not force and now - self._last_draw < self.REDRAW_SECONDS):
                return
            self._last_draw = now
            self._set_bar(self._progress(processed, failed, now - self._started))

    def summary(self, summary: Summary) -> None:
        done = summary.processed + summary.failed
        lines = []
        if summary.interrupted:
            lines.append(
                f"Interrupted after {summary.seconds:.1f} s: {done} of {summary.total} files finished, "
                f"{summary.unfinished} not started (left untouched)."
            )
        elif summary.total == 0:
            lines.append("No files to process.")
        else:
            lines.append(
                f"Processed {summary.processed} of {summary.total} files in {summary.seconds:.1f} s "
                f"({summary.images_per_s:.1f} images/s)."
            )
        if summary.failed:
            lines.append(f"{summary.failed} failed (listed above); their inputs were left in place.")
        if summary.unfinished and not summary.interrupted:
            lines.append(f"{summary.unfinished} not finished (see the errors above).")
        if summary.processed:
            lines.append(f"Results are in {summary.out}")
            if summary.done is not None:
                lines.append(f"Originals were moved to {summary.done}")
        with self._lock:
            self._set_bar("")
            self._write("".join(line + "\n" for line in lines))

    def close(self) -> None:
        self._set_bar("")

    # -- drawing ----------------------------------------------------------------------------
    def _progress(self, processed: int, failed: int, elapsed: float) -> str:
        done = processed + failed
        rate = done / elapsed if elapsed > 0 else 0.0
        eta = (self._total - done) / rate if rate > 0 else None
        text = (
            f" {done}/{self._total}  {failed} failed  {rate:.1f} images/s  "
            f"ETA {_duration(eta) if eta is not None else '--'}"
        )
        width = _columns(self._stream) - 1
        room = min(40, width - len(text) - 2)
        if room >= 10:
            filled = room * done // self._total if self._total else room
            text = "[" + "#" * filled + "." * (room - filled) + "]" + text
        return text[:width]

    def _set_bar(self, text: str) -> None:
        with self._lock:
            self._bar = text
            self._write("\r\x1b[K" + text)

    def _line(self, text: str) -> None:
        # Above the bar: clear it, write the line, draw the bar again below it.
        with self._lock:
            self._write("\r\x1b[K" + text + "\n" + self._bar)

    def _write(self, text: str) -> None:
        try:
            self._stream.write(text)
            self._stream.flush()
        except (OSError, ValueError):
            pass  # the terminal went away; the run itself goes on

    def _log_record(self, record: Dict[str, Any]) -> None:
        level = record.get("level", "")
        event = record.get("event", "")
        if level not in ("warning", "error", "critical") or event in self._SHOWN_ELSEWHERE:
            return
        detail = next((record[key] for key in ("error", "reason", "note") if record.get(key)), None)
        where = f" {record['input']}" if record.get("input") else ""
        text = f"{level}: {event}{where}" + (f": {detail}" if detail else "")
        if level == "critical" and record.get("exception"):
            text += "\n" + str(record["exception"]).rstrip()  # a bug in rmbgd: keep its traceback
        self._line(text)


class _LogReader:
    """A text stream for the log handler that hands each JSON line to `on_record`."""

    def __init__(self, on_record) -> None:
        self._on_record = on_record

    def write(self, text: str) -> int:
        for line in text.splitlines():
            try:
                record = json.loads(line)
            except ValueError:
                continue
            if isinstance(record, dict):
                self._on_record(record)
        return len(text)

    def flush(self) -> None:
        pass


def _columns(stream: IO[str]) -> int:
    try:
        return os.get_terminal_size(stream.fileno()).columns or 80
    except (AttributeError, OSError, ValueError):
        return shutil.get_terminal_size().columns


def _duration(seconds: float) -> str:
    seconds = int(round(seconds))
    if seconds < 60:
        return f"{seconds}s"
    if seconds < 3600:
        return f"{seconds // 60}m{seconds % 60:02d}s"
    return f"{seconds // 3600}h{seconds // 60 % 60:02d}m"


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
