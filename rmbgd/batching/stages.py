"""The pixel work the pipeline schedules but does not do itself.

The pipeline moves jobs between pools, the collector and the model thread; decoding,
sizing, rendering and telling a GPU out-of-memory error apart need numpy, Pillow and torch,
which this layer never imports (pyproject.toml's import contracts). Whoever starts a pipeline
hands them in: rmbgd.runtime.stages.image_stages().
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, List, Optional, Tuple, Type


@dataclass(frozen=True)
class Stages:
    # (path, *, input_size, max_pixels) -> a decoded image (rmbgd.imaging.decode.DecodedImage)
    decode: Callable[..., Any]
    # What `decode` raises for a file that is not a usable image: the file fails with its message.
    decode_error: Type[Exception]
    # (width, height, max_side) -> the (width, height) a dynamic-size model runs the image at.
    input_size: Callable[[int, int, int], Tuple[int, int]]
    # (rgb, (width, height)) -> rgb resized for the model.
    resize: Callable[[Any, Tuple[int, int]], Any]
    # (image, mask, output settings, *, device) -> the files to publish.
    render: Callable[..., List[Any]]
    # What `render` raises when a result cannot be made; its `stage` names the failed step.
    render_error: Type[Exception]
    # Whether a model error is the GPU running out of memory (split the batch, do not fail it).
    is_out_of_memory: Callable[[BaseException], bool]
    # (data, *, input_size, max_pixels) -> a decoded image, for images held in memory (HTTP);
    # raises `decode_error` as `decode` does.
    decode_data: Optional[Callable[..., Any]] = None
