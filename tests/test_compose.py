"""Tests for rmbgd.render.compose: crop box, downscaling, compositing over a flat colour."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from rmbgd.render.compose import SUBJECT_THRESHOLD, fit_within, over_background, subject_box

H, W = 60, 80


def mask_with_subject(top: int = 10, left: int = 20, bottom: int = 30, right: int = 50) -> np.ndarray:
    """A 60x80 mask whose pixels at or above the threshold fill exactly rows top..bottom-1
    and columns left..right-1 (a cross, so the box is not simply one filled rectangle),
    with sub-threshold haze elsewhere."""
    alpha = np.random.default_rng(0).integers(0, SUBJECT_THRESHOLD, (H, W), dtype=np.uint8)
    middle_row, middle_column = (top + bottom) // 2, (left + right) // 2
    alpha[middle_row, left:right] = 255
    alpha[top:bottom, middle_column] = SUBJECT_THRESHOLD  # the threshold itself counts
    return alpha


# --------------------------------------------------------------------------- subject_box


def test_box_is_exact_and_exclusive():
    assert subject_box(mask_with_subject()) == (20, 10, 50, 30)


def test_single_pixel_subject():
    alpha = np.zeros((H, W), np.uint8)
    alpha[7, 9] = 200
    assert subject_box(alpha) == (9, 7, 10, 8)


def test_pixel_padding_grows_every_side():
    assert subject_box(mask_with_subject(), pixels=5) == (15, 5, 55, 35)


def test_fraction_padding_uses_the_boxs_own_width_and_height():
    # The box is 30 wide and 20 high: 10% is 3 px left/right and 2 px top/bottom.
    assert subject_box(mask_with_subject(), fraction=0.1) == (17, 8, 53, 32)
    # Both together add up; 0.25 * 30 = 7.5 rounds half up to 8, 0.25 * 20 = 5.
    assert subject_box(mask_with_subject(), pixels=1, fraction=0.25) == (11, 4, 59, 36)


def test_padding_is_clipped_to_the_image():
    assert subject_box(mask_with_subject(), pixels=100) == (0, 0, W, H)
    edge = mask_with_subject(top=0, left=0, bottom=H, right=5)
    assert subject_box(edge, pixels=3) == (0, 0, 8, H)
    corner = np.zeros((H, W), np.uint8)
    corner[-1, -1] = 255
    assert subject_box(corner, pixels=2, fraction=1.0) == (W - 4, H - 4, W, H)


def test_threshold_decides_what_counts():
    alpha = mask_with_subject()
    alpha[0, 0] = SUBJECT_THRESHOLD - 1
    assert subject_box(alpha) == (20, 10, 50, 30)
    assert subject_box(alpha, threshold=1) == (0, 0, W, H)  # the haze now counts
    assert subject_box(alpha, threshold=SUBJECT_THRESHOLD + 1) == (20, 20, 50, 21)  # only the 255 row
    assert 8 <= SUBJECT_THRESHOLD <= 16


def test_empty_mask_gives_none():
    assert subject_box(np.zeros((H, W), np.uint8)) is None
    haze = np.full((H, W), SUBJECT_THRESHOLD - 1, np.uint8)
    assert subject_box(haze, pixels=10) is None


def test_one_by_one():
    assert subject_box(np.full((1, 1), 255, np.uint8), pixels=5, fraction=2.0) == (0, 0, 1, 1)
    assert subject_box(np.zeros((1, 1), np.uint8)) is None


def test_box_of_a_non_contiguous_view():
    alpha = mask_with_subject()
    assert subject_box(alpha[1:, 1:]) == (19, 9, 49, 29)
    assert subject_box(alpha[::2, ::2]) == (10, 10, 25, 11)  # the odd column 35 is skipped
    assert subject_box(np.asfortranarray(alpha)) == (20, 10, 50, 30)


@pytest.mark.parametrize(
    ("alpha", "kwargs"),
    [
        (np.zeros((4, 4), np.uint16), {}),
        (np.zeros((4, 4, 1), np.uint8), {}),
        (np.zeros((4, 4), np.uint8), {"pixels": -1}),
        (np.zeros((4, 4), np.uint8), {"pixels": 1.5}),
        (np.zeros((4, 4), np.uint8), {"pixels": True}),
        (np.zeros((4, 4), np.uint8), {"fraction": -0.1}),
        (np.zeros((4, 4), np.uint8), {"fraction": float("nan")}),
        (np.zeros((4, 4), np.uint8), {"fraction": float("inf")}),
        (np.zeros((4, 4), np.uint8), {"threshold": 0}),
        (np.zeros((4, 4), np.uint8), {"threshold": 256}),
    ],
)
def test_box_rejects_bad_arguments(alpha, kwargs):
    with pytest.raises(ValueError):
        subject_box(alpha, **kwargs)
    with pytest.raises(TypeError):
        subject_box([[0, 255]])


def test_box_on_12_mp_agrees_with_argwhere():
    alpha = np.zeros((3000, 4000), np.uint8)
    alpha[1234:2100, 567:3333] = 255
    alpha[np.random.default_rng(1).random(alpha.shape) < 0.001] = SUBJECT_THRESHOLD - 1
    found = np.argwhere(alpha >= SUBJECT_THRESHOLD)
    (top, left), (bottom, right) = found.min(axis=0), found.max(axis=0) + 1
    assert subject_box(alpha) == (left, top, right, bottom) == (567, 1234, 3333, 2100)


# --------------------------------------------------------------------------- fit_within


def photo(h: int, w: int) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(2)
    return rng.integers(0, 256, (h, w, 3), dtype=np.uint8), rng.integers(0, 256, (h, w), dtype=np.uint8)


@pytest.mark.parametrize("max_size", [80, 81, 1000])
def test_small_enough_returns_the_same_objects(max_size):
    rgb, alpha = photo(H, W)
    small_rgb, small_alpha = fit_within(rgb, alpha, max_size)
    assert small_rgb is rgb and small_alpha is alpha
    assert fit_within(rgb, None, max_size)[0] is rgb


@pytest.mark.parametrize(("h", "w", "max_size", "expected"), [
    (60, 80, 40, (30, 40)),      # landscape: width is the longest side
    (80, 60, 40, (40, 30)),      # portrait
    (3000, 4000, 1024, (768, 1024)),
    (100, 100, 7, (7, 7)),
    (1000, 3, 10, (10, 1)),      # the short side never drops to 0
    (1, 500, 50, (1, 50)),
    (33, 101, 50, (16, 50)),     # 16.34 rounds to 16
])
def test_longest_side_becomes_max_size_and_aspect_is_kept(h, w, max_size, expected):
    rgb, alpha = photo(h, w)
    small_rgb, small_alpha = fit_within(rgb, alpha, max_size)
    assert small_rgb.shape == (*expected, 3) and small_alpha.shape == expected
    assert small_rgb.dtype == np.uint8 and small_alpha.dtype == np.uint8
    assert small_rgb.flags["WRITEABLE"] and small_alpha.flags["WRITEABLE"]


def test_never_upscales():
    rgb, alpha = photo(10, 20)
    small_rgb, small_alpha = fit_within(rgb, alpha, 5000)
    assert small_rgb.shape == (10, 20, 3)


def test_downscale_antialiases_and_uses_one_filter_for_both():
    # A 1-pixel checkerboard shrunk 4x must come out as its average grey, not as aliasing.
    board = (np.indices((400, 400)).sum(axis=0) % 2 * 255).astype(np.uint8)
    rgb = np.repeat(board[..., None], 3, axis=2)
    small_rgb, small_alpha = fit_within(rgb, board, 100)
    assert np.abs(small_rgb.astype(int) - 128).max() <= 2
    np.testing.assert_array_equal(small_rgb[..., 0], small_alpha)
    expected = Image.fromarray(board).resize((100, 100), Image.Resampling.LANCZOS)
    np.testing.assert_array_equal(small_alpha, np.asarray(expected))


def test_fit_accepts_views_and_no_alpha():
    rgb, alpha = photo(H, W)
    small_rgb, small_alpha = fit_within(rgb[5:45, 10:70], None, 30)
    assert small_rgb.shape == (20, 30, 3) and small_alpha is None
    expected = Image.fromarray(rgb[5:45, 10:70]).resize((30, 20), Image.Resampling.LANCZOS)
    np.testing.assert_array_equal(small_rgb, np.asarray(expected))


@pytest.mark.parametrize("max_size", [0, -1, 2.5, True])
def test_fit_rejects_bad_sizes(max_size):
    rgb, alpha = photo(4, 4)
    with pytest.raises(ValueError):
        fit_within(rgb, alpha, max_size)


def test_fit_rejects_mismatched_alpha():
    rgb, alpha = photo(4, 4)
    with pytest.raises(ValueError):
        fit_within(rgb, alpha[:3], 2)
    with pytest.raises(ValueError):
        fit_within(rgb[..., :2], alpha, 2)


# --------------------------------------------------------------------------- over_background


def reference_over(rgb: np.ndarray, alpha: np.ndarray, colour) -> np.ndarray:
    a = alpha.astype(np.float64)[..., None]
    return np.rint((rgb * a + np.array(colour, np.float64) * (255 - a)) / 255).astype(np.uint8)


def test_opaque_keeps_colour_and_transparent_gives_background():
    rgb, _ = photo(H, W)
    opaque = over_background(rgb, np.full((H, W), 255, np.uint8), (10, 20, 30))
    np.testing.assert_array_equal(opaque, rgb)
    clear = over_background(rgb, np.zeros((H, W), np.uint8), (10, 20, 30))
    assert (clear == (10, 20, 30)).all()


@pytest.mark.parametrize("colour", [(255, 255, 255), (0, 0, 0), (255, 0, 128), (17, 200, 3)])
def test_every_colour_and_alpha_pair_matches_the_float_reference(colour):
    # All 256 x 256 (value, alpha) pairs, in every channel.
    values, alphas = np.meshgrid(np.arange(256, dtype=np.uint8), np.arange(256, dtype=np.uint8))
    rgb = np.stack((values, values[::-1], values.T), axis=2)
    result = over_background(rgb, alphas, colour)
    assert result.dtype == np.uint8 and result.shape == (256, 256, 3)
    np.testing.assert_array_equal(result, reference_over(rgb, alphas, colour))


def test_white_background_known_values():
    rgb = np.array([[[0, 0, 0], [0, 0, 0], [100, 150, 200], [255, 0, 0]]], np.uint8)
    alpha = np.array([[128, 127, 51, 1]], np.uint8)
    result = over_background(rgb, alpha, (255, 255, 255))
    # Black at 128 and 127 of 255 lands on either side of mid-grey; 51/255 = 0.2 exactly
    # (20 + 204 = 224, ...); at alpha 1 white gets 254 and red 1 + 254.
    assert result.tolist() == [[[127, 127, 127], [128, 128, 128], [224, 234, 244], [255, 254, 254]]]


def test_over_accepts_views_and_leaves_inputs_alone():
    rgb, alpha = photo(H, W)
    rgb.flags.writeable = False
    alpha.flags.writeable = False
    view_rgb, view_alpha = rgb[3:40:2, 5:70:3], alpha[3:40:2, 5:70:3]
    result = over_background(view_rgb, view_alpha, (1, 2, 3))
    np.testing.assert_array_equal(result, reference_over(view_rgb, view_alpha, (1, 2, 3)))


@pytest.mark.parametrize("colour", [(0, 0), (0, 0, 256), (-1, 0, 0), (0.5, 0, 0), "white", (True, 0, 0)])
def test_over_rejects_bad_colours(colour):
    rgb, alpha = photo(4, 4)
    with pytest.raises(ValueError):
        over_background(rgb, alpha, colour)


def test_over_rejects_bad_arrays():
    rgb, alpha = photo(4, 4)
    with pytest.raises(ValueError):
        over_background(rgb, alpha[:, :3], (0, 0, 0))
    with pytest.raises(ValueError):
        over_background(rgb.astype(np.int16), alpha, (0, 0, 0))
    with pytest.raises(ValueError):
        over_background(rgb, None, (0, 0, 0))


def test_importing_does_not_pull_in_torch():
    code = "import sys, rmbgd.render.compose, rmbgd.render.encoders; sys.exit('torch' in sys.modules)"
    assert subprocess.run([sys.executable, "-c", code], check=False).returncode == 0
