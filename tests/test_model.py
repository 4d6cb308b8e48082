"""rmbgd.model: loading a model the way BiRefNet is loaded, and predicting masks.

Everything runs on CPU without network: the model is a tiny custom-code
checkpoint built on the fly (tests/support/tinymodel.py) and loaded through
``AutoModelForImageSegmentation.from_pretrained(..., trust_remote_code=True)``.
"""

from __future__ import annotations

import logging
import math
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

import huggingface_hub
import huggingface_hub.constants
import numpy as np
import pytest
import torch
from PIL import Image

from rmbgd.model import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    ModelLoadError,
    Segmenter,
    dtype_for_device,
    load_segmenter,
    resolve_device,
)
from tests.support.tinymodel import alpha_for_rgb, build_tiny_model, expected_alpha

SIDE = 64  # the model input size for these tests; BiRefNet uses 1024


@dataclass(frozen=True)
class ModelConfig:
    """Stand-in for rmbgd.config.ModelConfig (same attributes)."""

    name: str = "ZhengPeng7/BiRefNet"
    device: str = "cpu"
    trust_remote_code: bool = True
    input_size: int = SIDE
    revision: str | None = None


class RecordingLog:
    """A structlog-like logger keeping (event, fields) pairs."""

    def __init__(self) -> None:
        self.events: list[tuple[str, dict]] = []

    def info(self, event: str, **fields) -> None:
        self.events.append((event, fields))

    warning = info

    def names(self) -> list[str]:
        return [event for event, _ in self.events]


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory) -> Path:
    return build_tiny_model(tmp_path_factory.mktemp("models") / "tiny")


@pytest.fixture(scope="module")
def segmenter(tiny_dir) -> Segmenter:
    return load_segmenter(ModelConfig(name=str(tiny_dir)))


@pytest.fixture
def empty_hub_cache(tmp_path, monkeypatch) -> Path:
    """An empty Hugging Face cache, so a model cached on the developer's machine cannot interfere."""
    cache = tmp_path / "hf-cache"
    cache.mkdir()
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(cache))
    return cache


@pytest.fixture
def online_mode(monkeypatch) -> None:
    """Whatever the environment says, behave as if the hub may be contacted."""
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.delenv("TRANSFORMERS_OFFLINE", raising=False)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)


def load_error(cfg: ModelConfig) -> str:
    with pytest.raises(ModelLoadError) as info:
        load_segmenter(cfg)
    message = str(info.value)
    assert "\n" not in message
    return message


# --------------------------------------------------------------------------- images


def paint(width: int, height: int, regions) -> np.ndarray:
    """An RGB image made of flat rectangles ((x0, y0, x1, y1), colour)."""
    image = np.zeros((height, width, 3), dtype=np.uint8)
    for (x0, y0, x1, y1), colour in regions:
        image[y0:y1, x0:x1] = colour
    return image


def interior(width: int, height: int, regions, margin: int) -> np.ndarray:
    """Pixels at least ``margin`` away from any boundary between two regions.

    Image edges are not boundaries, so a flat image is interior everywhere.
    """
    keep = np.zeros((height, width), dtype=bool)
    for (x0, y0, x1, y1), _ in regions:
        left = x0 + (margin if x0 > 0 else 0)
        top = y0 + (margin if y0 > 0 else 0)
        right = x1 - (margin if x1 < width else 0)
        bottom = y1 - (margin if y1 < height else 0)
        keep[top:bottom, left:right] = True
    return keep


def resize_like_daemon(image: np.ndarray) -> np.ndarray:
    resized = Image.fromarray(image).resize((SIDE, SIDE), Image.Resampling.BILINEAR)
    return np.asarray(resized, dtype=np.uint8)


RED, BLUE, BLACK, GREEN = (255, 0, 0), (0, 0, 255), (0, 0, 0), (0, 255, 0)

# (width, height, regions): each case has its own layout, so masks returned in
# the wrong order, at the wrong size or transposed do not match.
CASES = [
    (40, 30, [((0, 0, 20, 30), RED), ((20, 0, 40, 30), BLUE)]),
    (25, 50, [((0, 0, 25, 25), RED), ((0, 25, 25, 50), BLACK)]),
    (SIDE, SIDE, [((0, 0, SIDE, SIDE), (128, 0, 0))]),
    (
        100,
        20,
        [((0, 0, 33, 20), BLACK), ((33, 0, 66, 20), (200, 30, 30)), ((66, 0, 100, 20), (60, 200, 10))],
    ),
    (1, 1, [((0, 0, 1, 1), RED)]),
    (300, 200, [((0, 0, 150, 100), RED), ((150, 0, 300, 200), GREEN), ((0, 100, 150, 200), (90, 0, 0))]),
]


# --------------------------------------------------------------------------- tiny model


def test_tiny_model_alpha_function():
    assert alpha_for_rgb(255, 0, 0) == 255
    assert alpha_for_rgb(0, 255, 255) == 0
    assert 120 < alpha_for_rgb(128, 0, 0) < 140
    colours = np.array([[[255, 0, 0], [0, 0, 255], [128, 7, 9]]], dtype=np.uint8)
    assert expected_alpha(colours).tolist() == [[255, 0, alpha_for_rgb(128, 7, 9)]]


def test_tiny_model_has_the_hugging_face_custom_code_layout(tiny_dir):
    names = {path.name for path in tiny_dir.iterdir()}
    assert {"config.json", "model.safetensors", "configuration_tinyseg.py", "modeling_tinyseg.py"} <= names


# --------------------------------------------------------------------------- loading and predicting


def test_load_on_cpu(segmenter, tiny_dir):
    assert segmenter.name == str(tiny_dir)
    assert segmenter.device == "cpu"
    assert segmenter.dtype == "float32"
    assert segmenter.input_size == SIDE


def test_auto_device_without_cuda_is_cpu(tiny_dir, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    log = RecordingLog()
    loaded = load_segmenter(ModelConfig(name=str(tiny_dir), device="auto"), log=log)
    assert (loaded.device, loaded.dtype) == ("cpu", "float32")
    assert log.names() == ["model_loading", "model_loaded"]
    loading, loaded_event = (fields for _, fields in log.events)
    assert loading == {"name": str(tiny_dir), "device": "cpu", "dtype": "float32"}
    assert loaded_event["ms"] >= 0


def test_predict_batch_of_different_images_and_sizes(segmenter):
    images = [paint(w, h, regions) for w, h, regions in CASES]
    masks = segmenter.predict([resize_like_daemon(image) for image in images], [(w, h) for w, h, _ in CASES])

    assert len(masks) == len(CASES)
    for (width, height, regions), image, mask in zip(CASES, images, masks):
        assert mask.shape == (height, width)
        assert mask.dtype == np.uint8
        margin = max(4, math.ceil(2 * max(width, height) / SIDE) + 2)
        keep = interior(width, height, regions, margin)
        assert keep.any()
        difference = np.abs(mask[keep].astype(int) - expected_alpha(image)[keep].astype(int))
        assert difference.max() <= 2, f"{width}x{height}: off by up to {difference.max()}"


def test_predict_uses_the_last_output(segmenter):
    # The tiny model's output[0] is the inverted mask: pure red would give 0 there.
    mask = segmenter.predict([paint(SIDE, SIDE, [((0, 0, SIDE, SIDE), RED)])], [(8, 6)])[0]
    assert (mask == 255).all()


def test_predict_empty_batch(segmenter):
    assert segmenter.predict([], []) == []


@pytest.mark.parametrize(
    "image",
    [
        np.zeros((SIDE, SIDE, 3), dtype=np.float32),
        np.zeros((SIDE + 1, SIDE, 3), dtype=np.uint8),
        np.zeros((SIDE, SIDE), dtype=np.uint8),
    ],
)
def test_predict_rejects_images_not_resized_by_the_caller(segmenter, image):
    with pytest.raises(ValueError):
        segmenter.predict([image], [(10, 10)])


def test_predict_rejects_mismatched_sizes(segmenter):
    with pytest.raises(ValueError):
        segmenter.predict([np.zeros((SIDE, SIDE, 3), dtype=np.uint8)], [])


def test_warmup(segmenter):
    segmenter.warmup()


def test_loading_prints_nothing(tmp_path, capfd, caplog):
    model_dir = build_tiny_model(tmp_path / "quiet")
    capfd.readouterr()
    with caplog.at_level(logging.INFO):
        loaded = load_segmenter(ModelConfig(name=str(model_dir)))
        loaded.warmup()
    out, err = capfd.readouterr()
    assert (out, err) == ("", "")
    # Propagated to the root logger instead of printed; none should be warnings,
    # which would betray a checkpoint in the wrong format (e.g. missing keys).
    assert [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING] == []


# --------------------------------------------------------------------------- fakes: dtype, normalisation


class FakeModel:
    """Records its inputs; returns [inverse, final] constant logit maps like BiRefNet's list."""

    def __init__(self, final_logit: float = -30.0) -> None:
        self.final_logit = final_logit
        self.inputs: list[torch.Tensor] = []
        self.inference_mode: list[bool] = []

    def __call__(self, pixels: torch.Tensor):
        self.inputs.append(pixels.clone())
        self.inference_mode.append(torch.is_inference_mode_enabled())
        batch, _, height, width = pixels.shape
        final = torch.full((batch, 1, height, width), self.final_logit, dtype=pixels.dtype)
        return [-final, final]


@pytest.mark.parametrize("dtype", ["float32", "float16"])
def test_predict_normalises_in_the_segmenter_dtype(dtype):
    fake = FakeModel(final_logit=-30.0)
    fake_segmenter = Segmenter(fake, name="fake", device="cpu", dtype=dtype, input_size=4)
    image = np.zeros((4, 4, 3), dtype=np.uint8)
    image[..., 0] = 255
    masks = fake_segmenter.predict([image, image], [(3, 5), (7, 2)])

    assert [mask.shape for mask in masks] == [(5, 3), (2, 7)]
    assert all((mask == 0).all() for mask in masks)  # output[-1], not output[0]
    (pixels,) = fake.inputs
    assert pixels.dtype == getattr(torch, dtype)
    assert pixels.shape == (2, 3, 4, 4)
    assert fake.inference_mode == [True]
    expected = [(1.0 - IMAGENET_MEAN[0]) / IMAGENET_STD[0]] + [
        -IMAGENET_MEAN[c] / IMAGENET_STD[c] for c in (1, 2)
    ]
    per_channel = pixels.float()[0, :, 0, 0].tolist()
    assert per_channel == pytest.approx(expected, abs=1e-2)


def test_warmup_runs_one_zero_image():
    fake = FakeModel()
    Segmenter(fake, name="fake", device="cpu", dtype="float32", input_size=8).warmup()
    (pixels,) = fake.inputs
    assert pixels.shape == (1, 3, 8, 8)
    zero = [-IMAGENET_MEAN[c] / IMAGENET_STD[c] for c in range(3)]
    assert pixels[0, :, 3, 3].tolist() == pytest.approx(zero, abs=1e-5)


def test_predict_rejects_output_of_the_wrong_shape():
    def two_channels(pixels):
        return [torch.zeros((pixels.shape[0], 2, 4, 4))]

    broken = Segmenter(two_channels, name="fake", device="cpu", dtype="float32", input_size=4)
    with pytest.raises(ValueError, match="logits of shape"):
        broken.predict([np.zeros((4, 4, 3), dtype=np.uint8)], [(4, 4)])


def test_model_exceptions_propagate_from_predict():
    def failing(pixels):
        raise RuntimeError("CUDA error: device-side assert triggered")

    broken = Segmenter(failing, name="fake", device="cpu", dtype="float32", input_size=4)
    with pytest.raises(RuntimeError, match="device-side assert"):
        broken.predict([np.zeros((4, 4, 3), dtype=np.uint8)], [(4, 4)])


@pytest.mark.parametrize(
    ("device", "dtype"),
    [("cuda", "float16"), ("cuda:0", "float16"), ("cuda:3", "float16"), ("cpu", "float32")],
)
def test_dtype_for_device(device, dtype):
    assert dtype_for_device(device) == dtype


# --------------------------------------------------------------------------- devices


@pytest.fixture
def cuda_devices(monkeypatch):
    def set_count(count: int) -> None:
        monkeypatch.setattr(torch.cuda, "is_available", lambda: count > 0)
        monkeypatch.setattr(torch.cuda, "device_count", lambda: count)

    return set_count


@pytest.mark.parametrize(
    ("spec", "count", "expected"),
    [
        ("auto", 0, "cpu"),
        ("auto", 2, "cuda"),
        ("cpu", 2, "cpu"),
        ("cuda", 1, "cuda"),
        ("cuda:0", 1, "cuda:0"),
        ("cuda:1", 2, "cuda:1"),
        (" CUDA:1 ", 2, "cuda:1"),
    ],
)
def test_resolve_device(cuda_devices, spec, count, expected):
    cuda_devices(count)
    assert resolve_device(spec) == expected


def test_resolve_device_index_out_of_range(cuda_devices):
    cuda_devices(1)
    with pytest.raises(ModelLoadError) as info:
        resolve_device("cuda:3")
    assert str(info.value) == "model.device: cuda:3 requested but only 1 CUDA device(s) visible"


@pytest.mark.parametrize("spec", ["cuda", "cuda:0"])
def test_resolve_device_without_cuda(cuda_devices, spec):
    cuda_devices(0)
    with pytest.raises(ModelLoadError) as info:
        resolve_device(spec)
    assert str(info.value) == (
        f"model.device: {spec} requested but CUDA is not available "
        "(torch was built without CUDA or no GPU is visible)"
    )


@pytest.mark.parametrize("spec", ["gpu", "cuda:", "cuda:x", "mps", ""])
def test_resolve_device_rejects_unknown_specs(spec):
    with pytest.raises(ModelLoadError, match=r"^model\.device: expected auto, cpu, cuda or cuda:N"):
        resolve_device(spec)


def test_load_reports_a_missing_gpu_before_touching_the_model(cuda_devices):
    cuda_devices(0)
    message = load_error(ModelConfig(name="/does/not/matter", device="cuda"))
    assert message.startswith("model.device: cuda requested but CUDA is not available")


# --------------------------------------------------------------------------- load errors


def test_missing_local_directory(tmp_path):
    missing = tmp_path / "nowhere" / "BiRefNet"
    message = load_error(ModelConfig(name=str(missing)))
    assert message.startswith(f"model.name: {missing} is not a model directory (no config.json)")


def test_directory_without_config_json(tmp_path):
    message = load_error(ModelConfig(name=str(tmp_path)))
    assert message == f"model.name: {tmp_path} is not a model directory (no config.json)"


def test_file_instead_of_directory(tmp_path):
    weights = tmp_path / "model.safetensors"
    weights.write_bytes(b"")
    message = load_error(ModelConfig(name=str(weights)))
    assert message.startswith(f"model.name: {weights} is not a model directory")


def test_invalid_model_id():
    message = load_error(ModelConfig(name="not a valid id"))
    assert message.startswith("model.name: 'not a valid id' is neither an existing local directory")


OFFLINE_HINT = (
    "; on an offline machine, copy the model folder there and set model.name to that local "
    "directory, e.g. model.name: /srv/rmbgd/models/BiRefNet"
)


def test_hub_id_with_hf_hub_offline_and_empty_cache(monkeypatch, empty_hub_cache):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    started = time.monotonic()
    message = load_error(ModelConfig(name="ZhengPeng7/BiRefNet"))
    assert time.monotonic() - started < 5
    assert message == (
        "model.name: cannot download 'ZhengPeng7/BiRefNet' from the Hugging Face hub "
        "(HF_HUB_OFFLINE is set)" + OFFLINE_HINT
    )


def test_hub_id_with_unreachable_hub(monkeypatch, online_mode, empty_hub_cache):
    def unreachable(url, **kwargs):
        raise ConnectionError("[Errno -2] Name or service not known")

    monkeypatch.setattr(huggingface_hub, "get_hf_file_metadata", unreachable)
    message = load_error(ModelConfig(name="ZhengPeng7/BiRefNet"))
    assert message == (
        "model.name: cannot download 'ZhengPeng7/BiRefNet' from the Hugging Face hub "
        "(no network access?)" + OFFLINE_HINT
    )


def test_hub_id_real_attempt_fails_fast(online_mode, empty_hub_cache):
    # A real request: here it fails for lack of network, elsewhere the hub
    # answers that this repository does not exist. Either way, quickly.
    started = time.monotonic()
    message = load_error(ModelConfig(name="rmbgd-tests/no-such-model-3f9a"))
    assert time.monotonic() - started < 10
    assert message.startswith("model.name: ")
    assert "cannot download 'rmbgd-tests/no-such-model-3f9a'" in message or "was not found" in message


def test_hub_id_loads_from_the_cache_when_the_hub_is_unreachable(
    monkeypatch, online_mode, empty_hub_cache, tiny_dir
):
    # The layout huggingface_hub leaves behind after downloading a repository.
    commit = "0123456789abcdef0123456789abcdef01234567"
    repo = empty_hub_cache / "models--rmbgd-tests--tiny"
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(commit)
    shutil.copytree(tiny_dir, repo / "snapshots" / commit)

    def unreachable(url, **kwargs):
        raise ConnectionError("[Errno -2] Name or service not known")

    monkeypatch.setattr(huggingface_hub, "get_hf_file_metadata", unreachable)
    log = RecordingLog()
    cached = load_segmenter(ModelConfig(name="rmbgd-tests/tiny"), log=log)
    assert "model_hub_unreachable" in log.names()
    mask = cached.predict([paint(SIDE, SIDE, [((0, 0, SIDE, SIDE), RED)])], [(3, 3)])[0]
    assert (mask == 255).all()


def test_remote_code_not_trusted(tiny_dir):
    message = load_error(ModelConfig(name=str(tiny_dir), trust_remote_code=False))
    assert message.startswith("model.trust_remote_code: ")
    assert "set model.trust_remote_code: true" in message


def test_remote_code_needs_a_missing_package(tmp_path):
    model_dir = build_tiny_model(tmp_path / "tiny_needs_pkg")
    modeling = model_dir / "modeling_tinyseg.py"
    modeling.write_text("import some_missing_pkg_xyz\n" + modeling.read_text())
    message = load_error(ModelConfig(name=str(model_dir)))
    assert message == (
        "model.name: the model's code needs the Python package 'some_missing_pkg_xyz', "
        "which is not installed: pip install some_missing_pkg_xyz"
    )


def test_corrupt_weights(tmp_path):
    model_dir = build_tiny_model(tmp_path / "tiny_corrupt")
    (model_dir / "model.safetensors").write_bytes(b"this is not a safetensors file")
    message = load_error(ModelConfig(name=str(model_dir)))
    assert message.startswith(f"model.name: cannot load '{model_dir}': ")

