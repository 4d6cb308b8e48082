"""decode → batch → model → encode → publish, with each stage overlapping the others.

Decoding runs in a thread pool as soon as a file is claimed, so the next batch is ready while
the model works on the current one; the single model thread takes a batch the moment it is
free (see collector.py); encoding and publishing run in a second pool so the model never
waits for PNG compression. Pillow and torch release the GIL for their heavy work.
"""

from __future__ import annotations

import itertools
import threading
import time
from concurrent.futures import Future, ThreadPoolExecutor
from concurrent.futures import wait as futures_wait
from typing import Any, Callable, List, Optional, Set

from rmbgd.collector import BatchQueue
from rmbgd.config import Config, effective_workers
from rmbgd.images import ImageError, combine_alpha, decode_image, encode_png
from rmbgd.job import Counters, Job, ms_since
from rmbgd.publisher import Publisher


class Pipeline:
    def __init__(
        self,
        cfg: Config,
        segmenter: Any,
        publisher: Publisher,
        counters: Counters,
        log: Any,
        on_finished: Callable[[Job], None] = lambda job: None,
    ) -> None:
        self._cfg = cfg
        self._segmenter = segmenter
        self._publisher = publisher
        self._counters = counters
        self._log = log
        self._on_finished = on_finished
        workers = effective_workers(cfg)
        self._decode_pool = ThreadPoolExecutor(workers, thread_name_prefix="rmbgd-decode")
        self._encode_pool = ThreadPoolExecutor(workers, thread_name_prefix="rmbgd-encode")
        self.batches: BatchQueue[Job] = BatchQueue(cfg.batch.size, cfg.batch.max_wait_ms / 1000.0)
        self._model_thread = threading.Thread(target=self._model_loop, name="rmbgd-model", daemon=True)
        self._batch_ids = itertools.count(1)
        self._pending_lock = threading.Lock()
        self._pending: Set[Future] = set()
        self.last_progress = time.monotonic()

    # -- control ----------------------------------------------------------------------------
    def start(self) -> None:
        self._model_thread.start()

    def model_alive(self) -> bool:
        return self._model_thread.is_alive()

    def submit(self, job: Job) -> None:
        self._track(self._decode_pool.submit(self._decode, job))

    def stop_intake(self) -> None:
        """Stop forming batches and decoding.

        The batch already handed to the model thread is finished; everything else stays claimed
        in the work area, where the next start finds it.
        """
        self.batches.close()
        self._decode_pool.shutdown(wait=False, cancel_futures=True)

    def wait(self, timeout: float) -> bool:
        """Wait up to `timeout` for the model thread and the pending encodes; True when done."""
        deadline = time.monotonic() + timeout
        self._model_thread.join(max(0.0, deadline - time.monotonic()))
        if self._model_thread.is_alive():
            return False
        while True:
            with self._pending_lock:
                pending = [f for f in self._pending if not f.done()]
            if not pending:
                break
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                return False
            futures_wait(pending, timeout=min(remaining, 0.2))
        self._encode_pool.shutdown(wait=True)
        self._decode_pool.shutdown(wait=True)
        return True

    def _track(self, future: Future) -> None:
        with self._pending_lock:
            self._pending.add(future)
        future.add_done_callback(self._untrack)

    def _untrack(self, future: Future) -> None:
        with self._pending_lock:
            self._pending.discard(future)

    # -- stages -----------------------------------------------------------------------------
    def _decode(self, job: Job) -> None:
        start = time.monotonic()
        try:
            job.image = decode_image(
                job.claim.path,
                input_size=self._cfg.model.input_size,
                max_pixels=self._cfg.input.max_pixels,
            )
        except ImageError as exc:
            self.fail(job, "decode", str(exc))
            return
        except Exception as exc:  # per-file boundary: one bad file must not stop the daemon
            self.fail(job, "decode", _describe(exc), exc_info=True)
            return
        job.ms["decode"] = ms_since(start)
        self.batches.put(job, ready_at=job.ready_at)

    def _model_loop(self) -> None:
        while True:
            batch = self.batches.get()
            if batch is None:
                return
            self._run_batch(batch)
            self.last_progress = time.monotonic()

    def _run_batch(self, batch: List[Job]) -> None:
        batch_id = next(self._batch_ids)
        started = time.monotonic()
        for job in batch:
            job.batch = batch_id
            job.ms["wait"] = round((started - job.ready_at) * 1000.0 - job.ms.get("decode", 0.0), 1)
        try:
            masks = self._infer(batch)
        except Exception as exc:  # per-batch boundary: find the image that really fails
            self._log.warning("batch_failed", batch=batch_id, size=len(batch), error=_describe(exc))
            self._retry_singly(batch)
            return
        ms = ms_since(started)
        self._log.info("batch_done", batch=batch_id, size=len(batch), ms=ms, queued=len(self.batches))
        for job, mask in zip(batch, masks):
            job.mask = mask
            job.ms["infer"] = ms
            self._track(self._encode_pool.submit(self._encode_and_publish, job))

    def _retry_singly(self, batch: List[Job]) -> None:
        for job in batch:
            started = time.monotonic()
            try:
                (mask,) = self._infer([job])
            except Exception as exc:  # per-file boundary
                self.fail(job, "inference", _describe(exc), exc_info=True)
                continue
            job.mask = mask
            job.ms["infer"] = ms_since(started)
            self._track(self._encode_pool.submit(self._encode_and_publish, job))

    def _infer(self, batch: List[Job]) -> list:
        return self._segmenter.predict(
            [job.image.model_input for job in batch],
            [(job.image.width, job.image.height) for job in batch],
        )

    def _encode_and_publish(self, job: Job) -> None:
        out = self._cfg.output
        stage = "encode"
        try:
            start = time.monotonic()
            alpha = combine_alpha(job.mask, job.image.alpha)
            data = encode_png(
                job.image.rgb,
                alpha,
                compress_level=out.png_compress_level,
                clean_transparent=out.clean_transparent,
                icc_profile=job.image.icc_profile,
            )
            job.ms["encode"] = ms_since(start)
            stage = "write"
            start = time.monotonic()
            output = self._publisher.publish(job.claim.rel, data)
            job.ms["write"] = ms_since(start)
            stage = "retire"
            retired = self._publisher.retire(job.claim.rel, job.claim.path)
        except Exception as exc:  # per-file boundary
            self.fail(job, stage, _describe(exc), exc_info=not isinstance(exc, OSError))
            return
        job.ms["total"] = ms_since(job.ready_at)
        size = (job.image.width, job.image.height)
        job.release_image()
        self._counters.finished(ok=True)
        self._log.info(
            "file_done",
            input=str(job.input),
            output=str(output),
            original=str(retired) if retired is not None else "deleted",
            width=size[0],
            height=size[1],
            batch=job.batch,
            ms=job.ms["total"],
            wait_ms=job.ms.get("wait"),
            decode_ms=job.ms.get("decode"),
            infer_ms=job.ms.get("infer"),
            encode_ms=job.ms.get("encode"),
            write_ms=job.ms.get("write"),
        )
        self._on_finished(job)

    # -- failures ---------------------------------------------------------------------------
    def fail(self, job: Job, stage: str, error: str, exc_info: bool = False) -> None:
        job.release_image()
        try:
            rejection = self._publisher.reject(job.claim.rel, job.claim.path, stage=stage, error=error)
        except OSError as exc:
            # The errors folder itself is unusable: the input stays claimed in the work area,
            # untouched, and the next start picks it up again.
            self._counters.abandoned()
            self._log.error(
                "file_stuck",
                input=str(job.input),
                claimed=str(job.claim.path),
                stage=stage,
                error=error,
                reject_error=_describe(exc),
            )
            return
        self._counters.finished(ok=False)
        self._log.error(
            "file_failed",
            input=str(job.input),
            error=error,
            stage=stage,
            moved_to=str(rejection.moved_to),
            sidecar=str(rejection.sidecar),
            exc_info=exc_info,
        )
        self._on_finished(job)


def _describe(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__
