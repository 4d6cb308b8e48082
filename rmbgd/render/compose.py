"""Geometry and compositing on uint8 pixel arrays: crop box, downscale, flat background.

numpy + Pillow only (no torch): the output side calls these between the model's mask and
the encoders.
"""

from __future__ import annotations

import numbers

import numpy as np
from PIL import Image

from rmbgd.imaging.pixels import check_uint8

__all__ = ["SUBJECT_THRESHOLD", "fit_within", "over_background", "subject_box"]

# Alpha at or above which a pixel counts as subject when cropping. Predicted masks often carry
# a faint haze of low alpha over the background (shadows, reflections, upsampling noise); at
# a threshold of 1 one stray speck would stretch the crop to the whole photo. At 12 (~5%
# opacity) a pixel moves even a black-on-white edge by only 12 levels, so what is cut away
# is at most faintly visible, while hair and soft edges that clearly show stay inside; the
# crop padding then takes in the rest of their fall-off.
SUBJECT_THRESHOLD = 12

# Antialiased downscale. reducing_gap=3.0 first shrinks by a whole factor with a box filter
# when the scale is 1/6 or less, then finishes with Lanczos; Pillow documents 3.0 as
# indistinguishable from plain Lanczos in most cases, and it is several times faster for
# thumbnails of large photos (12 MP to 400 px: ~40 ms instead of ~150 ms here).
_RESAMPLE = Image.Resampling.LANCZOS
_REDUCING_GAP = 3.0


def subject_box(
    alpha: np.ndarray,
    *,
    pixels: int = 0,
    fraction: float = 0.0,
    threshold: int = SUBJECT_THRESHOLD,
) -> tuple[int, int, int, int] | None:
    """(left, top, right, bottom), right/bottom exclusive, of pixels with alpha >= threshold,
    grown by `pixels` on every side plus `fraction` of the box's own width (left/right) and
    height (top/bottom), clipped to the image. None when no pixel reaches the threshold.

    The fractional padding is rounded half up to whole pixels.
    """
    check_uint8(alpha, "alpha", ndim=2)
    if isinstance(pixels, bool) or not isinstance(pixels, numbers.Integral) or pixels < 0:
        raise ValueError(f"pixels must be a non-negative integer, got {pixels!r}")
    if isinstance(fraction, bool) or not isinstance(fraction, numbers.Real) or not 0.0 <= fraction < float("inf"):
        raise ValueError(f"fraction must be a finite number >= 0, got {fraction!r}")
    if isinstance(threshold, bool) or not isinstance(threshold, numbers.Integral) or not 1 <= threshold <= 255:
        raise ValueError(f"threshold must be an integer from 1 to 255, got {threshold!r}")
    height, width = alpha.shape
    if height == 0 or width == 0:
        return None

    # Per-row and per-column maxima: two vectorised reductions over the uint8 data, with no
    # 12 MP boolean temporary and no coordinate list (argwhere would build one per pixel).
    rows = np.flatnonzero(alpha.max(axis=1) >= threshold)
    if rows.size == 0:
        return None
    columns = np.flatnonzero(alpha.max(axis=0) >= threshold)
    top, bottom = int(rows[0]), int(rows[-1]) + 1
    left, right = int(columns[0]), int(columns[-1]) + 1

    pad_x = int(pixels) + _round_half_up(fraction * (right - left))
    pad_y = int(pixels) + _round_half_up(fraction * (bottom - top))
    return (max(0, left - pad_x), max(0, top - pad_y), min(width, right + pad_x), min(height, bottom + pad_y))


def fit_within(
    rgb: np.ndarray, alpha: np.ndarray | None, max_size: int
) -> tuple[np.ndarray, np.ndarray | None]:
    """Scale down so the longest side is at most max_size (aspect kept, sides >= 1); never
    upscale; returns the inputs themselves when already small enough.

    Colour and alpha are resized apart with the same antialiasing filter, not premultiplied:
    ``rgb`` is the photo itself (its background still in place), so the result is exactly a
    smaller photo with a smaller mask, and colours under transparent pixels survive for
    outputs that keep them.
    """
    _check_rgb_alpha(rgb, alpha)
    if isinstance(max_size, bool) or not isinstance(max_size, numbers.Integral) or max_size < 1:
        raise ValueError(f"max_size must be a positive integer, got {max_size!r}")
    height, width = rgb.shape[:2]
    longest = max(height, width)
    if longest <= max_size:
        return rgb, alpha
    scale = max_size / longest
    size = (max(1, min(max_size, round(width * scale))), max(1, min(max_size, round(height * scale))))
    # np.array, not asarray: Pillow's buffers are read-only, and later stages (foreground
    # refinement through torch.from_numpy) want writable arrays.
    small_rgb = np.array(_resized(rgb, size))
    small_alpha = None if alpha is None else np.array(_resized(alpha, size))
    return small_rgb, small_alpha


def over_background(rgb: np.ndarray, alpha: np.ndarray, colour: tuple[int, int, int]) -> np.ndarray:
    """Composite over a flat colour: round((rgb*a + colour*(255-a)) / 255) exactly, in integer
    arithmetic, (h, w, 3) uint8."""
    _check_rgb_alpha(rgb, alpha)
    if alpha is None:
        raise ValueError("alpha is required to composite over a background")
    if (
        not isinstance(colour, (tuple, list))
        or len(colour) != 3
        or not all(isinstance(v, numbers.Integral) and not isinstance(v, bool) and 0 <= v <= 255 for v in colour)
    ):
        raise ValueError(f"colour must be three integers from 0 to 255, got {colour!r}")

    # rgb*a + c*(255-a) = (rgb - c)*a + 255*c: computed in uint16, where the subtraction may
    # wrap around, but the final sum is exact modulo 2**16 and lies in 0..65025, so it comes
    # out right. Channel by channel, because numpy broadcasting over a trailing axis of 3
    # runs 3-element inner loops and was twice as slow at 12 MP.
    out = rgb.astype(np.uint16)
    for channel, value in enumerate(colour):
        plane = out[..., channel]
        plane -= np.uint16(value)
        plane *= alpha
        plane += np.uint16(255 * value + 128)
    # Exact round(x / 255) given x + 128, as in rmbgd.imaging.pixels.combine_alpha; the largest
    # intermediate is 65025 + 128 + 254 < 2**16.
    out += out >> 8
    out >>= 8
    return out.astype(np.uint8)


def _round_half_up(value: float) -> int:
    return int(value + 0.5)


def _resized(array: np.ndarray, size: tuple[int, int]) -> Image.Image:
    return Image.fromarray(np.ascontiguousarray(array)).resize(size, _RESAMPLE, reducing_gap=_REDUCING_GAP)


def _check_rgb_alpha(rgb: np.ndarray, alpha: np.ndarray | None) -> None:
    check_uint8(rgb, "rgb", ndim=3)
    if rgb.shape[2] != 3:
        raise ValueError(f"rgb must have 3 channels, got shape {rgb.shape}")
    if rgb.shape[0] == 0 or rgb.shape[1] == 0:
        raise ValueError(f"rgb has no pixels (shape {rgb.shape})")
    if alpha is not None:
        check_uint8(alpha, "alpha", ndim=2)
        if alpha.shape != rgb.shape[:2]:
            raise ValueError(f"alpha shape {alpha.shape} differs from rgb size {rgb.shape[:2]}")

