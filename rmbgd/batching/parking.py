"""Retrying a result that could not be written, with the file parked meanwhile (see
rmbgd.batching.pipeline's module doc): it stays claimed and keeps its encoded result, but
gives its in-flight slot back, up to `max_parked` files that keep a result.

Mixed into Pipeline (rmbgd.batching.pipeline), whose attributes it uses.
"""

from __future__ import annotations

from typing import Callable

from rmbgd.batching.job import Job
from rmbgd.errors import describe
from rmbgd.output.backoff import Verdict, write_error_verdict
from rmbgd.output.publisher import FinishingFailed


class Parking:
    """Pipeline's write retries."""

    def _write_failed(self, job: Job, exc: OSError) -> None:
        if isinstance(exc, FinishingFailed):
            # Published: never failed (it would be in the outbox and in errors/), and the
            # intent has all it takes to finish, so the result need not stay in memory.
            job.files = None
            self._retry_later(job, "write", exc, self._deliver)
            return
        attempt = job.attempts + 1
        roots_usable = getattr(self._publisher, "roots_usable", lambda: True)()
        if write_error_verdict(exc.errno, attempt, roots_usable) is Verdict.FAIL:
            tried = f" (tried {attempt} times)" if attempt > 1 else ""
            self.fail(job, "write", describe(exc) + tried)
        else:
            self._retry_later(job, "write", exc, self._deliver)

    def _retry_later(self, job: Job, stage: str, exc: OSError, action: Callable[[Job], None]) -> None:
        """Try `action` again after the backoff delay; meanwhile the job is parked (see the
        module doc), unless too many parked files already keep a result."""
        job.attempts += 1
        delay = self._retry_delay(job.attempts)
        with self._pending_lock:
            if self._stopping:
                return  # stays claimed (and counted in flight); the next start picks it up
            park = job.files is None or len(self._holding) < self._max_parked
            if park and job.files is not None:
                self._holding.add(id(job))
            if park:
                job.parked = True
        if park:
            self._counters.park()
        self._log.warning(
            "file_retry",
            input=str(job.input),
            stage=stage,
            error=describe(exc),
            attempt=job.attempts,
            retry_in_s=delay,
            parked=park,
        )
        # Once closed (a stop), it stays claimed and parked: counted as left claimed.
        self._retries.call_later(delay, self._guarded, self._resubmit, job, action)

    def _resubmit(self, job: Job, action: Callable[[Job], None]) -> None:
        with self._pending_lock:
            if self._stopping:
                return
        self._unpark(job)
        self._run_in(self._encode_pool, action, job)

    def _unpark(self, job: Job) -> None:
        """Take an in-flight slot again (see Counters.unpark)."""
        with self._pending_lock:
            if not job.parked:
                return
            job.parked = False
            self._holding.discard(id(job))
        self._counters.unpark()
