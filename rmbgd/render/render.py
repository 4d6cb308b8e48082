"""From a decoded image and its predicted mask to the files written for it.

The order is chosen for cost and correctness: cropping and shrinking first (everything after
works on fewer pixels), then foreground refinement (it needs the final alpha), then the
background (compositing must see the refined colours), then the format's encoder. The mask
file is the result's own alpha, so it always lines up with the result pixel for pixel.
"""

from __future__ import annotations

from typing import Callable, List, Optional

import numpy as np

from rmbgd.render.compose import fit_within, over_background, subject_box
from rmbgd.config import FORMAT_SUFFIXES, MASK_NONE, MASK_ONLY, MASK_SUFFIX, OutputConfig
from rmbgd.render.encoders import encode_jpeg, encode_webp
from rmbgd.imaging.decode import DecodedImage
from rmbgd.imaging.pixels import combine_alpha
from rmbgd.render.png import encode_grey_png, encode_png
from rmbgd.output.files import OutputFile

__all__ = ["RenderError", "render"]

EMPTY_MASK = "no subject found (the mask is empty), so there is nothing to crop to"


class RenderError(Exception):
    """The input decoded and ran through the model, yet cannot give the asked-for result."""

    def __init__(self, stage: str, reason: str) -> None:
        super().__init__(reason)
        self.stage = stage


# estimate_foreground's shape: (rgb, alpha, *, device) -> refined rgb.
Refine = Callable[..., np.ndarray]


def render(
    image: DecodedImage,
    mask: np.ndarray,
    out: OutputConfig,
    *,
    device: str = "cpu",
    refine: Optional[Refine] = None,
) -> List[OutputFile]:
    """The files `out` asks for: the result, its mask, or both (result first).

    `refine` (rmbgd.model.refine.estimate_foreground) is handed in by whoever runs the model:
    it needs torch, which this layer never imports. Only `output.refine_foreground` needs it.
    """
    alpha = combine_alpha(mask, image.alpha)
    rgb = image.rgb
    if out.crop:
        box = subject_box(alpha, pixels=out.crop_padding.pixels, fraction=out.crop_padding.fraction)
        if box is None:
            raise RenderError("crop", EMPTY_MASK)
        left, top, right, bottom = box
        rgb, alpha = rgb[top:bottom, left:right], alpha[top:bottom, left:right]
    if out.max_size is not None:
        rgb, alpha = fit_within(rgb, alpha, out.max_size)
    files = []
    if out.mask != MASK_ONLY:
        if out.refine_foreground:
            rgb = _refined(rgb, alpha, device, refine)
        exif = image.exif if out.keep_exif else None
        data = _encode(rgb, alpha, out, image.icc_profile, exif)
        files.append(OutputFile(FORMAT_SUFFIXES[out.format], data))
    if out.mask != MASK_NONE:
        files.append(OutputFile(MASK_SUFFIX, encode_grey_png(alpha, compress_level=out.png_compress_level)))
    return files


def _refined(rgb: np.ndarray, alpha: np.ndarray, device: str, refine: Optional[Refine]) -> np.ndarray:
    if refine is None:
        raise TypeError("render: output.refine_foreground is on but no refine function was given")
    return refine(np.ascontiguousarray(rgb), np.ascontiguousarray(alpha), device=device)


def _encode(
    rgb: np.ndarray,
    alpha: np.ndarray,
    out: OutputConfig,
    icc_profile: Optional[bytes],
    exif: Optional[bytes],
) -> bytes:
    kept_alpha: Optional[np.ndarray] = alpha
    if out.background is not None:
        rgb = over_background(rgb, alpha, out.background)
        kept_alpha = None
    if out.format == "jpeg":
        return encode_jpeg(rgb, quality=out.jpeg_quality, icc_profile=icc_profile, exif=exif)
    if out.format == "webp":
        return encode_webp(
            rgb, kept_alpha, clean_transparent=out.clean_transparent, icc_profile=icc_profile, exif=exif
        )
    return encode_png(
        rgb,
        kept_alpha,
        compress_level=out.png_compress_level,
        clean_transparent=out.clean_transparent,
        icc_profile=icc_profile,
        exif=exif,
    )
