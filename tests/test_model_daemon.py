"""The real daemon on the model variants of issue 3: older remote code, fp16 checkpoints,
dynamic input sizes, bfloat16 on a model without a bfloat16 kernel.

Each runs `rmbgd run` as a subprocess on the tiny model written in that style and checks
the real outputs' alpha against the model's known mask.
"""

from __future__ import annotations

from pathlib import Path

from tests.support.photos import check_output, pattern, save
from tests.support.tinymodel import build_legacy_model, build_tiny_model

ALL_DONE = ("file_done", "file_failed")


def drop(inbox: Path, specs) -> dict:
    sources = {}
    for name, width, height, box in specs:
        # PNG is lossless: the array is what the daemon decodes (and the file may be claimed
        # the moment it is written, so it is not read back).
        rgb = pattern(width, height, box)
        save(rgb, inbox / name)
        sources[inbox / name] = rgb
    return sources


def check_all(daemon, folders, sources: dict) -> None:
    records = daemon.wait_count(ALL_DONE, len(sources))
    assert [r for r in records if r["event"] == "file_failed"] == []
    for record in daemon.events("file_done"):
        check_output(Path(record["output"]), sources[Path(record["input"])])
    assert daemon.stop() == 0
    assert daemon.stderr_lines == [] and daemon.non_json == []


def test_legacy_fp16_model_with_dynamic_input_sizes(daemons, folders, tmp_path):
    model = build_legacy_model(tmp_path / "rmbg-style", "birefnet_style", stored_dtype="float16")
    daemon = daemons.start(
        model={"name": str(model), "input_size": "dynamic", "max_input_size": 256},
        batch={"size": 2, "max_wait_ms": 300},
    )
    loaded = daemon.events("model_loaded")[0]
    assert (loaded["loader"], loaded["dtype"]) == ("legacy", "float32")
    assert daemon.events("model_legacy_fallback")
    # 160x96 and 150x100 both run at 160x96; 300x200 at 256x160 (capped).
    sources = drop(
        folders.inbox,
        [
            ("a.png", 160, 96, (0.1, 0.1, 0.6, 0.7)),
            ("b.png", 150, 100, (0.4, 0.2, 0.9, 0.9)),
            ("c.png", 300, 200, (0.2, 0.3, 0.7, 0.8)),
        ],
    )
    check_all(daemon, folders, sources)
    sizes = sorted(r["size"] for r in daemon.events("batch_done"))
    assert sum(sizes) == 3


def test_bfloat16_on_a_model_without_a_bfloat16_kernel(daemons, folders, tmp_path):
    model = build_tiny_model(tmp_path / "deformable", deformable=True)
    daemon = daemons.start(model={"name": str(model), "dtype": "bfloat16"})
    (fallback,) = daemon.events("model_precision_fallback")
    assert fallback["level"] == "warning" and "BFloat16" in fallback["error"]
    assert daemon.events("model_warm")
    sources = drop(folders.inbox, [("a.png", 120, 90, (0.1, 0.1, 0.5, 0.6))])
    check_all(daemon, folders, sources)
