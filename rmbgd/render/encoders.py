"""WebP and JPEG encoders for results (PNG lives in rmbgd.render.png, written by hand for speed).

Pillow + numpy only, never torch. Both take the same pixel arrays as
:func:`rmbgd.render.png.encode_png` and embed the input's ICC profile and EXIF when given.
"""

from __future__ import annotations

import io
import numbers

import numpy as np
from PIL import Image

from rmbgd.imaging.exif import EXIF_PREFIX, tiff_exif
from rmbgd.imaging.pixels import checked_pixels, rgba_rows

__all__ = ["encode_jpeg", "encode_webp"]

# Lossless WebP effort. method 0 / quality 0 is libwebp's fastest lossless setting. Measured
# with Pillow 13 / libwebp 1.6 on one core of an AMD EPYC, photo-like RGBA with a soft mask
# (bench/_support.photo), CPU time per encode:
#   1.5 MP: method 0 ~35-60 ms, 0.60 MB; method 1 ~240 ms, 0.44 MB; method 6 ~430 ms, 0.39 MB
#   12 MP:  method 0 ~350-450 ms, 4.98 MB; method 1-2 ~1.7 s, 2.95 MB
# (rmbgd's own PNG: ~10 ms / 0.72 MB and ~85 ms / 4.56 MB.) Method 1 and up shrink files by
# a third but cost 4x more, which would make the encoder, not the model, the bottleneck on
# large photos. quality (effort within a method) barely changed time or size at method 0.
_WEBP_METHOD = 0
_WEBP_QUALITY = 0
_WEBP_MAX_SIDE = 16383  # the format's limit (14-bit dimensions)

# Chroma subsampling. At quality >= 90 colour is kept at full resolution (4:4:4): cut-outs put
# saturated subject edges right against a flat background, where 4:2:0 smears colour across
# the edge into a visible fringe. Below 90 the caller asked for small files, and 4:2:0 is the
# larger saving for the loss (12 MP at quality 90: 4:4:4 ~53 ms / 1.12 MB, 4:2:0 ~31 ms /
# 0.95 MB). optimize=True (optimal Huffman tables) saved 10-15% of the size but more than
# doubled the encode time (4:4:4 at 12 MP: 53 -> 129 ms), so it stays off.
_JPEG_FULL_CHROMA_FROM_QUALITY = 90
_SUBSAMPLING_444 = 0
_SUBSAMPLING_420 = 2
_JPEG_MAX_SIDE = 65535
# EXIF lives in one APP1 segment: 2 bytes of length plus at most 65533 of data, prefix included.
_JPEG_MAX_EXIF_BYTES = 65533


def encode_webp(
    rgb: np.ndarray,
    alpha: np.ndarray | None,
    *,
    clean_transparent: bool = True,
    icc_profile: bytes | None = None,
    exif: bytes | None = None,
) -> bytes:
    """Lossless WebP from ``rgb`` (h, w, 3) and ``alpha`` (h, w), or without alpha when None.

    Decodes back to exactly ``rgb`` wherever alpha > 0 and exactly ``alpha``. With
    ``clean_transparent`` libwebp may rewrite the colour of fully transparent pixels (it
    zeroes them, which compresses best); without it they are kept exactly, which on a photo
    whose background is still under the mask took twice the time and 2-3x the size.
    ``exif`` is a TIFF-structured blob, with or without the ``Exif\\0\\0`` prefix.
    """
    rgb, alpha = checked_pixels(rgb, alpha)
    height, width = rgb.shape[:2]
    if max(height, width) > _WEBP_MAX_SIDE:
        raise ValueError(f"WebP cannot hold {width}x{height}: each side must be at most {_WEBP_MAX_SIDE}")
    if alpha is None:
        image = Image.fromarray(rgb)
    else:
        # rmbgd's own interleave is several times faster than Pillow's putalpha/merge.
        image = Image.frombuffer("RGBA", (width, height), rgba_rows(rgb, alpha, False), "raw", "RGBA", 0, 1)
    options: dict = {
        "lossless": True,
        "method": _WEBP_METHOD,
        "quality": _WEBP_QUALITY,
        "exact": not clean_transparent,
    }
    if icc_profile:
        options["icc_profile"] = icc_profile
    exif = tiff_exif(exif)
    if exif:
        options["exif"] = exif  # WebP's EXIF chunk holds the bare TIFF structure
    return _saved(image, "WEBP", options)


def encode_jpeg(
    rgb: np.ndarray,
    *,
    quality: int = 90,
    icc_profile: bytes | None = None,
    exif: bytes | None = None,
) -> bytes:
    """Baseline JPEG from ``rgb`` (h, w, 3); JPEG has no alpha, so composite first.

    ``quality`` is libjpeg's 1-100 scale. ``exif`` is a TIFF-structured blob, with or
    without the ``Exif\\0\\0`` prefix; one too large for JPEG's single APP1 segment
    (over ~64 KB) is left out rather than failing the image.
    """
    rgb, _ = checked_pixels(rgb, None)
    if isinstance(quality, bool) or not isinstance(quality, numbers.Integral) or not 1 <= quality <= 100:
        raise ValueError(f"quality must be an integer from 1 to 100, got {quality!r}")
    height, width = rgb.shape[:2]
    if max(height, width) > _JPEG_MAX_SIDE:
        raise ValueError(f"JPEG cannot hold {width}x{height}: each side must be at most {_JPEG_MAX_SIDE}")
    subsampling = _SUBSAMPLING_444 if quality >= _JPEG_FULL_CHROMA_FROM_QUALITY else _SUBSAMPLING_420
    options: dict = {"quality": int(quality), "subsampling": subsampling, "optimize": False}
    if icc_profile:
        options["icc_profile"] = icc_profile
    exif = tiff_exif(exif)
    if exif and len(EXIF_PREFIX) + len(exif) <= _JPEG_MAX_EXIF_BYTES:
        # Pillow writes the APP1 payload as given, and JPEG readers expect the prefix.
        options["exif"] = EXIF_PREFIX + exif
    return _saved(Image.fromarray(rgb), "JPEG", options)


def _saved(image: Image.Image, format: str, options: dict) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=format, **options)
    return buffer.getvalue()
