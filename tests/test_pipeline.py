"""The pipeline's model stage with fake segmenters: batching by size, GPU out-of-memory, retries.

The Pipeline is the real class, fed real image files through the real decoder and publishing
into real folders; only the model is a fake, so that a GPU running out of memory (or a model
failing on one image) can be staged on a CPU-only machine.
"""

from __future__ import annotations

import dataclasses
import json
import queue
import threading
import time
import weakref
from pathlib import Path, PurePath

import numpy as np
import pytest
import torch
from PIL import Image

from rmbgd.config import BatchConfig, Config, ModelConfig, PathsConfig, PipelineConfig
from rmbgd.batching.job import Counters, Job
from rmbgd.batching.modelstage import OUT_OF_GPU_MEMORY
from rmbgd.batching.pipeline import Pipeline
from rmbgd.output.publisher import Publisher
from rmbgd.intake.workarea import Claim
from rmbgd.runtime.stages import image_stages
from tests.support.logcapture import WaitableLog

WAIT_S = 30.0
FOREVER_MS = 60_000  # batches then go out only when full, which makes them deterministic


class FakeSegmenter:
    """Opaque masks for every image; records each call's batch.

    ``fails`` decides per call: it gets the list of image sizes (width, height of the
    originals) and returns an exception to raise, or None.
    """

    resizes_on_device = False

    def __init__(self, fails=lambda sizes: None) -> None:
        self.fails = fails
        self.calls: list[dict] = []
        self._lock = threading.Lock()

    def predict(self, images, sizes, model_size=None):
        with self._lock:
            self.calls.append(
                {"sizes": list(sizes), "shapes": [image.shape for image in images], "model_size": model_size}
            )
        error = self.fails(list(sizes))
        if error is not None:
            raise error
        return [np.full((height, width), 255, dtype=np.uint8) for width, height in sizes]

    def batch_sizes(self) -> list[int]:
        with self._lock:
            return [len(call["sizes"]) for call in self.calls]


def cuda_oom() -> torch.cuda.OutOfMemoryError:
    return torch.cuda.OutOfMemoryError(
        "CUDA out of memory. Tried to allocate 3.00 GiB. GPU 0 has a total capacity of 79.10 GiB"
    )


class Harness:
    """A real Pipeline over real folders, with files claimed the way the daemon claims them."""

    def __init__(self, root: Path, segmenter, *, batch_size: int, max_wait_ms: int = FOREVER_MS,
                 on_finished=None, **model) -> None:
        self.root = root
        paths = PathsConfig(
            inbox=root / "inbox", outbox=root / "outbox", errors=root / "errors", done=root / "done"
        )
        for folder in (paths.inbox, paths.outbox, paths.errors, paths.done):
            folder.mkdir(parents=True)
        self.work = paths.inbox / ".rmbgd" / "work" / "test-1"
        self.work.mkdir(parents=True)
        model.setdefault("input_size", 64)
        self.cfg = Config(
            paths=paths,
            batch=BatchConfig(size=batch_size, max_wait_ms=max_wait_ms),
            model=ModelConfig(name="fake", device="cpu", **model),
            pipeline=PipelineConfig(workers=2),
        )
        self.log = WaitableLog()
        self.counters = Counters()
        self.finished: "queue.Queue[Job]" = queue.Queue()
        self.publisher = Publisher(paths, owner="test-1")
        self.pipeline = Pipeline(
            self.cfg,
            segmenter,
            self.publisher,
            self.counters,
            self.log,
            on_finished=on_finished or self.finished.put,
            stages=image_stages(),
        )
        self.pipeline.start()

    def submit(self, name: str, width: int, height: int, red: int = 200, claimed_ago: float = 0.0) -> Job:
        path = self.work / name
        Image.new("RGB", (width, height), (red, 10, 10)).save(path)
        job = Job(claim=Claim(rel=PurePath(name), path=path), input=self.cfg.paths.inbox / name,
                  ready_at=time.monotonic() - claimed_ago)
        self.counters.started()
        self.pipeline.submit(job)
        return job

    def wait_finished(self, count: int) -> list[Job]:
        return [self.finished.get(timeout=WAIT_S) for _ in range(count)]

    def outputs(self) -> list[str]:
        return sorted(path.name for path in self.cfg.paths.outbox.iterdir())

    def sidecar(self, name: str) -> dict:
        return json.loads((self.cfg.paths.errors / f"{name}.error.json").read_text())

    def stop(self) -> None:
        self.pipeline.stop_intake()
        assert self.pipeline.wait(WAIT_S)


@pytest.fixture
def harness(tmp_path):
    made = []

    def make(segmenter, **options) -> Harness:
        made.append(Harness(tmp_path / f"run{len(made)}", segmenter, **options))
        return made[-1]

    yield make
    for one in made:
        one.stop()


# --------------------------------------------------------------------------- GPU out of memory


def test_out_of_memory_splits_the_batch_and_lowers_the_batch_size(harness):
    fake = FakeSegmenter(fails=lambda sizes: cuda_oom() if len(sizes) > 2 else None)
    run = harness(fake, batch_size=8)
    for index in range(8):
        run.submit(f"p{index}.png", 40, 30)
    run.wait_finished(8)

    assert fake.batch_sizes() == [8, 4, 2, 2, 4, 2, 2]
    lowered = run.log.of("batch_size_lowered")
    assert [(event["was"], event["batch_size"]) for event in lowered] == [(8, 4), (4, 2)]
    assert all(event["reason"] == OUT_OF_GPU_MEMORY for event in lowered)
    assert [event["size"] for event in run.log.of("batch_done")] == [2, 2, 2, 2]
    assert all(event["out_of_memory"] for event in run.log.of("batch_failed"))
    assert run.outputs() == [f"p{index}.png" for index in range(8)]
    assert run.counters.snapshot() == {"processed": 8, "failed": 0, "in_flight": 0}

    # For the rest of the run batches hold two images at most, so nothing runs out again.
    for index in range(4):
        run.submit(f"q{index}.png", 40, 30)
    run.wait_finished(4)
    # (The free model no longer waits to fill a batch once calls proved cheap: how these
    # four group depends on when each is decoded, but none goes over two.)
    later = fake.batch_sizes()[7:]
    assert sum(later) == 4 and max(later) <= 2
    assert len(run.log.of("batch_size_lowered")) == 2


def test_only_an_image_that_fails_alone_is_a_failure(harness):
    # The 500-pixel-wide image does not fit even on its own; the others fit in pairs.
    def fails(sizes):
        if any(width == 500 for width, _ in sizes) or len(sizes) > 2:
            return cuda_oom()
        return None

    fake = FakeSegmenter(fails=fails)
    run = harness(fake, batch_size=4)
    for name, width in [("a.png", 40), ("huge.png", 500), ("b.png", 40), ("c.png", 40)]:
        run.submit(name, width, 30)
    run.wait_finished(4)

    assert run.outputs() == ["a.png", "b.png", "c.png"]
    sidecar = run.sidecar("huge.png")
    assert (sidecar["stage"], sidecar["error"]) == ("inference", OUT_OF_GPU_MEMORY)
    (failed,) = run.log.of("file_failed")
    assert (failed["stage"], failed["error"]) == ("inference", OUT_OF_GPU_MEMORY)
    assert (run.cfg.paths.errors / "huge.png").is_file()
    assert run.counters.snapshot() == {"processed": 3, "failed": 1, "in_flight": 0}


def test_runtime_error_saying_out_of_memory_counts_too(harness):
    fake = FakeSegmenter(
        fails=lambda sizes: RuntimeError("CUDA error: out of memory") if len(sizes) > 1 else None
    )
    run = harness(fake, batch_size=2)
    run.submit("a.png", 40, 30)
    run.submit("b.png", 40, 30)
    run.wait_finished(2)
    assert fake.batch_sizes() == [2, 1, 1]
    assert [(e["was"], e["batch_size"]) for e in run.log.of("batch_size_lowered")] == [(2, 1)]


def test_other_model_errors_are_retried_one_by_one_without_lowering_the_size(harness):
    def fails(sizes):
        if any(width == 77 for width, _ in sizes):
            return ValueError("NaN in the decoder")
        return None

    fake = FakeSegmenter(fails=fails)
    run = harness(fake, batch_size=3)
    for name, width in [("a.png", 40), ("bad.png", 77), ("b.png", 40)]:
        run.submit(name, width, 30)
    run.wait_finished(3)

    assert fake.batch_sizes() == [3, 1, 1, 1]
    assert run.log.of("batch_size_lowered") == []
    assert run.pipeline.batches.size == 3
    assert run.outputs() == ["a.png", "b.png"]
    sidecar = run.sidecar("bad.png")
    assert (sidecar["stage"], sidecar["error"]) == ("inference", "ValueError: NaN in the decoder")


def test_out_of_memory_when_retrying_one_by_one(harness):
    # A generic failure first, then one image that does not fit on its own.
    def fails(sizes):
        if len(sizes) > 1:
            return RuntimeError("cuDNN error: CUDNN_STATUS_INTERNAL_ERROR")
        if sizes[0][0] == 500:
            return cuda_oom()
        return None

    run = harness(FakeSegmenter(fails=fails), batch_size=2)
    run.submit("a.png", 40, 30)
    run.submit("huge.png", 500, 30)
    run.wait_finished(2)
    assert run.outputs() == ["a.png"]
    assert run.sidecar("huge.png")["error"] == OUT_OF_GPU_MEMORY


class Allocation:
    """Stands for GPU memory held by one model call (weak-referenceable, unlike bytes)."""

    def __init__(self, images: int) -> None:
        self.block = bytearray(images * 1024)


class AllocatingSegmenter(FakeSegmenter):
    """Allocates per call and keeps it in a local, as a real forward pass keeps its activations.

    A raised exception's traceback holds that frame, so an allocation outlives its call for
    as long as anything keeps the exception: that is the leak this records.
    """

    def __init__(self, limit: int) -> None:
        super().__init__()
        self.limit = limit
        self.allocations: list[weakref.ref] = []
        self.live_at_call: list[int] = []

    def live(self) -> int:
        return sum(1 for ref in self.allocations if ref() is not None)

    def predict(self, images, sizes, model_size=None):
        self.live_at_call.append(self.live())
        activations = Allocation(len(images))
        self.allocations.append(weakref.ref(activations))
        if len(images) > self.limit:
            raise cuda_oom()
        return super().predict(images, sizes, model_size)


def test_no_memory_is_kept_across_batches(harness):
    fake = AllocatingSegmenter(limit=1)
    run = harness(fake, batch_size=4)
    jobs = []
    for round_ in range(3):
        jobs += [run.submit(f"r{round_}-{index}.png", 40, 30) for index in range(4)]
        run.wait_finished(4)

    assert len(fake.allocations) == len(fake.live_at_call) >= 12
    # Every call, including each retry after an out-of-memory error, starts with nothing
    # left over from the calls before it.
    assert fake.live_at_call == [0] * len(fake.live_at_call)
    assert fake.live() == 0
    assert all(job.image is None and job.mask is None for job in jobs)
    assert run.counters.snapshot() == {"processed": 12, "failed": 0, "in_flight": 0}


# --------------------------------------------------------------------------- batching by size


def test_dynamic_input_sizes_batch_only_images_of_one_size(harness):
    fake = FakeSegmenter()
    run = harness(fake, batch_size=2, input_size="dynamic", max_input_size=128)
    # (100, 60) and (90, 70) both run at 96x64; (200, 100) and (250, 120) at 128x64.
    for name, width, height in [("a.png", 100, 60), ("w.png", 200, 100), ("b.png", 90, 70), ("x.png", 250, 120)]:
        run.submit(name, width, height)
    run.wait_finished(4)

    by_size = {}
    for call in fake.calls:
        width, height = call["model_size"]
        # The pipeline resized each image (on the CPU) to its batch's size.
        assert call["shapes"] == [(height, width, 3)] * len(call["shapes"])
        by_size[(width, height)] = sorted(call["sizes"])
    assert by_size == {(96, 64): [(90, 70), (100, 60)], (128, 64): [(200, 100), (250, 120)]}
    assert run.outputs() == ["a.png", "b.png", "w.png", "x.png"]


def test_dynamic_sizes_on_a_device_that_resizes_get_the_full_image(harness):
    fake = FakeSegmenter()
    fake.resizes_on_device = True
    run = harness(fake, batch_size=1, input_size="dynamic", max_input_size=128)
    run.submit("a.png", 100, 60)
    run.wait_finished(1)
    (call,) = fake.calls
    assert call["model_size"] == (96, 64)
    assert call["shapes"] == [(60, 100, 3)]


def test_fixed_input_size_passes_the_decoders_square(harness):
    fake = FakeSegmenter()
    run = harness(fake, batch_size=2, input_size=64)
    run.submit("a.png", 100, 60)
    run.submit("b.png", 30, 300)
    run.wait_finished(2)
    (call,) = fake.calls
    assert call["model_size"] == (64, 64)
    assert call["shapes"] == [(64, 64, 3), (64, 64, 3)]


def test_a_reload_does_not_raise_the_batch_size_above_what_fitted(harness):
    fake = FakeSegmenter(fails=lambda sizes: cuda_oom() if len(sizes) > 2 else None)
    run = harness(fake, batch_size=4)
    for index in range(4):
        run.submit(f"p{index}.png", 40, 30)
    run.wait_finished(4)
    assert run.pipeline.batches.size == 2
    run.pipeline.apply(dataclasses.replace(run.cfg, batch=BatchConfig(size=8, max_wait_ms=FOREVER_MS)))
    assert run.pipeline.batches.size == 2
    run.pipeline.apply(dataclasses.replace(run.cfg, batch=BatchConfig(size=1, max_wait_ms=FOREVER_MS)))
    assert run.pipeline.batches.size == 1


def _until(condition, what: str) -> None:
    deadline = time.monotonic() + WAIT_S
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"not within {WAIT_S}s: {what}")
        time.sleep(0.005)


def test_regression_batch_wait_counts_from_decode_not_claim(harness):
    # A backlog: every file was claimed long ago and queued for a decoder (issue 12). Its
    # batch window must open when it is decoded, so files decoded one by one, well within
    # max_wait, share one full batch instead of each going out alone.
    fake = FakeSegmenter()
    run = harness(fake, batch_size=4, max_wait_ms=20_000)
    jobs = []
    for index in range(4):
        jobs.append(run.submit(f"p{index}.png", 40, 30, claimed_ago=60.0))
        # One at a time: each is decoded and in the collector (or, wrongly, at the model)
        # before the next is decoded.
        _until(lambda n=index + 1: len(run.pipeline.batches) + sum(fake.batch_sizes()) == n, "decoded")
    run.wait_finished(4)
    assert fake.batch_sizes() == [4]
    for job in jobs:
        # wait_ms: from decoded to the model call, not from the claim a minute ago.
        assert 0.0 <= job.ms["wait"] < 20_000.0
        assert job.ms["total"] >= 60_000.0


def test_regression_images_decoded_during_a_model_call_join_one_batch(harness):
    # max_wait 0: every image is due the moment it is decoded. While the model is busy the
    # stage thread used to take each one as it came and stage it alone (issue 12); now only
    # a full batch is staged beside a running call, and a partial one waits for the model.
    gate = threading.Event()
    fake = FakeSegmenter(fails=lambda sizes: None if gate.wait(WAIT_S) else TimeoutError("gate"))
    run = harness(fake, batch_size=4, max_wait_ms=0)
    run.submit("first.png", 40, 30)
    _until(lambda: fake.batch_sizes() == [1], "the first call started")

    def gathered() -> int:
        staged = run.pipeline._handoff._item
        return len(run.pipeline.batches) + (len(staged[0]) if staged else 0)

    for index in range(4):
        run.submit(f"p{index}.png", 40, 30)
        _until(lambda n=index + 1: gathered() == n, "decoded")
    gate.set()
    run.wait_finished(5)
    assert fake.batch_sizes() == [1, 4]


# --------------------------------------------------------------------------- the free model


class TimedSegmenter(FakeSegmenter):
    """A FakeSegmenter whose warm-up measured its calls (see rmbgd.model.warmup.WarmUp._time_calls)
    and that resizes model inputs itself, recording what it was asked to resize."""

    def __init__(self, call_timings, **kwargs) -> None:
        super().__init__(**kwargs)
        self.call_timings = call_timings
        self.resized: list[tuple] = []

    def resize_input(self, rgb, size):
        with self._lock:
            self.resized.append((rgb.shape, tuple(size)))
        return np.asarray(Image.fromarray(rgb).resize(tuple(size), Image.Resampling.BILINEAR))


def test_regression_free_model_waits_max_wait_for_company_when_a_call_costs_little(harness):
    # Issue 12, item 3: at the start of a burst the accelerator sat idle for the whole batch
    # window while the first images decoded. A call whose fixed part costs 1 ms is not worth
    # waiting 60 s for: the lone image goes at once.
    fake = TimedSegmenter([((64, 64), 1, 0.011), ((64, 64), 2, 0.021)])
    run = harness(fake, batch_size=8)
    run.submit("alone.png", 40, 30)
    (job,) = run.wait_finished(1)
    assert job.ms["wait"] < 10_000
    assert fake.batch_sizes() == [1]


def test_warm_up_timings_are_per_input_size(harness):
    # Timings of another input size say nothing about this one: max_wait applies (batches go
    # out only when full), so two images wait for each other.
    fake = TimedSegmenter([((1024, 1024), 1, 0.011), ((1024, 1024), 2, 0.021)])
    run = harness(fake, batch_size=2)
    run.submit("a.png", 40, 30)
    run.submit("b.png", 40, 30)
    run.wait_finished(2)
    assert fake.batch_sizes() == [2]


def test_pipeline_learns_what_a_call_costs_from_its_batches(harness):
    # No warm-up timings: the first batch waits to be full (max_wait is a minute here); once
    # a call was seen to cost next to nothing, a lone image no longer waits.
    fake = FakeSegmenter()
    run = harness(fake, batch_size=2)
    run.submit("a.png", 40, 30)
    run.submit("b.png", 40, 30)
    run.wait_finished(2)
    run.submit("c.png", 40, 30)
    run.wait_finished(1)
    assert fake.batch_sizes() == [2, 1]


def test_model_inputs_are_resized_by_the_segmenter_when_it_can(harness):
    fake = TimedSegmenter([])
    run = harness(fake, batch_size=1)
    run.submit("a.png", 40, 30)
    run.wait_finished(1)
    assert fake.resized == [((30, 40, 3), (64, 64))]
    assert fake.calls[0]["shapes"] == [(64, 64, 3)]


# --------------------------------------------------------------------------- the CPU path


class ThreadRecordingSegmenter:
    """A real Segmenter (the tiny model on the CPU) that notes which thread runs each step."""

    def __init__(self, real) -> None:
        self._real = real
        self.splits_work = real.splits_work
        self.resizes_on_device = real.resizes_on_device
        self.device = real.device
        self.threads: dict[str, set[str]] = {}
        self._lock = threading.Lock()

    def _note(self, step: str) -> None:
        with self._lock:
            self.threads.setdefault(step, set()).add(threading.current_thread().name.rsplit("_", 1)[0])

    def prepare(self, image):
        self._note("prepare")
        return self._real.prepare(image)

    def stack(self, prepared):
        self._note("stack")
        return self._real.stack(prepared)

    def predict_prepared(self, prepared):
        self._note("predict_prepared")
        return self._real.predict_prepared(prepared)

    def finish(self, logits, size):
        self._note("finish")
        return self._real.finish(logits, size)

    def predict(self, *args, **kwargs):
        self._note("predict")
        return self._real.predict(*args, **kwargs)


def test_on_the_cpu_pre_and_postprocessing_run_in_the_pools(harness, tiny_model):
    from rmbgd.model.loading import load_segmenter
    from tests.support.tinymodel import alpha_for_rgb

    real = load_segmenter(ModelConfig(name=str(tiny_model), device="cpu", input_size=64))
    assert real.splits_work
    segmenter = ThreadRecordingSegmenter(real)
    run = harness(segmenter, batch_size=2)
    run.submit("a.png", 40, 30, red=255)
    run.submit("b.png", 50, 20, red=0)
    run.wait_finished(2)

    assert segmenter.threads == {
        "prepare": {"rmbgd-decode"},
        "stack": {"rmbgd-stage"},
        "predict_prepared": {"rmbgd-model"},
        "finish": {"rmbgd-encode"},
    }
    a = np.asarray(Image.open(run.cfg.paths.outbox / "a.png"))
    b = np.asarray(Image.open(run.cfg.paths.outbox / "b.png"))
    assert a.shape == (30, 40, 4) and b.shape == (20, 50, 4)
    assert (a[..., 3] == alpha_for_rgb(255, 10, 10)).all()
    assert (b[..., 3] == alpha_for_rgb(0, 10, 10)).all()


def test_the_next_batch_is_staged_while_the_model_runs_and_left_claimed_on_stop(harness, tiny_model):
    from rmbgd.model.loading import load_segmenter

    class Gated(ThreadRecordingSegmenter):
        """The first model call waits for the test, so a second batch gets staged meanwhile."""

        def __init__(self, real) -> None:
            super().__init__(real)
            self.running = threading.Event()
            self.release = threading.Event()
            self.staged = threading.Event()

        def stack(self, prepared):
            stacked = super().stack(prepared)
            if self.running.is_set():
                self.staged.set()
            return stacked

        def predict_prepared(self, prepared):
            self._note("predict_prepared")
            assert isinstance(prepared, torch.Tensor), "the model thread got the staged stack"
            self.running.set()
            assert self.release.wait(WAIT_S)
            return self._real.predict_prepared(prepared)

    segmenter = Gated(load_segmenter(ModelConfig(name=str(tiny_model), device="cpu", input_size=64)))
    run = harness(segmenter, batch_size=2)
    first = [run.submit(f"a{index}.png", 40, 30) for index in range(2)]
    assert segmenter.running.wait(WAIT_S)
    second = [run.submit(f"b{index}.png", 40, 30) for index in range(2)]
    assert segmenter.staged.wait(WAIT_S), "the second batch is stacked while the first runs"
    assert segmenter.threads["stack"] == {"rmbgd-stage"}

    run.pipeline.stop_intake()
    segmenter.release.set()
    assert run.pipeline.wait(WAIT_S)
    assert sorted(job.claim.path.name for job in run.wait_finished(2)) == ["a0.png", "a1.png"]
    assert run.outputs() == ["a0.png", "a1.png"]
    # The staged batch never reached the model: its files stay claimed for the next start.
    assert all(job.claim.path.exists() for job in second)
    assert run.finished.empty()


# --------------------------------------------------------------------------- errors in the pools


def wait_idle(counters: Counters, timeout: float = WAIT_S) -> None:
    with counters._idle:
        assert counters._idle.wait_for(lambda: counters.in_flight == 0, timeout), "the job kept its slot"


def test_regression_pool_task_exception_when_reject_raises_is_logged_and_frees_the_slot(harness, monkeypatch):
    """Finding 8: `fail()` when reject raises something other than an OSError: the exception
    vanished in the pool and the job kept its in-flight slot for ever."""
    run = harness(FakeSegmenter(), batch_size=1)
    monkeypatch.setattr(run.publisher, "reject", lambda *a, **k: (_ for _ in ()).throw(ValueError("bug in reject")))
    path = run.work / "broken.png"
    path.write_bytes(b"not an image")
    job = Job(claim=Claim(rel=PurePath("broken.png"), path=path), input=run.cfg.paths.inbox / "broken.png",
              ready_at=time.monotonic())
    run.counters.started()
    run.pipeline.submit(job)
    event = run.log.wait_for("task_failed", WAIT_S)
    assert event["error"] == "ValueError: bug in reject" and event.get("exc_info")
    assert event["left_claimed"] is True and event["input"].endswith("broken.png")
    wait_idle(run.counters)
    assert run.counters.snapshot() == {"processed": 0, "failed": 0, "in_flight": 0}
    assert path.exists(), "left claimed for the next start"


def test_regression_pool_task_exception_in_on_finished_is_logged_not_lost(harness):
    def on_finished(job):
        raise RuntimeError("callback bug")

    run = harness(FakeSegmenter(), batch_size=1, on_finished=on_finished)
    run.submit("a.png", 40, 30)
    event = run.log.wait_for("task_failed", WAIT_S)
    assert event["error"] == "RuntimeError: callback bug" and event.get("exc_info")
    assert event["left_claimed"] is False, "it was published and counted before the callback"
    wait_idle(run.counters)
    assert run.counters.snapshot() == {"processed": 1, "failed": 0, "in_flight": 0}
    assert run.outputs() == ["a.png"]


def test_regression_pool_task_exception_in_batches_put_is_logged_and_frees_the_slot(harness, monkeypatch):
    run = harness(FakeSegmenter(), batch_size=1)
    monkeypatch.setattr(run.pipeline.batches, "put", lambda *a, **k: (_ for _ in ()).throw(KeyError("queue bug")))
    job = run.submit("a.png", 40, 30)
    event = run.log.wait_for("task_failed", WAIT_S)
    assert event["left_claimed"] is True and event.get("exc_info")
    wait_idle(run.counters)
    assert job.claim.path.exists()
    assert run.counters.snapshot() == {"processed": 0, "failed": 0, "in_flight": 0}
