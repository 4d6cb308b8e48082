"""A file's outcome: its outputs published and the original retired, or the input sent to
errors/ with its reason.

Mixed into Pipeline (rmbgd.batching.pipeline), whose attributes it uses.
"""

from __future__ import annotations

import time

from rmbgd.batching.job import Job, ms_since
from rmbgd.errors import describe

__all__ = ["Outcomes", "PublishError"]


class PublishError(Exception):
    """A publisher's verdict that this file cannot be written: it fails with this reason
    (no traceback: nothing went wrong in rmbgd)."""


class Outcomes:
    """Pipeline's last steps for a file."""

    def _deliver(self, job: Job) -> None:
        start = time.monotonic()
        try:
            if job.files is None:
                # Its outputs were published before; only finishing (the original's move)
                # remained, which the intent in the work area completes.
                delivery = self._publisher.resume(job.claim)
                if delivery is None:
                    self._log.info("file_reprocessed", input=str(job.input), reason="nothing left to finish")
                    self._run_in(self._decode_pool, self._decode, job)
                    return
            else:
                delivery = self._publisher.deliver(job.claim, job.files)
        except OSError as exc:
            self._write_failed(job, exc)
            return
        except PublishError as exc:
            self.fail(job, "write", str(exc))
            return
        except Exception as exc:  # per-file boundary
            self.fail(job, "write", describe(exc), exc_info=True)
            return
        job.ms["write"] = ms_since(start)
        job.ms["total"] = ms_since(job.ready_at)
        job.files = None
        self._settle(job, True)
        self._log.info(
            "file_done",
            input=str(job.input),
            output=str(delivery.output),
            original=str(delivery.original) if delivery.original is not None else "deleted",
            **({"also": [str(path) for path in delivery.extra]} if delivery.extra else {}),
            width=job.size[0],
            height=job.size[1],
            batch=job.batch,
            ms=job.ms["total"],
            wait_ms=job.ms.get("wait"),
            decode_ms=job.ms.get("decode"),
            infer_ms=job.ms.get("infer"),
            encode_ms=job.ms.get("encode"),
            write_ms=job.ms.get("write"),
            **({"retries": job.attempts} if job.attempts else {}),
        )
        self._on_finished(job)

    # -- failures ---------------------------------------------------------------------------
    def fail(self, job: Job, stage: str, error: str, exc_info: bool = False) -> None:
        """Send `job`'s input to errors/ with this reason; never raises (see _guarded)."""
        if job.reply is not None:
            self._guarded(self._reply_failed, job, stage, error, exc_info)
            return
        self._guarded(self._fail, job, stage, error, exc_info)

    def _fail(self, job: Job, stage: str, error: str, exc_info: bool) -> None:
        job.release_image()
        job.files = None
        try:
            rejection = self._publisher.reject(job.claim, stage=stage, error=error)
        except OSError as exc:
            # The errors folder is unusable: the input stays claimed, untouched, and its
            # rejection is tried again later (and at the next start, at the latest), for as
            # long as it takes: there is nowhere else it could go.
            self._retry_later(job, "reject", exc, lambda j: self._fail(j, stage, error, exc_info))
            return
        self._settle(job, False)
        job.stage, job.error = stage, error
        self._log.error(
            "file_failed",
            input=str(job.input),
            error=error,
            stage=stage,
            moved_to=str(rejection.moved_to),
            **({"sidecar": str(rejection.sidecar)} if rejection.sidecar is not None else {}),
            exc_info=exc_info,
        )
        self._on_finished(job)
