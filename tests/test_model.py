"""rmbgd.model (segmenter, loading, device, warmup): loading a model the way BiRefNet is loaded, and predicting masks.

Everything runs on CPU without network: the model is a tiny custom-code
checkpoint built on the fly (tests/support/tinymodel.py) and loaded through
``AutoModelForImageSegmentation.from_pretrained(..., trust_remote_code=True)``.
"""

from __future__ import annotations

import logging
import math
import os
import shutil
import types
from dataclasses import dataclass
from pathlib import Path

import huggingface_hub
import huggingface_hub.constants
import numpy as np
import pytest
import torch
from PIL import Image

import rmbgd.model.warmup as warmup_module
from rmbgd.model.device import (
    configure_backends,
    cpu_threads,
    dtype_for_device,
    is_out_of_memory,
    resolve_device,
    resolve_dtype,
)
from rmbgd.model.hub import ModelLoadError
from rmbgd.model.loading import load_segmenter
from rmbgd.model.segmenter import IMAGENET_MEAN, IMAGENET_STD, Segmenter
from tests.support.hidepkgs import hidden
from tests.support.logcapture import CapturedLog
from tests.support.tinymodel import (
    LEGACY_CLASSES,
    alpha_for_rgb,
    build_birefnet_lite,
    build_legacy_model,
    build_tiny_model,
    edit_weights,
    expected_alpha,
)

SIDE = 64  # the model input size for these tests; BiRefNet uses 1024


@dataclass(frozen=True)
class ModelConfig:
    """Stand-in for rmbgd.config.ModelConfig (same attributes)."""

    name: str = "ZhengPeng7/BiRefNet"
    device: str = "cpu"
    trust_remote_code: bool = True
    input_size: int | str = SIDE
    revision: str | None = None
    dtype: str = "auto"
    max_input_size: int = 2048
    compile: bool = False


class RecordingLog(CapturedLog):
    """structlog's LogCapture, read as (event, fields) pairs; debug ones apart."""

    @staticmethod
    def _pairs(entries) -> list[tuple[str, dict]]:
        return [(e["event"], {k: v for k, v in e.items() if k not in ("event", "log_level")}) for e in entries]

    @property
    def events(self) -> list[tuple[str, dict]]:
        return self._pairs(e for e in self.entries if e["log_level"] != "debug")

    @property
    def debug_events(self) -> list[tuple[str, dict]]:
        return self._pairs(e for e in self.entries if e["log_level"] == "debug")

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
    assert loaded_event["loader"] == "from_pretrained"
    assert loaded_event["threads"] >= 1


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


def test_warmup(tiny_dir, monkeypatch):
    # What the daemon does before `ready` (rmbgd.runtime.daemon.load_model), observed: the warm-up
    # runs the model once at the configured size in float32 weights, settles on them (no
    # silent fallback to autocast or to an uncompiled model), and says so in the log.
    from rmbgd.runtime.daemon import load_model

    ran = []
    real_warmup = Segmenter.warmup

    def observed_warmup(self):
        def hook(module, args, output):
            ran.append((tuple(args[0].shape), args[0].dtype))

        handle = self._model.register_forward_hook(hook)
        try:
            real_warmup(self)
        finally:
            handle.remove()

    monkeypatch.setattr(Segmenter, "warmup", observed_warmup)
    log = RecordingLog()
    warm = load_model(types.SimpleNamespace(model=ModelConfig(name=str(tiny_dir))), log)
    # The warm-up call, then one call of one image and one of two, timed for the batcher.
    assert ran == [((1, 3, SIDE, SIDE), torch.float32), ((1, 3, SIDE, SIDE), torch.float32), ((2, 3, SIDE, SIDE), torch.float32)]
    assert [(key, size) for key, size, _ in warm.call_timings] == [((SIDE, SIDE), 1), ((SIDE, SIDE), 2)]
    assert (warm.precision, warm.loader, warm.dtype, warm.device) == ("weights", "from_pretrained", "float32", "cpu")
    assert log.names() == ["model_loading", "model_loaded", "model_warm"]
    fields = dict(log.events)
    assert fields["model_loaded"]["loader"] == "from_pretrained"
    assert fields["model_loaded"]["dtype"] == "float32"
    assert isinstance(fields["model_warm"]["ms"], float) and fields["model_warm"]["ms"] >= 0
    assert fields["model_warm"]["call_ms"] > 0
    assert 0 <= fields["model_warm"]["fixed_ms"] <= fields["model_warm"]["call_ms"]


def test_warmup_of_a_slow_model_times_no_extra_calls(monkeypatch):
    # A CPU model taking seconds per image: two more calls would delay the start by seconds.
    monkeypatch.setattr(warmup_module, "QUICK_CALL_SECONDS", 0.0)
    fake = FakeModel()
    segmenter = Segmenter(fake, name="fake", device="cpu", dtype="float32", input_size=8)
    segmenter.warmup()
    assert len(fake.inputs) == 1
    ((key, size, seconds),) = segmenter.call_timings
    assert (key, size) == ((8, 8), 1) and seconds > 0


def test_warmup_timing_that_fails_keeps_the_warm_up_time():
    # The warm-up worked; a failing timing call (a batch of two out of GPU memory) is not a
    # reason to refuse the start, and the batcher keeps the warm-up call's time.
    fake = FakeModel()
    fake.fail_batches_of = 2
    segmenter = Segmenter(fake, name="fake", device="cpu", dtype="float32", input_size=8)
    segmenter.warmup()
    assert [(key, size) for key, size, _ in segmenter.call_timings] == [((8, 8), 1)]


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
        self.fail_batches_of: int | None = None

    def __call__(self, pixels: torch.Tensor):
        self.inputs.append(pixels.clone())
        if len(pixels) == self.fail_batches_of:
            raise RuntimeError("CUDA out of memory. Tried to allocate 2.00 GiB")
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
    pixels, *timed = fake.inputs  # then one call of one image and one of two, timed
    assert pixels.shape == (1, 3, 8, 8)
    assert [t.shape[0] for t in timed] == [1, 2]
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


def offline_hint(cache: Path) -> str:
    return (
        f" and it is not in this machine's Hugging Face cache ({cache}); run `rmbgd fetch-model --config PATH` "
        "where the hub is reachable to fill that cache, or, for an offline machine, copy the model "
        "folder to this machine and set model.name to that local directory, "
        "e.g. model.name: /srv/rmbgd/models/BiRefNet"
    )


def hub_at(monkeypatch, url: str) -> None:
    """Point this process's huggingface_hub at `url` (it read HF_ENDPOINT once, at import)."""
    monkeypatch.setenv("HF_ENDPOINT", url)
    monkeypatch.setattr(huggingface_hub.constants, "ENDPOINT", url)
    monkeypatch.setattr(
        huggingface_hub.constants, "HUGGINGFACE_CO_URL_TEMPLATE", url + "/{repo_id}/resolve/{revision}/{filename}"
    )


def test_hub_id_with_hf_hub_offline_and_empty_cache(monkeypatch, empty_hub_cache, fake_hub, fake_hub_server):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    hub_at(monkeypatch, fake_hub)
    message = load_error(ModelConfig(name="ZhengPeng7/BiRefNet"))
    assert fake_hub_server.requests == []  # offline: not one request, so no wait on a network
    assert message == (
        "model.name: cannot download 'ZhengPeng7/BiRefNet' from the Hugging Face hub "
        "(HF_HUB_OFFLINE is set)" + offline_hint(empty_hub_cache)
    )


def test_hub_id_offline_names_the_pinned_revision(monkeypatch, empty_hub_cache):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    message = load_error(ModelConfig(name="ZhengPeng7/BiRefNet", revision="v1.2"))
    assert message.startswith(
        "model.name: cannot download 'ZhengPeng7/BiRefNet' at revision 'v1.2' from the Hugging Face hub"
    )


def test_hub_id_with_unreachable_hub(monkeypatch, online_mode, empty_hub_cache):
    def unreachable(url, **kwargs):
        raise ConnectionError("[Errno -2] Name or service not known")

    monkeypatch.setattr(huggingface_hub, "get_hf_file_metadata", unreachable)
    message = load_error(ModelConfig(name="ZhengPeng7/BiRefNet"))
    assert message == (
        "model.name: cannot download 'ZhengPeng7/BiRefNet' from the Hugging Face hub "
        "(no network access?)" + offline_hint(empty_hub_cache)
    )


@pytest.mark.parametrize(
    "repo, expected",
    [
        ("rmbgd-tests/missing", "model.name: 'rmbgd-tests/missing' was not found on the Hugging Face hub"),
        # The fake hub answers 500 for this one: a hub in trouble, the cache may still do.
        ("rmbgd-tests/hub-in-trouble", "model.name: cannot download 'rmbgd-tests/hub-in-trouble' from the "
         "Hugging Face hub (no network access?)"),
    ],
)
def test_hub_id_probe_asks_the_hub_once(monkeypatch, online_mode, empty_hub_cache, fake_hub, fake_hub_server, repo, expected):
    # One request for config.json, no retries: huggingface_hub's own retry loop backs off
    # for 1+2+4+8+8 s before it gives up, and the daemon would start that late.
    hub_at(monkeypatch, fake_hub)
    message = load_error(ModelConfig(name=repo))
    assert message.startswith(expected)
    assert [(method, path.split("?")[0]) for method, path in fake_hub_server.requests] == [
        ("HEAD", f"/{repo}/resolve/main/config.json")
    ]


def test_hub_id_with_a_hub_that_refuses_connections(monkeypatch, online_mode, empty_hub_cache, hub_nowhere):
    hub_at(monkeypatch, hub_nowhere)
    log = RecordingLog()
    with pytest.raises(ModelLoadError) as info:
        load_segmenter(ModelConfig(name="ZhengPeng7/BiRefNet"), log=log)
    assert str(info.value) == (
        "model.name: cannot download 'ZhengPeng7/BiRefNet' from the Hugging Face hub "
        "(no network access?)" + offline_hint(empty_hub_cache)
    )
    assert log.names() == ["model_loading", "model_hub_unreachable"]


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



def test_remote_code_needing_birefnets_packages_names_the_extra(tmp_path):
    # Hidden while the model loads, so this runs whether they are installed here or not.
    missing = ("timm", "kornia", "einops")
    model_dir = build_tiny_model(tmp_path / "tiny_birefnet_imports")
    modeling = model_dir / "modeling_tinyseg.py"
    modeling.write_text("".join(f"import {name}\n" for name in missing) + modeling.read_text())
    with hidden(missing):
        message = load_error(ModelConfig(name=str(model_dir)))
    assert message.startswith("model.name: the model's code needs the Python package")
    assert all(f"'{name}'" in message for name in missing)
    assert message.endswith(
        ": pip install 'rmbgd[birefnet]' (BiRefNet's code needs timm, kornia, einops)"
    )


# --------------------------------------------------------------------------- legacy remote code


def red_square() -> np.ndarray:
    return paint(SIDE, SIDE, [((0, 0, SIDE, SIDE), RED)])


@pytest.mark.parametrize("habit", sorted(LEGACY_CLASSES))
def test_legacy_code_breaks_plain_from_pretrained(tmp_path, habit):
    # The fixture really reproduces the habit: transformers alone cannot load it.
    from transformers import AutoModelForImageSegmentation

    model_dir = build_legacy_model(tmp_path / habit, habit)
    with pytest.raises((AttributeError, RuntimeError)) as info:
        AutoModelForImageSegmentation.from_pretrained(
            str(model_dir), trust_remote_code=True, dtype=torch.float32, local_files_only=True
        )
    assert any(
        sign in str(info.value)
        for sign in ("model_type", "get_text_config", "all_tied_weights_keys", "meta tensors")
    )


@pytest.mark.parametrize("habit", sorted(LEGACY_CLASSES))
def test_legacy_code_loads_through_the_fallback(tmp_path, habit):
    model_dir = build_legacy_model(tmp_path / habit, habit)
    log = RecordingLog()
    loaded = load_segmenter(ModelConfig(name=str(model_dir)), log=log)

    assert loaded.loader == "legacy"
    assert log.names() == ["model_loading", "model_legacy_fallback", "model_loaded"]
    fields = dict(log.events)
    assert fields["model_loaded"]["loader"] == "legacy"
    assert fields["model_legacy_fallback"]["reason"]
    loaded.warmup()
    # The weights really loaded: zero-initialised ones would give 128 everywhere.
    width, height, regions = CASES[0]
    image = paint(width, height, regions)
    (mask,) = loaded.predict([resize_like_daemon(image)], [(width, height)])
    keep = interior(width, height, regions, margin=4)
    assert np.abs(mask[keep].astype(int) - expected_alpha(image)[keep].astype(int)).max() <= 2


def test_legacy_fp16_checkpoint_loads_in_float32_on_cpu(tmp_path):
    model_dir = build_legacy_model(tmp_path / "legacy16", "birefnet_style", stored_dtype="float16")
    loaded = load_segmenter(ModelConfig(name=str(model_dir)))
    assert loaded.loader == "legacy"
    assert {p.dtype for p in loaded._model.parameters()} == {torch.float32}
    assert (loaded.predict([red_square()], [(4, 4)])[0] == 255).all()


def test_a_well_written_model_does_not_take_the_fallback(tiny_dir):
    log = RecordingLog()
    assert load_segmenter(ModelConfig(name=str(tiny_dir)), log=log).loader == "from_pretrained"
    assert "model_legacy_fallback" not in log.names()


def test_legacy_weights_that_do_not_match_the_code(tmp_path):
    model_dir = build_legacy_model(tmp_path / "legacy_extra", "no_post_init")

    def edit(state):
        state["stray.weight"] = torch.zeros(2)
        del state["head.bias"]

    edit_weights(model_dir, edit)
    message = load_error(ModelConfig(name=str(model_dir)))
    assert message == (
        f"model.name: cannot load '{model_dir}': its weights do not match its code: "
        "1 weight(s) missing from the checkpoint (head.bias); "
        "1 unexpected tensor(s) in the checkpoint (stray.weight) "
        "(an incomplete download, or weights for other code?)"
    )


def test_legacy_model_without_safetensors(tmp_path):
    model_dir = build_legacy_model(tmp_path / "legacy_bin", "plain_config")
    (model_dir / "model.safetensors").unlink()
    message = load_error(ModelConfig(name=str(model_dir)))
    assert message.startswith(f"model.name: cannot load '{model_dir}': ")


def test_legacy_fallback_failing_too_reports_both(tmp_path):
    model_dir = build_legacy_model(tmp_path / "legacy_broken", "plain_config")
    modeling = model_dir / "modeling_legacyseg.py"
    # Breaks construction itself, which the fallback cannot work around either.
    modeling.write_text(
        modeling.read_text().replace(
            "self.config = PlainConfig()", "self.config = PlainConfig(); self.config.nope.x = 1"
        )
    )
    message = load_error(ModelConfig(name=str(model_dir)))
    assert message.startswith(f"model.name: cannot load '{model_dir}': AttributeError: ")
    assert "from_pretrained had failed with AttributeError" in message


# --------------------------------------------------------------------------- checkpoints that do not match (issue 11, finding 4)

LOADERS = ["from_pretrained", "legacy"]


def tiny_for(loader: str, dest: Path) -> Path:
    """The tiny model, loaded by rmbgd through ``loader``."""
    # A folder name of its own: transformers keeps a local model's code under its folder's name.
    dest = dest.with_name(f"{dest.name}-{loader}")
    if loader == "legacy":
        return build_legacy_model(dest, "no_post_init")
    return build_tiny_model(dest)


def expect_loader(model_dir: Path, loader: str) -> None:
    # The fixture must really go down the path under test before a fault is put in.
    assert load_segmenter(ModelConfig(name=str(model_dir))).loader == loader


@pytest.mark.parametrize("loader", LOADERS)
def test_regression_incomplete_checkpoint_fails_to_load(tmp_path, loader):
    model_dir = tiny_for(loader, tmp_path / "incomplete")
    expect_loader(model_dir, loader)
    edit_weights(model_dir, lambda state: state.pop("head.bias"))
    message = load_error(ModelConfig(name=str(model_dir)))
    assert message.startswith(f"model.name: cannot load '{model_dir}': its weights do not match its code: ")
    assert "1 weight(s) missing from the checkpoint (head.bias)" in message


@pytest.mark.parametrize("loader", LOADERS)
def test_regression_checkpoint_with_an_extra_tensor_fails_to_load(tmp_path, loader):
    model_dir = tiny_for(loader, tmp_path / "extra")
    expect_loader(model_dir, loader)
    edit_weights(model_dir, lambda state: state.update({"stray.weight": torch.zeros(2)}))
    message = load_error(ModelConfig(name=str(model_dir)))
    assert message.startswith(f"model.name: cannot load '{model_dir}': its weights do not match its code: ")
    assert "1 unexpected tensor(s) in the checkpoint (stray.weight)" in message
    assert "missing" not in message


@pytest.mark.parametrize("loader", LOADERS)
def test_checkpoint_with_a_tensor_of_the_wrong_shape_fails_to_load(tmp_path, loader):
    model_dir = tiny_for(loader, tmp_path / "shape")
    expect_loader(model_dir, loader)
    edit_weights(model_dir, lambda state: state.update({"head.bias": torch.zeros(2)}))
    message = load_error(ModelConfig(name=str(model_dir)))
    assert message.startswith(f"model.name: cannot load '{model_dir}': its weights do not match its code: ")
    assert "1 tensor(s) of the wrong shape (head.bias: [2] in the checkpoint, [1] in the code)" in message


def test_many_missing_weights_are_counted_and_a_few_named(tmp_path):
    model_dir = build_tiny_model(tmp_path / "many")

    def edit(state):
        for index in range(5):
            state[f"stray{index}.weight"] = torch.zeros(1)

    edit_weights(model_dir, edit)
    message = load_error(ModelConfig(name=str(model_dir)))
    assert "5 unexpected tensor(s) in the checkpoint (stray0.weight, stray1.weight, stray2.weight, ...)" in message


class WithBuffers(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = torch.nn.Conv2d(3, 1, 1)
        self.norm = torch.nn.BatchNorm2d(1)
        self.register_buffer("index_table", torch.arange(4))


def test_missing_keys_are_learned_unless_the_model_computes_them():
    from rmbgd.model.legacy import _classify_missing

    missing = ["conv.weight", "norm.running_mean", "norm.running_var", "norm.num_batches_tracked", "index_table"]
    learned, computed = _classify_missing(WithBuffers(), missing)
    # Running statistics are learned in training like weights; the batch counter is unused
    # in evaluation; an index table is what __init__ computes.
    assert learned == ["conv.weight", "norm.running_mean", "norm.running_var"]
    assert computed == ["index_table"]


def transformers_load_report(name: str) -> str:
    """What transformers 5 logs about missing weights: a coloured, multi-line table."""
    return (
        f"[transformers] \x1b[1mTinySegModel LOAD REPORT\x1b[0m from: {name}\n"
        "Key       | Status  | \n----------+---------+-\nhead.bias | MISSING | \n\nNotes:\n"
        "- MISSING:\tthose params were newly initialized because missing from the checkpoint."
    )


def test_regression_library_messages_are_one_clean_line_each():
    import warnings as python_warnings

    from rmbgd.model.messages import library_messages

    log = RecordingLog()
    with python_warnings.catch_warnings(), library_messages(log):
        python_warnings.simplefilter("always")  # whatever pytest's -W options say
        logging.getLogger("transformers.modeling_utils").warning("\x1b[1mSomething\x1b[0m odd\nsecond line\n")
        logging.getLogger("transformers.modeling_utils").warning(transformers_load_report("/m"))
        python_warnings.warn("Importing from timm.models.layers is deprecated, please import via timm.layers", FutureWarning)
        python_warnings.warn("Importing from timm.models.registry is deprecated, please import via timm.models", FutureWarning)
        python_warnings.warn("a \x1b[31mred\x1b[0m warning\nwith two lines", UserWarning)
    events = log.events + log.debug_events
    assert [event for event, _ in events] == ["model_warning"] * 5
    for _, fields in events:
        for value in [fields["message"], *fields.get("details", [])]:
            assert "\x1b" not in value and "\n" not in value and value == value.strip()
    shown = {fields["message"]: fields for _, fields in log.events}
    assert shown["Something odd"] == {
        "logger": "transformers.modeling_utils", "message": "Something odd", "details": ["second line"]
    }
    assert shown["a red warning"] == {"category": "UserWarning", "message": "a red warning", "details": ["with two lines"]}
    # Known harmless (timm's old import paths still work), or said by rmbgd itself (the table).
    quiet = [fields["message"] for _, fields in log.debug_events]
    assert quiet == [
        "Importing from timm.models.layers is deprecated, please import via timm.layers",
        "Importing from timm.models.registry is deprecated, please import via timm.models",
        "[transformers] TinySegModel LOAD REPORT from: /m",
    ]


def test_library_messages_leave_the_transformers_logger_as_it_was():
    from rmbgd.model.messages import library_messages

    library_logger = logging.getLogger("transformers")
    before = (library_logger.propagate, list(library_logger.handlers))
    with pytest.raises(ValueError):
        with library_messages(RecordingLog()):
            raise ValueError("loading failed")
    assert (library_logger.propagate, list(library_logger.handlers)) == before


def test_loading_an_incomplete_checkpoint_logs_no_table(tmp_path, caplog):
    model_dir = build_tiny_model(tmp_path / "report")
    edit_weights(model_dir, lambda state: state.pop("head.bias"))
    log = RecordingLog()
    with caplog.at_level(logging.INFO), pytest.raises(ModelLoadError):
        load_segmenter(ModelConfig(name=str(model_dir)), log=log)
    assert [r.getMessage() for r in caplog.records if r.name.startswith("transformers")] == []
    assert [fields["message"] for event, fields in log.events if event == "model_warning"] == []


def birefnet_for(loader: str, source: Path, dest: Path) -> Path:
    # A folder name of its own: transformers keeps a local model's code under its folder's name.
    dest = dest.with_name(f"{dest.name}-{loader}")
    return build_birefnet_lite(dest, post_init=loader == "from_pretrained", weights_from=source)


@pytest.mark.parametrize("loader", LOADERS)
def test_regression_real_birefnet_lite_missing_a_weight_fails_to_load(tmp_path, birefnet_lite, loader):
    model_dir = birefnet_for(loader, birefnet_lite, tmp_path / "BiRefNet_lite")
    edit_weights(model_dir, lambda state: state.pop("decoder.conv_out1.0.weight"))
    log = RecordingLog()
    with pytest.raises(ModelLoadError) as info:
        load_segmenter(ModelConfig(name=str(model_dir)), log=log)
    message = str(info.value)
    assert "\n" not in message
    assert "1 weight(s) missing from the checkpoint (decoder.conv_out1.0.weight)" in message
    fallback = [fields["reason"] for event, fields in log.events if event == "model_legacy_fallback"]
    assert bool(fallback) == (loader == "legacy")
    for _, fields in log.events + log.debug_events:
        assert all("\x1b" not in str(value) and "\n" not in str(value) for value in fields.values())


def test_regression_real_birefnet_lite_missing_a_computed_buffer_loads_it_correctly(tmp_path, birefnet_lite):
    # from_pretrained builds the model on the meta device: a missing index table would be
    # left as uninitialised memory. The legacy loader computes it for real.
    from safetensors.torch import load_file

    key = "bb.layers.0.blocks.0.attn.relative_position_index"
    true_index = load_file(birefnet_lite / "model.safetensors")[key]
    model_dir = birefnet_for("from_pretrained", birefnet_lite, tmp_path / "BiRefNet_lite")
    edit_weights(model_dir, lambda state: state.pop(key))
    log = RecordingLog()
    loaded = load_segmenter(ModelConfig(name=str(model_dir)), log=log)
    assert loaded.loader == "legacy"
    assert key in dict(log.events)["model_legacy_fallback"]["reason"]
    assert torch.equal(dict(loaded._model.named_buffers())[key], true_index)


# --------------------------------------------------------------------------- precision


@pytest.mark.parametrize(
    ("spec", "device", "expected"),
    [
        ("auto", "cpu", "float32"),
        ("auto", "cuda", "float16"),
        ("auto", "cuda:1", "float16"),
        ("float16", "cuda", "float16"),
        ("bfloat16", "cpu", "bfloat16"),
        ("bfloat16", "cuda", "bfloat16"),
        (" Float32 ", "cuda", "float32"),
    ],
)
def test_resolve_dtype(spec, device, expected):
    assert resolve_dtype(spec, device) == expected


def test_resolve_dtype_rejects_unknown():
    with pytest.raises(ModelLoadError, match=r"^model\.dtype: expected auto, float16, bfloat16 or float32"):
        resolve_dtype("fp8", "cpu")


def test_fp16_checkpoint_fixture_is_fp16_under_transformers_defaults(tmp_path):
    # What the issue is about: transformers 5 alone keeps an fp16 checkpoint in fp16.
    from transformers import AutoModelForImageSegmentation

    model_dir = build_tiny_model(tmp_path / "tiny16", stored_dtype="float16")
    model = AutoModelForImageSegmentation.from_pretrained(
        str(model_dir), trust_remote_code=True, local_files_only=True
    )
    assert {p.dtype for p in model.parameters()} == {torch.float16}


def test_fp16_checkpoint_loads_and_runs_in_float32_on_cpu(tmp_path):
    model_dir = build_tiny_model(tmp_path / "tiny16", stored_dtype="float16")
    loaded = load_segmenter(ModelConfig(name=str(model_dir), dtype="auto"))
    assert loaded.dtype == "float32"
    assert {p.dtype for p in loaded._model.parameters()} == {torch.float32}
    loaded.warmup()
    width, height, regions = CASES[5]
    image = paint(width, height, regions)
    (mask,) = loaded.predict([resize_like_daemon(image)], [(width, height)])
    keep = interior(width, height, regions, margin=12)
    assert np.abs(mask[keep].astype(int) - expected_alpha(image)[keep].astype(int)).max() <= 2


@pytest.mark.parametrize("bfloat16_kernels", [False, True])
def test_regression_float16_on_the_cpu_is_refused(tiny_dir, monkeypatch, bfloat16_kernels):
    # About 100x slower than float32 there (a 512x512 BiRefNet_lite warm-up: 349 s, not 4 s).
    monkeypatch.setattr(torch.ops.mkldnn, "_is_mkldnn_bf16_supported", lambda: bfloat16_kernels)
    message = load_error(ModelConfig(name=str(tiny_dir), dtype="float16"))
    assert message.startswith("model.dtype: float16 on the CPU runs about 100 times slower than float32")
    what_works = "set model.dtype: float32 (or auto)"
    if bfloat16_kernels:
        what_works += ", or bfloat16, which this CPU supports"
    assert message.endswith(what_works)


def test_float16_is_refused_where_auto_finds_no_gpu(tiny_dir, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    message = load_error(ModelConfig(name=str(tiny_dir), device="auto", dtype="float16"))
    assert message.startswith("model.dtype: float16 on the CPU")


def test_bfloat16_with_a_deformable_convolution_falls_back_to_autocast(tmp_path):
    # torchvision's deform_conv2d has no bfloat16 kernel (on CPU as on CUDA), BiRefNet's case.
    model_dir = build_tiny_model(tmp_path / "deformable", deformable=True)
    log = RecordingLog()
    loaded = load_segmenter(ModelConfig(name=str(model_dir), dtype="bfloat16"), log=log)
    loaded.warmup()
    assert (loaded.dtype, loaded.precision) == ("bfloat16", "autocast")
    fallback = dict(log.events)["model_precision_fallback"]
    assert fallback["dtype"] == "bfloat16"
    assert "BFloat16" in fallback["error"]
    assert fallback["fallback"] == "float32 weights under bfloat16 autocast"
    width, height, regions = CASES[0]
    image = paint(width, height, regions)
    (mask,) = loaded.predict([resize_like_daemon(image)], [(width, height)])
    keep = interior(width, height, regions, margin=4)
    assert np.abs(mask[keep].astype(int) - expected_alpha(image)[keep].astype(int)).max() <= 2


class DtypeSensitiveModel(torch.nn.Module):
    """Fails for some input dtypes (weights or autocast), like a kernel missing for a dtype."""

    def __init__(self, fail_weights=(), fail_autocast=()):
        super().__init__()
        self.head = torch.nn.Conv2d(3, 1, 1)
        self.fail_weights = fail_weights
        self.fail_autocast = fail_autocast

    def forward(self, pixels):
        autocast = torch.is_autocast_enabled(pixels.device.type)
        if autocast and torch.get_autocast_dtype(pixels.device.type) in self.fail_autocast:
            raise RuntimeError('"kernel_autocast" not implemented for this dtype')
        if not autocast and pixels.dtype in self.fail_weights:
            raise RuntimeError(f'"kernel" not implemented for {pixels.dtype}')
        out = self.head(pixels)
        return [out, out]


def make_segmenter(model, dtype="float32", log=None, **options) -> Segmenter:
    options.setdefault("input_size", 8)
    return Segmenter(model, name="fake", device="cpu", dtype=dtype, log=log, **options)


def test_bfloat16_failing_under_autocast_too_is_one_clear_line():
    model = DtypeSensitiveModel(fail_weights=(torch.bfloat16,), fail_autocast=(torch.bfloat16,))
    broken = make_segmenter(model.to(torch.bfloat16), dtype="bfloat16", log=RecordingLog())
    with pytest.raises(ModelLoadError) as info:
        broken.warmup()
    message = str(info.value)
    assert message.startswith("model.dtype: bfloat16 does not work with 'fake' on cpu: RuntimeError: ")
    assert message.endswith("; it runs in float32: set model.dtype: float32 (or auto)")
    assert "\n" not in message


def test_regression_bfloat16_failing_alike_with_and_without_autocast_blames_model_dtype():
    # BiRefNet on a CPU: its deformable convolution fails the same way in bfloat16 weights and
    # under bfloat16 autocast, and runs in float32.
    class NoBfloat16(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.head = torch.nn.Conv2d(3, 1, 1)

        def forward(self, pixels):
            out = self.head(pixels)
            if out.dtype == torch.bfloat16:
                raise RuntimeError('"deformable_im2col" not implemented for \'BFloat16\'')
            return [out, out]

    broken = make_segmenter(NoBfloat16().to(torch.bfloat16), dtype="bfloat16", log=RecordingLog())
    with pytest.raises(ModelLoadError) as info:
        broken.warmup()
    assert str(info.value) == (
        "model.dtype: bfloat16 does not work with 'fake' on cpu: RuntimeError: \"deformable_im2col\" "
        "not implemented for 'BFloat16' (with its weights in bfloat16 and under bfloat16 autocast alike); "
        "it runs in float32: set model.dtype: float32 (or auto)"
    )


def test_a_model_failing_in_float32_too_is_blamed_on_model_name():
    class Broken(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.head = torch.nn.Conv2d(3, 1, 1)

        def forward(self, pixels):
            raise RuntimeError("shape mismatch in decoder")

    with pytest.raises(ModelLoadError) as info:
        make_segmenter(Broken().to(torch.bfloat16), dtype="bfloat16").warmup()
    assert str(info.value) == (
        "model.name: 'fake' fails on a test image on cpu in bfloat16 and in float32: "
        "RuntimeError: shape mismatch in decoder"
    )


def test_regression_real_birefnet_lite_in_bfloat16_on_the_cpu_blames_model_dtype(birefnet_lite):
    loaded = load_segmenter(ModelConfig(name=str(birefnet_lite), dtype="bfloat16", input_size=32))
    with pytest.raises(ModelLoadError) as info:
        loaded.warmup()
    message = str(info.value)
    assert message.startswith(f"model.dtype: bfloat16 does not work with '{birefnet_lite}' on cpu: ")
    assert message.endswith("it runs in float32: set model.dtype: float32 (or auto)")


def test_warmup_failure_unrelated_to_precision():
    def broken(pixels):
        raise RuntimeError("shape mismatch in decoder")

    with pytest.raises(ModelLoadError) as info:
        make_segmenter(broken).warmup()
    assert str(info.value) == (
        "model.name: 'fake' fails on a test image on cpu (float32): RuntimeError: shape mismatch in decoder"
    )


def test_warmup_out_of_memory_is_a_load_error():
    def hungry(pixels):
        raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")

    with pytest.raises(ModelLoadError, match=r"^model\.device: out of GPU memory on cpu running one 8x8 image"):
        make_segmenter(hungry).warmup()


@pytest.mark.parametrize(
    ("exc", "expected"),
    [
        (torch.cuda.OutOfMemoryError("CUDA out of memory."), True),
        (RuntimeError("CUDA error: out of memory"), True),
        (RuntimeError("CUDA error: device-side assert triggered"), False),
        (MemoryError(), False),
        (ValueError("out of memory"), False),
    ],
)
def test_is_out_of_memory(exc, expected):
    assert is_out_of_memory(exc) is expected


# --------------------------------------------------------------------------- torch.compile


class CountingModel:
    def __init__(self):
        self.calls: list[int] = []

    def __call__(self, pixels):
        self.calls.append(pixels.shape[0])
        out = torch.zeros((pixels.shape[0], 1, pixels.shape[2], pixels.shape[3]))
        return [out, out]


def test_compile_is_used_and_warmed_up_with_two_batch_sizes(tiny_dir, monkeypatch):
    compiled = CountingModel()
    wrapped = []

    def fake_compile(model, **kwargs):
        wrapped.append(model)
        return compiled

    monkeypatch.setattr(torch, "compile", fake_compile)
    log = RecordingLog()
    loaded = load_segmenter(ModelConfig(name=str(tiny_dir), compile=True), log=log)
    assert len(wrapped) == 1 and dict(log.events)["model_loaded"]["compiled"] is True
    loaded.warmup()
    # Compiled with both batch sizes, then one call of one image and one of two, timed.
    assert compiled.calls == [1, 2, 1, 2]
    loaded.predict([red_square()] * 3, [(2, 2)] * 3)
    assert compiled.calls == [1, 2, 1, 2, 3]


def test_compile_failing_at_once_falls_back_to_eager(tiny_dir, monkeypatch):
    def no_compiler(model, **kwargs):
        raise RuntimeError("Dynamo is not supported on this Python")

    monkeypatch.setattr(torch, "compile", no_compiler)
    log = RecordingLog()
    loaded = load_segmenter(ModelConfig(name=str(tiny_dir), compile=True), log=log)
    assert dict(log.events)["model_compile_failed"] == {
        "error": "RuntimeError: Dynamo is not supported on this Python",
        "fallback": "eager",
    }
    loaded.warmup()
    assert (loaded.predict([red_square()], [(2, 2)])[0] == 255).all()


def test_compile_failing_in_warmup_falls_back_to_eager(tiny_dir, monkeypatch):
    def failing_compiled(pixels):
        raise RuntimeError("InductorError: CppCompileError: C++ compile error")

    monkeypatch.setattr(torch, "compile", lambda model, **kwargs: failing_compiled)
    log = RecordingLog()
    loaded = load_segmenter(ModelConfig(name=str(tiny_dir), compile=True), log=log)
    loaded.warmup()
    assert "model_compile_failed" in log.names()
    assert (loaded.predict([red_square()], [(2, 2)])[0] == 255).all()


# --------------------------------------------------------------------------- input sizes, GPU-only paths


def test_dynamic_input_size_runs_each_batch_at_its_own_size():
    fake = FakeModel(final_logit=30.0)
    dynamic = make_segmenter(fake, input_size="dynamic", max_input_size=128)
    assert dynamic.model_size(200, 100) == (128, 64)
    images = [np.zeros((64, 96, 3), dtype=np.uint8)] * 2
    masks = dynamic.predict(images, [(300, 200), (30, 20)], model_size=(96, 64))
    assert [mask.shape for mask in masks] == [(200, 300), (20, 30)]
    assert fake.inputs[0].shape == (2, 3, 64, 96)
    assert all((mask == 255).all() for mask in masks)
    with pytest.raises(ValueError, match="multiples of 32"):
        dynamic.predict([np.zeros((50, 96, 3), dtype=np.uint8)], [(5, 5)])
    with pytest.raises(ValueError, match=r"expected a \(64, 96, 3\) uint8 array"):
        dynamic.predict([np.zeros((64, 64, 3), dtype=np.uint8)], [(5, 5)], model_size=(96, 64))


def test_dynamic_warmup_size_is_capped():
    fake = FakeModel()
    make_segmenter(fake, input_size="dynamic", max_input_size=256).warmup()
    assert fake.inputs[0].shape == (1, 3, 256, 256)


def test_dynamic_input_size_with_the_real_model(tiny_dir):
    loaded = load_segmenter(ModelConfig(name=str(tiny_dir), input_size="dynamic", max_input_size=256))
    width, height, regions = CASES[5]
    image = paint(width, height, regions)
    size = loaded.model_size(width, height)
    assert size == (256, 160)
    resized = np.asarray(Image.fromarray(image).resize(size, Image.Resampling.BILINEAR))
    (mask,) = loaded.predict([resized], [(width, height)], model_size=size)
    keep = interior(width, height, regions, margin=4)
    assert np.abs(mask[keep].astype(int) - expected_alpha(image)[keep].astype(int)).max() <= 2


def test_resize_on_device_matches_the_decoders_resize():
    # The CUDA path (resizing on the device) exercised on the CPU: images arrive at their
    # own size and come out like those the decode pool resizes with Pillow.
    model = DtypeSensitiveModel()
    with torch.no_grad():
        model.head.weight.zero_()
        model.head.weight[0, 0, 0, 0] = 24.0 * IMAGENET_STD[0]
        model.head.bias.fill_(24.0 * IMAGENET_MEAN[0] - 12.0)
    on_device = make_segmenter(model, input_size=SIDE, resize_on_device=True)
    on_host = make_segmenter(model, input_size=SIDE)
    images = [paint(w, h, regions) for w, h, regions in CASES]
    sizes = [(w, h) for w, h, _ in CASES]
    device_masks = on_device.predict(images, sizes)
    host_masks = on_host.predict([resize_like_daemon(image) for image in images], sizes)
    for (width, height, regions), device_mask, host_mask in zip(CASES, device_masks, host_masks):
        keep = interior(width, height, regions, margin=max(4, math.ceil(2 * max(width, height) / SIDE) + 2))
        assert np.abs(device_mask[keep].astype(int) - host_mask[keep].astype(int)).max() <= 2


def test_on_the_cpu_images_must_arrive_resized():
    assert make_segmenter(FakeModel()).resizes_on_device is False
    with pytest.raises(ValueError):
        make_segmenter(FakeModel()).predict([np.zeros((9, 8, 3), dtype=np.uint8)], [(9, 8)])


def test_cudnn_benchmark_only_on_cuda_with_a_fixed_size(monkeypatch):
    monkeypatch.setattr(torch.backends.cudnn, "benchmark", False)
    configure_backends("cpu", 1024)
    assert torch.backends.cudnn.benchmark is False
    configure_backends("cuda", "dynamic")
    assert torch.backends.cudnn.benchmark is False
    configure_backends("cuda:0", 1024)
    assert torch.backends.cudnn.benchmark is True


# --------------------------------------------------------------------------- CPU threads


@pytest.mark.parametrize(("cores", "threads"), [(1, 1), (2, 2), (3, 3), (4, 3), (8, 6), (16, 12), (64, 48)])
def test_cpu_threads_leave_a_quarter_of_the_cores(cores, threads):
    assert cpu_threads(cores) == threads


def test_cpu_threads_respect_omp_num_threads(tiny_dir, monkeypatch):
    calls = []
    monkeypatch.setattr(torch, "set_num_threads", calls.append)
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    load_segmenter(ModelConfig(name=str(tiny_dir)))
    assert calls == []
    monkeypatch.delenv("OMP_NUM_THREADS")
    from rmbgd.config import cpus

    monkeypatch.setattr(cpus, "available_cpus", lambda: 4)
    load_segmenter(ModelConfig(name=str(tiny_dir)))
    assert calls == [cpu_threads(4)]



# --------------------------------------------------------------------------- model.revision


def inverted_copy(source: Path, dest: Path) -> Path:
    """The tiny model with its logit negated: red comes out transparent instead of opaque."""
    from safetensors.torch import load_file, save_file

    shutil.copytree(source, dest)
    weights = dest / "model.safetensors"
    state = {key: -value for key, value in load_file(weights).items()}
    save_file(state, weights, metadata={"format": "pt"})
    return dest


def cache_repo(cache: Path, repo: str, snapshots: dict, refs: dict) -> None:
    """The layout huggingface_hub leaves after downloading ``repo`` at several revisions."""
    folder = cache / ("models--" + repo.replace("/", "--"))
    (folder / "refs").mkdir(parents=True)
    for commit, source in snapshots.items():
        shutil.copytree(source, folder / "snapshots" / commit)
    for ref, commit in refs.items():
        (folder / "refs" / ref).write_text(commit)


@pytest.mark.parametrize("legacy", [False, True], ids=["from_pretrained", "legacy"])
def test_revision_selects_the_cached_snapshot(tmp_path, monkeypatch, empty_hub_cache, legacy):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    if legacy:
        pinned = build_legacy_model(tmp_path / "pinned", "birefnet_style")
    else:
        pinned = build_tiny_model(tmp_path / "pinned")
    latest = inverted_copy(pinned, tmp_path / "latest")
    # Names of their own: transformers keeps the classes of a repository's code (keyed by
    # repository and commit) for the life of the process.
    repo = "rmbgd-tests/legacy" if legacy else "rmbgd-tests/tiny"
    old, new = ("3" if legacy else "1") * 40, ("4" if legacy else "2") * 40
    cache_repo(empty_hub_cache, repo, {old: pinned, new: latest}, {"main": new, "v1": old})

    at_v1 = load_segmenter(ModelConfig(name=repo, revision="v1"))
    at_main = load_segmenter(ModelConfig(name=repo))
    at_commit = load_segmenter(ModelConfig(name=repo, revision=old))
    assert at_v1.loader == ("legacy" if legacy else "from_pretrained")
    assert (at_v1.predict([red_square()], [(2, 2)])[0] == 255).all()
    assert (at_commit.predict([red_square()], [(2, 2)])[0] == 255).all()
    assert (at_main.predict([red_square()], [(2, 2)])[0] == 0).all()


# --------------------------------------------------------------------------- input resize


@pytest.mark.parametrize("size", [(1024, 1024), (640, 480), (2048, 1536), (33, 65)])
def test_resize_input_matches_the_decoders_filter(segmenter, size):
    # The pipeline resizes with the segmenter's torch kernels (faster than Pillow's on a busy
    # CPU); the model must see what the decoder's Pillow resize gives, to within one level.
    from rmbgd.imaging.sizing import resize_rgb

    rng = np.random.default_rng(7)
    coarse = rng.integers(0, 256, (12, 9, 3), dtype=np.uint8)
    rgb = np.asarray(Image.fromarray(coarse).resize((1086, 1448), Image.Resampling.BICUBIC))
    rgb = np.clip(rgb.astype(np.int16) + rng.integers(-20, 21, rgb.shape), 0, 255).astype(np.uint8)
    ours = segmenter.resize_input(rgb, size)
    pillow = resize_rgb(rgb, size)
    assert ours.shape == pillow.shape == (size[1], size[0], 3) and ours.dtype == np.uint8
    assert ours.flags.c_contiguous
    assert np.abs(ours.astype(np.int16) - pillow).max() <= 1


def test_resize_input_of_the_right_size_is_the_image_itself(segmenter):
    rgb = np.zeros((20, 30, 3), dtype=np.uint8)
    assert segmenter.resize_input(rgb, (30, 20)) is rgb
