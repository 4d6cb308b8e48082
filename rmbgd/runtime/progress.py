"""What `rmbgd process` shows besides its JSON log: nothing, or a progress bar and a summary.

The runner calls a Report directly as its work goes (loading, begin, file_finished, tick,
summary); on a terminal, TerminalReport draws that with rich.progress and also gets the log
records, as event dicts (ops/logs.py's sink), to show warnings and errors as plain lines.
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any, Callable, Dict, Optional

from rich.console import Console
from rich.progress import BarColumn, Progress, ProgressColumn, Task, TaskID, TextColumn
from rich.text import Text

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

    # Where log records go instead of stdout's JSON lines, if anywhere (see logs.configure).
    log_sink: Optional[Callable[[Dict[str, Any]], None]] = None

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


class _Counts(ProgressColumn):
    """`done/total  N failed  R images/s  ETA t`, once the total is known."""

    def render(self, task: Task) -> Text:
        if task.total is None:
            return Text("")
        done = int(task.completed)
        elapsed = task.elapsed or 0.0
        rate = done / elapsed if elapsed > 0 else 0.0
        eta = (task.total - done) / rate if rate > 0 else None
        return Text(
            f"{done}/{int(task.total)}  {task.fields.get('failed', 0)} failed  {rate:.1f} images/s  "
            f"ETA {_duration(eta) if eta is not None else '--'}"
        )


class TerminalReport(Report):
    """For a person at a terminal: a progress bar, a line per failure, a summary.

    Warnings and errors from the log become readable lines above the bar; everything else
    (one line per file) would only scroll it away.
    """

    # Shown from their own line (failures) or by the CLI (start-up failures) instead.
    _SHOWN_ELSEWHERE = frozenset({"file_failed", "startup_failed", "file_done", "summary"})

    def __init__(self, stream: IO[str], clock: Callable[[], float] = time.monotonic) -> None:
        # Decided by the caller (stderr is a terminal), so rich need not guess it again.
        self._console = Console(file=stream, force_terminal=True, highlight=False, markup=False, emoji=False)
        self._progress = Progress(
            TextColumn("{task.description}"),
            BarColumn(bar_width=40),
            _Counts(),
            console=self._console,
            get_time=clock,
            # stdout and stderr stay as they are: nothing else is written to them meanwhile,
            # and the CLI's own one-line errors must not go through rich.
            redirect_stdout=False,
            redirect_stderr=False,
        )
        self._lock = threading.Lock()
        self._task: Optional[TaskID] = None
        self._shown = False
        self.log_sink = self._log_record

    # -- phases -----------------------------------------------------------------------------
    def loading(self, model: str) -> None:
        with self._lock:
            self._show()
            self._task = self._progress.add_task(f"loading model {model} …", total=None)

    def begin(self, total: int) -> None:
        with self._lock:
            self._show()
            if self._task is not None:
                self._progress.remove_task(self._task)
            self._task = self._progress.add_task("", total=total, failed=0)

    def file_finished(self, job: Job) -> None:
        if job.error is not None:
            self._line(f"failed: {job.claim.shown}: {job.error} (stage: {job.stage})")

    def tick(self, processed: int, failed: int, force: bool = False) -> None:
        with self._lock:
            if self._task is None or not self._shown:
                return
            self._progress.update(self._task, completed=processed + failed, failed=failed, refresh=force)

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
        self.close()
        for line in lines:
            self._line(line)

    def close(self) -> None:
        # Leaves the last drawing of the bar in place, and the cursor visible again.
        with self._lock:
            if self._shown:
                self._shown = False
                self._progress.stop()

    # -- drawing ----------------------------------------------------------------------------
    def _show(self) -> None:
        if not self._shown:
            self._shown = True
            self._progress.start()

    def _line(self, text: str) -> None:
        # Above the bar while it is shown (rich keeps it below what is printed).
        try:
            self._console.print(Text(text), soft_wrap=True)
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


def _duration(seconds: float) -> str:
    seconds = int(round(seconds))
    if seconds < 60:
        return f"{seconds}s"
    if seconds < 3600:
        return f"{seconds // 60}m{seconds % 60:02d}s"
    return f"{seconds // 3600}h{seconds // 60 % 60:02d}m"
