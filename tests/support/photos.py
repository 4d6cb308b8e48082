"""Synthetic photos whose correct mask is known, and checks of real outputs against it."""

from __future__ import annotations

from pathlib import Path
from typing import Tuple

import numpy as np
from PIL import Image

from tests.support.tinymodel import expected_alpha

RED = (230, 40, 20)     # the tiny model makes this opaque
BLUE = (10, 60, 200)    # and this transparent


def pattern(width: int, height: int, box: Tuple[float, float, float, float]) -> np.ndarray:
    """A BLUE image with a RED rectangle; box = (left, top, right, bottom) as fractions."""
    rgb = np.empty((height, width, 3), np.uint8)
    rgb[:] = BLUE
    l, t, r, b = box
    rgb[int(t * height) : int(b * height), int(l * width) : int(r * width)] = RED
    return rgb


def random_rgba(h: int = 30, w: int = 40, seed: int = 1) -> Tuple[np.ndarray, np.ndarray]:
    """Noise RGB and an alpha with about 30% fully transparent pixels: a hard case for encoders."""
    rng = np.random.default_rng(seed)
    rgb = rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
    alpha = rng.integers(0, 256, (h, w), dtype=np.uint8)
    alpha[rng.random((h, w)) < 0.3] = 0
    return rgb, alpha


def save(rgb: np.ndarray, path: Path, fmt: str = None, **kw) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(rgb).save(path, format=fmt, **kw)
    return path


def interior(mask: np.ndarray, margin: int) -> np.ndarray:
    """Pixels at least `margin` away from any change in `mask` (boundary blur is excluded)."""
    keep = np.ones(mask.shape, bool)
    h, w = mask.shape
    for dy in range(-margin, margin + 1, max(1, margin // 2)):
        for dx in range(-margin, margin + 1, max(1, margin // 2)):
            shifted = np.full(mask.shape, -1, np.int32)
            ys, yd = (slice(dy, h), slice(0, h - dy)) if dy >= 0 else (slice(0, h + dy), slice(-dy, h))
            xs, xd = (slice(dx, w), slice(0, w - dx)) if dx >= 0 else (slice(0, w + dx), slice(-dx, w))
            shifted[yd, xd] = mask[ys, xs]
            keep &= (shifted == mask) | (shifted == -1)
    return keep


def check_output(png: Path, source_rgb: np.ndarray, margin: int = 8, tolerance: int = 3) -> None:
    """The output is RGBA at the source's size, alpha = the model's known mask in region
    interiors, and RGB = the source wherever alpha > 0."""
    with Image.open(png) as im:
        assert im.format == "PNG"
        assert im.mode == "RGBA", im.mode
        out = np.asarray(im)
    assert out.shape[:2] == source_rgb.shape[:2], (out.shape, source_rgb.shape)
    want = expected_alpha(source_rgb).astype(np.int16)
    inside = interior(want, margin)
    assert inside.sum() > 0.3 * inside.size, "test image too small for its margin"
    diff = np.abs(out[..., 3].astype(np.int16) - want)
    assert diff[inside].max() <= tolerance, f"alpha off by {diff[inside].max()} in region interiors of {png}"
    visible = out[..., 3] > 0
    assert np.array_equal(out[..., :3][visible], source_rgb[visible]), f"RGB changed under alpha > 0 in {png}"
