"""One claimed input on its way through the pipeline, and the counters an operator reads."""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, Optional

from rmbgd.intake.workarea import Claim


@dataclass
class Job:
    claim: Optional[Claim]          # None for an in-memory job (an HTTP request: see `reply`)
    input: Path                     # where the user put it (inbox path), for logs and sidecars
    ready_at: float                 # monotonic time it was claimed: `total_ms` counts from here
    # Monotonic time it was decoded and handed to the collector: the batch window and
    # `wait_ms` (decoded → its model call starts: batching plus a busy model) count from here.
    queued_at: Optional[float] = None
    image: Any = None               # DecodedImage once decoded
    mask: Any = None                # (h, w) uint8 once inferred
    batch: Optional[int] = None
    files: Optional[list] = None    # the encoded outputs (output.files.OutputFile), kept until safely published
    size: tuple = (0, 0)            # (width, height), kept after the pixels are released
    attempts: int = 0               # publish/reject retries after environment errors
    parked: bool = False            # waiting for a retry without holding an in-flight slot
    settled: bool = False           # counted as processed, failed or left claimed: never twice
    stage: Optional[str] = None     # set when the job failed: where,
    error: Optional[str] = None     # and why
    ms: Dict[str, float] = field(default_factory=dict)
    # An in-memory job (HTTP): decoded from `data`, rendered with `output` (OutputConfig), and
    # its files or failure handed to `reply` (batching.replies.Reply) instead of the outbox and
    # errors/. `urgent` puts it ahead of waiting inbox files (collector.py).
    data: Optional[bytes] = None
    output: Any = None
    reply: Any = None
    urgent: bool = False

    def release_image(self) -> None:
        # Decoded pixels are the bulk of a job's memory; drop them as soon as they are written.
        self.image = None
        self.mask = None


def ms_since(start: float) -> float:
    return round((time.monotonic() - start) * 1000.0, 1)


class Counters:
    """Thread-safe tallies: files in flight, processed and failed.

    `in_flight` counts every claimed, unfinished file (after a stop: the files left claimed).
    Of those, `parked` ones wait for a retry (their destination is full or gone): they stay
    claimed but give their slot back, so `busy` (in flight and not parked) is what the claim
    gate compares with the in-flight limit, and a waiting file never stalls the ones behind it.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._idle = threading.Condition(self._lock)
        self.in_flight = 0
        self.parked = 0
        self.processed = 0
        self.failed = 0

    @property
    def busy(self) -> int:
        with self._lock:
            return self.in_flight - self.parked

    def started(self) -> None:
        with self._lock:
            self.in_flight += 1

    def park(self) -> None:
        with self._lock:
            self.parked += 1
            self._idle.notify_all()

    def unpark(self) -> None:
        """The slot is taken again for the retry (briefly above the limit if all are taken:
        the claim gate then waits a little longer, nothing else)."""
        with self._lock:
            self.parked -= 1

    def finished(self, ok: bool) -> None:
        with self._lock:
            self.in_flight -= 1
            if ok:
                self.processed += 1
            else:
                self.failed += 1
            self._idle.notify_all()

    def abandoned(self) -> None:
        """A job left claimed on purpose (shutdown, or an error in rmbgd itself): not done,
        not failed, no longer in flight."""
        with self._lock:
            self.in_flight -= 1
            self._idle.notify_all()

    def snapshot(self) -> Dict[str, int]:
        with self._lock:
            return {"processed": self.processed, "failed": self.failed, "in_flight": self.in_flight}
