"""Pillow's image modes turned into 8-bit RGB and alpha: palette, grey, 16-bit and float
inputs, with 16-bit samples rounded rather than truncated.
"""

from __future__ import annotations

import sys

import numpy as np
from PIL import Image

from rmbgd.imaging.pillow import PILLOW_ERRORS, ImageError

# Pillow reads 16-bit RGB(A) PNGs and TIFFs into 8-bit modes by keeping each sample's high
# byte (truncation). Decoding the same tiles a second time with the opposite byte order
# makes the same unpacker pick each sample's low byte instead, and both bytes together give
# the properly rounded 8-bit value. Only these raw modes are swapped: for them the swap
# provably reads the other byte of every sample; any other wide raw mode (premultiplied
# "RGBa", "LA", planar TIFFs, CMYK) keeps Pillow's truncation, at most one level off.
_NATIVE_16 = "L" if sys.byteorder == "little" else "B"

_WIDE_GREY_MODES = frozenset({"I;16", "I;16L", "I;16B", "I;16N", "I"})
_OTHER_BYTE_RAWMODES = {
    f"{bands};16{order}": f"{bands};16{other}"
    for bands in ("RGB", "RGBA", "RGBX")
    for order, other in (("B", "L"), ("L", "B"), ("N", "B" if _NATIVE_16 == "L" else "L"))
}


# Only for these source modes does an embedded RGB ICC profile still describe the RGB
# values we hand out; after CMYK or grey conversion it would be wrong.
_RGB_FAMILY_MODES = frozenset({"RGB", "RGBA", "RGBX", "RGBa", "P", "PA", "YCbCr"})


def rgb_icc_profile(im: Image.Image) -> bytes | None:
    profile = im.info.get("icc_profile")
    if not isinstance(profile, bytes) or len(profile) < 128 or im.mode not in _RGB_FAMILY_MODES:
        return None
    # Bytes 16-19 of an ICC header name the colour space the profile applies to.
    return profile if profile[16:20] == b"RGB " else None


def split_colour_and_alpha(im: Image.Image) -> tuple[Image.Image, Image.Image | None]:
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


def low_byte_tiles_of(im: Image.Image) -> list | None:
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


def split_wide_colour(im: Image.Image, fp, low_byte_tiles: list) -> tuple[Image.Image, Image.Image | None] | None:
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
    except PILLOW_ERRORS:
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
