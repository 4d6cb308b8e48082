"""Tests for rmbgd.imaging (decode, modes, exif, pixels) and rmbgd.render.png: decoding every supported mode/format, failures, PNG encoding."""

from __future__ import annotations

import dataclasses
import io
import os
import resource
import struct
import subprocess
import sys
import threading
import warnings
import zlib
from pathlib import Path

import numpy as np
import pytest
from PIL import ExifTags, Image, ImageCms, ImageOps

from rmbgd.imaging import modes
from rmbgd.imaging.decode import SUPPORTED_FORMATS, DecodedImage, ImageError, decode_image
from rmbgd.imaging.pixels import combine_alpha
from rmbgd.render import png
from rmbgd.render.png import encode_png

from tests.support.photos import random_rgba

W, H = 40, 30
SIZE = 16
BIG_LIMIT = 10_000_000
# Full-resolution chroma, so colour edges survive the tiny test images.
JPEG = {"quality": 95, "subsampling": 0}


# --------------------------------------------------------------------------- helpers


def pattern(h: int = H, w: int = W, seed: int = 0) -> np.ndarray:
    """Random RGB with a solid red block at the top-left, so any flip or turn shows."""
    rgb = np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8)
    rgb[:6, :6] = (255, 0, 0)
    return rgb


def smooth_pattern(h: int = H, w: int = W) -> np.ndarray:
    """JPEG-friendly content: flat quadrants, with the red block at the top-left."""
    rgb = np.zeros((h, w, 3), np.uint8)
    rgb[: h // 2, : w // 2] = (220, 30, 30)
    rgb[: h // 2, w // 2 :] = (30, 200, 30)
    rgb[h // 2 :, : w // 2] = (30, 30, 210)
    rgb[h // 2 :, w // 2 :] = (240, 240, 240)
    return rgb


def save(tmp_path: Path, name: str, image: Image.Image, **params) -> Path:
    path = tmp_path / name
    image.save(path, **params)
    return path


def decode(path, *, input_size: int = SIZE, max_pixels: int = BIG_LIMIT) -> DecodedImage:
    return decode_image(path, input_size=input_size, max_pixels=max_pixels)


def grey_to_rgb(grey: np.ndarray) -> np.ndarray:
    return np.repeat(grey[..., None], 3, axis=2)


def png_chunk(tag: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + tag + data + struct.pack(">I", zlib.crc32(tag + data))


def handmade_png(width: int, height: int, bit_depth: int, colour_type: int, idat: bytes) -> bytes:
    ihdr = struct.pack(">IIBBBBB", width, height, bit_depth, colour_type, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n"
        + png_chunk(b"IHDR", ihdr)
        + png_chunk(b"IDAT", idat)
        + png_chunk(b"IEND", b"")
    )


def png_chunks(data: bytes) -> list[tuple[bytes, bytes]]:
    """Walks a PNG, checking every CRC itself instead of trusting the decoder."""
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    chunks, pos = [], 8
    while pos < len(data):
        (length,) = struct.unpack(">I", data[pos : pos + 4])
        tag = data[pos + 4 : pos + 8]
        body = data[pos + 8 : pos + 8 + length]
        (crc,) = struct.unpack(">I", data[pos + 8 + length : pos + 12 + length])
        assert crc == zlib.crc32(tag + body), tag
        chunks.append((tag, body))
        pos += 12 + length
    assert chunks[0][0] == b"IHDR" and chunks[-1] == (b"IEND", b"")
    return chunks


def read_png(data: bytes) -> np.ndarray:
    with Image.open(io.BytesIO(data)) as im:
        assert im.format == "PNG" and im.mode == "RGBA"
        return np.array(im)


def expected_model_input(rgb: np.ndarray, size: int = SIZE) -> np.ndarray:
    return np.asarray(Image.fromarray(rgb).resize((size, size), Image.Resampling.BILINEAR))


def assert_readable(message: str) -> None:
    assert message and "\n" not in message
    assert "<_io." not in message and "Traceback" not in message


# --------------------------------------------------------------------------- 8-bit modes


@pytest.mark.parametrize(
    ("fmt", "suffix", "params"),
    [
        ("PNG", "png", {}),
        ("BMP", "bmp", {}),
        ("TIFF", "tiff", {}),
        ("TIFF", "tif", {"compression": "tiff_deflate"}),
        ("WEBP", "webp", {"lossless": True}),
    ],
)
def test_rgb_is_pixel_exact_in_lossless_formats(tmp_path, fmt, suffix, params):
    rgb = pattern()
    decoded = decode(save(tmp_path, f"x.{suffix}", Image.fromarray(rgb), **params))
    assert decoded.format == fmt
    assert decoded.alpha is None
    np.testing.assert_array_equal(decoded.rgb, rgb)
    assert (decoded.width, decoded.height) == (W, H)


def test_rgb_jpeg_is_close(tmp_path):
    rgb = smooth_pattern()
    decoded = decode(save(tmp_path, "x.jpg", Image.fromarray(rgb), **JPEG))
    assert decoded.format == "JPEG" and decoded.alpha is None
    assert np.abs(decoded.rgb.astype(int) - rgb).mean() < 3


@pytest.mark.parametrize(
    ("suffix", "params"), [("png", {}), ("tiff", {}), ("webp", {"lossless": True})]
)
def test_rgba_keeps_colour_and_alpha(tmp_path, suffix, params):
    rgb = pattern()
    alpha = np.random.default_rng(1).integers(1, 256, (H, W), dtype=np.uint8)
    alpha[5:9, 10:20] = 0
    if suffix == "webp":
        # Lossless WebP may rewrite the colour of fully transparent pixels.
        alpha[alpha == 0] = 1
    rgba = np.dstack((rgb, alpha))
    decoded = decode(save(tmp_path, f"x.{suffix}", Image.fromarray(rgba), **params))
    np.testing.assert_array_equal(decoded.rgb, rgb)
    np.testing.assert_array_equal(decoded.alpha, alpha)


def palette_image() -> tuple[Image.Image, np.ndarray, np.ndarray]:
    rng = np.random.default_rng(2)
    palette = rng.integers(0, 256, (16, 3), dtype=np.uint8)
    index = rng.integers(0, 16, (H, W), dtype=np.uint8)
    index[0, 0] = 3
    image = Image.frombytes("P", (W, H), index.tobytes())
    image.putpalette(palette.tobytes())
    return image, index, palette


@pytest.mark.parametrize("suffix", ["png", "gif", "bmp", "tiff"])
def test_palette_without_transparency(tmp_path, suffix):
    image, index, palette = palette_image()
    decoded = decode(save(tmp_path, f"p.{suffix}", image))
    np.testing.assert_array_equal(decoded.rgb, palette[index])
    assert decoded.alpha is None


@pytest.mark.parametrize("suffix", ["png", "gif"])
def test_palette_with_one_transparent_index(tmp_path, suffix):
    image, index, palette = palette_image()
    decoded = decode(save(tmp_path, f"p.{suffix}", image, transparency=3))
    np.testing.assert_array_equal(decoded.alpha, np.where(index == 3, 0, 255))
    opaque = index != 3
    np.testing.assert_array_equal(decoded.rgb[opaque], palette[index][opaque])


def test_palette_with_per_entry_alpha(tmp_path):
    image, index, palette = palette_image()
    table = bytes(range(0, 256, 16))  # one alpha value per palette entry
    decoded = decode(save(tmp_path, "p.png", image, transparency=table))
    np.testing.assert_array_equal(decoded.alpha, np.frombuffer(table, np.uint8)[index])
    np.testing.assert_array_equal(decoded.rgb, palette[index])


def test_palette_alpha_mode_pa():
    # No supported format stores "PA" directly, so exercise the conversion itself.
    image, index, palette = palette_image()
    alpha = np.random.default_rng(3).integers(0, 256, (H, W), dtype=np.uint8)
    pa = image.convert("PA")
    pa.putalpha(Image.fromarray(alpha))
    rgb_image, alpha_image = modes.split_colour_and_alpha(pa)
    np.testing.assert_array_equal(np.asarray(rgb_image), palette[index])
    np.testing.assert_array_equal(np.asarray(alpha_image), alpha)


@pytest.mark.parametrize("suffix", ["png", "tiff", "bmp", "jpg"])
def test_greyscale_l(tmp_path, suffix):
    grey = np.random.default_rng(4).integers(0, 256, (H, W), dtype=np.uint8)
    if suffix == "jpg":
        grey = np.kron(np.array([[20, 200], [120, 250]], np.uint8), np.ones((H // 2, W // 2), np.uint8))
    params = JPEG if suffix == "jpg" else {}
    decoded = decode(save(tmp_path, f"l.{suffix}", Image.fromarray(grey), **params))
    assert decoded.alpha is None
    if suffix == "jpg":
        assert np.abs(decoded.rgb.astype(int) - grey_to_rgb(grey)).mean() < 2
    else:
        np.testing.assert_array_equal(decoded.rgb, grey_to_rgb(grey))


def test_greyscale_with_colour_key_gives_alpha(tmp_path):
    grey = np.random.default_rng(5).integers(0, 256, (H, W), dtype=np.uint8)
    grey[2:4, 2:4] = 77
    decoded = decode(save(tmp_path, "l.png", Image.fromarray(grey), transparency=77))
    np.testing.assert_array_equal(decoded.alpha, np.where(grey == 77, 0, 255))
    np.testing.assert_array_equal(decoded.rgb, grey_to_rgb(grey))


def test_rgb_with_colour_key_gives_alpha(tmp_path):
    rgb = pattern()
    rgb[10, 10] = (1, 2, 3)
    decoded = decode(save(tmp_path, "c.png", Image.fromarray(rgb), transparency=(1, 2, 3)))
    keyed = np.all(rgb == (1, 2, 3), axis=2)
    np.testing.assert_array_equal(decoded.alpha, np.where(keyed, 0, 255))
    np.testing.assert_array_equal(decoded.rgb, rgb)


def test_greyscale_la(tmp_path):
    rng = np.random.default_rng(6)
    grey = rng.integers(0, 256, (H, W), dtype=np.uint8)
    alpha = rng.integers(0, 256, (H, W), dtype=np.uint8)
    la = Image.merge("LA", (Image.fromarray(grey), Image.fromarray(alpha)))
    decoded = decode(save(tmp_path, "la.png", la))
    np.testing.assert_array_equal(decoded.rgb, grey_to_rgb(grey))
    np.testing.assert_array_equal(decoded.alpha, alpha)


@pytest.mark.parametrize("suffix", ["png", "bmp", "tiff", "gif"])
def test_bilevel_mode_1(tmp_path, suffix):
    bits = np.random.default_rng(7).integers(0, 2, (H, W)).astype(bool)
    decoded = decode(save(tmp_path, f"b.{suffix}", Image.fromarray(bits)))
    np.testing.assert_array_equal(decoded.rgb, grey_to_rgb(np.where(bits, 255, 0).astype(np.uint8)))


@pytest.mark.parametrize("suffix", ["jpg", "tiff"])
def test_cmyk_converts_like_pillow(tmp_path, suffix):
    # CMYK JPEGs are written with an Adobe marker (inverted ink values); Pillow undoes it.
    cmyk = Image.new("CMYK", (W, H), (10, 200, 30, 40))
    decoded = decode(save(tmp_path, f"k.{suffix}", cmyk))
    expected = np.asarray(cmyk.convert("RGB"))
    tolerance = 3 if suffix == "jpg" else 0
    assert np.abs(decoded.rgb.astype(int) - expected).max() <= tolerance
    assert decoded.rgb.shape == (H, W, 3)


def test_ycbcr_tiff(tmp_path):
    ycbcr = Image.fromarray(pattern()).convert("YCbCr")
    path = save(tmp_path, "y.tiff", ycbcr)
    try:
        with Image.open(path) as written:
            written.load()
    except OSError as exc:
        # Pillow before 13 writes a YCbCr TIFF it cannot read back itself: no test file to use.
        pytest.skip(f"this Pillow cannot read its own YCbCr TIFF: {exc}")
    decoded = decode(path)
    np.testing.assert_array_equal(decoded.rgb, np.asarray(ycbcr.convert("RGB")))


# --------------------------------------------------------------------------- wide modes


def to_8_bit(values) -> np.ndarray:
    """The reference for every 16-bit reduction: round(v * 255 / 65535), in floats."""
    return np.rint(np.asarray(values, np.float64) * 255 / 65535).astype(np.uint8)


def test_reference_rounding_differs_from_truncation():
    # Guards the tests below: they would prove nothing if rounding and truncation agreed.
    values = np.array([0, 200, 255, 256, 32896, 51200, 65535])
    assert to_8_bit(values).tolist() == [0, 1, 1, 1, 128, 199, 255]
    assert (values >> 8).tolist() == [0, 0, 0, 1, 128, 200, 255]


def test_round_16_to_8_is_exact_for_every_value():
    values = np.arange(65536)
    high, low = (values >> 8).astype(np.uint8), (values & 255).astype(np.uint8)
    np.testing.assert_array_equal(modes._round_16_to_8(high, low), to_8_bit(values))


def wide_grey() -> np.ndarray:
    values = np.random.default_rng(8).integers(0, 65536, (H, W), dtype=np.uint16)
    values[0, :6] = (0, 255, 256, 65535, 51200, 32896)
    return values


@pytest.mark.parametrize("suffix", ["png", "tiff"])
def test_16_bit_greyscale_rounds(tmp_path, suffix):
    values = wide_grey()
    image = Image.fromarray(values)
    assert image.mode == "I;16"
    decoded = decode(save(tmp_path, f"g16.{suffix}", image))
    np.testing.assert_array_equal(decoded.rgb, grey_to_rgb(to_8_bit(values)))
    assert decoded.rgb[0, :6, 0].tolist() == [0, 1, 1, 255, 199, 128]


def test_16_bit_big_endian_tiff(tmp_path):
    values = wide_grey()
    image = Image.fromarray(values.astype(">u2"))
    assert image.mode == "I;16B"
    path = save(tmp_path, "g16b.tiff", image)
    with Image.open(path) as reopened:
        assert reopened.mode == "I;16B"
    np.testing.assert_array_equal(decode(path).rgb, grey_to_rgb(to_8_bit(values)))


def test_32_bit_integer_tiff_is_read_as_16_bit_range(tmp_path):
    values = wide_grey().astype(np.int32)
    values[1, :3] = (-5, 70000, 1 << 30)
    image = Image.fromarray(values)
    assert image.mode == "I"
    decoded = decode(save(tmp_path, "i32.tiff", image))
    np.testing.assert_array_equal(decoded.rgb, grey_to_rgb(to_8_bit(np.clip(values, 0, 65535))))
    assert decoded.rgb[1, :3, 0].tolist() == [0, 255, 255]


def test_16_bit_greyscale_with_colour_key(tmp_path):
    values = wide_grey()
    values[3, 3] = 4242
    decoded = decode(save(tmp_path, "g16t.png", Image.fromarray(values), transparency=4242))
    np.testing.assert_array_equal(decoded.alpha, np.where(values == 4242, 0, 255))


def test_float_tiff(tmp_path):
    values = np.random.default_rng(9).uniform(0, 255, (H, W)).astype(np.float32)
    values[0, :6] = (-5.0, 12.4, 12.6, 254.6, 300.0, np.nan)
    decoded = decode(save(tmp_path, "f.tiff", Image.fromarray(values)))
    expected = np.rint(np.clip(np.nan_to_num(values, nan=0.0), 0, 255)).astype(np.uint8)
    np.testing.assert_array_equal(decoded.rgb, grey_to_rgb(expected))
    assert decoded.rgb[0, :6, 0].tolist() == [0, 12, 13, 255, 255, 0]


def wide_colour(channels: int, seed: int, h: int = H, w: int = W) -> np.ndarray:
    values = np.random.default_rng(seed).integers(0, 65536, (h, w, channels), dtype=np.uint16)
    values[0, :5, 0] = (200, 255, 32896, 51200, 65535)  # where truncation is off by one
    return values


def rows_16_bit(values: np.ndarray) -> bytes:
    h = values.shape[0]
    raw = values.astype(">u2").reshape(h, -1).view(np.uint8)
    return zlib.compress(np.hstack((np.zeros((h, 1), np.uint8), raw)).tobytes())


def paeth(a: np.ndarray, b: np.ndarray, c: np.ndarray) -> np.ndarray:
    p = a + b - c
    pa, pb, pc = np.abs(p - a), np.abs(p - b), np.abs(p - c)
    return np.where((pa <= pb) & (pa <= pc), a, np.where(pb <= pc, b, c))


def filtered_rows_16_bit(values: np.ndarray) -> bytes:
    """PNG scanlines using all five filter types in turn (None, Sub, Up, Average, Paeth)."""
    h = values.shape[0]
    raw = values.astype(">u2").reshape(h, -1).view(np.uint8).astype(np.int32)
    bpp = 2 * values.shape[2]
    up = np.vstack((np.zeros((1, raw.shape[1]), np.int32), raw[:-1]))
    left = np.hstack((np.zeros((h, bpp), np.int32), raw[:, :-bpp]))
    up_left = np.hstack((np.zeros((h, bpp), np.int32), up[:, :-bpp]))
    predictions = [0, left, up, (left + up) // 2, paeth(left, up, up_left)]
    lines = []
    for row in range(h):
        kind = row % 5
        prediction = predictions[kind] if kind == 0 else predictions[kind][row]
        lines.append(bytes([kind]) + ((raw[row] - prediction) % 256).astype(np.uint8).tobytes())
    return zlib.compress(b"".join(lines))


@pytest.mark.parametrize("rows", [rows_16_bit, filtered_rows_16_bit])
def test_16_bit_rgb_png_rounds(tmp_path, rows):
    values = wide_colour(3, seed=10)
    path = tmp_path / "rgb16.png"
    path.write_bytes(handmade_png(W, H, 16, 2, rows(values)))
    decoded = decode(path)
    np.testing.assert_array_equal(decoded.rgb, to_8_bit(values))
    assert decoded.alpha is None


@pytest.mark.parametrize("rows", [rows_16_bit, filtered_rows_16_bit])
def test_16_bit_rgba_png_rounds(tmp_path, rows):
    values = wide_colour(4, seed=11)
    values[1, :3, 3] = (200, 51200, 65535)
    path = tmp_path / "rgba16.png"
    path.write_bytes(handmade_png(W, H, 16, 6, rows(values)))
    decoded = decode(path)
    np.testing.assert_array_equal(decoded.rgb, to_8_bit(values[..., :3]))
    np.testing.assert_array_equal(decoded.alpha, to_8_bit(values[..., 3]))


def test_every_16_bit_value_rounds_exactly_in_png(tmp_path):
    values = np.arange(65536, dtype=np.uint16).reshape(256, 256)
    rgb = np.dstack((values, values[::-1], values.T))
    path = tmp_path / "all16.png"
    path.write_bytes(handmade_png(256, 256, 16, 2, filtered_rows_16_bit(rgb)))
    np.testing.assert_array_equal(decode(path).rgb, to_8_bit(rgb))


def test_16_bit_rgb_png_colour_key_matches_all_16_bits(tmp_path):
    values = wide_colour(3, seed=12)
    key = (1000, 2000, 3000)
    values[4, 5] = key
    values[6, 7] = (1001, 2000, 3000)  # same high bytes: only the full value tells them apart
    ihdr = struct.pack(">IIBBBBB", W, H, 16, 2, 0, 0, 0)
    data = (
        b"\x89PNG\r\n\x1a\n"
        + png_chunk(b"IHDR", ihdr)
        + png_chunk(b"tRNS", struct.pack(">3H", *key))
        + png_chunk(b"IDAT", rows_16_bit(values))
        + png_chunk(b"IEND", b"")
    )
    path = tmp_path / "key16.png"
    path.write_bytes(data)
    decoded = decode(path)
    expected = np.full((H, W), 255, np.uint8)
    expected[4, 5] = 0
    np.testing.assert_array_equal(decoded.alpha, expected)
    np.testing.assert_array_equal(decoded.rgb, to_8_bit(values))


def handmade_tiff_16(
    values: np.ndarray, *, order: str = "<", compression: int = 1, extra: int | None = None, make: bytes = b""
) -> bytes:
    """A 16-bit RGB(A) TIFF in one strip (Pillow cannot write one); ``compression`` 8 is
    deflate, which Pillow hands to libtiff; ``extra`` is the ExtraSamples value of a
    fourth sample (0 unspecified, 1 premultiplied alpha, 2 straight alpha); ``make`` (at
    most 3 bytes) becomes an EXIF Make tag, which Pillow reads from the file itself."""
    h, w, samples = values.shape
    pixels = values.astype(f"{order}u2").tobytes()
    if compression == 8:
        pixels = zlib.compress(pixels)
    entries = [
        (256, 3, 1, w), (257, 3, 1, h), (258, 3, samples, None), (259, 3, 1, compression), (262, 3, 1, 2),
        (273, 4, 1, None), (277, 3, 1, samples), (278, 3, 1, h), (279, 4, 1, len(pixels)), (284, 3, 1, 1),
    ]
    if make:
        inline = int.from_bytes(make.ljust(4, b"\x00"), "little" if order == "<" else "big")
        entries.insert(5, (271, 2, len(make) + 1, inline))  # after 262: tags stay in order
    if extra is not None:
        entries.append((338, 3, 1, extra))
    bits_offset = 8 + 2 + 12 * len(entries) + 4
    pixels_offset = bits_offset + 2 * samples
    ifd = struct.pack(f"{order}H", len(entries))
    for tag, kind, count, value in entries:
        value = bits_offset if tag == 258 else pixels_offset if tag == 273 else value
        packed = struct.pack(f"{order}HH", value, 0) if kind == 3 and count == 1 else struct.pack(f"{order}I", value)
        ifd += struct.pack(f"{order}HHI", tag, kind, count) + packed
    head = (b"II*\x00" if order == "<" else b"MM\x00*") + struct.pack(f"{order}I", 8)
    return head + ifd + struct.pack(f"{order}I", 0) + struct.pack(f"{order}{samples}H", *([16] * samples)) + pixels


@pytest.mark.parametrize("order", ["<", ">"])
@pytest.mark.parametrize("compression", [1, 8])
def test_16_bit_rgb_tiff_rounds(tmp_path, order, compression):
    values = wide_colour(3, seed=17)
    path = tmp_path / "rgb16.tiff"
    path.write_bytes(handmade_tiff_16(values, order=order, compression=compression))
    with Image.open(path) as im:
        codec = im.tile[0][0]
    assert codec == ("raw" if compression == 1 else "libtiff")
    decoded = decode(path)
    assert decoded.format == "TIFF"
    np.testing.assert_array_equal(decoded.rgb, to_8_bit(values))


@pytest.mark.parametrize("compression", [1, 8])
def test_16_bit_tiff_keeps_its_exif_after_the_second_decode(tmp_path, compression):
    # TIFF EXIF is read from the open file, after the low-byte decode has used it too.
    values = wide_colour(3, seed=21)
    path = tmp_path / "rgb16exif.tiff"
    path.write_bytes(handmade_tiff_16(values, compression=compression, make=b"Ac"))
    decoded = decode(path)
    np.testing.assert_array_equal(decoded.rgb, to_8_bit(values))
    assert parse_exif(decoded.exif)[ExifTags.Base.Make] == "Ac"


@pytest.mark.parametrize("compression", [1, 8])
def test_16_bit_rgba_and_rgbx_tiff_round(tmp_path, compression):
    values = wide_colour(4, seed=18)
    path = tmp_path / "rgba16.tiff"
    path.write_bytes(handmade_tiff_16(values, compression=compression, extra=2))
    decoded = decode(path)
    np.testing.assert_array_equal(decoded.rgb, to_8_bit(values[..., :3]))
    np.testing.assert_array_equal(decoded.alpha, to_8_bit(values[..., 3]))
    path.write_bytes(handmade_tiff_16(values, compression=compression, extra=0))
    decoded = decode(path)
    np.testing.assert_array_equal(decoded.rgb, to_8_bit(values[..., :3]))
    assert decoded.alpha is None


def test_premultiplied_16_bit_tiff_keeps_pillows_reading(tmp_path):
    # Pillow un-premultiplies the high bytes itself; the low-byte trick cannot follow it
    # there, so these files stay exactly as Pillow reads them.
    values = wide_colour(4, seed=19)
    values[..., :3] = np.minimum(values[..., :3], values[..., 3:])
    path = tmp_path / "rgba16p.tiff"
    path.write_bytes(handmade_tiff_16(values, extra=1))
    with Image.open(path) as im:
        expected = np.asarray(im.convert("RGBA"))
    decoded = decode(path)
    np.testing.assert_array_equal(decoded.rgb, expected[..., :3])
    np.testing.assert_array_equal(decoded.alpha, expected[..., 3])


def test_failing_low_byte_decode_falls_back_to_truncation(tmp_path, monkeypatch):
    values = wide_colour(3, seed=20)
    path = tmp_path / "rgb16.png"
    path.write_bytes(handmade_png(W, H, 16, 2, rows_16_bit(values)))
    # A raw mode Pillow has no unpacker for: the second decode raises inside Pillow.
    monkeypatch.setitem(modes._OTHER_BYTE_RAWMODES, "RGB;16B", "RGB;99Q")
    decoded = decode(path)
    np.testing.assert_array_equal(decoded.rgb, (values >> 8).astype(np.uint8))


def test_8_bit_inputs_are_decoded_once(tmp_path, monkeypatch):
    calls = []
    monkeypatch.setattr(modes, "_decode_low_bytes", lambda *args: calls.append(args))
    rgba = Image.fromarray(np.dstack((pattern(), pattern()[..., 0])))
    decode(save(tmp_path, "x.png", rgba))
    decode(save(tmp_path, "x.tiff", rgba))
    decode(save(tmp_path, "x.jpg", rgba.convert("RGB")))
    assert calls == []


def test_lab_tiff_converts_like_pillow(tmp_path):
    lab = Image.fromarray(pattern()).convert("LAB")
    decoded = decode(save(tmp_path, "lab.tiff", lab))
    np.testing.assert_array_equal(decoded.rgb, np.asarray(lab.convert("RGB")))


# --------------------------------------------------------------------------- multi-frame


def test_gif_first_frame(tmp_path):
    frames = [Image.fromarray(pattern(seed=s)).quantize(64) for s in (20, 21)]
    path = save(tmp_path, "anim.gif", frames[0], save_all=True, append_images=frames[1:])
    first = np.asarray(frames[0].convert("RGB"))
    decoded = decode(path)
    assert decoded.format == "GIF"
    np.testing.assert_array_equal(decoded.rgb, first)


def test_multi_page_tiff_first_page(tmp_path):
    pages = [Image.fromarray(pattern(seed=s)) for s in (30, 31)]
    path = save(tmp_path, "pages.tiff", pages[0], save_all=True, append_images=pages[1:])
    with Image.open(path) as reopened:
        assert reopened.n_frames == 2
    np.testing.assert_array_equal(decode(path).rgb, np.asarray(pages[0]))


def test_mpo_first_picture(tmp_path):
    pictures = [Image.fromarray(smooth_pattern()), Image.new("RGB", (W, H), (0, 0, 0))]
    path = save(tmp_path, "stereo.mpo", pictures[0], format="MPO", save_all=True,
                append_images=pictures[1:], **JPEG)
    decoded = decode(path)
    assert decoded.format == "MPO" and "MPO" in SUPPORTED_FORMATS
    assert np.abs(decoded.rgb.astype(int) - smooth_pattern()).mean() < 3


# --------------------------------------------------------------------------- orientation

# What a viewer shows for each EXIF orientation, written from the EXIF definition.
ORIENTED = {
    1: lambda a: a,
    2: lambda a: a[:, ::-1],
    3: lambda a: a[::-1, ::-1],
    4: lambda a: a[::-1],
    5: lambda a: a.swapaxes(0, 1),
    6: lambda a: np.rot90(a, k=-1),
    7: lambda a: np.rot90(a, k=-1)[::-1],
    8: lambda a: np.rot90(a, k=1),
}
# Where the stored top-left corner lands after orientation: (row, column) of the result.
CORNER = {1: (0, 0), 2: (0, -1), 3: (-1, -1), 4: (-1, 0), 5: (0, 0), 6: (0, -1), 7: (-1, -1), 8: (-1, 0)}


def exif_with_orientation(orientation: int) -> Image.Exif:
    exif = Image.Exif()
    exif[0x0112] = orientation
    return exif


@pytest.mark.parametrize("orientation", range(1, 9))
@pytest.mark.parametrize(("suffix", "params"), [("png", {}), ("tiff", {}), ("webp", {"lossless": True})])
def test_exif_orientation_exact(tmp_path, orientation, suffix, params):
    rgb = pattern()
    path = save(tmp_path, f"o.{suffix}", Image.fromarray(rgb), exif=exif_with_orientation(orientation), **params)
    decoded = decode(path)
    expected = ORIENTED[orientation](rgb)
    np.testing.assert_array_equal(decoded.rgb, expected)
    transposed = orientation >= 5
    assert (decoded.width, decoded.height) == ((H, W) if transposed else (W, H))
    assert tuple(decoded.rgb[CORNER[orientation]]) == (255, 0, 0)
    with Image.open(path) as reference:
        np.testing.assert_array_equal(decoded.rgb, np.asarray(ImageOps.exif_transpose(reference)))
    np.testing.assert_array_equal(decoded.model_input, expected_model_input(np.ascontiguousarray(expected)))


@pytest.mark.parametrize("orientation", range(1, 9))
def test_exif_orientation_jpeg(tmp_path, orientation):
    rgb = smooth_pattern()
    path = save(tmp_path, "o.jpg", Image.fromarray(rgb), exif=exif_with_orientation(orientation), **JPEG)
    decoded = decode(path)
    expected = ORIENTED[orientation](rgb)
    assert decoded.rgb.shape == expected.shape
    assert np.abs(decoded.rgb.astype(int) - expected).mean() < 3
    corner = decoded.rgb[CORNER[orientation]].astype(int)
    assert np.abs(corner - (220, 30, 30)).max() < 20


def test_orientation_also_turns_alpha(tmp_path):
    rgb = pattern()
    alpha = np.zeros((H, W), np.uint8)
    alpha[:6, :6] = 255
    path = save(tmp_path, "o.png", Image.fromarray(np.dstack((rgb, alpha))), exif=exif_with_orientation(6))
    decoded = decode(path)
    np.testing.assert_array_equal(decoded.alpha, np.rot90(alpha, k=-1))
    np.testing.assert_array_equal(decoded.rgb, np.rot90(rgb, k=-1))


def test_broken_exif_is_ignored(tmp_path):
    rgb = smooth_pattern()
    path = save(tmp_path, "badexif.jpg", Image.fromarray(rgb), exif=b"Exif\x00\x00MM\x00*\xff\xff\xff\xf0junk")
    decoded = decode(path)
    assert decoded.rgb.shape == (H, W, 3)
    assert decoded.exif is None


# --------------------------------------------------------------------------- EXIF kept for outputs


def rich_exif(orientation: int = 6) -> Image.Exif:
    exif = exif_with_orientation(orientation)
    exif[ExifTags.Base.Make] = "Acme"
    exif[ExifTags.Base.Model] = "Snapper 3"
    exif[ExifTags.Base.DateTime] = "2024:05:06 07:08:09"
    exif[ExifTags.Base.XResolution] = 300.0
    exif.get_ifd(ExifTags.IFD.Exif)[ExifTags.Base.DateTimeOriginal] = "2024:05:06 07:08:00"
    exif.get_ifd(ExifTags.IFD.GPSInfo)[ExifTags.GPS.GPSLatitudeRef] = "N"
    return exif


def parse_exif(blob: bytes) -> Image.Exif:
    # The blob must be the bare TIFF structure the encoders expect, not JPEG's APP1 form.
    assert blob.startswith((b"II*\x00", b"MM\x00*"))
    exif = Image.Exif()
    exif.load(blob)
    return exif


@pytest.mark.parametrize(("suffix", "params"), [("jpg", JPEG), ("png", {}), ("webp", {"lossless": True})])
def test_exif_is_kept_with_orientation_reset(tmp_path, suffix, params):
    rgb = smooth_pattern()
    decoded = decode(save(tmp_path, f"e.{suffix}", Image.fromarray(rgb), exif=rich_exif(6), **params))
    assert decoded.rgb.shape == (W, H, 3)  # turned upright, so orientation 1 is now true
    exif = parse_exif(decoded.exif)
    assert exif[ExifTags.Base.Orientation] == 1
    assert exif[ExifTags.Base.Make] == "Acme" and exif[ExifTags.Base.Model] == "Snapper 3"
    assert exif[ExifTags.Base.DateTime] == "2024:05:06 07:08:09"
    assert exif.get_ifd(ExifTags.IFD.Exif)[ExifTags.Base.DateTimeOriginal] == "2024:05:06 07:08:00"
    assert exif.get_ifd(ExifTags.IFD.GPSInfo)[ExifTags.GPS.GPSLatitudeRef] == "N"
    assert ExifTags.Base.XResolution not in exif  # the result's print size is not the source's
    assert "exif=True" in repr(decoded)


def test_tiff_exif_leaves_the_files_own_layout_tags_behind(tmp_path):
    decoded = decode(save(tmp_path, "e.tiff", Image.fromarray(pattern()), exif=rich_exif(3)))
    np.testing.assert_array_equal(decoded.rgb, pattern()[::-1, ::-1])
    exif = parse_exif(decoded.exif)
    assert exif[ExifTags.Base.Orientation] == 1 and exif[ExifTags.Base.Make] == "Acme"
    for tag in (ExifTags.Base.ImageWidth, ExifTags.Base.StripOffsets, ExifTags.Base.BitsPerSample):
        assert tag not in exif


@pytest.mark.parametrize(("suffix", "params"), [("jpg", JPEG), ("png", {}), ("webp", {"lossless": True}), ("tiff", {})])
def test_no_exif_or_orientation_only_gives_none(tmp_path, suffix, params):
    plain = decode(save(tmp_path, f"plain.{suffix}", Image.fromarray(smooth_pattern()), **params))
    assert plain.exif is None
    assert "exif=False" in repr(plain)
    image = Image.fromarray(smooth_pattern())
    turned = decode(save(tmp_path, f"o.{suffix}", image, exif=exif_with_orientation(8), **params))
    assert turned.rgb.shape == (W, H, 3)
    assert turned.exif is None  # once reset, nothing of the input's EXIF is left to carry


def test_exif_that_cannot_be_written_back_is_dropped(tmp_path, monkeypatch):
    path = save(tmp_path, "e.jpg", Image.fromarray(smooth_pattern()), exif=rich_exif(1), **JPEG)

    def refuse(self, offset=8):
        raise struct.error("cannot pack")

    monkeypatch.setattr(Image.Exif, "tobytes", refuse)
    decoded = decode(path)
    assert decoded.exif is None and decoded.rgb.shape == (H, W, 3)


# --------------------------------------------------------------------------- result shape


def test_decoded_arrays_are_contiguous_writable_uint8(tmp_path):
    rgba = np.dstack((pattern(), np.full((H, W), 9, np.uint8)))
    decoded = decode(save(tmp_path, "x.png", Image.fromarray(rgba)), input_size=24)
    for array, shape in ((decoded.rgb, (H, W, 3)), (decoded.alpha, (H, W)), (decoded.model_input, (24, 24, 3))):
        assert array.dtype == np.uint8 and array.shape == shape
        assert array.flags["C_CONTIGUOUS"] and array.flags["WRITEABLE"]
    np.testing.assert_array_equal(decoded.model_input, expected_model_input(pattern(), 24))
    with pytest.raises(dataclasses.FrozenInstanceError):
        decoded.format = "PNG"  # type: ignore[misc]
    assert "40x30" in repr(decoded)


def test_model_input_upscales_small_images(tmp_path):
    rgb = pattern(5, 7)
    decoded = decode(save(tmp_path, "tiny.png", Image.fromarray(rgb)), input_size=64)
    assert decoded.model_input.shape == (64, 64, 3)
    np.testing.assert_array_equal(decoded.model_input, expected_model_input(rgb, 64))


def test_accepts_str_and_pathlike(tmp_path):
    path = save(tmp_path, "x.png", Image.fromarray(pattern()))
    np.testing.assert_array_equal(decode(str(path)).rgb, decode(path).rgb)


def test_icc_profile_is_kept_for_rgb_only(tmp_path):
    srgb = ImageCms.ImageCmsProfile(ImageCms.createProfile("sRGB")).tobytes()
    decoded = decode(save(tmp_path, "icc.jpg", Image.fromarray(smooth_pattern()), icc_profile=srgb))
    assert decoded.icc_profile == srgb
    assert decode(save(tmp_path, "plain.png", Image.fromarray(pattern()))).icc_profile is None
    grey = Image.new("L", (W, H), 50)
    assert decode(save(tmp_path, "grey.png", grey, icc_profile=srgb)).icc_profile is None


# --------------------------------------------------------------------------- failures


def expect_image_error(path, match: str, **kwargs) -> str:
    with pytest.raises(ImageError, match=match) as info:
        decode(path, **kwargs)
    assert_readable(str(info.value))
    return str(info.value)


def test_empty_file(tmp_path):
    path = tmp_path / "empty.jpg"
    path.write_bytes(b"")
    expect_image_error(path, "^empty file$")


def test_text_file(tmp_path):
    path = tmp_path / "notes.jpg"
    path.write_text("hello, this is not a picture\n")
    expect_image_error(path, "not a supported image")


def test_random_bytes(tmp_path):
    path = tmp_path / "noise.png"
    path.write_bytes(b"\x00" + np.random.default_rng(12).bytes(5000))
    expect_image_error(path, "not a supported image")


def test_format_outside_the_whitelist_is_refused(tmp_path):
    path = save(tmp_path, "x.ppm", Image.fromarray(pattern()))
    with Image.open(path) as im:
        assert im.format == "PPM"  # Pillow itself would read it
    expect_image_error(path, "not a supported image")


def test_truncated_jpeg(tmp_path):
    data = (save(tmp_path, "full.jpg", Image.fromarray(pattern()))).read_bytes()
    path = tmp_path / "cut.jpg"
    path.write_bytes(data[: len(data) // 2])
    expect_image_error(path, "^truncated or corrupt image: image file is truncated")


def test_truncated_png(tmp_path):
    data = (save(tmp_path, "full.png", Image.fromarray(pattern()))).read_bytes()
    path = tmp_path / "cut.png"
    path.write_bytes(data[: len(data) // 2])
    expect_image_error(path, "^truncated or corrupt image")


@pytest.mark.parametrize("length", [12, 20, 40])
def test_png_cut_inside_its_header(tmp_path, length):
    data = (save(tmp_path, "full.png", Image.fromarray(pattern()))).read_bytes()
    path = tmp_path / "cut.png"
    path.write_bytes(data[:length])
    expect_image_error(path, "^truncated or corrupt (PNG file|image)")


def test_jpeg_cut_inside_its_header(tmp_path):
    path = tmp_path / "cut.jpg"
    path.write_bytes(b"\xff\xd8\xff\xe0\x00\x10JF")
    expect_image_error(path, "^truncated or corrupt (JPEG file|image)")


def test_corrupt_bytes_in_the_middle(tmp_path):
    data = bytearray(save(tmp_path, "full.png", Image.fromarray(pattern())).read_bytes())
    middle = len(data) // 2
    data[middle : middle + 32] = np.random.default_rng(13).bytes(32)
    path = tmp_path / "corrupt.png"
    path.write_bytes(bytes(data))
    expect_image_error(path, "^truncated or corrupt image: ")


def test_corrupt_gif_stream(tmp_path):
    data = bytearray(save(tmp_path, "full.gif", Image.fromarray(pattern()).quantize(64)).read_bytes())
    middle = len(data) // 2
    data[middle : middle + 16] = b"\xff" * 16
    path = tmp_path / "corrupt.gif"
    path.write_bytes(bytes(data))
    expect_image_error(path, "^truncated or corrupt image: ")


def test_directory(tmp_path):
    expect_image_error(tmp_path, "directory")


def test_missing_file(tmp_path):
    expect_image_error(tmp_path / "gone.jpg", "not found")


@pytest.mark.skipif(not hasattr(os, "mkfifo"), reason="needs FIFOs")
@pytest.mark.timeout(120)  # opening a FIFO without a writer never returns: only a hang fails
def test_fifo_is_refused_without_blocking(tmp_path):
    fifo = tmp_path / "pipe.jpg"
    os.mkfifo(fifo)
    expect_image_error(fifo, "not a regular file")



def test_regression_symlink_target_is_never_read(tmp_path):
    # Finding 3: every input is opened with O_NOFOLLOW, so a link (to an image, to a FIFO
    # that would block, dangling) is refused as a link and its target never opened.
    target = save(tmp_path, "secret.png", Image.fromarray(pattern()))
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    for name, points_to in (("link.png", target), ("to_fifo.png", fifo), ("dangling.png", tmp_path / "nothing")):
        (tmp_path / name).symlink_to(points_to)
        expect_image_error(tmp_path / name, "^symbolic link: never followed$")


def test_link_swapped_in_after_the_look_is_not_followed(tmp_path, monkeypatch):
    # The lstat sees a regular file; by the time of the open it is a link: O_NOFOLLOW refuses.
    target = save(tmp_path, "secret.png", Image.fromarray(pattern()))
    path = tmp_path / "input.png"
    path.write_bytes(target.read_bytes())
    real_lstat = os.lstat

    def lstat_then_swap(name, *args, **kwargs):
        result = real_lstat(name, *args, **kwargs)
        if os.fspath(name) == os.fspath(path):
            path.unlink()
            path.symlink_to(target)
        return result

    monkeypatch.setattr(os, "lstat", lstat_then_swap)
    expect_image_error(path, "^symbolic link: never followed$")


@pytest.mark.skipif(not hasattr(os, "mkfifo"), reason="needs FIFOs")
def test_fifo_is_never_opened(tmp_path, monkeypatch):
    fifo = tmp_path / "pipe.jpg"
    os.mkfifo(fifo)
    opened = []
    real_open = os.open
    monkeypatch.setattr(os, "open", lambda path, *a, **k: opened.append(path) or real_open(path, *a, **k))
    expect_image_error(fifo, "not a regular file")
    assert opened == []


# --------------------------------------------------------------------------- size limits


def header_only_png(width: int, height: int) -> bytes:
    # A real image of this size is never needed: the size check must fire on the header.
    return handmade_png(width, height, 1, 0, zlib.compress(b"\x00" * 64))


def peak_rss_bytes() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def test_bomb_is_refused_from_the_header(tmp_path):
    path = tmp_path / "bomb.png"
    path.write_bytes(header_only_png(50_000, 50_000))
    rss_before = peak_rss_bytes()
    message = expect_image_error(path, "max_pixels", max_pixels=100_000_000)
    # Decoding 2500 MP would take gigabytes: the peak shows that only the header was read.
    assert peak_rss_bytes() - rss_before < 200 * 2**20
    assert "2500.0 MP" in message and "100.0 MP" in message


def test_near_bomb_reports_dimensions_without_warning(tmp_path):
    # Above Pillow's warning threshold, below its hard limit: our own check must answer.
    path = tmp_path / "large.png"
    path.write_bytes(header_only_png(12_000, 10_000))
    limit_before = Image.MAX_IMAGE_PIXELS
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        message = expect_image_error(path, "max_pixels", max_pixels=100_000_000)
    assert caught == []
    assert message == "image is 12000×10000 (120.0 MP), above input.max_pixels (100.0 MP)"
    assert Image.MAX_IMAGE_PIXELS == limit_before


def test_max_pixels_applies_to_ordinary_images(tmp_path):
    path = save(tmp_path, "x.png", Image.fromarray(pattern()))
    expect_image_error(path, r"40×30 .*input\.max_pixels", max_pixels=W * H - 1)
    assert decode(path, max_pixels=W * H).rgb.shape == (H, W, 3)


def test_limit_above_pillows_own_is_explained(tmp_path):
    path = tmp_path / "bomb.png"
    path.write_bytes(header_only_png(50_000, 50_000))
    expect_image_error(path, "Pillow's decompression-bomb limit", max_pixels=10**12)


def test_decoding_emits_no_warnings(tmp_path):
    image, _, _ = palette_image()
    paths = [
        save(tmp_path, "p.png", image, transparency=bytes(range(16))),
        save(tmp_path, "p.gif", image, transparency=3),
        save(tmp_path, "x.tiff", Image.fromarray(pattern())),
    ]
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for path in paths:
            decode(path)
    assert caught == []


def test_concurrent_decodes_leak_no_warnings_and_restore_filters(tmp_path):
    near_bomb = tmp_path / "large.png"
    near_bomb.write_bytes(header_only_png(12_000, 10_000))
    fine = save(tmp_path, "fine.png", Image.fromarray(pattern()))
    errors: list[str] = []

    def work(index: int) -> None:
        for _ in range(20):
            try:
                decode(near_bomb if index % 2 else fine, max_pixels=100_000_000)
            except ImageError as exc:
                errors.append(str(exc))

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        filters_before = list(warnings.filters)
        threads = [threading.Thread(target=work, args=(i,)) for i in range(8)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        assert warnings.filters == filters_before
    assert caught == []
    assert len(errors) == 4 * 20 and all("max_pixels" in e for e in errors)


def test_rejects_nonsense_arguments(tmp_path):
    path = save(tmp_path, "x.png", Image.fromarray(pattern()))
    with pytest.raises(ValueError):
        decode_image(path, input_size=0, max_pixels=BIG_LIMIT)
    with pytest.raises(ValueError):
        decode_image(path, input_size=SIZE, max_pixels=0)


# --------------------------------------------------------------------------- combine_alpha


def test_combine_without_input_alpha_is_the_mask():
    mask = np.random.default_rng(14).integers(0, 256, (H, W), dtype=np.uint8)
    assert combine_alpha(mask, None) is mask


def test_combine_rounds_every_pair_exactly():
    mask, alpha = np.meshgrid(np.arange(256, dtype=np.uint8), np.arange(256, dtype=np.uint8))
    combined = combine_alpha(mask, alpha)
    expected = np.rint(mask.astype(np.float64) * alpha / 255).astype(np.uint8)
    assert combined.dtype == np.uint8 and combined.shape == (256, 256)
    np.testing.assert_array_equal(combined, expected)
    assert combined[0].max() == 0 and combined[:, 0].max() == 0  # transparent stays so
    np.testing.assert_array_equal(combined[255], mask[255])  # opaque input keeps the mask


def test_combine_leaves_inputs_alone_and_checks_shapes():
    mask = np.full((H, W), 200, np.uint8)
    alpha = np.full((H, W), 100, np.uint8)
    combine_alpha(mask, alpha)
    assert mask.max() == 200 and alpha.max() == 100
    with pytest.raises(ValueError):
        combine_alpha(mask, alpha[:-1])
    with pytest.raises(ValueError):
        combine_alpha(mask.astype(np.float32), alpha)


# --------------------------------------------------------------------------- encode_png


@pytest.mark.parametrize(("h", "w"), [(H, W), (1, 1), (1, 17), (23, 1), (7, 5), (64, 3)])
def test_encode_round_trip_exact(h, w):
    rgb, alpha = random_rgba(h, w)
    data = encode_png(rgb, alpha, clean_transparent=False)
    png_chunks(data)
    np.testing.assert_array_equal(read_png(data), np.dstack((rgb, alpha)))
    with Image.open(io.BytesIO(data)) as im:
        im.verify()


def test_clean_transparent_zeroes_only_invisible_pixels():
    rgb, alpha = random_rgba()
    rgb_before, alpha_before = rgb.copy(), alpha.copy()
    decoded = read_png(encode_png(rgb, alpha))
    np.testing.assert_array_equal(rgb, rgb_before)
    np.testing.assert_array_equal(alpha, alpha_before)
    np.testing.assert_array_equal(decoded[..., 3], alpha)
    hidden = alpha == 0
    assert hidden.any() and (rgb[hidden] != 0).any()
    assert not decoded[hidden, :3].any()
    np.testing.assert_array_equal(decoded[~hidden, :3], rgb[~hidden])


def test_encode_does_not_touch_callers_arrays_even_when_not_cleaning():
    rgb, alpha = random_rgba()
    for arr in (rgb, alpha):
        arr.flags.writeable = False  # any write attempt would raise
    encode_png(rgb, alpha)
    encode_png(rgb, alpha, clean_transparent=False)


def test_encode_accepts_non_contiguous_views():
    rgb, alpha = random_rgba(60, 80)
    view_rgb, view_alpha = rgb[::2, ::2], alpha[::2, ::2]
    data = encode_png(view_rgb, view_alpha, clean_transparent=False)
    np.testing.assert_array_equal(read_png(data), np.dstack((view_rgb, view_alpha)))


def test_compress_level_is_honoured():
    rgb = np.kron(pattern(8, 10), np.ones((8, 8, 1), np.uint8))
    alpha = np.full(rgb.shape[:2], 255, np.uint8)
    sizes = {level: len(encode_png(rgb, alpha, compress_level=level)) for level in (0, 1, 9)}
    assert sizes[0] > sizes[1] >= sizes[9]
    assert sizes[0] > rgb.size * 4 // 3  # level 0 stores the scanlines uncompressed
    for level in (0, 9):
        np.testing.assert_array_equal(read_png(encode_png(rgb, alpha, compress_level=level))[..., :3], rgb)


@pytest.mark.parametrize("deflate", ["isal", "zlib"])
@pytest.mark.parametrize("level", range(10))
def test_every_level_round_trips_with_either_deflate(monkeypatch, deflate, level):
    if deflate == "isal":
        pytest.importorskip("isal")
    else:
        monkeypatch.setattr(png, "_isal_zlib", None)
    rgb, alpha = random_rgba(37, 29)
    for clean in (False, True):
        data = encode_png(rgb, alpha, compress_level=level, clean_transparent=clean)
        png_chunks(data)
        # zlib itself must accept the stream, not only Pillow's tolerant reader.
        idat = b"".join(body for tag, body in png_chunks(data) if tag == b"IDAT")
        assert len(zlib.decompress(idat)) == 37 * (1 + 4 * 29)
        want = np.dstack((rgb, alpha))
        if clean:
            want[alpha == 0] = 0
        np.testing.assert_array_equal(read_png(data), want)


def test_isal_and_zlib_write_the_same_pixels(monkeypatch):
    pytest.importorskip("isal")
    rgb = np.kron(pattern(9, 11), np.ones((7, 7, 1), np.uint8))
    alpha = np.random.default_rng(3).integers(0, 256, rgb.shape[:2], dtype=np.uint8)
    fast = encode_png(rgb, alpha)
    monkeypatch.setattr(png, "_isal_zlib", None)
    plain = encode_png(rgb, alpha)
    np.testing.assert_array_equal(read_png(fast), read_png(plain))


@pytest.mark.parametrize(("h", "w"), [(1, 1), (2, 1), (1, 2), (3, 5)])
def test_last_pixel_and_tiny_images_interleave_exactly(h, w):
    # Each pixel is read as a word that overlaps the next pixel's red byte; the last pixel
    # has none after it and is handled apart. A sentinel after the buffer must not leak in.
    buffer = np.full(h * w * 3 + 1, 0xAB, np.uint8)
    rgb = buffer[:-1].reshape(h, w, 3)
    rgb[:] = np.arange(h * w * 3, dtype=np.uint8).reshape(h, w, 3)
    alpha = np.full((h, w), 200, np.uint8)
    np.testing.assert_array_equal(read_png(encode_png(rgb, alpha)), np.dstack((rgb, alpha)))


def test_many_idat_chunks_decode(monkeypatch):
    monkeypatch.setattr(png, "_IDAT_CHUNK_BYTES", 100)
    rgb, alpha = random_rgba()
    data = encode_png(rgb, alpha, clean_transparent=False)
    assert sum(tag == b"IDAT" for tag, _ in png_chunks(data)) > 10
    np.testing.assert_array_equal(read_png(data), np.dstack((rgb, alpha)))


def test_icc_profile_round_trip():
    srgb = ImageCms.ImageCmsProfile(ImageCms.createProfile("sRGB")).tobytes()
    rgb, alpha = random_rgba()
    data = encode_png(rgb, alpha, icc_profile=srgb, clean_transparent=False)
    tags = [tag for tag, _ in png_chunks(data)]
    assert tags.index(b"iCCP") < tags.index(b"IDAT")
    with Image.open(io.BytesIO(data)) as im:
        assert im.info["icc_profile"] == srgb
    np.testing.assert_array_equal(read_png(data), np.dstack((rgb, alpha)))


@pytest.mark.parametrize(
    ("rgb", "alpha", "kwargs"),
    [
        (np.zeros((4, 4, 4), np.uint8), np.zeros((4, 4), np.uint8), {}),
        (np.zeros((4, 4, 3), np.uint8), np.zeros((4, 5), np.uint8), {}),
        (np.zeros((4, 4, 3), np.uint16), np.zeros((4, 4), np.uint8), {}),
        (np.zeros((0, 4, 3), np.uint8), np.zeros((0, 4), np.uint8), {}),
        (np.zeros((4, 4, 3), np.uint8), np.zeros((4, 4), np.uint8), {"compress_level": 10}),
        (np.zeros((4, 4, 3), np.uint8), np.zeros((4, 4), np.uint8), {"compress_level": -1}),
    ],
)
def test_encode_rejects_bad_input(rgb, alpha, kwargs):
    with pytest.raises(ValueError):
        encode_png(rgb, alpha, **kwargs)


def test_decode_combine_encode_end_to_end(tmp_path):
    rgb = pattern()
    alpha = np.random.default_rng(16).integers(0, 256, (H, W), dtype=np.uint8)
    path = save(tmp_path, "in.png", Image.fromarray(np.dstack((rgb, alpha))), exif=exif_with_orientation(8))
    decoded = decode(path)
    mask = np.full((decoded.height, decoded.width), 255, np.uint8)
    data = encode_png(decoded.rgb, combine_alpha(mask, decoded.alpha), clean_transparent=False)
    np.testing.assert_array_equal(read_png(data), np.rot90(np.dstack((rgb, alpha)), k=1))


# --------------------------------------------------------------------------- module hygiene


def test_importing_does_not_pull_in_torch():
    code = "import sys, rmbgd.imaging.decode, rmbgd.render.png; sys.exit('torch' in sys.modules)"
    assert subprocess.run([sys.executable, "-c", code], check=False).returncode == 0


def test_supported_formats_are_pillow_names():
    assert SUPPORTED_FORMATS == ("JPEG", "MPO", "PNG", "WEBP", "BMP", "TIFF", "GIF", "AVIF", "HEIF")
