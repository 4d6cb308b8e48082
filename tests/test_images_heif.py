"""HEIC/HEIF (pillow-heif) and AVIF (Pillow) inputs: decoded like every other format."""

from __future__ import annotations

import base64
import re
import struct
from pathlib import Path

import numpy as np
import pillow_heif
import pytest
from PIL import ExifTags, Image, ImageCms

from rmbgd.imaging import decode as decode_module
from rmbgd.imaging.decode import ImageError, decode_image
from tests.support.inprocess import inprocess  # noqa: F401 (a fixture)

W, H = 40, 30
SIZE = 16
BIG_LIMIT = 10_000_000

# Writing HEIF through Image.save needs pillow-heif's plugin; its options stay as rmbgd set them.
pillow_heif.register_heif_opener()

# Pillow < 11.3 has no AVIF plugin of its own (rmbgd then takes pillow-heif's, if it has one).
AvifImagePlugin = pytest.importorskip("PIL.AvifImagePlugin")
pytestmark = pytest.mark.skipif(not AvifImagePlugin.SUPPORTED, reason="this Pillow has no AVIF support")

# Nearly lossless settings, so pixel checks can be tight: full-resolution chroma in both.
HEIF = {"quality": -1, "chroma": 444}
AVIF = {"quality": 100, "subsampling": "4:4:4"}
# 16x12, 10 bits per sample, YUV 4:4:4: Pillow cannot write a 10-bit AVIF, so it was made
# once with `avifenc -d 10 -y 444 --min 0 --max 0` from a 16-bit PNG of `ten_bit_source()`.
TEN_BIT_AVIF = base64.b64decode(
    "AAAAIGZ0eXBhdmlmAAAAAGF2aWZtaWYxbWlhZk1BMUEAAADybWV0YQAAAAAAAAAoaGRscgAAAAAAAAAAcGljdAAAAAAAAAAAAAAA"
    "AGxpYmF2aWYAAAAADnBpdG0AAAAAAAEAAAAeaWxvYwAAAABEAAABAAEAAAABAAABGgAAAaEAAAAoaWluZgAAAAAAAQAAABppbmZl"
    "AgAAAAABAABhdjAxQ29sb3IAAAAAamlwcnAAAABLaXBjbwAAABRpc3BlAAAAAAAAABAAAAAMAAAAEHBpeGkAAAAAAwoKCgAAAAxh"
    "djFDgSBAAAAAABNjb2xybmNseAABAA0ABoAAAAAXaXBtYQAAAAAAAAABAAEEAQKDBAAAAaltZGF0EgAKCDgM/tjAQ0GkMpIDEAAA"
    "yRWLY4texVBcu6mf9EXU9TFfLH+SNksQ1CaJj1xJ1X4WNmUGbaRJvrVhDQL+/6T8Xs12XUyRrxYJlxnts86EoSjX//3XR50UATtu"
    "TdLWSqjtl5u//tM+zoWDyrQnKvflgw5S5ahtP27mdqzKLRbEXvaukfBeDVR7/vodr7CcCEcTNGv2vYtKgB7axch40wMjuqODBX3G"
    "E87bh51GsvreYkRKVJOfjwcHBLjcwvqVu74E4jWsoW/EiNOtyGjISk0v4CMy2sLingxhz24dbjstkRzb5bYFOa5kmSOTD4cGuC43"
    "Ouhh1OrMySVeK9iLsjujPS86Go6XavpB2TD/6poPj4mtH+uvbdv7/UCz5Xk18PFDNFXnOGtVNEZoODA16vPPXPZmkdw1FKUZpKXH"
    "TAy47ruEz5fL9rEWztH7bHrr9yQlANQP4HH1PUc9y8l/P5m8wGLy/rJ9ot/zZp8b5HE9p5X/zfEnYvjEaG5w1v4eySz2vLWNo8QY"
    "NLfY6L2GFqhEAUHuhPPYliBtmV8+vDtA"
)


def pattern(h: int = H, w: int = W) -> np.ndarray:
    """Gentle noise over flat quadrants with a red block at the top-left, so a turn shows."""
    rgb = np.zeros((h, w, 3), np.uint8)
    rgb[: h // 2, : w // 2] = (200, 40, 40)
    rgb[: h // 2, w // 2 :] = (40, 180, 40)
    rgb[h // 2 :, : w // 2] = (40, 40, 190)
    rgb[h // 2 :, w // 2 :] = (220, 220, 220)
    rgb += np.random.default_rng(0).integers(0, 30, (h, w, 3), dtype=np.uint8)
    rgb[:6, :6] = (255, 0, 0)
    return rgb


def ten_bit_source() -> np.ndarray:
    """The 16-bit RGB that TEN_BIT_AVIF was encoded from: ramps and a red corner."""
    rgb = np.zeros((12, 16, 3), np.uint16)
    rgb[..., 0] = np.linspace(0, 65535, 16)[None, :]
    rgb[..., 1] = np.linspace(0, 65535, 12)[:, None]
    rgb[..., 2] = 30000
    rgb[:4, :4] = (65535, 0, 0)
    return rgb


def save(tmp_path: Path, name: str, image: Image.Image, **params) -> Path:
    path = tmp_path / name
    image.save(path, **(HEIF if name.endswith((".heic", ".heif")) else AVIF), **params)
    return path


def decode(path, *, max_pixels: int = BIG_LIMIT):
    return decode_image(path, input_size=SIZE, max_pixels=max_pixels)


def assert_close(actual: np.ndarray, expected: np.ndarray, tolerance: int) -> None:
    assert actual.shape == expected.shape, (actual.shape, expected.shape)
    assert np.abs(actual.astype(int) - expected.astype(int)).max() <= tolerance


SUFFIXES = pytest.mark.parametrize(("suffix", "fmt"), [("heic", "HEIF"), ("heif", "HEIF"), ("avif", "AVIF")])


@SUFFIXES
def test_heic_heif_and_avif_decode(tmp_path, suffix, fmt):
    rgb = pattern()
    decoded = decode(save(tmp_path, f"photo.{suffix}", Image.fromarray(rgb)))
    assert decoded.format == fmt
    assert decoded.alpha is None and decoded.exif is None
    assert_close(decoded.rgb, rgb, 3)
    assert decoded.model_input.shape == (SIZE, SIZE, 3)


@SUFFIXES
def test_heic_and_avif_alpha_is_kept(tmp_path, suffix, fmt):
    rgb = pattern()
    alpha = np.full((H, W), 255, np.uint8)
    alpha[:, W // 2 :] = 0
    decoded = decode(save(tmp_path, f"cutout.{suffix}", Image.fromarray(np.dstack((rgb, alpha)))))
    assert decoded.alpha is not None
    assert_close(decoded.alpha, alpha, 2)
    assert_close(decoded.rgb[:, : W // 2], rgb[:, : W // 2], 3)


@SUFFIXES
def test_rotated_heic_and_avif_come_out_upright_once(tmp_path, suffix, fmt):
    # pillow-heif writes the orientation as the container's rotation (which libheif applies)
    # and Pillow's AVIF writer keeps it in EXIF: either way the photo must be turned once.
    rgb = pattern()
    exif = Image.Exif()
    exif[ExifTags.Base.Orientation] = 6
    exif[ExifTags.Base.Make] = "Acme"
    decoded = decode(save(tmp_path, f"turned.{suffix}", Image.fromarray(rgb), exif=exif.tobytes()))
    assert (decoded.width, decoded.height) == (H, W)
    assert_close(decoded.rgb, np.rot90(rgb, k=-1), 3)
    assert_close(decoded.rgb[0, -1], np.array([255, 0, 0]), 3)  # the top-left block is now top-right
    kept = Image.Exif()
    kept.load(decoded.exif)
    assert kept[ExifTags.Base.Orientation] == 1 and kept[ExifTags.Base.Make] == "Acme"


@SUFFIXES
def test_heic_and_avif_icc_profile_is_kept(tmp_path, suffix, fmt):
    profile = ImageCms.ImageCmsProfile(ImageCms.createProfile("sRGB")).tobytes()
    decoded = decode(save(tmp_path, f"icc.{suffix}", Image.fromarray(pattern()), icc_profile=profile))
    assert decoded.icc_profile == profile


def test_ten_bit_heic_becomes_8_bit(tmp_path):
    rgb = pattern()
    wide = pillow_heif.from_bytes(mode="RGB;16", size=(W, H), data=(rgb.astype(np.uint16) * 257).tobytes())
    path = tmp_path / "hdr.heic"
    wide.save(path, **HEIF)
    assert pillow_heif.open_heif(path, convert_hdr_to_8bit=False).info["bit_depth"] == 10
    decoded = decode(path)
    assert decoded.rgb.dtype == np.uint8
    assert_close(decoded.rgb, rgb, 2)


def test_ten_bit_avif_becomes_8_bit(tmp_path):
    path = tmp_path / "hdr.avif"
    path.write_bytes(TEN_BIT_AVIF)
    decoded = decode(path)
    assert decoded.format == "AVIF" and decoded.rgb.dtype == np.uint8
    assert_close(decoded.rgb, np.rint(ten_bit_source() / 257), 3)


def claiming_size(data: bytes, width: int, height: int) -> bytes:
    """The file with every `ispe` (image spatial extents) box claiming width x height."""
    out = bytearray(data)
    for found in re.finditer(b"ispe", data):
        # box type, then 4 bytes of version and flags, then width and height
        out[found.end() + 4 : found.end() + 12] = struct.pack(">II", width, height)
    return bytes(out)


@pytest.mark.parametrize("suffix", ["heic", "avif"])
def test_heic_and_avif_over_max_pixels_are_refused_before_decoding(tmp_path, suffix, monkeypatch):
    # 64x64 so the HEVC frame needs no clean-aperture crop: the ispe box is the image size.
    small = save(tmp_path, f"small.{suffix}", Image.new("RGB", (64, 64), (9, 9, 9)))
    bomb = tmp_path / f"bomb.{suffix}"
    bomb.write_bytes(claiming_size(small.read_bytes(), 12_000, 10_000))
    decoding = []
    for plugin in (pillow_heif.HeifImageFile, AvifImagePlugin.AvifImageFile):
        monkeypatch.setattr(plugin, "load", lambda self, *a: decoding.append(self))
    with pytest.raises(ImageError) as info:
        decode(bomb, max_pixels=100_000_000)
    assert str(info.value) == "image is 12000×10000 (120.0 MP), above input.max_pixels (100.0 MP)"
    assert decoding == []
    with pytest.raises(ImageError, match=r"64×64 .*input\.max_pixels"):
        decode(small, max_pixels=64 * 64 - 1)


@pytest.mark.parametrize(("suffix", "fmt"), [("heic", "HEIF"), ("avif", "AVIF")])
def test_heic_and_avif_cut_inside_the_header_say_so(tmp_path, suffix, fmt):
    data = save(tmp_path, f"full.{suffix}", Image.fromarray(pattern())).read_bytes()
    cut = tmp_path / f"cut.{suffix}"
    cut.write_bytes(data[:40])
    with pytest.raises(ImageError, match=f"^truncated or corrupt {fmt} file"):
        decode(cut)


def test_heif_and_avif_are_supported_formats():
    assert {"HEIF", "AVIF"} <= set(decode_module._openable_formats())


def test_phone_photos_through_the_daemon(inprocess, folders, tmp_path):
    # Issue 15: .heic and .avif went to errors/ as unsupported. Dropped into a running daemon
    # they come out as cut-outs, turned upright once, with the alpha the model gives.
    from tests.support.photos import check_output
    from tests.support.photos import pattern as boxes

    daemon = inprocess.start()
    rgb = boxes(64, 48, (0.1, 0.2, 0.6, 0.9))
    exif = Image.Exif()
    exif[ExifTags.Base.Orientation] = 6
    staging = tmp_path / "staging"
    staging.mkdir()
    names = ["phone.heic", "phone.avif", "turned.heic", "turned.avif"]
    for name in names:
        extra = {"exif": exif.tobytes()} if name.startswith("turned") else {}
        made = save(staging, name, Image.fromarray(rgb), **extra)
        made.rename(folders.inbox / name)
    records = daemon.wait_count(("file_done", "file_failed"), len(names))
    assert [r for r in records if r["event"] == "file_failed"] == []
    outputs = {Path(r["input"]).name: Path(r["output"]) for r in daemon.events("file_done")}
    for name in names:
        seen = decode(folders.done / name).rgb  # what the daemon decoded, checked above
        assert seen.shape[:2] == ((64, 48) if name.startswith("turned") else (48, 64))
        check_output(outputs[name], seen)
    assert daemon.stop() == 0
    assert daemon.crashes() == []
