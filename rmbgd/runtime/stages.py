"""The pipeline's pixel stages, as the daemon and `rmbgd process` run them."""

from __future__ import annotations

import functools
from typing import Any

from rmbgd.batching.stages import Stages
from rmbgd.imaging.decode import ImageError, decode_bytes, decode_image
from rmbgd.imaging.sizing import dynamic_input_size, resize_rgb
from rmbgd.render.render import RenderError, render


def _refine(rgb: Any, alpha: Any, *, device: str = "cpu") -> Any:
    # Imported on first use: it needs torch, which the model has loaded by then.
    from rmbgd.model.refine import estimate_foreground

    return estimate_foreground(rgb, alpha, device=device)


def _is_out_of_memory(exc: BaseException) -> bool:
    # Imported here: torch is loaded by then (the model raised this).
    from rmbgd.model.device import is_out_of_memory

    return is_out_of_memory(exc)


def image_stages() -> Stages:
    return Stages(
        decode=decode_image,
        decode_error=ImageError,
        input_size=dynamic_input_size,
        resize=resize_rgb,
        render=functools.partial(render, refine=_refine),
        render_error=RenderError,
        is_out_of_memory=_is_out_of_memory,
        decode_data=decode_bytes,
    )
