"""model.backend: running the model as an ONNX Runtime or OpenVINO export on CPU-only hosts.

The exports are real (the tiny model with a deformable convolution, like BiRefNet's, exported
and run by each installed runtime); a backend whose package is missing is skipped with the
reason. Failures are forced for real too: no folder the export can be written to, a corrupt
cached export.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

import numpy as np
import pytest

from rmbgd.model.backends import EXPORT_DIR_NAME, choose_backend
from rmbgd.config import ConfigError, parse_config
from tests.support.logcapture import CapturedLog
from tests.support.tinymodel import build_tiny_model, expected_alpha

SIDE = 64
EXPORTED = ("onnxruntime", "openvino")


# What each backend's extra installs: with any of it missing the export falls back to torch.
EXTRA_PACKAGES = {"onnxruntime": ("onnx", ("onnxruntime", "onnx", "onnxscript")), "openvino": ("openvino", ("openvino",))}


def needs(backend: str) -> None:
    extra, packages = EXTRA_PACKAGES[backend]
    missing = [name for name in packages if importlib.util.find_spec(name) is None]
    if missing:
        pytest.skip(f"{', '.join(missing)} not installed (pip install 'rmbgd[{extra}]')")


def model_cfg(tmp_path: Path, model_dir: Path, **model: object):
    folders = {name: str(tmp_path / name) for name in ("inbox", "outbox", "errors", "done")}
    data = {"name": str(model_dir), "device": "cpu", "input_size": SIDE, **model}
    return parse_config({"paths": folders, "model": data}, tmp_path).model


def photo() -> np.ndarray:
    """Flat regions of red levels, which the tiny model maps to known alphas."""
    image = np.zeros((SIDE, SIDE, 3), np.uint8)
    image[:, : SIDE // 2, 0] = 255
    image[: SIDE // 2, SIDE // 2 :, 0] = 128
    image[..., 2] = 90
    return image


def assert_masks_right(segmenter) -> None:
    image = photo()
    (mask,) = segmenter.predict([image], [(SIDE, SIDE)])
    # Away from the region edges, where the deformable head samples its neighbours.
    inner = (slice(4, SIDE // 2 - 4), slice(4, SIDE // 2 - 4))
    wanted = expected_alpha(image)
    assert np.abs(mask[inner].astype(int) - wanted[inner]).max() <= 1


@pytest.fixture(scope="module")
def deform_dir(tmp_path_factory) -> Path:
    return build_tiny_model(tmp_path_factory.mktemp("models") / "deform", deformable=True)


# --------------------------------------------------------------------------- config


def test_backend_defaults_to_torch_and_accepts_each_value(tmp_path: Path) -> None:
    model_dir = tmp_path / "m"
    model_dir.mkdir()
    assert model_cfg(tmp_path, model_dir).backend == "torch"
    for value in ("auto", "torch", "onnxruntime", "OpenVINO"):
        assert model_cfg(tmp_path, model_dir, backend=value).backend == value.lower()


@pytest.mark.parametrize("value", ["onnx", "tensorrt", 3, None, ""])
def test_backend_rejects_other_values_naming_the_key(tmp_path: Path, value: object) -> None:
    with pytest.raises(ConfigError) as info:
        model_cfg(tmp_path, tmp_path, backend=value)
    assert any(p.startswith("model.backend: expected auto, torch, onnxruntime or openvino") for p in info.value.problems)


# --------------------------------------------------------------------------- choosing


def choose(wanted: str, installed=("openvino", "onnxruntime"), device="cpu", size=1024, dtype="float32"):
    return choose_backend(wanted, device_type=device, input_size=size, dtype=dtype, installed=lambda p: p in installed)


def test_auto_prefers_openvino_then_onnxruntime_on_cpu() -> None:
    assert choose("auto") == ("openvino", None)
    assert choose("auto", installed=("onnxruntime",)) == ("onnxruntime", None)
    assert choose("auto", installed=()) == ("torch", None)


def test_auto_is_torch_quietly_where_exports_do_not_apply() -> None:
    assert choose("auto", device="cuda") == ("torch", None)
    assert choose("auto", size="dynamic") == ("torch", None)
    assert choose("auto", dtype="bfloat16") == ("torch", None)


def test_torch_is_torch() -> None:
    assert choose("torch") == ("torch", None)


@pytest.mark.parametrize("backend", EXPORTED)
def test_explicit_backend_that_cannot_run_falls_back_with_reason(backend: str) -> None:
    assert choose(backend) == (backend, None)
    for kwargs, words in (
        ({"installed": ()}, f"rmbgd[{'onnx' if backend == 'onnxruntime' else 'openvino'}]"),
        ({"device": "cuda"}, "CPU only"),
        ({"size": "dynamic"}, "fixed model.input_size"),
        ({"dtype": "bfloat16"}, "model.dtype is bfloat16"),
    ):
        chosen, reason = choose(backend, **kwargs)
        assert chosen == "torch"
        assert words in reason


# --------------------------------------------------------------------------- real exports


@pytest.mark.parametrize("backend", EXPORTED)
def test_export_load_predict_and_cache(tmp_path: Path, deform_dir: Path, backend: str, capfd) -> None:
    needs(backend)
    from rmbgd.model.loading import load_segmenter

    log = CapturedLog()
    segmenter = load_segmenter(model_cfg(tmp_path, deform_dir, backend=backend), log=log)
    # stdout carries the daemon's JSON log: the exporters' progress must not reach it.
    assert capfd.readouterr().out == ""
    loaded = log.fields("model_loaded")
    assert loaded["backend"] == backend and segmenter.backend == backend
    assert "backend_fallback_reason" not in loaded
    assert Path(loaded["export"]).is_file()
    assert Path(loaded["export"]).is_relative_to(deform_dir / EXPORT_DIR_NAME)
    segmenter.warmup()
    assert segmenter.backend == backend
    assert_masks_right(segmenter)

    # A second start reuses the export.
    again = CapturedLog()
    load_segmenter(model_cfg(tmp_path, deform_dir, backend=backend), log=again)
    assert again.fields("model_loaded")["exported"] is False
    assert again.fields("model_loaded")["export"] == loaded["export"]


@pytest.mark.parametrize("backend", EXPORTED)
def test_fallback_when_no_folder_can_hold_the_export(tmp_path: Path, monkeypatch, backend: str) -> None:
    needs(backend)
    from rmbgd.model.loading import load_segmenter

    model_dir = build_tiny_model(tmp_path / "model", deformable=True)
    # A file where each export folder would go: the export cannot be written anywhere.
    (model_dir / EXPORT_DIR_NAME).write_text("not a folder")
    blocker = tmp_path / "cache-is-a-file"
    blocker.write_text("")
    monkeypatch.setenv("XDG_CACHE_HOME", str(blocker))

    log = CapturedLog()
    segmenter = load_segmenter(model_cfg(tmp_path, model_dir, backend=backend), log=log)
    loaded = log.fields("model_loaded")
    assert loaded["backend"] == "torch" and segmenter.backend == "torch"
    assert "no writable folder for the export" in loaded["backend_fallback_reason"]
    segmenter.warmup()
    assert_masks_right(segmenter)


def test_a_corrupt_cached_export_is_made_again(tmp_path: Path) -> None:
    needs("onnxruntime")
    from rmbgd.model.loading import load_segmenter

    model_dir = build_tiny_model(tmp_path / "model")
    cfg = model_cfg(tmp_path, model_dir, backend="onnxruntime")
    first = CapturedLog()
    load_segmenter(cfg, log=first)
    Path(first.fields("model_loaded")["export"]).write_bytes(b"\x08garbage")

    log = CapturedLog()
    segmenter = load_segmenter(cfg, log=log)
    loaded = log.fields("model_loaded")
    assert loaded["backend"] == "onnxruntime" and loaded["exported"] is True
    segmenter.warmup()
    assert_masks_right(segmenter)


def test_a_backend_failing_its_warmup_hands_over_to_torch(tmp_path: Path) -> None:
    # The runtime is stood in for here: no real export is known to load and then fail on
    # its first image, but the warm-up must still survive one that does.
    from rmbgd.model.loading import load_segmenter

    class BrokenRunner:
        backend = "openvino"
        path = tmp_path / "model.xml"

        def __call__(self, pixels):
            raise RuntimeError("Exception from src/inference/src/cpp/infer_request.cpp:223")

    model_dir = build_tiny_model(tmp_path / "model")
    log = CapturedLog()
    loaded = load_segmenter(model_cfg(tmp_path, model_dir), log=log)
    from rmbgd.model.segmenter import Segmenter

    segmenter = Segmenter(
        loaded._model, name="tiny", device="cpu", dtype="float32", input_size=SIDE, log=log, runner=BrokenRunner()
    )
    assert segmenter.backend == "openvino"
    segmenter.warmup()
    fallback = log.fields("model_backend_fallback")
    assert fallback["backend"] == "openvino" and fallback["fallback"] == "torch"
    assert "infer_request" in fallback["error"]
    assert segmenter.backend == "torch"
    assert_masks_right(segmenter)


@pytest.mark.parametrize("backend", EXPORTED)
def test_daemon_runs_the_export_end_to_end(daemons, folders, tmp_path: Path, backend: str) -> None:
    needs(backend)
    from tests.support.photos import check_output, pattern, save

    model = build_tiny_model(tmp_path / "model", deformable=True)
    daemon = daemons.start(model={"name": str(model), "input_size": SIDE, "backend": backend})
    loaded = daemon.events("model_loaded")[0]
    assert loaded["backend"] == backend and loaded["exported"] is True
    sources = {}
    for name, box in (("a.png", (0.2, 0.2, 0.7, 0.8)), ("b.png", (0.4, 0.1, 0.9, 0.6))):
        rgb = pattern(160, 120, box)
        save(rgb, folders.inbox / name)
        sources[folders.inbox / name] = rgb
    records = daemon.wait_count(("file_done", "file_failed"), len(sources))
    assert [r for r in records if r["event"] == "file_failed"] == []
    for record in daemon.events("file_done"):
        check_output(Path(record["output"]), sources[Path(record["input"])])
    assert daemon.stop() == 0
    assert daemon.stderr_lines == [] and daemon.non_json == []
