"""The pipeline's model side: staging batches, one model call per batch, and what a failing
call turns into (halves on GPU out-of-memory, one image at a time otherwise).

Mixed into Pipeline (rmbgd.batching.pipeline), whose attributes it uses.
"""

from __future__ import annotations

import dataclasses
import time
from typing import Any, List, Optional, Tuple

from rmbgd.batching.job import Job, ms_since
from rmbgd.errors import describe

# The reason recorded for an image that does not fit in GPU memory even on its own.
OUT_OF_GPU_MEMORY = "out of GPU memory"


class ModelStage:
    """Pipeline's stage and model threads."""

    def _stage_loop(self) -> None:
        """Take each batch as it comes due and get it ready for the model, while the model
        thread runs the previous one."""
        while self._handoff.wait_free():
            batch = self.batches.get()
            if batch is None:
                self._handoff.close()
                return
            # Requests whose client went away never reach the model (replies.py).
            batch = self._without_cancelled(batch)
            if batch:
                self._handoff.put((batch, self._staged(batch)))

    def _staged(self, batch: List[Job]) -> Any:
        """The batch's stacked model input (CPU path), or None to have the model thread make it."""
        if not self._split:
            return None
        try:
            return self._segmenter.stack([job.image.model_input for job in batch])
        except Exception as exc:  # the model thread stacks again and meets the error at its per-batch boundary
            self._log.debug("batch_not_staged", error=describe(exc))
            return None

    def _model_loop(self) -> None:
        while True:
            # Marked busy before the slot is freed, so the stage thread, which wakes then,
            # stages only a full batch beside this call (see collector.BatchQueue.model_busy).
            item = self._handoff.get(on_take=lambda: self.batches.model_busy(True))
            if item is None:
                return
            batch, staged = item
            # A request cancelled while its batch was staged still never reaches the model.
            kept = self._without_cancelled(batch)
            if len(kept) < len(batch):
                batch, staged = kept, None
                if not batch:
                    self.batches.model_busy(False)
                    continue
            self._busy_since = time.monotonic()
            try:
                self._run_batch(batch, staged)
            finally:
                self._busy_since = None
                self.batches.model_busy(False)
            self.last_progress = time.monotonic()

    def _run_batch(self, batch: List[Job], staged: Any = None) -> None:
        started = time.monotonic()
        for job in batch:
            job.ms["wait"] = round((started - (job.queued_at or started)) * 1000.0, 1)
        self._run_part(batch, staged)

    def _run_part(self, batch: List[Job], staged: Any = None) -> None:
        """One model call for `batch`; on GPU out-of-memory, its halves are tried instead."""
        batch_id = next(self._batch_ids)
        started = time.monotonic()
        self._log.debug("batch_started", batch=batch_id, size=len(batch))
        for job in batch:
            job.batch = batch_id
        failure: Optional[Tuple[str, bool]] = None
        try:
            masks = self._infer(batch, staged)
        except Exception as exc:  # per-batch boundary: find the image that really fails
            failure = (describe(exc), self._stages.is_out_of_memory(exc))
        # Retries happen only once the except block is left: until then the exception's
        # traceback keeps the failed call's frames, and with them its GPU tensors, alive.
        if failure is None:
            ms = ms_since(started)
            first = batch[0].image
            self.batches.observe(self._model_size(first.width, first.height), len(batch), ms / 1000.0)
            self._log.info("batch_done", batch=batch_id, size=len(batch), ms=ms, queued=len(self.batches))
            self._on_batch(len(batch), ms)
            for job, mask in zip(batch, masks):
                self._inferred(job, mask, ms)
            return
        error, out_of_memory = failure
        self._log.warning(
            "batch_failed", batch=batch_id, size=len(batch), error=error, out_of_memory=out_of_memory
        )
        if not out_of_memory:
            self._retry_singly(batch)
        elif len(batch) == 1:
            self.fail(batch[0], "inference", OUT_OF_GPU_MEMORY)
        else:
            half = (len(batch) + 1) // 2
            self._lower_batch_size(half)
            self._run_part(batch[:half])
            self._run_part(batch[half:])

    def _lower_batch_size(self, size: int) -> None:
        """Batches of `size` images at most from now on, for the rest of the run."""
        current = self.batches.size
        if size >= current:
            return
        self._memory_limit = size
        self.batches.reconfigure(size, self._cfg.batch.max_wait_ms / 1000.0)
        self._log.warning("batch_size_lowered", batch_size=size, was=current, reason=OUT_OF_GPU_MEMORY)

    def _retry_singly(self, batch: List[Job]) -> None:
        for job in batch:
            started = time.monotonic()
            try:
                (mask,) = self._infer([job])
            except Exception as exc:  # per-file boundary
                if self._stages.is_out_of_memory(exc):
                    self.fail(job, "inference", OUT_OF_GPU_MEMORY)
                else:
                    self.fail(job, "inference", describe(exc), exc_info=True)
                continue
            self._inferred(job, mask, ms_since(started))

    def _inferred(self, job: Job, mask: Any, ms: float) -> None:
        job.mask = mask
        job.ms["infer"] = ms
        if self._split:
            # The normalised input is 4x the size of the decoded one; it is not needed again.
            job.image = dataclasses.replace(job.image, model_input=None)
        self._run_in(self._encode_pool, self._encode_and_publish, job)

    def _infer(self, batch: List[Job], staged: Any = None) -> list:
        if self._split:
            inputs = staged if staged is not None else [job.image.model_input for job in batch]
            return self._segmenter.predict_prepared(inputs)
        first = batch[0].image
        return self._segmenter.predict(
            [job.image.model_input for job in batch],
            [(job.image.width, job.image.height) for job in batch],
            model_size=self._model_size(first.width, first.height),
        )
