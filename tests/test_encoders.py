"""Tests for the output encoders: WebP and JPEG (rmbgd.render.encoders), RGB and grey PNG
(rmbgd.render.png), and the ICC profile and EXIF they carry. Every check decodes real bytes."""

from __future__ import annotations

import functools
import io
import struct
import zlib

import numpy as np
import pytest
from PIL import ExifTags, Image, ImageCms, JpegImagePlugin

from rmbgd.render.encoders import encode_jpeg, encode_webp
from rmbgd.imaging.decode import decode_image
from rmbgd.render.png import encode_grey_png, encode_png
from tests.support.photos import random_rgba

H, W = 30, 40


def smooth_rgb(h: int = 64, w: int = 96) -> np.ndarray:
    """JPEG-friendly content: gradients and flat blocks."""
    y, x = np.mgrid[0:h, 0:w]
    rgb = np.dstack((x * 255 // (w - 1), y * 255 // (h - 1), np.full((h, w), 90))).astype(np.uint8)
    rgb[10:30, 10:40] = (220, 30, 30)
    return rgb


def opened(data: bytes, fmt: str) -> Image.Image:
    im = Image.open(io.BytesIO(data))
    assert im.format == fmt
    im.load()
    return im


def png_chunks(data: bytes) -> list[tuple[bytes, bytes]]:
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    chunks, pos = [], 8
    while pos < len(data):
        (length,) = struct.unpack(">I", data[pos : pos + 4])
        tag, body = data[pos + 4 : pos + 8], data[pos + 8 : pos + 8 + length]
        (crc,) = struct.unpack(">I", data[pos + 8 + length : pos + 12 + length])
        assert crc == zlib.crc32(tag + body), tag
        chunks.append((tag, body))
        pos += 12 + length
    assert chunks[0][0] == b"IHDR" and chunks[-1] == (b"IEND", b"")
    return chunks


@functools.lru_cache(maxsize=1)
def srgb_profile() -> bytes:
    # Made once: LittleCMS stamps each new profile with the current time, so two made a
    # second apart differ in their header and a comparison of them would flake.
    return ImageCms.ImageCmsProfile(ImageCms.createProfile("sRGB")).tobytes()


# --------------------------------------------------------------------------- WebP


def test_webp_is_lossless_where_visible():
    rgb, alpha = random_rgba()
    im = opened(encode_webp(rgb, alpha), "WEBP")
    assert im.mode == "RGBA"
    pixels = np.asarray(im)
    np.testing.assert_array_equal(pixels[..., 3], alpha)
    visible = alpha > 0
    np.testing.assert_array_equal(pixels[visible, :3], rgb[visible])


def test_webp_keeps_hidden_colour_only_when_asked():
    rgb, alpha = random_rgba()
    kept = np.asarray(opened(encode_webp(rgb, alpha, clean_transparent=False), "WEBP"))
    np.testing.assert_array_equal(kept, np.dstack((rgb, alpha)))
    # Noise under the transparent pixels costs bytes only when it must be kept.
    assert len(encode_webp(rgb, alpha)) < len(encode_webp(rgb, alpha, clean_transparent=False))


def test_webp_without_alpha():
    rgb, _ = random_rgba()
    im = opened(encode_webp(rgb, None), "WEBP")
    assert im.mode == "RGB"
    np.testing.assert_array_equal(np.asarray(im), rgb)


@pytest.mark.parametrize(("h", "w"), [(1, 1), (1, 17), (23, 1)])
def test_webp_tiny_images(h, w):
    rgb, alpha = random_rgba(h, w)
    alpha[:] = 200
    np.testing.assert_array_equal(np.asarray(opened(encode_webp(rgb, alpha), "WEBP")), np.dstack((rgb, alpha)))


def test_webp_accepts_views_and_leaves_inputs_alone():
    rgb, alpha = random_rgba(60, 80)
    rgb.flags.writeable = False
    alpha.flags.writeable = False
    view_rgb, view_alpha = rgb[::2, 1::2], alpha[::2, 1::2]
    pixels = np.asarray(opened(encode_webp(view_rgb, view_alpha, clean_transparent=False), "WEBP"))
    np.testing.assert_array_equal(pixels, np.dstack((view_rgb, view_alpha)))


def test_webp_rejects_what_it_cannot_hold():
    with pytest.raises(ValueError, match="16383"):
        encode_webp(np.zeros((1, 16384, 3), np.uint8), None)
    with pytest.raises(ValueError):
        encode_webp(np.zeros((4, 4, 3), np.uint8), np.zeros((4, 5), np.uint8))
    with pytest.raises(ValueError):
        encode_webp(np.zeros((0, 4, 3), np.uint8), None)


# --------------------------------------------------------------------------- JPEG


def test_jpeg_round_trip_is_close_and_rgb():
    rgb = smooth_rgb()
    im = opened(encode_jpeg(rgb), "JPEG")
    assert im.mode == "RGB" and im.size == (96, 64)
    assert np.abs(np.asarray(im).astype(int) - rgb).mean() < 2


def test_jpeg_quality_changes_size_and_error():
    rgb = random_rgba(64, 64)[0]
    low, high = encode_jpeg(rgb, quality=30), encode_jpeg(rgb, quality=95)
    assert len(low) < len(high)
    error = {q: np.abs(np.asarray(opened(d, "JPEG")).astype(int) - rgb).mean() for q, d in ((30, low), (95, high))}
    assert error[95] < error[30]


@pytest.mark.parametrize(("quality", "sampling"), [(100, 0), (90, 0), (89, 2), (50, 2)])
def test_jpeg_chroma_subsampling_follows_quality(quality, sampling):
    im = opened(encode_jpeg(smooth_rgb(), quality=quality), "JPEG")
    assert JpegImagePlugin.get_sampling(im) == sampling


@pytest.mark.parametrize("quality", [0, 101, 90.0, True, "90"])
def test_jpeg_rejects_bad_quality(quality):
    with pytest.raises(ValueError):
        encode_jpeg(smooth_rgb(), quality=quality)


def test_jpeg_rejects_alpha_shaped_input():
    with pytest.raises(ValueError):
        encode_jpeg(np.zeros((4, 4, 4), np.uint8))
    with pytest.raises(ValueError):
        encode_jpeg(np.zeros((1, 65536, 3), np.uint8))


# --------------------------------------------------------------------------- PNG: RGB and grey


def test_rgb_png_without_alpha():
    rgb, _ = random_rgba()
    data = encode_png(rgb, None)
    assert png_chunks(data)[0][1][9] == 2  # IHDR colour type: RGB
    im = opened(data, "PNG")
    assert im.mode == "RGB"
    np.testing.assert_array_equal(np.asarray(im), rgb)


@pytest.mark.parametrize(("h", "w"), [(1, 1), (1, 9), (9, 1), (64, 3)])
@pytest.mark.parametrize("level", [0, 1, 9])
def test_rgb_png_shapes_and_levels(h, w, level):
    rgb, _ = random_rgba(h, w)
    view = np.ascontiguousarray(rgb)[:, ::-1]  # a negative-stride view
    data = encode_png(view, None, compress_level=level)
    idat = b"".join(body for tag, body in png_chunks(data) if tag == b"IDAT")
    assert len(zlib.decompress(idat)) == h * (1 + 3 * w)
    np.testing.assert_array_equal(np.asarray(opened(data, "PNG")), view)


def test_grey_png_round_trip():
    grey = np.random.default_rng(3).integers(0, 256, (H, W), dtype=np.uint8)
    data = encode_grey_png(grey)
    assert png_chunks(data)[0][1][8:10] == bytes([8, 0])  # 8-bit greyscale
    im = opened(data, "PNG")
    assert im.mode == "L"
    np.testing.assert_array_equal(np.asarray(im), grey)


@pytest.mark.parametrize(("h", "w"), [(1, 1), (1, 17), (23, 1)])
def test_grey_png_tiny_and_views(h, w):
    grey = np.random.default_rng(4).integers(0, 256, (2 * h, 2 * w), dtype=np.uint8)[::2, ::2]
    np.testing.assert_array_equal(np.asarray(opened(encode_grey_png(grey, compress_level=9), "PNG")), grey)


@pytest.mark.parametrize(
    ("grey", "kwargs"),
    [
        (np.zeros((4, 4, 1), np.uint8), {}),
        (np.zeros((4, 4), np.uint16), {}),
        (np.zeros((0, 4), np.uint8), {}),
        (np.zeros((4, 4), np.uint8), {"compress_level": 10}),
    ],
)
def test_grey_png_rejects_bad_input(grey, kwargs):
    with pytest.raises(ValueError):
        encode_grey_png(grey, **kwargs)


# --------------------------------------------------------------------------- ICC and EXIF


def encoded(fmt: str, rgb: np.ndarray, alpha: np.ndarray | None, **metadata) -> bytes:
    if fmt == "PNG":
        return encode_png(rgb, alpha, **metadata)
    if fmt == "WEBP":
        return encode_webp(rgb, alpha, **metadata)
    return encode_jpeg(rgb, **metadata)


FORMATS = [("PNG", True), ("PNG", False), ("WEBP", True), ("WEBP", False), ("JPEG", False)]


@pytest.mark.parametrize(("fmt", "with_alpha"), FORMATS)
def test_icc_profile_is_embedded(fmt, with_alpha):
    profile = srgb_profile()
    rgb, alpha = random_rgba()
    im = opened(encoded(fmt, rgb, alpha if with_alpha else None, icc_profile=profile), fmt)
    assert im.info["icc_profile"] == profile
    plain = opened(encoded(fmt, rgb, alpha if with_alpha else None), fmt)
    assert not plain.info.get("icc_profile")


def photo_exif(orientation: int = 6) -> Image.Exif:
    exif = Image.Exif()
    exif[ExifTags.Base.Orientation] = orientation
    exif[ExifTags.Base.Make] = "Acme"
    exif[ExifTags.Base.Model] = "Snapper 3"
    exif[ExifTags.Base.DateTime] = "2024:05:06 07:08:09"
    exif.get_ifd(ExifTags.IFD.Exif)[ExifTags.Base.DateTimeOriginal] = "2024:05:06 07:08:00"
    exif.get_ifd(ExifTags.IFD.GPSInfo)[ExifTags.GPS.GPSLatitudeRef] = "S"
    return exif


@pytest.fixture
def decoded_exif(tmp_path) -> bytes:
    """The EXIF of a real, turned camera-style JPEG as rmbgd's decoder hands it on."""
    path = tmp_path / "camera.jpg"
    Image.fromarray(smooth_rgb()).save(path, exif=photo_exif(6), quality=95)
    decoded = decode_image(path, input_size=16, max_pixels=10**7)
    assert decoded.rgb.shape == (96, 64, 3) and decoded.exif is not None
    return decoded.exif


@pytest.mark.parametrize(("fmt", "with_alpha"), FORMATS)
def test_exif_is_embedded_with_orientation_1(fmt, with_alpha, decoded_exif):
    rgb = smooth_rgb(96, 64)
    alpha = np.full((96, 64), 255, np.uint8) if with_alpha else None
    im = opened(encoded(fmt, rgb, alpha, exif=decoded_exif), fmt)
    exif = im.getexif()
    assert exif[ExifTags.Base.Orientation] == 1
    assert exif[ExifTags.Base.Make] == "Acme" and exif[ExifTags.Base.Model] == "Snapper 3"
    assert exif[ExifTags.Base.DateTime] == "2024:05:06 07:08:09"
    assert exif.get_ifd(ExifTags.IFD.Exif)[ExifTags.Base.DateTimeOriginal] == "2024:05:06 07:08:00"
    assert exif.get_ifd(ExifTags.IFD.GPSInfo)[ExifTags.GPS.GPSLatitudeRef] == "S"
    assert im.size == (64, 96)  # a viewer honouring orientation 1 shows it as stored


@pytest.mark.parametrize(("fmt", "with_alpha"), FORMATS)
def test_exif_and_icc_together_survive_rmbgds_own_decoder(fmt, with_alpha, decoded_exif, tmp_path):
    rgb = smooth_rgb(96, 64)
    alpha = np.full((96, 64), 255, np.uint8) if with_alpha else None
    path = tmp_path / f"out.{fmt.lower()}"
    path.write_bytes(encoded(fmt, rgb, alpha, exif=decoded_exif, icc_profile=srgb_profile()))
    again = decode_image(path, input_size=16, max_pixels=10**7)
    assert again.rgb.shape == (96, 64, 3)  # orientation 1: nothing is turned twice
    assert again.icc_profile == srgb_profile()
    exif = Image.Exif()
    exif.load(again.exif)
    assert exif[ExifTags.Base.Make] == "Acme" and exif[ExifTags.Base.Orientation] == 1


def test_png_exif_chunk_sits_before_the_pixels(decoded_exif):
    rgb, alpha = random_rgba()
    tags = [tag for tag, _ in png_chunks(encode_png(rgb, alpha, exif=decoded_exif))]
    assert tags.count(b"eXIf") == 1 and tags.index(b"eXIf") < tags.index(b"IDAT")
    body = dict(png_chunks(encode_png(rgb, alpha, exif=decoded_exif)))[b"eXIf"]
    assert body == decoded_exif  # the bare TIFF structure, as the PNG spec wants


@pytest.mark.parametrize(("fmt", "with_alpha"), FORMATS)
def test_exif_with_jpeg_prefix_is_accepted(fmt, with_alpha, decoded_exif):
    rgb, alpha = random_rgba()
    data = encoded(fmt, rgb, alpha if with_alpha else None, exif=b"Exif\x00\x00" + decoded_exif)
    assert opened(data, fmt).getexif()[ExifTags.Base.Make] == "Acme"


@pytest.mark.parametrize(("fmt", "with_alpha"), FORMATS)
def test_bad_exif_is_refused(fmt, with_alpha):
    rgb, alpha = random_rgba()
    with pytest.raises(ValueError, match="TIFF"):
        encoded(fmt, rgb, alpha if with_alpha else None, exif=b"not exif at all")
    with pytest.raises(TypeError):
        encoded(fmt, rgb, alpha if with_alpha else None, exif="II*\x00")


def test_jpeg_leaves_out_exif_too_big_for_its_segment():
    exif = Image.Exif()
    exif[ExifTags.Base.Make] = "Acme"
    exif[ExifTags.Base.ImageDescription] = "x" * 70_000
    blob = exif.tobytes()[6:]
    data = encode_jpeg(smooth_rgb(), exif=blob)
    assert not opened(data, "JPEG").getexif()
    # PNG and WebP have no such limit.
    assert opened(encode_png(smooth_rgb(), None, exif=blob), "PNG").getexif()[ExifTags.Base.Make] == "Acme"
    assert opened(encode_webp(smooth_rgb(), None, exif=blob), "WEBP").getexif()[ExifTags.Base.Make] == "Acme"
