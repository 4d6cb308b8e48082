"""The HTTP API's backend in the daemon: requests become jobs of the daemon's own pipeline.

An image from a request is a Job without a claim (rmbgd.batching.replies): decoded in the
decode pool, batched with the inbox's files (ahead of them with `http.priority: interactive`),
run by the model and rendered in the encode pool; its files come back here. `/v1/remove`
hands them to the waiting request; `/v1/batch` publishes them atomically under
`outbox/http/<batch id>/`.

Admission: requests share `pipeline.max_in_flight` with the inbox's files. A request that
finds it full waits up to `http.busy_wait_seconds` (holding back the inbox's claims
meanwhile, so a backlog cannot take every slot that frees), then gets 503 with Retry-After.
"""

from __future__ import annotations

import itertools
import threading
import time
from concurrent.futures import Future, InvalidStateError
from pathlib import Path, PurePath
from typing import Any, Callable, Dict, List, Mapping

from rmbgd.api.app import READY, STARTING, ApiError, Result
from rmbgd.api.options import OptionError, request_output
from rmbgd.batching.job import Job
from rmbgd.config import Config
from rmbgd.config.http import INTERACTIVE
from rmbgd.errors import describe
from rmbgd.output.files import companion_target
from rmbgd.output.fsops import publish_bytes

__all__ = ["HttpJobs", "HttpStats"]

_MEDIA_TYPES = {".png": "image/png", ".webp": "image/webp", ".jpg": "image/jpeg"}
# What a failed stage answers: an image that is not one is the client's (422), a stop is
# temporary (503), anything else went wrong in rmbgd (500).
_STATUS = {"decode": 422, "queue": 499, "stopped": 503}
_RETRY_AFTER = {503: 1}
# Longest a batch's URL waits for room in the pipeline (a stop ends the wait at once).
_BATCH_WAIT_S = 600.0


def media_type(suffix: str) -> str:
    return _MEDIA_TYPES.get(suffix[suffix.rfind("."):], "application/octet-stream")


class HttpStats:
    """Counts for `rmbgd status`: requests by status, images done and failed."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.by_status: dict = {}
        self.images_done = 0
        self.images_failed = 0

    def request(self, status: int) -> None:
        with self._lock:
            self.by_status[status] = self.by_status.get(status, 0) + 1

    def image(self, ok: bool) -> None:
        with self._lock:
            if ok:
                self.images_done += 1
            else:
                self.images_failed += 1

    def snapshot(self, in_flight: int = 0) -> dict:
        with self._lock:
            return {"requests": sum(self.by_status.values()), "in_flight": in_flight,
                    "by_status": {str(k): v for k, v in sorted(self.by_status.items())},
                    "images_done": self.images_done, "images_failed": self.images_failed}


class _Reply:
    """The pipeline's answer for one job, into `future` (batching.replies.Reply)."""

    def __init__(self, owner: "HttpJobs", future: Future) -> None:
        self._owner, self.future = owner, future

    def cancelled(self) -> bool:
        return self.future.cancelled()

    def done(self, job: Job, files: List[Any]) -> None:
        try:
            self._answer(self.result(job, files), None)
        except OSError as exc:
            self._answer(None, ApiError(500, f"cannot write the result: {describe(exc)}"))
        self._owner.finished(job, ok=True)

    def result(self, job: Job, files: List[Any]) -> Any:
        return Result(files[0].data, media_type(files[0].suffix))

    def failed(self, job: Job, stage: str, error: str) -> None:
        status = _STATUS.get(stage, 500)
        self._answer(None, ApiError(status, error if status != 500 else f"{stage} failed: {error}",
                                    _RETRY_AFTER.get(status)))
        self._owner.finished(job, ok=False)

    def _answer(self, result: Any, error: Any) -> None:
        try:
            if error is None:
                self.future.set_result(result)
            else:
                self.future.set_exception(error)
        except InvalidStateError:
            pass  # cancelled by a client that went away, or answered at a stop: nobody waits


class _Published(_Reply):
    """A batch's image: its files published under outbox/http/<batch id>/, the path returned."""

    def __init__(self, owner: "HttpJobs", future: Future, outbox: Path, folder: PurePath, index: int) -> None:
        super().__init__(owner, future)
        self._outbox, self._folder, self._index = outbox, folder, index

    def result(self, job: Job, files: List[Any]) -> Any:
        owner = self._owner.instance
        first = publish_bytes(files[0].data, self._outbox / self._folder / f"{self._index}{files[0].suffix}", owner)
        for extra in files[1:]:
            publish_bytes(extra.data, companion_target(first, files[0].suffix, extra.suffix), owner)
        return str(first.relative_to(self._outbox))


class HttpJobs:
    """The Backend (rmbgd.api.app) the daemon serves: admission, jobs, answers."""

    def __init__(self, cfg: Config, submit: Callable[[Job], None], file_slots: Callable[[], int],
                 limit: Callable[[], int], on_finished: Callable[[], None], instance: str) -> None:
        self.cfg = cfg
        self.instance = instance
        self.stats = HttpStats()
        self._submit, self._file_slots, self._limit, self._on_finished = submit, file_slots, limit, on_finished
        self._cond = threading.Condition()
        self._state = STARTING
        # Admitted and unanswered, by id().
        self._jobs: Dict[int, Job] = {}
        self._waiting = 0
        self._ids = itertools.count(1)

    # -- what the daemon asks -----------------------------------------------------------------
    def held(self) -> int:
        """Slots HTTP holds or waits for: the inbox's claims leave them alone."""
        with self._cond:
            return len(self._jobs) + self._waiting

    @property
    def in_flight(self) -> int:
        with self._cond:
            return len(self._jobs)

    def set_state(self, state: str) -> None:
        with self._cond:
            self._state = state
            self._cond.notify_all()

    def wait_idle(self, timeout: float) -> bool:
        with self._cond:
            return self._cond.wait_for(lambda: not self._jobs, timeout)

    def close(self) -> None:
        """Answer every job still unanswered (the stop left it unprocessed) with 503."""
        with self._cond:
            left = list(self._jobs.values())
        for job in left:
            job.reply.failed(job, "stopped", "rmbgd stopped before the image was processed")

    def finished(self, job: Job, ok: bool) -> None:
        with self._cond:
            if self._jobs.pop(id(job), None) is None:
                return
            self._cond.notify_all()
        self.stats.image(ok)
        self._on_finished()

    # -- the Backend protocol -------------------------------------------------------------------
    def state(self) -> str:
        return self._state

    def options(self, params: Mapping[str, str]) -> Any:
        try:
            return request_output(self.cfg.output, params)
        except OptionError as exc:
            raise ApiError(400, str(exc)) from None

    def remove(self, data: bytes, options: Any) -> "Future[Result]":
        future: Future = Future()
        self._admit(data, options, _Reply(self, future), self.cfg.http.busy_wait_seconds)
        return future

    def publish(self, data: bytes, options: Any, batch_id: str, index: int, url: str) -> "Future[str]":
        future: Future = Future()
        reply = _Published(self, future, self.cfg.paths.outbox, PurePath("http", batch_id), index)
        # A batch's URLs queue for room as long as it takes: the batch itself was admitted, and
        # a client following its progress line by line expects each URL to run, not 503.
        self._admit(data, options, reply, _BATCH_WAIT_S)
        return future

    def _admit(self, data: bytes, options: Any, reply: _Reply, wait: float) -> None:
        deadline = time.monotonic() + wait
        with self._cond:
            self._waiting += 1
            try:
                while True:
                    if self._state != READY:
                        raise ApiError(503, f"rmbgd is {self._state}", 5 if self._state == STARTING else None)
                    if self._file_slots() + len(self._jobs) < self._limit():
                        break
                    remaining = deadline - time.monotonic()
                    if remaining <= 0:
                        raise ApiError(503, "busy: the pipeline is full (pipeline.max_in_flight); try again", 1)
                    # File jobs finishing do not notify this condition: look again soon.
                    self._cond.wait(min(remaining, 0.05))
            finally:
                self._waiting -= 1
            number = next(self._ids)
            job = Job(claim=None, input=Path(f"http/{number}"), ready_at=time.monotonic(), data=data,
                      output=options, reply=reply, urgent=self.cfg.http.priority == INTERACTIVE)
            self._jobs[id(job)] = job
        try:
            self._submit(job)
        except RuntimeError:  # the decode pool shut down: a stop came between the check and now
            reply.failed(job, "stopped", "rmbgd is stopping")
