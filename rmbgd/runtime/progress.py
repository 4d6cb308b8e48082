"""What `rmbgd process` shows besides its JSON log: nothing, or a progress bar and a summary."""

from __future__ import annotations

import json
import os
import shutil
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any, Dict, Optional

from rmbgd.batching.job import Job

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
