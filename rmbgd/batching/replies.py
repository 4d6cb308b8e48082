"""In-memory jobs (the HTTP API's): their results and failures go back to whoever asked.

Such a job carries a `reply` (Reply below) and its image's bytes. It is decoded, batched and
run like any file, but once rendered its files go to `reply.done`, and a failure at any
stage to `reply.failed`: nothing is written to the outbox or errors/ for it, and it never
enters the file counters (its admitter counts it). A job whose reply was cancelled (the client
went away) before the model took it is dropped without a model call.

Mixed into Pipeline (rmbgd.batching.pipeline), whose attributes it uses.
"""

from __future__ import annotations

from typing import Any, List, Protocol

from rmbgd.batching.job import Job, ms_since
from rmbgd.errors import describe

CANCELLED = "cancelled: the client went away before the model took the image"


class Reply(Protocol):
    def cancelled(self) -> bool:
        """Whether nobody waits for the answer any more."""

    def done(self, job: Job, files: List[Any]) -> None:
        """The rendered files (output.files.OutputFile), the result first."""

    def failed(self, job: Job, stage: str, error: str) -> None:
        """Why there is no result, and at which stage."""


class Replies:
    """Pipeline's side of in-memory jobs."""

    def _decode_source(self, job: Job, **options: Any) -> Any:
        if job.data is None:
            return self._stages.decode(job.claim.path, **options)
        data, job.data = job.data, None  # the decoded image replaces the encoded bytes
        return self._stages.decode_data(data, **options)

    def _dropped(self, job: Job) -> bool:
        """True when `job` was cancelled and is now answered as such."""
        if job.reply is None or not job.reply.cancelled():
            return False
        self._reply_failed(job, "queue", CANCELLED)
        return True

    def _without_cancelled(self, batch: List[Job]) -> List[Job]:
        return [job for job in batch if not self._dropped(job)]

    def _reply_done(self, job: Job) -> None:
        files, job.files = job.files, None
        job.size = (job.image.width, job.image.height)
        job.release_image()
        job.ms["total"] = ms_since(job.ready_at)
        if self._settle(job, True):
            job.reply.done(job, files)

    def _reply_failed(self, job: Job, stage: str, error: str, exc_info: bool = False) -> None:
        job.release_image()
        job.files = None
        job.data = None
        if not self._settle(job, False):
            return
        job.stage, job.error = stage, error
        if exc_info:
            # A fault of rmbgd's (not of the image): worth its traceback in the log.
            self._log.error("request_failed", input=str(job.input), stage=stage, error=error, exc_info=True)
        job.reply.failed(job, stage, error)

    def _reply_crashed(self, job: Job, task: Any, exc: BaseException) -> None:
        """A bug in rmbgd met while working on `job` (see Pipeline._guarded)."""
        self._log.error("task_failed", input=str(job.input), task=getattr(task, "__name__", repr(task)),
                        error=describe(exc), exc_info=exc)
        self._reply_failed(job, "internal", describe(exc))
