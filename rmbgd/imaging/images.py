"""Image decoding for the model and PNG encoding (RGBA, RGB, grey) for the results.

Pillow + numpy (and ISA-L's deflate when installed): this module is imported by the CLI and
the watcher, which must start quickly, so it never imports torch.
"""

from __future__ import annotations

import errno
import os
import re
import stat
import struct
import sys
import threading
import warnings
import zlib
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from functools import lru_cache
from typing import Any

import numpy as np
from PIL import ExifTags, Image, UnidentifiedImageError

try:
    # ISA-L's deflate is about 4x faster than zlib's at level 1 for files of about the same
    # size (bench/RESULTS.md); without the wheel, stdlib zlib writes the very same PNG format.
    from isal import isal_zlib as _isal_zlib
except ImportError:  # pragma: no cover - depends on the platform's wheels
    _isal_zlib = None

__all__ = [
    "SUPPORTED_FORMATS",
    "DecodedImage",
    "ImageError",
    "check_uint8",
    "combine_alpha",
    "decode_image",
    "encode_grey_png",
    "encode_png",
]

# Formats `decode_image` accepts, as Pillow names them in `DecodedImage.format`. "MPO" (the
# multi-picture JPEG many cameras write) is listed because Pillow reports it, but Pillow
# opens it through the JPEG opener: it has no opener of its own and must not be passed to
# `Image.open(formats=...)`, which raises KeyError for it.
# "HEIF" (HEIC phone photos) comes from pillow-heif's plugin and "AVIF" from Pillow's own
# (Pillow >= 11.3), registered in `_openable_formats`.
SUPPORTED_FORMATS: tuple[str, ...] = ("JPEG", "MPO", "PNG", "WEBP", "BMP", "TIFF", "GIF", "AVIF", "HEIF")

_NOT_SUPPORTED = "not a supported image (expected JPEG, PNG, WebP, BMP, TIFF, GIF, HEIC/HEIF or AVIF)"

# What Pillow's parsers and decoders raise on hostile or damaged input. TypeError is left
# out on purpose: here it would more likely be a bug of ours than a bad file.
_PILLOW_ERRORS: tuple[type[BaseException], ...] = (
    OSError,
    SyntaxError,
    ValueError,
    EOFError,
    IndexError,
    KeyError,
    ZeroDivisionError,
    struct.error,
    zlib.error,
    Image.DecompressionBombError,
)

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

_EXIF_ORIENTATION = 0x0112
EXIF_PREFIX = b"Exif\x00\x00"
_TIFF_HEADERS = (b"II*\x00", b"MM\x00*")
# First-IFD tags worth carrying into an output: who took the photo, when, with what, and the
# pointers to the Exif and GPS sub-IFDs (kept whole). Everything else there is dropped: in a
# TIFF input the first IFD also describes the file's own pixel layout (strip offsets, sample
# formats, colour maps, embedded XMP/ICC/Photoshop blocks with thumbnails), which would be
# false in the output; an allowlist keeps unknown private blobs out too. Resolution tags go
# as well: they would give a cropped or shrunk result its source's print size. The
# thumbnail (IFD1) is not carried either (Exif.tobytes never writes it): it would still
# show the removed background.
_EXIF_KEPT_TAGS = frozenset(
    {
        ExifTags.Base.ImageDescription,
        ExifTags.Base.Make,
        ExifTags.Base.Model,
        _EXIF_ORIENTATION,
        ExifTags.Base.Software,
        ExifTags.Base.DateTime,
        ExifTags.Base.Artist,
        ExifTags.Base.HostComputer,
        ExifTags.Base.Copyright,
        ExifTags.Base.Rating,
        ExifTags.Base.RatingPercent,
        ExifTags.Base.XPTitle,
        ExifTags.Base.XPComment,
        ExifTags.Base.XPAuthor,
        ExifTags.Base.XPKeywords,
        ExifTags.Base.XPSubject,
        ExifTags.IFD.Exif,
        ExifTags.IFD.GPSInfo,
    }
)
_TRANSPOSE_FOR_ORIENTATION = {
    2: Image.Transpose.FLIP_LEFT_RIGHT,
    3: Image.Transpose.ROTATE_180,
    4: Image.Transpose.FLIP_TOP_BOTTOM,
    5: Image.Transpose.TRANSPOSE,
    6: Image.Transpose.ROTATE_270,
    7: Image.Transpose.TRANSVERSE,
    8: Image.Transpose.ROTATE_90,
}

_WIDE_GREY_MODES = frozenset({"I;16", "I;16L", "I;16B", "I;16N", "I"})
# Pillow reads 16-bit RGB(A) PNGs and TIFFs into 8-bit modes by keeping each sample's high
# byte (truncation). Decoding the same tiles a second time with the opposite byte order
# makes the same unpacker pick each sample's low byte instead, and both bytes together give
# the properly rounded 8-bit value. Only these raw modes are swapped: for them the swap
# provably reads the other byte of every sample; any other wide raw mode (premultiplied
# "RGBa", "LA", planar TIFFs, CMYK) keeps Pillow's truncation, at most one level off.
_NATIVE_16 = "L" if sys.byteorder == "little" else "B"
_OTHER_BYTE_RAWMODES = {
    f"{bands};16{order}": f"{bands};16{other}"
    for bands in ("RGB", "RGBA", "RGBX")
    for order, other in (("B", "L"), ("L", "B"), ("N", "B" if _NATIVE_16 == "L" else "L"))
}
# Only for these source modes does an embedded RGB ICC profile still describe the RGB
# values we hand out; after CMYK or grey conversion it would be wrong.
_RGB_FAMILY_MODES = frozenset({"RGB", "RGBA", "RGBX", "RGBa", "P", "PA", "YCbCr"})

_PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
_PNG_FILTER_UP = 2
_RGB_MASK = np.uint32(0x00FFFFFF)
# zlib level -> ISA-L level. Only the default, speed-first level 1 is swapped: ISA-L's level 2
# is as fast as its level 1 and within 1% of zlib 1's size, about 4x faster. Level 0 must
# stay "stored", and 2-9 ask for smaller files, which only zlib's slower matching gives.
_ISAL_LEVEL_FOR = {1: 2}
# PNG caps a chunk at 2**31 - 1 bytes; smaller IDAT chunks also keep each CRC pass short.
_IDAT_CHUNK_BYTES = 1 << 24


class ImageError(Exception):
    """A readable, one-line reason why this file is not a usable image (goes into the error sidecar)."""


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
    if input_size is not None and input_size < 1:
        raise ValueError(f"input_size must be positive, got {input_size}")
    if max_pixels < 1:
        raise ValueError(f"max_pixels must be positive, got {max_pixels}")

    with _pillow_warnings_silenced():
        with _open_regular_file(path) as fp:
            with _identify(fp, max_pixels) as im:
                return _decode_opened(im, fp, input_size)


def combine_alpha(mask: np.ndarray, input_alpha: np.ndarray | None) -> np.ndarray:
    """Merge the predicted mask with the input's own alpha.

    Returns ``mask`` itself (uncopied, unless it was not C-contiguous) when ``input_alpha``
    is None; otherwise a new array holding ``round(mask * input_alpha / 255)``, so what
    was transparent in the input stays so.
    """
    mask = _require_uint8(mask, "mask", ndim=2)
    if input_alpha is None:
        return mask
    input_alpha = _require_uint8(input_alpha, "input_alpha", ndim=2)
    if input_alpha.shape != mask.shape:
        raise ValueError(f"input_alpha shape {input_alpha.shape} differs from mask shape {mask.shape}")
    product = mask.astype(np.uint16)
    product *= input_alpha
    # Exact round(x / 255) for 0 <= x <= 255*255 without a division; the half-way case
    # cannot occur because 255 is odd. Every intermediate stays below 2**16.
    product += 128
    product += product >> 8
    product >>= 8
    return product.astype(np.uint8)


def encode_png(
    rgb: np.ndarray,
    alpha: np.ndarray | None,
    *,
    compress_level: int = 1,
    clean_transparent: bool = True,
    icc_profile: bytes | None = None,
    exif: bytes | None = None,
) -> bytes:
    """Encode an 8-bit PNG from ``rgb`` (h, w, 3) and ``alpha`` (h, w): RGBA, or RGB when
    ``alpha`` is None.

    ``clean_transparent`` zeroes RGB where alpha is 0: invisible, yet it roughly halves
    the encode time and shrinks files ~3x. The caller's arrays are never modified.
    ``icc_profile`` goes into an iCCP chunk and ``exif`` (a TIFF-structured EXIF blob, with
    or without the ``Exif\\0\\0`` prefix) into an eXIf chunk, both before the pixels.

    Written directly rather than through Pillow's PNG encoder: one "Up" filter for every
    row (a numpy subtraction) and one deflate call (ISA-L when installed, else zlib)
    measured several times faster than Pillow's per-row adaptive filtering at level 1, at
    a similar size. Any conforming decoder reads the result back to the exact same pixels.
    """
    rgb, alpha = checked_pixels(rgb, alpha)
    _check_compress_level(compress_level)
    exif = tiff_exif(exif)
    height, width = rgb.shape[:2]
    if alpha is None:
        rows = rgb.reshape(height, 3 * width)
        colour_type = 2
    else:
        rows = rgba_rows(rgb, alpha, clean_transparent)
        colour_type = 6
    scanlines = _up_filtered(rows)
    del rows  # the RGBA interleave is a full copy; free it before deflate allocates
    compressed = _deflate(scanlines, compress_level)
    del scanlines  # and the scanlines before the file is joined together
    return _png_file(width, height, colour_type, compressed, icc_profile, exif)


def encode_grey_png(grey: np.ndarray, *, compress_level: int = 1) -> bytes:
    """Encode an 8-bit greyscale PNG from ``grey`` (h, w), e.g. a mask, the same fast way."""
    grey = _require_uint8(grey, "grey", ndim=2)
    _check_compress_level(compress_level)
    height, width = grey.shape
    if height == 0 or width == 0:
        raise ValueError(f"cannot encode an empty image ({width}x{height})")
    return _png_file(width, height, 0, _deflate(_up_filtered(grey), compress_level), None, None)


# --------------------------------------------------------------------------- decoding


_silence_lock = threading.Lock()
_silence_users = 0
_silence_context: warnings.catch_warnings | None = None


@contextmanager
def _pillow_warnings_silenced() -> Iterator[None]:
    """Ignore warnings raised inside Pillow while any thread is decoding.

    Pillow warns about near-bomb sizes (we enforce our own limit), odd TIFF tags and the
    like; none of it may reach the daemon's output. ``warnings.catch_warnings`` swaps a
    process-wide filter list, so overlapping per-call uses from decoding threads would
    restore each other's state out of order and could leave a filter installed for good.
    One shared, reference-counted context avoids that, and the filter only matches
    warnings attributed to Pillow's own modules, so other threads' warnings still show.
    """
    global _silence_users, _silence_context
    with _silence_lock:
        if _silence_users == 0:
            context = warnings.catch_warnings()
            context.__enter__()
            warnings.filterwarnings("ignore", module=r"PIL(\.|$)")
            _silence_context = context
        _silence_users += 1
    try:
        yield
    finally:
        with _silence_lock:
            _silence_users -= 1
            if _silence_users == 0 and _silence_context is not None:
                _silence_context.__exit__(None, None, None)
                _silence_context = None


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
        raise ImageError(f"cannot read file: {exc.strerror or _one_line(exc)}") from exc
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
        raise ImageError(f"cannot read file: {exc.strerror or _one_line(exc)}") from exc
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
    except _PILLOW_ERRORS as exc:
        raise ImageError(f"truncated or corrupt image: {_one_line(exc)}") from exc

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
    low_byte_tiles = _low_byte_tiles(im)
    try:
        im.load()
    except _PILLOW_ERRORS as exc:
        raise ImageError(f"truncated or corrupt image: {_one_line(exc)}") from exc

    source_format = im.format or "unknown"
    exif = _read_exif(im)
    transpose = _TRANSPOSE_FOR_ORIENTATION.get(_exif_orientation(exif))
    icc_profile = _rgb_icc_profile(im)

    split = None
    if low_byte_tiles is not None:
        split = _split_wide_colour(im, fp, low_byte_tiles)
    rgb_image, alpha_image = split or _split_colour_and_alpha(im)
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
        exif=_exif_for_output(exif),
    )


def _read_exif(im: Image.Image) -> Image.Exif | None:
    # A photo with damaged EXIF is still a good photo; like most viewers, show it as
    # stored rather than reject it.
    try:
        return im.getexif()
    except _PILLOW_ERRORS:
        return None


def _exif_orientation(exif: Image.Exif | None) -> int:
    if not exif:
        return 1
    try:
        value = exif.get(_EXIF_ORIENTATION, 1)
    except _PILLOW_ERRORS:
        return 1
    return value if isinstance(value, int) else 1


def _exif_for_output(exif: Image.Exif | None) -> bytes | None:
    """The EXIF to embed in results, or None; edits ``exif`` in place (it is thrown away)."""
    if not exif:
        return None  # the common no-EXIF case costs one length check
    try:
        for tag in [tag for tag in exif if tag not in _EXIF_KEPT_TAGS]:
            del exif[tag]
        if all(tag == _EXIF_ORIENTATION for tag in exif):
            return None
        exif[_EXIF_ORIENTATION] = 1
        blob = exif.tobytes()
    except (*_PILLOW_ERRORS, TypeError):
        # Parsing is lazy, so damaged sub-IFDs and values Pillow cannot write back only
        # show up here (TypeError included: the TIFF writer raises it for odd value types).
        # The pixels are fine; the result simply goes without EXIF.
        return None
    blob = blob[len(EXIF_PREFIX) :] if blob.startswith(EXIF_PREFIX) else blob
    return blob if blob.startswith(_TIFF_HEADERS) else None


def _rgb_icc_profile(im: Image.Image) -> bytes | None:
    profile = im.info.get("icc_profile")
    if not isinstance(profile, bytes) or len(profile) < 128 or im.mode not in _RGB_FAMILY_MODES:
        return None
    # Bytes 16-19 of an ICC header name the colour space the profile applies to.
    return profile if profile[16:20] == b"RGB " else None


def _split_colour_and_alpha(im: Image.Image) -> tuple[Image.Image, Image.Image | None]:
    mode = im.mode
    if mode in _WIDE_GREY_MODES:
        return _wide_grey_to_rgb(im)
    if mode == "F":
        return _float_grey_to_rgb(im)
    try:
        if im.has_transparency_data:
            # RGBA covers every flavour: alpha bands, palette alpha, and tRNS colour keys
            # on P/L/RGB (converting those straight to RGB would drop or warn about them).
            rgba = im if mode == "RGBA" and "transparency" not in im.info else im.convert("RGBA")
            return rgba.convert("RGB"), rgba.getchannel("A")
        return (im if mode == "RGB" else im.convert("RGB")), None
    except ValueError as exc:
        raise ImageError(f"unsupported colour mode {mode}") from exc


def _wide_grey_to_rgb(im: Image.Image) -> tuple[Image.Image, Image.Image | None]:
    # Pillow's own convert("L") clips 16-bit values at 255 (nearly everything turns white).
    raw = np.asarray(im)
    wide = np.clip(raw, 0, 0xFFFF) if raw.dtype.kind == "i" else raw
    grey = _round_16_to_8((wide >> 8).astype(np.uint8), (wide & 0xFF).astype(np.uint8))
    alpha_image = None
    key = im.info.get("transparency")
    if isinstance(key, int) and not isinstance(key, bool):
        alpha_image = Image.fromarray(np.where(raw == key, 0, 255).astype(np.uint8))
    return Image.fromarray(grey).convert("RGB"), alpha_image


def _low_byte_tiles(im: Image.Image) -> list | None:
    """``im``'s tiles re-aimed at each 16-bit sample's low byte, or None when not wide RGB(A)."""
    if im.mode not in ("RGB", "RGBA") or not im.tile:
        return None
    swapped = []
    for tile in im.tile:
        args = tile[3]
        rawmode = args if isinstance(args, str) else args[0] if isinstance(args, tuple) and args else None
        other = _OTHER_BYTE_RAWMODES.get(rawmode) if isinstance(rawmode, str) else None
        if other is None:
            return None
        new_args = other if isinstance(args, str) else (other, *args[1:])
        # Pillow >= 11 uses a named tuple (and reads .offset from it); older ones plain tuples.
        swapped.append(tile._replace(args=new_args) if hasattr(tile, "_replace") else (*tile[:3], new_args))
    return swapped


def _split_wide_colour(im: Image.Image, fp, low_byte_tiles: list) -> tuple[Image.Image, Image.Image | None] | None:
    """Properly rounded colour and alpha of a 16-bit RGB(A) image, or None to fall back.

    ``im`` holds the high bytes (Pillow's truncation); a second decode of the same file
    with ``low_byte_tiles`` gives the low bytes. This doubles the decode time of these
    (rare) inputs only. It also honours a 16-bit tRNS colour key exactly, which Pillow
    compares against its truncated 8-bit pixels and so never matches.
    """
    high = np.asarray(im)
    low = _decode_low_bytes(fp, im, low_byte_tiles)
    if low is None or low.shape != high.shape:
        return None
    rounded = _round_16_to_8(high, low)
    if im.mode == "RGBA":
        return Image.fromarray(rounded[..., :3]), Image.fromarray(rounded[..., 3])
    alpha_image = None
    key = im.info.get("transparency")
    if isinstance(key, tuple) and len(key) == 3:
        wide = high.astype(np.uint16) << 8
        wide |= low
        keyed = np.all(wide == np.array(key, dtype=np.uint16), axis=2)
        alpha_image = Image.fromarray(np.where(keyed, 0, 255).astype(np.uint8))
    return Image.fromarray(rounded), alpha_image


def _decode_low_bytes(fp, im: Image.Image, low_byte_tiles: list) -> np.ndarray | None:
    try:
        fp.seek(0)
        with Image.open(fp, formats=(im.format,)) as other:
            if other.mode != im.mode or other.size != im.size:
                return None
            other.tile = low_byte_tiles
            other.load()
            return np.asarray(other)
    except _PILLOW_ERRORS:
        # The full decode already succeeded; failing here only costs the rounding, so the
        # image goes on with Pillow's truncated bytes instead of being rejected.
        return None


def _round_16_to_8(high: np.ndarray, low: np.ndarray) -> np.ndarray:
    """round(v * 255 / 65535) = round(v / 257) of each 16-bit value v = high * 256 + low.

    Since v = 257 * high + (low - high) and |low - high| <= 255, the result is ``high``
    moved by one where (low - high) / 257 rounds away from 0, i.e. where |low - high| > 128
    (257 is odd, so there is no tie). int16 work on 8-bit inputs: several times faster
    than dividing 32-bit values, and ``high`` cannot overflow (low - high > 128 needs
    high < 127, and < -128 needs high > 128).
    """
    diff = low.astype(np.int16)
    diff -= high
    rounded = high.copy()
    rounded += diff > 128
    rounded -= diff < -128
    return rounded


def _float_grey_to_rgb(im: Image.Image) -> tuple[Image.Image, None]:
    # Pillow treats "F" values on the same 0-255 scale as "L"; we round instead of
    # truncating and map NaN to black.
    raw = np.asarray(im, dtype=np.float32)
    grey = np.rint(np.clip(np.nan_to_num(raw, nan=0.0, posinf=255.0, neginf=0.0), 0.0, 255.0))
    return Image.fromarray(grey.astype(np.uint8)).convert("RGB"), None


def _one_line(exc: BaseException) -> str:
    text = " ".join(str(exc).split())
    return text or type(exc).__name__


# --------------------------------------------------------------------------- encoding


def checked_pixels(rgb: np.ndarray, alpha: np.ndarray | None) -> tuple[np.ndarray, np.ndarray | None]:
    """``rgb`` (h, w, 3) and ``alpha`` (h, w) or None as C-contiguous uint8, or ValueError.

    Shared with rmbgd.render.encoders so every output format accepts and refuses the same input.
    """
    rgb = _require_uint8(rgb, "rgb", ndim=3)
    if rgb.shape[2] != 3:
        raise ValueError(f"rgb must have 3 channels, got shape {rgb.shape}")
    height, width = rgb.shape[:2]
    if height == 0 or width == 0:
        raise ValueError(f"cannot encode an empty image ({width}x{height})")
    if alpha is None:
        return rgb, None
    alpha = _require_uint8(alpha, "alpha", ndim=2)
    if alpha.shape != rgb.shape[:2]:
        raise ValueError(f"alpha shape {alpha.shape} differs from rgb size {rgb.shape[:2]}")
    return rgb, alpha


def tiff_exif(exif: bytes | None) -> bytes | None:
    """The bare TIFF-structured EXIF blob that PNG's eXIf chunk and WebP's EXIF chunk hold.

    Also takes the blob with JPEG's ``Exif\\0\\0`` prefix, since that is what Pillow's own
    ``Exif.tobytes()`` returns. Empty means none.
    """
    if exif is None:
        return None
    if not isinstance(exif, (bytes, bytearray)):
        raise TypeError(f"exif must be bytes, got {type(exif).__name__}")
    exif = bytes(exif)
    if exif.startswith(EXIF_PREFIX):
        exif = exif[len(EXIF_PREFIX) :]
    if not exif:
        return None
    if not exif.startswith(_TIFF_HEADERS):
        raise ValueError("exif must be a TIFF-structured EXIF blob (starting with II*\\0 or MM\\0*)")
    return exif


def _check_compress_level(compress_level: int) -> None:
    if isinstance(compress_level, bool) or not isinstance(compress_level, int) or not 0 <= compress_level <= 9:
        raise ValueError(f"compress_level must be an integer from 0 to 9, got {compress_level!r}")


def check_uint8(array: np.ndarray, name: str, *, ndim: int) -> None:
    """Raise a readable error unless `array` is a uint8 numpy array with `ndim` dimensions."""
    if not isinstance(array, np.ndarray):
        raise TypeError(f"{name} must be a numpy array, got {type(array).__name__}")
    if array.dtype != np.uint8:
        raise ValueError(f"{name} must be uint8, got {array.dtype}")
    if array.ndim != ndim:
        raise ValueError(f"{name} must have {ndim} dimensions, got shape {array.shape}")


def _require_uint8(array: np.ndarray, name: str, *, ndim: int) -> np.ndarray:
    check_uint8(array, name, ndim=ndim)
    return np.ascontiguousarray(array)


def rgba_rows(rgb: np.ndarray, alpha: np.ndarray, clean_transparent: bool) -> np.ndarray:
    """Interleave C-contiguous ``rgb`` and ``alpha`` into (h, 4 * w) bytes of RGBA rows.

    Each pixel is read as one little-endian 32-bit word starting at its red byte (a view
    with a 3-byte stride, no copy), which holds R, G, B and the next pixel's red; masking
    the top byte and putting alpha there gives RGBA in one pass. This is about 4x faster
    than going through Pillow (fromarray, putalpha, tobytes) and 10x faster than numpy's
    strided 3-into-4 channel copies, mostly because it allocates and touches less memory.
    """
    height, width = alpha.shape
    count = height * width
    pixels = np.empty(count, dtype="<u4")
    # The last pixel's word would read one byte past the buffer, so it is done on its own.
    words = np.ndarray((count - 1,), dtype="<u4", buffer=rgb, strides=(3,))
    np.bitwise_and(words, _RGB_MASK, out=pixels[:-1])
    red, green, blue = (int(v) for v in rgb[-1, -1])
    pixels[-1] = red | green << 8 | blue << 16
    rows = pixels.view(np.uint8).reshape(height, 4 * width)
    rows[:, 3::4] = alpha
    if clean_transparent:
        # Zeroes whole pixels; their alpha byte is 0 already.
        np.multiply(pixels, (alpha != 0).reshape(-1), out=pixels, casting="unsafe")
    return rows


def _up_filtered(rows: np.ndarray) -> np.ndarray:
    """PNG scanlines for (h, row bytes) ``rows``: each row prefixed by filter type "Up"."""
    height, stride = rows.shape
    scanlines = np.empty((height, 1 + stride), dtype=np.uint8)
    scanlines[:, 0] = _PNG_FILTER_UP
    # "Up" against the implicit all-zero row above the first one is the row itself.
    scanlines[0, 1:] = rows[0]
    np.subtract(rows[1:], rows[:-1], out=scanlines[1:, 1:])
    return scanlines


def _png_file(
    width: int, height: int, colour_type: int, compressed: bytes, icc_profile: bytes | None, exif: bytes | None
) -> bytes:
    header = struct.pack(">IIBBBBB", width, height, 8, colour_type, 0, 0, 0)  # 8-bit, no interlace
    parts = [_PNG_SIGNATURE, _png_chunk(b"IHDR", header)]
    if icc_profile:
        parts.append(_png_chunk(b"iCCP", b"ICC profile\x00\x00" + zlib.compress(icc_profile)))
    if exif:
        parts.append(_png_chunk(b"eXIf", exif))
    view = memoryview(compressed)
    for start in range(0, len(view), _IDAT_CHUNK_BYTES):
        parts.append(_png_chunk(b"IDAT", view[start : start + _IDAT_CHUNK_BYTES]))
    parts.append(_png_chunk(b"IEND", b""))
    return b"".join(parts)


def _deflate(data: np.ndarray, level: int) -> bytes:
    isal_level = _ISAL_LEVEL_FOR.get(level)
    if isal_level is not None and _isal_zlib is not None:
        return _isal_zlib.compress(data, isal_level)
    return zlib.compress(data, level)


def _png_chunk(tag: bytes, data: bytes | memoryview) -> bytes:
    crc = zlib.crc32(data, zlib.crc32(tag))
    return b"".join((struct.pack(">I", len(data)), tag, data, struct.pack(">I", crc)))
