"""Image decoding: a claimed file to upright 8-bit RGB, its alpha and the model's input.

Pillow + numpy: this module is imported by the CLI and the watcher, which must start
quickly, so it never imports torch. Modes, EXIF and Pillow's quirks have their own modules.
"""

from __future__ import annotations

import errno
import io
import os
import re
import stat
from dataclasses import dataclass
from functools import lru_cache
from typing import Any

import numpy as np
from PIL import Image, UnidentifiedImageError

from rmbgd.errors import describe
from rmbgd.imaging.exif import TRANSPOSE_FOR_ORIENTATION, exif_for_output, exif_orientation, read_exif
from rmbgd.imaging.modes import low_byte_tiles_of, rgb_icc_profile, split_colour_and_alpha, split_wide_colour
from rmbgd.imaging.pillow import PILLOW_ERRORS, ImageError, pillow_warnings_silenced

__all__ = ["SUPPORTED_FORMATS", "DecodedImage", "ImageError", "decode_bytes", "decode_image"]

# Formats `decode_image` accepts, as Pillow names them in `DecodedImage.format`. "MPO" (the
# multi-picture JPEG many cameras write) is listed because Pillow reports it, but Pillow
# opens it through the JPEG opener: it has no opener of its own and must not be passed to
# `Image.open(formats=...)`, which raises KeyError for it.
# "HEIF" (HEIC phone photos) comes from pillow-heif's plugin and "AVIF" from Pillow's own
# (Pillow >= 11.3), registered in `_openable_formats`.
SUPPORTED_FORMATS: tuple[str, ...] = ("JPEG", "MPO", "PNG", "WEBP", "BMP", "TIFF", "GIF", "AVIF", "HEIF")

_NOT_SUPPORTED = "not a supported image (expected JPEG, PNG, WebP, BMP, TIFF, GIF, HEIC/HEIF or AVIF)"


# Lets a file that Pillow cannot identify still get a precise reason when it starts like a
# supported format (a download cut off inside the header is the usual case).
_SIGNATURES: tuple[tuple[bytes, str], ...] = (
    (b"\xff\xd8\xff", "JPEG"),
    (b"\x89PNG\r\n\x1a\n", "PNG"),
    (b"GIF87a", "GIF"),
    (b"GIF89a", "GIF"),
    (b"II*\x00", "TIFF"),
    (b"MM\x00*", "TIFF"),
    (b"BM", "BMP"),
)
# ISO base media files (HEIF, AVIF) start with a box size, then "ftyp" and the major brand.
_FTYP_BRANDS = {b"avif": "AVIF", b"avis": "AVIF", b"heic": "HEIF", b"heix": "HEIF", b"mif1": "HEIF", b"msf1": "HEIF"}


@dataclass(frozen=True, eq=False)
class DecodedImage:
    """A decoded input: full-size pixels for the output and a model-sized copy (the decoder's
    (H, W, 3) uint8 array, or whatever the pipeline turned it into for the model; None once
    the model has run, or when the decoder was not asked for one).

    ``eq=False`` because comparing numpy arrays with ``==`` has no single truth value.
    ``icc_profile`` is the input's RGB ICC profile (None when absent or not applicable);
    pass it on to :func:`encode_png` so wide-gamut photos keep their colours.
    ``exif`` is the input's EXIF as a TIFF-structured blob (no ``Exif\\0\\0`` prefix), with
    Orientation set to 1 because ``rgb`` is already turned upright, and only descriptive
    first-IFD tags kept (the Exif and GPS sub-IFDs come whole); None when the input has none
    or it cannot be parsed. Ready for the ``exif`` argument of the encoders.
    """

    rgb: np.ndarray
    alpha: np.ndarray | None
    model_input: Any
    format: str
    icc_profile: bytes | None = None
    exif: bytes | None = None

    @property
    def width(self) -> int:
        return int(self.rgb.shape[1])

    @property
    def height(self) -> int:
        return int(self.rgb.shape[0])

    def __repr__(self) -> str:
        # The default repr would print pixel arrays into logs and tracebacks. The model input
        # may have become the model's tensor, or been dropped after inference.
        shape = getattr(self.model_input, "shape", None)
        model_input = "x".join(str(int(v)) for v in shape) if shape is not None else "none"
        return (
            f"DecodedImage(format={self.format!r}, size={self.width}x{self.height}, "
            f"alpha={self.alpha is not None}, model_input={model_input}, "
            f"icc_profile={self.icc_profile is not None}, exif={self.exif is not None})"
        )


def decode_image(path: str | os.PathLike, *, input_size: int | None, max_pixels: int) -> DecodedImage:
    """Decode ``path`` into oriented 8-bit RGB, its own alpha if any, and the model's input
    (``input_size`` squared; None when ``input_size`` is None: the caller makes its own).

    Raises :class:`ImageError` for anything that is not a usable image, including a file
    that cannot be read (the original OSError is kept as ``__cause__``). Safe to call from
    several threads at once; warnings raised inside Pillow are silenced meanwhile.
    """
    _check_arguments(input_size, max_pixels)
    with pillow_warnings_silenced():
        with _open_regular_file(path) as fp:
            with _identify(fp, max_pixels) as im:
                return _decode_opened(im, fp, input_size)


def decode_bytes(data: bytes, *, input_size: int | None, max_pixels: int) -> DecodedImage:
    """`decode_image` for an image held in memory (an HTTP request's body)."""
    _check_arguments(input_size, max_pixels)
    if not data:
        raise ImageError("empty image")
    with pillow_warnings_silenced():
        with io.BytesIO(data) as fp:
            with _identify(fp, max_pixels) as im:
                return _decode_opened(im, fp, input_size)


def _check_arguments(input_size: int | None, max_pixels: int) -> None:
    if input_size is not None and input_size < 1:
        raise ValueError(f"input_size must be positive, got {input_size}")
    if max_pixels < 1:
        raise ValueError(f"max_pixels must be positive, got {max_pixels}")


# --------------------------------------------------------------------------- decoding


def _open_regular_file(path: str | os.PathLike):
    """Open `path` for reading only if it is a regular file itself (never a link's target).

    The entry is looked at with lstat first, so a FIFO, socket or device node is never
    opened at all (that could block or have side effects); O_NOFOLLOW keeps a link swapped
    in after that look from being followed, and the descriptor's own fstat is what counts.
    """
    try:
        before = os.lstat(path)
    except FileNotFoundError as exc:
        raise ImageError("file not found (it may have been moved or deleted)") from exc
    except OSError as exc:
        raise ImageError(f"cannot read file: {exc.strerror or describe(exc, kind=False)}") from exc
    _require_regular(before.st_mode)
    try:
        # O_NONBLOCK: should a FIFO be swapped in after the lstat, opening it cannot hang
        # the decoder; it has no effect on regular files.
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_NOCTTY | os.O_CLOEXEC)
    except FileNotFoundError as exc:
        raise ImageError("file not found (it may have been moved or deleted)") from exc
    except OSError as exc:
        if exc.errno == errno.ELOOP:
            raise ImageError("symbolic link: never followed") from exc
        raise ImageError(f"cannot read file: {exc.strerror or describe(exc, kind=False)}") from exc
    try:
        info = os.fstat(fd)
        _require_regular(info.st_mode)
        if info.st_size == 0:
            raise ImageError("empty file")
        return os.fdopen(fd, "rb")
    except BaseException:
        os.close(fd)
        raise


def _require_regular(mode: int) -> None:
    if stat.S_ISREG(mode):
        return
    if stat.S_ISDIR(mode):
        raise ImageError("is a directory, not an image file")
    if stat.S_ISLNK(mode):
        raise ImageError("symbolic link: never followed")
    raise ImageError("not a regular file")


@lru_cache(maxsize=1)
def _openable_formats() -> tuple[str, ...]:
    # Image.init() registers every plugin, so the filter below sees what this Pillow
    # build can open; a format missing from the build is then simply not tried instead
    # of making Image.open raise KeyError.
    Image.init()
    _register_heif_opener()
    return tuple(name for name in SUPPORTED_FORMATS if name in Image.OPEN)


def _register_heif_opener() -> None:
    try:
        import pillow_heif
    except ImportError:  # pragma: no cover - a declared dependency; HEIC then goes to errors/
        return
    # Only the primary image is used: skip parsing thumbnails, depth maps and auxiliary images.
    # libheif applies the container's rotation (irot/imir) while decoding and pillow-heif
    # resets the EXIF orientation to 1, so no photo is turned twice.
    pillow_heif.register_heif_opener(thumbnails=False, depth_images=False, aux_images=False)
    if "AVIF" not in Image.OPEN and hasattr(pillow_heif, "register_avif_opener"):
        # Pillow < 11.3 has no AVIF plugin; pillow-heif < 1.0 brings one.
        pillow_heif.register_avif_opener(thumbnails=False, depth_images=False, aux_images=False)


def _identify(fp, max_pixels: int) -> Image.Image:
    try:
        im = Image.open(fp, formats=_openable_formats())
    except UnidentifiedImageError as exc:
        raise ImageError(_unidentified_reason(fp)) from exc
    except Image.DecompressionBombError as exc:
        raise ImageError(_pillow_bomb_reason(exc, max_pixels)) from exc
    except PILLOW_ERRORS as exc:
        raise ImageError(f"truncated or corrupt image: {describe(exc, kind=False)}") from exc

    width, height = im.size
    if width * height > max_pixels:
        im.close()
        raise ImageError(
            f"image is {width}×{height} ({width * height / 1e6:.1f} MP), "
            f"above input.max_pixels ({max_pixels / 1e6:.1f} MP)"
        )
    if width == 0 or height == 0:
        im.close()
        raise ImageError(f"image has no pixels ({width}×{height})")
    return im


def _unidentified_reason(fp) -> str:
    try:
        fp.seek(0)
        head = fp.read(16)
    except OSError:
        return _NOT_SUPPORTED
    for signature, name in _SIGNATURES:
        if head.startswith(signature):
            return f"truncated or corrupt {name} file: its header cannot be read"
    if head[:4] == b"RIFF" and head[8:12] == b"WEBP":
        return "truncated or corrupt WebP file: its header cannot be read"
    if head[4:8] == b"ftyp" and head[8:12] in _FTYP_BRANDS:
        return f"truncated or corrupt {_FTYP_BRANDS[head[8:12]]} file: its header cannot be read"
    return _NOT_SUPPORTED


def _pillow_bomb_reason(exc: Image.DecompressionBombError, max_pixels: int) -> str:
    # Image.open applies Pillow's own (global) limit before we see the size, so all we
    # know is the pixel count in its message.
    found = re.search(r"\((\d+) pixels\)", str(exc))
    size = f"image is {int(found.group(1)) / 1e6:.1f} MP" if found else "image is too large"
    pillow_limit = 2 * (Image.MAX_IMAGE_PIXELS or 0)
    if pillow_limit and max_pixels > pillow_limit:
        return (
            f"{size}, above Pillow's decompression-bomb limit ({pillow_limit / 1e6:.1f} MP), "
            f"which is lower than input.max_pixels ({max_pixels / 1e6:.1f} MP)"
        )
    return f"{size}, above input.max_pixels ({max_pixels / 1e6:.1f} MP)"


def _decode_opened(im: Image.Image, fp, input_size: int | None) -> DecodedImage:
    # Taken before load(), which empties the tile list.
    low_byte_tiles = low_byte_tiles_of(im)
    try:
        im.load()
    except PILLOW_ERRORS as exc:
        raise ImageError(f"truncated or corrupt image: {describe(exc, kind=False)}") from exc

    source_format = im.format or "unknown"
    exif = read_exif(im)
    transpose = TRANSPOSE_FOR_ORIENTATION.get(exif_orientation(exif))
    icc_profile = rgb_icc_profile(im)

    split = None
    if low_byte_tiles is not None:
        split = split_wide_colour(im, fp, low_byte_tiles)
    rgb_image, alpha_image = split or split_colour_and_alpha(im)
    if transpose is not None:
        rgb_image = rgb_image.transpose(transpose)
        if alpha_image is not None:
            alpha_image = alpha_image.transpose(transpose)

    # Same call torchvision's Resize makes on a PIL image: bilinear, antialiased when
    # shrinking, so the model sees what it was trained on.
    model_image = None if input_size is None else rgb_image.resize((input_size, input_size), Image.Resampling.BILINEAR)

    # np.array (not asarray) so the arrays are writable: Pillow's buffers are immutable
    # bytes, and e.g. torch.from_numpy warns on read-only arrays.
    return DecodedImage(
        rgb=np.array(rgb_image),
        alpha=None if alpha_image is None else np.array(alpha_image),
        model_input=None if model_image is None else np.array(model_image),
        format=source_format,
        icc_profile=icc_profile,
        exif=exif_for_output(exif),
    )


# --------------------------------------------------------------------------- encoding
