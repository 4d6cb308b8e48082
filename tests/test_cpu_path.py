"""The daemon on the CPU path (the segmenter's `splits_work`), which is what CI runs: the
pre- and postprocessing in the pools, and a failing model call split on out-of-memory or
retried one image at a time, through the real in-process daemon with the fake segmenter.

tests/test_pipeline.py covers the same policies on the GPU path (`predict` only)."""

from __future__ import annotations

import json

from rmbgd.batching.modelstage import OUT_OF_GPU_MEMORY
from tests.support.inprocess import FakeSegmenter, inprocess  # noqa: F401 (a fixture)
from tests.support.photos import save
import numpy as np

RED = (230, 40, 20)
MARKED = (230, 77, 20)     # red too (its output is opaque), told apart by its green
FOREVER_MS = 60_000        # batches go out only when full: deterministic groupings
TERMINAL = ("file_done", "file_failed")


def solid(colour, width=40, height=30) -> np.ndarray:
    rgb = np.empty((height, width, 3), np.uint8)
    rgb[:] = colour
    return rgb


def oom() -> RuntimeError:
    return RuntimeError("CUDA out of memory. Tried to allocate 3.00 GiB")


def drop(daemon, names_colours) -> None:
    """Write the files outside the inbox and move them in, so each is ready at once and a
    batch fills in one go."""
    staging = daemon.cfg.paths.inbox.parent / "staging"
    for name, colour in names_colours:
        save(solid(colour), staging / name)
    for name, _ in names_colours:
        (staging / name).rename(daemon.cfg.paths.inbox / name)


def outputs(daemon) -> list:
    return sorted(p.name for p in daemon.cfg.paths.outbox.iterdir())


def test_cpu_path_runs_prepare_in_decode_stack_in_stage_finish_in_encode(inprocess):
    fake = FakeSegmenter()
    daemon = inprocess.start(segmenter=fake, batch={"size": 2, "max_wait_ms": FOREVER_MS})
    drop(daemon, [("a.png", RED), ("b.png", RED)])
    daemon.wait_count(TERMINAL, 2)
    assert daemon.stop() == 0
    assert daemon.crashes() == []
    assert fake.batch_sizes() == [2]
    assert fake.threads["prepare"] == {"rmbgd-decode"}
    assert fake.threads["resize_input"] == {"rmbgd-decode"}
    assert fake.threads["stack"] == {"rmbgd-stage"}
    assert fake.threads["predict_prepared"] == {"rmbgd-model"}
    assert fake.threads["finish"] == {"rmbgd-encode"}
    assert "predict" not in fake.threads
    assert outputs(daemon) == ["a.png", "b.png"]


def test_cpu_path_out_of_memory_splits_the_batch_and_lowers_the_size(inprocess):
    fake = FakeSegmenter(fail_predict=lambda colours: oom() if len(colours) > 1 else None)
    daemon = inprocess.start(segmenter=fake, batch={"size": 4, "max_wait_ms": FOREVER_MS})
    drop(daemon, [(f"p{i}.png", RED) for i in range(4)])
    daemon.wait_count(TERMINAL, 4)

    assert fake.batch_sizes() == [4, 2, 1, 1, 2, 1, 1]
    lowered = daemon.events("batch_size_lowered")
    assert [(e["was"], e["batch_size"]) for e in lowered] == [(4, 2), (2, 1)]
    assert all(e["reason"] == OUT_OF_GPU_MEMORY for e in lowered)
    assert all(e["out_of_memory"] for e in daemon.events("batch_failed"))
    assert [e["size"] for e in daemon.events("batch_done")] == [1, 1, 1, 1]
    assert outputs(daemon) == [f"p{i}.png" for i in range(4)]
    assert daemon.events("file_failed") == []
    assert daemon.stop() == 0
    assert daemon.crashes() == []


def test_cpu_path_image_that_does_not_fit_alone_fails_alone(inprocess):
    def fails(colours):
        return oom() if MARKED in colours or len(colours) > 2 else None

    fake = FakeSegmenter(fail_predict=fails)
    daemon = inprocess.start(segmenter=fake, batch={"size": 2, "max_wait_ms": FOREVER_MS})
    drop(daemon, [("a.png", RED), ("huge.png", MARKED)])
    daemon.wait_count(TERMINAL, 2)

    assert outputs(daemon) == ["a.png"]
    (failed,) = daemon.events("file_failed")
    assert (failed["stage"], failed["error"]) == ("inference", OUT_OF_GPU_MEMORY)
    sidecar = json.loads((daemon.cfg.paths.errors / "huge.png.error.json").read_text())
    assert (sidecar["stage"], sidecar["error"]) == ("inference", OUT_OF_GPU_MEMORY)
    assert daemon.stop() == 0
    assert daemon.crashes() == []


def test_cpu_path_other_model_errors_are_retried_one_by_one(inprocess):
    fake = FakeSegmenter(fail_predict=lambda colours: ValueError("NaN in the decoder") if MARKED in colours else None)
    daemon = inprocess.start(segmenter=fake, batch={"size": 3, "max_wait_ms": FOREVER_MS})
    drop(daemon, [("a.png", RED), ("bad.png", MARKED), ("b.png", RED)])
    daemon.wait_count(TERMINAL, 3)

    assert fake.batch_sizes() == [3, 1, 1, 1]
    assert daemon.events("batch_size_lowered") == []
    assert [e["out_of_memory"] for e in daemon.events("batch_failed")] == [False]
    assert outputs(daemon) == ["a.png", "b.png"]
    sidecar = json.loads((daemon.cfg.paths.errors / "bad.png.error.json").read_text())
    assert (sidecar["stage"], sidecar["error"]) == ("inference", "ValueError: NaN in the decoder")
    assert daemon.stop() == 0
    assert daemon.crashes() == []


def test_cpu_path_out_of_memory_when_retrying_one_by_one(inprocess):
    def fails(colours):
        if len(colours) > 1:
            return RuntimeError("cuDNN error: CUDNN_STATUS_INTERNAL_ERROR")
        return oom() if colours == [MARKED] else None

    daemon = inprocess.start(segmenter=FakeSegmenter(fail_predict=fails),
                             batch={"size": 2, "max_wait_ms": FOREVER_MS})
    drop(daemon, [("a.png", RED), ("huge.png", MARKED)])
    daemon.wait_count(TERMINAL, 2)
    assert outputs(daemon) == ["a.png"]
    (failed,) = daemon.events("file_failed")
    assert failed["error"] == OUT_OF_GPU_MEMORY
    assert daemon.stop() == 0
    assert daemon.crashes() == []


def test_cpu_path_prepare_and_finish_failures_fail_only_their_file(inprocess):
    fake = FakeSegmenter(
        fail_prepare=lambda colour: ValueError("cannot normalise") if colour == MARKED else None,
        fail_finish=lambda size: MemoryError("no room for the mask") if size == (41, 30) else None,
    )
    daemon = inprocess.start(segmenter=fake)
    staging = daemon.cfg.paths.inbox.parent / "staging"
    save(solid(MARKED), staging / "unprepared.png")
    save(solid(RED, width=41), staging / "unfinished.png")
    save(solid(RED), staging / "fine.png")
    for name in ("unprepared.png", "unfinished.png", "fine.png"):
        (staging / name).rename(daemon.cfg.paths.inbox / name)
    daemon.wait_count(TERMINAL, 3)

    assert outputs(daemon) == ["fine.png"]
    stages = {e["input"].rsplit("/", 1)[-1]: (e["stage"], e["error"]) for e in daemon.events("file_failed")}
    assert stages == {"unprepared.png": ("decode", "ValueError: cannot normalise"),
                      "unfinished.png": ("encode", "MemoryError: no room for the mask")}
    assert daemon.stop() == 0
    assert daemon.crashes() == []
