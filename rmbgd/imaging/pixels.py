"""Pixel arrays: the uint8 checks every encoder makes, the model mask combined with the
input's own alpha, and RGBA rows ready to encode.
"""

from __future__ import annotations

import numpy as np

_RGB_MASK = np.uint32(0x00FFFFFF)


def combine_alpha(mask: np.ndarray, input_alpha: np.ndarray | None) -> np.ndarray:
    """Merge the predicted mask with the input's own alpha.

    Returns ``mask`` itself (uncopied, unless it was not C-contiguous) when ``input_alpha``
    is None; otherwise a new array holding ``round(mask * input_alpha / 255)``, so what
    was transparent in the input stays so.
    """
    mask = require_uint8(mask, "mask", ndim=2)
    if input_alpha is None:
        return mask
    input_alpha = require_uint8(input_alpha, "input_alpha", ndim=2)
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


def checked_pixels(rgb: np.ndarray, alpha: np.ndarray | None) -> tuple[np.ndarray, np.ndarray | None]:
    """``rgb`` (h, w, 3) and ``alpha`` (h, w) or None as C-contiguous uint8, or ValueError.

    Shared with rmbgd.render.encoders so every output format accepts and refuses the same input.
    """
    rgb = require_uint8(rgb, "rgb", ndim=3)
    if rgb.shape[2] != 3:
        raise ValueError(f"rgb must have 3 channels, got shape {rgb.shape}")
    height, width = rgb.shape[:2]
    if height == 0 or width == 0:
        raise ValueError(f"cannot encode an empty image ({width}x{height})")
    if alpha is None:
        return rgb, None
    alpha = require_uint8(alpha, "alpha", ndim=2)
    if alpha.shape != rgb.shape[:2]:
        raise ValueError(f"alpha shape {alpha.shape} differs from rgb size {rgb.shape[:2]}")
    return rgb, alpha


def check_uint8(array: np.ndarray, name: str, *, ndim: int) -> None:
    """Raise a readable error unless `array` is a uint8 numpy array with `ndim` dimensions."""
    if not isinstance(array, np.ndarray):
        raise TypeError(f"{name} must be a numpy array, got {type(array).__name__}")
    if array.dtype != np.uint8:
        raise ValueError(f"{name} must be uint8, got {array.dtype}")
    if array.ndim != ndim:
        raise ValueError(f"{name} must have {ndim} dimensions, got shape {array.shape}")


def require_uint8(array: np.ndarray, name: str, *, ndim: int) -> np.ndarray:
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
