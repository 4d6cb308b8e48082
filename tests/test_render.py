"""render(): every output option checked on the bytes it writes, decoded back."""

from __future__ import annotations

import dataclasses
import io

import numpy as np
import pytest
from PIL import Image, ImageCms

from rmbgd.render.compose import SUBJECT_THRESHOLD
from rmbgd.config import MASK_ALSO, MASK_ONLY, OutputConfig, Padding
from rmbgd.imaging.decode import DecodedImage
from rmbgd.render.render import EMPTY_MASK, RenderError, render

W, H = 120, 80
# The subject: a rectangle with a soft 6-pixel ramp on the left, at known coordinates.
LEFT, TOP, RIGHT, BOTTOM = 30, 20, 90, 60


def scene() -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(7)
    rgb = rng.integers(0, 256, (H, W, 3), dtype=np.uint8)
    mask = np.zeros((H, W), np.uint8)
    mask[TOP:BOTTOM, LEFT:RIGHT] = 255
    mask[TOP:BOTTOM, LEFT : LEFT + 6] = np.linspace(40, 220, 6).astype(np.uint8)
    return rgb, mask


def decoded(rgb, *, alpha=None, icc=None, exif=None) -> DecodedImage:
    return DecodedImage(rgb=rgb, alpha=alpha, model_input=None, format="PNG", icc_profile=icc, exif=exif)


def open_bytes(data: bytes) -> Image.Image:
    im = Image.open(io.BytesIO(data))
    im.load()
    return im


def srgb_profile() -> bytes:
    return ImageCms.ImageCmsProfile(ImageCms.createProfile("sRGB")).tobytes()


def test_default_is_an_rgba_png_with_the_mask_as_alpha():
    rgb, mask = scene()
    (only,) = render(decoded(rgb), mask, OutputConfig())
    assert only.suffix == ".png"
    im = open_bytes(only.data)
    assert (im.format, im.mode, im.size) == ("PNG", "RGBA", (W, H))
    out = np.asarray(im)
    assert np.array_equal(out[..., 3], mask)
    visible = mask > 0
    assert np.array_equal(out[..., :3][visible], rgb[visible])


def test_background_composites_with_the_alpha():
    rgb, mask = scene()
    (only,) = render(decoded(rgb), mask, OutputConfig(background=(255, 255, 255)))
    im = open_bytes(only.data)
    assert im.mode == "RGB", "a flat background leaves nothing transparent"
    out = np.asarray(im).astype(np.int32)
    assert (out[mask == 0] == 255).all(), "the background is pure white"
    assert np.array_equal(out[mask == 255], rgb[mask == 255]), "the subject is untouched"
    a = mask.astype(np.float64)[..., None] / 255.0
    want = np.rint(rgb * a + 255.0 * (1.0 - a))
    edge = (mask > 0) & (mask < 255)
    assert edge.sum() > 100
    assert np.abs(out[edge] - want[edge]).max() <= 1, "the edge is blended by its alpha"


@pytest.mark.parametrize("fmt", ["jpeg", "webp", "png"])
def test_each_format_round_trips(fmt):
    rgb, mask = scene()
    rgb[:] = (200, 60, 30)  # flat, so JPEG's loss stays small
    out_cfg = OutputConfig(format=fmt, background=(0, 0, 255) if fmt == "jpeg" else None)
    (only,) = render(decoded(rgb), mask, out_cfg)
    im = open_bytes(only.data)
    assert only.suffix == {"jpeg": ".jpg", "webp": ".webp", "png": ".png"}[fmt]
    assert im.format == {"jpeg": "JPEG", "webp": "WEBP", "png": "PNG"}[fmt]
    pixels = np.asarray(im.convert("RGBA")).astype(np.int32)
    inside = np.zeros_like(mask, bool)
    inside[TOP + 4 : BOTTOM - 4, LEFT + 10 : RIGHT - 4] = True
    if fmt == "jpeg":
        assert im.mode == "RGB"
        assert np.abs(pixels[inside][:, :3] - (200, 60, 30)).mean() < 3
        outside = np.zeros_like(mask, bool)
        outside[:, :LEFT - 4] = True
        assert np.abs(pixels[outside][:, :3] - (0, 0, 255)).mean() < 3
    else:
        assert np.array_equal(pixels[..., 3], mask), "lossless alpha"
        assert (pixels[inside][:, :3] == (200, 60, 30)).all(), "lossless colour"


def test_crop_to_the_subject_box_with_pixel_padding():
    rgb, mask = scene()
    files = render(decoded(rgb), mask, OutputConfig(crop=True, crop_padding=Padding(pixels=5)))
    out = np.asarray(open_bytes(files[0].data))
    box = (LEFT - 5, TOP - 5, RIGHT + 5, BOTTOM + 5)
    assert out.shape == (box[3] - box[1], box[2] - box[0], 4)
    assert np.array_equal(out[..., 3], mask[box[1] : box[3], box[0] : box[2]])
    visible = out[..., 3] > 0
    assert np.array_equal(out[..., :3][visible], rgb[box[1] : box[3], box[0] : box[2]][visible])


def test_crop_padding_as_a_fraction_is_clipped_at_the_edges():
    rgb, mask = scene()
    # 50% of a 60x40 box: 30 px left/right, 20 px top/bottom; left and top reach the edge.
    files = render(decoded(rgb), mask, OutputConfig(crop=True, crop_padding=Padding(fraction=0.5)))
    out = np.asarray(open_bytes(files[0].data))
    assert out.shape[:2] == (min(H, BOTTOM + 20) - max(0, TOP - 20), min(W, RIGHT + 30) - max(0, LEFT - 30))


def test_crop_ignores_faint_noise_below_the_threshold():
    rgb, mask = scene()
    mask[0, 0] = SUBJECT_THRESHOLD - 1
    files = render(decoded(rgb), mask, OutputConfig(crop=True))
    assert open_bytes(files[0].data).size == (RIGHT - LEFT, BOTTOM - TOP)


def test_an_empty_mask_cannot_be_cropped():
    rgb, _ = scene()
    with pytest.raises(RenderError) as info:
        render(decoded(rgb), np.zeros((H, W), np.uint8), OutputConfig(crop=True))
    assert info.value.stage == "crop" and str(info.value) == EMPTY_MASK


def test_mask_file_next_to_the_result_is_its_alpha():
    rgb, mask = scene()
    files = render(decoded(rgb), mask, OutputConfig(mask=MASK_ALSO, crop=True, max_size=30))
    assert [f.suffix for f in files] == [".png", ".mask.png"]
    result = np.asarray(open_bytes(files[0].data))
    grey = open_bytes(files[1].data)
    assert grey.mode == "L"
    assert np.array_equal(np.asarray(grey), result[..., 3]), "mask = the written alpha, after crop and resize"


def test_mask_only_writes_just_the_mask():
    rgb, mask = scene()
    files = render(decoded(rgb), mask, OutputConfig(mask=MASK_ONLY, format="jpeg"))
    assert [f.suffix for f in files] == [".mask.png"]
    assert np.array_equal(np.asarray(open_bytes(files[0].data)), mask)


def test_max_size_scales_down_only():
    rgb, mask = scene()
    (small,) = render(decoded(rgb), mask, OutputConfig(max_size=60))
    assert open_bytes(small.data).size == (60, 40)
    (same,) = render(decoded(rgb), mask, OutputConfig(max_size=1000))
    assert open_bytes(same.data).size == (W, H), "never upscaled"


def test_the_input_alpha_still_limits_the_mask():
    rgb, mask = scene()
    own = np.full((H, W), 255, np.uint8)
    own[:, : W // 2] = 0
    (only,) = render(decoded(rgb, alpha=own), mask, OutputConfig())
    out = np.asarray(open_bytes(only.data))
    assert (out[:, : W // 2, 3] == 0).all() and np.array_equal(out[:, W // 2 :, 3], mask[:, W // 2 :])


@pytest.mark.parametrize("fmt", ["png", "webp", "jpeg"])
def test_icc_profile_kept_and_exif_only_when_asked(fmt):
    rgb, mask = scene()
    profile = srgb_profile()
    exif = Image.Exif()
    exif[0x010F] = "rmbgd-test-camera"  # Make
    exif[0x0112] = 1
    image = decoded(rgb, icc=profile, exif=exif.tobytes())
    background = (255, 255, 255) if fmt == "jpeg" else None
    base = OutputConfig(format=fmt, background=background)

    (plain,) = render(image, mask, base)
    im = open_bytes(plain.data)
    assert im.info.get("icc_profile") == profile
    assert im.getexif().get(0x010F) is None, "EXIF (GPS, serials) is dropped unless keep_exif"

    (kept,) = render(image, mask, dataclasses.replace(base, keep_exif=True))
    im = open_bytes(kept.data)
    assert im.info.get("icc_profile") == profile
    assert im.getexif().get(0x010F) == "rmbgd-test-camera"
    assert im.getexif().get(0x0112, 1) == 1


def test_refine_foreground_removes_the_old_background_from_the_edge():
    pytest.importorskip("torch")
    h, w = 96, 128
    yy, xx = np.mgrid[0:h, 0:w]
    foreground = np.stack([120 + xx, 80 + yy, 60 + xx // 2], axis=-1).clip(0, 255).astype(np.float64)
    green = np.array([20.0, 230.0, 30.0])
    # A disc whose edge fades over ~16 px: hair-like semi-transparent border.
    distance = np.hypot(xx - w / 2, yy - h / 2)
    alpha = np.clip((40.0 - distance) / 16.0, 0.0, 1.0)
    a = alpha[..., None]
    composite = np.rint(a * foreground + (1.0 - a) * green).astype(np.uint8)
    mask = np.rint(alpha * 255).astype(np.uint8)
    border = (mask > 25) & (mask < 230)
    assert border.sum() > 500

    out_cfg = OutputConfig(background=(255, 255, 255))
    (plain,) = render(decoded(composite), mask, out_cfg)
    from rmbgd.model.refine import estimate_foreground

    refined_cfg = dataclasses.replace(out_cfg, refine_foreground=True)
    (refined,) = render(decoded(composite), mask, refined_cfg, refine=estimate_foreground)
    ideal = np.rint(a * foreground + (1.0 - a) * 255.0)

    def error(data: bytes) -> float:
        return float(np.abs(np.asarray(open_bytes(data)).astype(np.float64) - ideal)[border].mean())

    # Without refinement the green of the old background shows as a fringe on white.
    assert error(plain.data) > 3 * error(refined.data), (error(plain.data), error(refined.data))


def test_regression_refine_out_of_gpu_memory_does_not_fail_the_image(monkeypatch):
    # The GPU is faked: refinement on "cuda:0" raises torch's out-of-memory error.
    torch = pytest.importorskip("torch")
    from rmbgd.model import refine

    real = refine._estimate

    def out_of_memory_on_gpu(rgb, alpha, device, settings):
        if device != "cpu":
            raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 512.00 MiB")
        return real(rgb, alpha, device, settings)

    monkeypatch.setattr(refine, "_estimate", out_of_memory_on_gpu)
    rgb, mask = scene()
    out_cfg = OutputConfig(refine_foreground=True)
    (on_gpu,) = render(decoded(rgb), mask, out_cfg, device="cuda:0", refine=refine.estimate_foreground)
    (on_cpu,) = render(decoded(rgb), mask, out_cfg, refine=refine.estimate_foreground)
    assert np.array_equal(np.asarray(open_bytes(on_gpu.data)), np.asarray(open_bytes(on_cpu.data)))


def test_render_hands_foreground_refinement_to_the_refine_it_is_given():
    # render never imports torch: refinement is the caller's callable, run on the caller's device.
    rgb, mask = scene()
    calls = []

    def refine(rgb, alpha, *, device):
        calls.append((rgb.shape, alpha.shape, device))
        return np.zeros_like(rgb)

    out_cfg = OutputConfig(refine_foreground=True)
    (only,) = render(decoded(rgb), mask, out_cfg, device="cuda:1", refine=refine)
    assert calls == [(rgb.shape, mask.shape, "cuda:1")]
    assert not np.asarray(open_bytes(only.data).convert("RGB")).any()
    with pytest.raises(TypeError, match="refine"):
        render(decoded(rgb), mask, out_cfg)
