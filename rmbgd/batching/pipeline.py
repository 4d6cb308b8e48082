"""decode → batch → model → encode → publish, with each stage overlapping the others.

Decoding runs in a thread pool as soon as a file is claimed, so the next batch is ready while
the model works on the current one; a stage thread takes each batch as it comes due (see
collector.py) and, on the CPU path, stacks its inputs into one tensor while the model thread
still runs the batch before; encoding and publishing run in a second pool so the model never
waits for PNG compression. Pillow and torch release the GIL for their heavy work.

Images in one model call share one input size: the collector batches by it (with
`model.input_size: dynamic` each image has its own). A batch that runs out of GPU memory is
split in halves and retried, and the batch size stays lowered for the rest of the run; only
an image that does not fit on its own fails. Any other model error retries the batch's
images one by one, so only the image that really fails goes to errors/.

A result that cannot be written is retried or failed by backoff.write_error_verdict. While a
file waits for its retry it is parked: it stays claimed and keeps its encoded result, but
gives its in-flight slot back, so files whose destinations work keep flowing past it. At most
`max_parked` parked files keep a result (by default as many as may be in flight, so parking
at most doubles the memory the in-flight limit allows); beyond that a waiting file keeps its
slot, as every file did before parking existed. Files that hold no result while they wait
(their outputs are already published and only the original's move remains, or their
rejection waits for errors/) cost a few hundred bytes and are parked without a limit.

Every pool task runs under `_guarded`: an exception that escapes a task is logged as
`task_failed` with its traceback, and its file is accounted for (left claimed for the next
start when it was not finished yet), so no slot leaks and nothing vanishes in a pool.

The model side is in rmbgd.batching.modelstage, the write retries in rmbgd.batching.parking,
the slot between the stage and model threads in rmbgd.batching.handoff, a file's publishing
and failing in rmbgd.batching.outcomes, in-memory (HTTP) jobs in rmbgd.batching.replies.
"""

from __future__ import annotations

import dataclasses
import itertools
import threading
import time
from concurrent.futures import Future, ThreadPoolExecutor
from concurrent.futures import wait as futures_wait
from typing import Any, Callable, Optional, Set, Tuple

from rmbgd.output import backoff
from rmbgd.output.backoff import Scheduler
from rmbgd.batching.collector import BatchQueue
from rmbgd.batching.handoff import Handoff, yield_to_model
from rmbgd.batching.modelstage import ModelStage
from rmbgd.batching.outcomes import Outcomes
from rmbgd.batching.parking import Parking
from rmbgd.batching.replies import Replies
from rmbgd.config import DYNAMIC_INPUT_SIZE, Config, effective_max_in_flight, effective_workers
from rmbgd.batching.job import Counters, Job, ms_since
from rmbgd.batching.stages import Stages
from rmbgd.errors import describe
from rmbgd.output.publisher import Publisher


class Pipeline(ModelStage, Parking, Replies, Outcomes):
    def __init__(
        self,
        cfg: Config,
        segmenter: Any,
        publisher: Publisher,
        counters: Counters,
        log: Any,
        on_finished: Callable[[Job], None] = lambda job: None,
        on_batch: Callable[[int, float], None] = lambda size, ms: None,
        retry_delay: Callable[[int], float] = backoff.retry_delay,
        max_parked: Optional[int] = None,
        *,
        stages: Stages,
    ) -> None:
        self._cfg = cfg
        self._stages = stages
        self._retry_delay = retry_delay
        self._max_parked = effective_max_in_flight(cfg) if max_parked is None else max_parked
        # Parked jobs that keep an encoded result (by id), bounded by max_parked.
        self._holding: Set[int] = set()
        self._retries = Scheduler(on_error=self._retry_error)
        self._on_batch = on_batch
        self._busy_since: Optional[float] = None
        self._segmenter = segmenter
        self._publisher = publisher
        self._counters = counters
        self._log = log
        self._on_finished = on_finished
        workers = effective_workers(cfg)
        self._decode_pool = ThreadPoolExecutor(workers, thread_name_prefix="rmbgd-decode", initializer=yield_to_model)
        self._encode_pool = ThreadPoolExecutor(workers, thread_name_prefix="rmbgd-encode", initializer=yield_to_model)
        self.batches: BatchQueue[Job] = BatchQueue(cfg.batch.size, cfg.batch.max_wait_ms / 1000.0)
        # The warm-up call is the first measure of what a call costs (see collector.py).
        for key, size, seconds in getattr(segmenter, "call_timings", ()):
            self.batches.observe(key, size, seconds)
        # Kept from start-up: the loaded model fixes them, whatever a reload says later.
        self._model_cfg = cfg.model
        self._dynamic = cfg.model.input_size == DYNAMIC_INPUT_SIZE
        self._decode_size = None if self._dynamic else int(cfg.model.input_size)
        self._resize: Optional[Callable[[Any, Tuple[int, int]], Any]] = getattr(segmenter, "resize_input", None)
        self._resize_on_device = bool(getattr(segmenter, "resizes_on_device", False))
        # On the CPU the segmenter's pre/postprocessing runs in the pools (see model.py).
        self._split = bool(getattr(segmenter, "splits_work", False))
        # Foreground refinement runs where the model does: on the GPU when there is one.
        self._render_device = str(getattr(segmenter, "device", "cpu"))
        # The largest batch that fitted in GPU memory, once a larger one did not.
        self._memory_limit: Optional[int] = None
        self._model_thread = threading.Thread(target=self._model_loop, name="rmbgd-model", daemon=True)
        self._stage_thread = threading.Thread(target=self._stage_loop, name="rmbgd-stage", daemon=True)
        self._handoff = Handoff()
        self._batch_ids = itertools.count(1)
        self._pending_lock = threading.Lock()
        self._pending: Set[Future] = set()
        self._stopping = False
        self.last_progress = time.monotonic()

    # -- control ----------------------------------------------------------------------------
    def start(self) -> None:
        self._stage_thread.start()
        self._model_thread.start()

    def model_alive(self) -> bool:
        return self._model_thread.is_alive() and self._stage_thread.is_alive()

    def busy_seconds(self) -> float:
        """How long the current model call has been running (0 when idle)."""
        since = self._busy_since
        return 0.0 if since is None else time.monotonic() - since

    def apply(self, cfg: Config) -> None:
        """Live settings from a reload: batching and output options."""
        self._cfg = cfg
        size = cfg.batch.size if self._memory_limit is None else min(cfg.batch.size, self._memory_limit)
        self.batches.reconfigure(size, cfg.batch.max_wait_ms / 1000.0)

    def submit(self, job: Job) -> None:
        if job.urgent and job.reply is not None:
            # An interactive request is decoded in the caller's thread (the HTTP server's
            # worker), not queued in the decode pool behind a backlog of inbox files.
            self._guarded(self._decode, job)
            return
        self._run_in(self._decode_pool, self._decode, job)

    def stop_intake(self) -> None:
        """Stop forming batches and decoding.

        The batch already handed to the model thread is finished; everything else stays claimed
        in the work area, where the next start finds it.
        """
        self.batches.close()
        # A batch staged for the model but not started stays claimed too.
        self._handoff.close()
        self._decode_pool.shutdown(wait=False, cancel_futures=True)
        with self._pending_lock:
            self._stopping = True
        # Parked files stay parked (claimed, counted in the snapshot's in_flight).
        self._retries.close()

    def wait(self, timeout: float) -> bool:
        """Wait up to `timeout` for the model thread and the pending encodes; True when done."""
        deadline = time.monotonic() + timeout
        for thread in (self._stage_thread, self._model_thread):
            thread.join(max(0.0, deadline - time.monotonic()))
            if thread.is_alive():
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

    def _run_in(self, pool: ThreadPoolExecutor, task: Callable[..., None], job: Job, *args: Any) -> None:
        self._track(pool.submit(self._guarded, task, job, *args))

    def _guarded(self, task: Callable[..., None], job: Job, *args: Any) -> None:
        """Run one step of `job`; whatever escapes it is logged and the job accounted for."""
        try:
            task(job, *args)
        except Exception as exc:  # the pool boundary: an error here is a bug in rmbgd
            if job.reply is not None:
                self._reply_crashed(job, task, exc)
                return
            left_claimed = self._settle(job, None)
            self._log.error(
                "task_failed",
                input=str(job.input),
                task=getattr(task, "__name__", repr(task)),
                error=describe(exc),
                left_claimed=left_claimed,
                exc_info=exc,
            )

    def _settle(self, job: Job, ok: Optional[bool]) -> bool:
        """Count `job` as processed (True), failed (False) or left claimed (None), once;
        False when it was already counted."""
        with self._pending_lock:
            if job.settled:
                return False
            job.settled = True
        if job.reply is not None:
            return True  # counted by whoever admitted it (replies.py)
        self._unpark(job)
        if ok is None:
            self._counters.abandoned()
        else:
            self._counters.finished(ok=ok)
        return True

    def _retry_error(self, exc: BaseException) -> None:
        self._log.error("retry_failed", error=describe(exc), exc_info=exc)

    def _track(self, future: Future) -> None:
        with self._pending_lock:
            self._pending.add(future)
        future.add_done_callback(self._untrack)

    def _untrack(self, future: Future) -> None:
        with self._pending_lock:
            self._pending.discard(future)

    # -- stages -----------------------------------------------------------------------------
    def _decode(self, job: Job) -> None:
        if self._dropped(job):
            return
        start = time.monotonic()
        try:
            image = self._decode_source(
                job,
                input_size=None if self._dynamic or self._resize is not None else self._decode_size,
                max_pixels=self._cfg.input.max_pixels,
            )
            size = self._model_size(image.width, image.height)
            if image.model_input is None:
                image = dataclasses.replace(image, model_input=self._model_input(image.rgb, size))
            if self._split:
                image = dataclasses.replace(image, model_input=self._segmenter.prepare(image.model_input))
            job.image = image
        except self._stages.decode_error as exc:
            self.fail(job, "decode", str(exc))
            return
        except Exception as exc:  # per-file boundary: one bad file must not stop the daemon
            self.fail(job, "decode", describe(exc), exc_info=True)
            return
        job.ms["decode"] = ms_since(start)
        # The batch window opens now, when the image is ready for the model (as Triton's
        # delay counts from a request's entry into its queue): counted from the claim, a
        # backlog's decode queueing alone used it up and each image went out on its own.
        job.queued_at = time.monotonic()
        # Images in one model call must share one size: the collector batches by it.
        self.batches.put(job, ready_at=job.queued_at, key=size, urgent=job.urgent)

    def _model_size(self, width: int, height: int) -> Tuple[int, int]:
        """The (width, height) an image is run through the model at."""
        if self._dynamic:
            return self._stages.input_size(width, height, self._model_cfg.max_input_size)
        side = int(self._model_cfg.input_size)
        return (side, side)

    def _model_input(self, rgb: Any, size: Tuple[int, int]) -> Any:
        # A segmenter on a GPU resizes dynamic sizes there, off the decode pool's cores.
        if self._dynamic and self._resize_on_device:
            return rgb
        # The segmenter's own resize is the decoder's filter, faster (model.resize_input).
        if self._resize is not None:
            return self._resize(rgb, size)
        return self._stages.resize(rgb, size)

    def _encode_and_publish(self, job: Job) -> None:
        # Read per file, not per run: a reload may have changed the output settings.
        out = job.output if job.output is not None else self._cfg.output_for(job.claim.rel)
        try:
            start = time.monotonic()
            mask = job.mask
            if self._split:
                mask = self._segmenter.finish(mask, (job.image.width, job.image.height))
            job.files = self._stages.render(job.image, mask, out, device=self._render_device)
            job.ms["encode"] = ms_since(start)
        except self._stages.render_error as exc:
            self.fail(job, exc.stage, str(exc))
            return
        except Exception as exc:  # per-file boundary
            self.fail(job, "encode", describe(exc), exc_info=True)
            return
        if job.reply is not None:
            self._reply_done(job)
            return
        job.size = (job.image.width, job.image.height)
        job.release_image()
        self._deliver(job)
