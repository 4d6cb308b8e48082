"""Per-request output options (rmbgd.api.options): query text read as the `output:` keys are."""

from __future__ import annotations

import pytest

from rmbgd.api.options import PARAMETERS, OptionError, request_output
from rmbgd.config import MASK_ALSO, MASK_NONE, MASK_ONLY, OutputConfig, Padding

BASE = OutputConfig(format="webp", background=(1, 2, 3), max_size=100)


def test_no_parameters_is_the_output_section():
    assert request_output(BASE, {}) is BASE


@pytest.mark.parametrize(
    "params, expected",
    [
        ({"format": "PNG"}, {"format": "png"}),
        ({"format": "jpg"}, {"format": "jpeg"}),
        ({"background": "fff"}, {"background": (255, 255, 255)}),
        ({"background": "#00ff00"}, {"background": (0, 255, 0)}),
        ({"background": "none"}, {"background": None}),
        ({"crop": "true", "crop_padding": "5%"}, {"crop": True, "crop_padding": Padding(fraction=0.05)}),
        ({"crop_padding": "16"}, {"crop_padding": Padding(pixels=16)}),
        ({"mask": "only"}, {"mask": MASK_ONLY}),
        ({"mask": "false"}, {"mask": MASK_NONE}),
        ({"mask": "true"}, {"mask": MASK_ALSO}),
        ({"max_size": "null"}, {"max_size": None}),
        ({"max_size": "64", "jpeg_quality": "70"}, {"max_size": 64, "jpeg_quality": 70}),
        ({"refine_foreground": "1"}, {"refine_foreground": True}),
    ],
)
def test_parameters_override_the_section_and_keep_the_rest(params, expected):
    result = request_output(BASE, params)
    for name in ("format", "background", "crop", "crop_padding", "mask", "max_size", "jpeg_quality",
                 "refine_foreground", "png_compress_level", "keep_exif"):
        assert getattr(result, name) == expected.get(name, getattr(BASE, name)), name


@pytest.mark.parametrize(
    "params, problem",
    [
        ({"format": "gif"}, "format: expected png, webp or jpeg, got 'gif'"),
        ({"background": "red"}, 'background: expected a colour like "#ffffff" or "ffffff", or "none"'),
        ({"crop": "maybe"}, "crop: expected true or false, got 'maybe'"),
        ({"max_size": "0"}, "max_size: must be at least 1, got 0"),
        ({"jpeg_quality": "high"}, "jpeg_quality: expected an integer, got 'high'"),
        ({"size": "10"}, "size: unknown parameter (expected one of: " + ", ".join(PARAMETERS) + ")"),
    ],
)
def test_a_bad_parameter_is_named(params, problem):
    with pytest.raises(OptionError) as info:
        request_output(BASE, params)
    assert str(info.value) == problem


def test_jpeg_needs_a_background_only_when_it_has_none():
    with pytest.raises(OptionError, match="^format: jpeg has no transparency: give a background"):
        request_output(OutputConfig(), {"format": "jpeg"})
    assert request_output(BASE, {"format": "jpeg"}).background == (1, 2, 3)
    assert request_output(OutputConfig(), {"format": "jpeg", "background": "000"}).format == "jpeg"
