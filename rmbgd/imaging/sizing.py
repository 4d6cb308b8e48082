"""The size an image is run through the model at, for ``model.input_size: dynamic``.

Models trained on many resolutions (BiRefNet_dynamic) do best on each image near its own
size. The sides must be multiples of 32 (the model downsamples by 32), and a cap keeps a
50-megapixel photo from needing more GPU memory than a batch of ordinary ones.
Pillow and numpy only: this runs in the decode pool and never imports torch.
"""

from __future__ import annotations

import numpy as np
from PIL import Image

MULTIPLE = 32
# Below this the model's deepest feature map would be a single cell or less.
MIN_SIDE = 64


def dynamic_input_size(width: int, height: int, max_side: int) -> tuple[int, int]:
    """(width, height) for an image: scaled so its longer side is at most ``max_side``,
    then each side rounded to the nearest multiple of 32, at least 64.

    The aspect ratio is kept up to that rounding; ``max_side`` must itself be a multiple of 32.
    """
    if width < 1 or height < 1:
        raise ValueError(f"invalid image size {width}x{height}")
    if max_side < MIN_SIDE or max_side % MULTIPLE:
        raise ValueError(f"max_side must be a multiple of {MULTIPLE} of at least {MIN_SIDE}, got {max_side}")
    scale = min(1.0, max_side / max(width, height))

    def side(value: int) -> int:
        rounded = int(round(value * scale / MULTIPLE)) * MULTIPLE
        return min(max_side, max(MIN_SIDE, rounded))

    return side(width), side(height)


def resize_rgb(rgb: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """``rgb`` (H, W, 3) uint8 resized to ``size`` (width, height).

    The same call the decoder makes for fixed input sizes (bilinear, antialiased when
    shrinking, like torchvision's Resize on a PIL image), so both modes feed the model
    the same kind of pixels.
    """
    if tuple(size) == (rgb.shape[1], rgb.shape[0]):
        return rgb
    resized = Image.fromarray(rgb).resize(tuple(size), Image.Resampling.BILINEAR)
    return np.array(resized)
