"""The `output` section's own kinds of value: format, background colour, mask mode, crop padding."""

from __future__ import annotations

import re
from typing import Annotated, Any, Literal, Optional, Tuple

from pydantic import Field, WithJsonSchema
from pydantic.dataclasses import dataclass

from rmbgd.config.kinds import problem, yaml_rule
from rmbgd.config.problems import describe, is_int

__all__ = [
    "FORMAT_SUFFIXES",
    "MASK_ALSO",
    "MASK_NONE",
    "MASK_ONLY",
    "MASK_SUFFIX",
    "Padding",
    "background",
    "crop_padding",
    "mask",
    "output_format",
]

# output.format values, and the file suffix each writes.
FORMAT_SUFFIXES = {"png": ".png", "webp": ".webp", "jpeg": ".jpg"}
MASK_SUFFIX = ".mask.png"
# output.mask values: no mask file, a mask file next to the result, or only the mask file.
MASK_NONE, MASK_ALSO, MASK_ONLY = "none", "also", "only"


@dataclass(frozen=True, config={"extra": "forbid"})
class Padding:
    """Room kept around the subject when cropping: `pixels` on every side plus `fraction` of
    the subject box's own width (left and right) and height (top and bottom)."""

    pixels: Annotated[int, Field(ge=0)] = 0
    fraction: Annotated[float, Field(ge=0)] = 0.0


_FORMAT_ALIASES = {"png": "png", "webp": "webp", "jpeg": "jpeg", "jpg": "jpeg"}
_MASK_VALUES = {False: MASK_NONE, True: MASK_ALSO, "only": MASK_ONLY}
_COLOUR_RE = re.compile(r"#([0-9a-f]{6}|[0-9a-f]{3})")
_PADDING_RE = re.compile(r"(\d+(?:\.\d+)?)\s*%")


def _format(value: Any, context: dict[str, Any]) -> str:
    fmt = _FORMAT_ALIASES.get(value.strip().lower()) if isinstance(value, str) else None
    if fmt is None:
        raise problem(f"expected png, webp or jpeg, got {describe(value)}")
    return fmt


def _background(value: Any, context: dict[str, Any]) -> tuple[int, int, int] | None:
    if value is None:
        return None
    match = _COLOUR_RE.fullmatch(value.strip().lower()) if isinstance(value, str) else None
    if match is None:
        raise problem(
            f'expected null or a colour like "#ffffff" (quoted: # starts a YAML comment), got {describe(value)}'
        )
    digits = match.group(1)
    if len(digits) == 3:
        digits = "".join(d * 2 for d in digits)
    return (int(digits[0:2], 16), int(digits[2:4], 16), int(digits[4:6], 16))


def _mask(value: Any, context: dict[str, Any]) -> str:
    key = value.strip().lower() if isinstance(value, str) else value
    if isinstance(key, (bool, str)) and key in _MASK_VALUES:
        return _MASK_VALUES[key]
    raise problem(f"expected false, true or only, got {describe(value)}")


def _padding(value: Any, context: dict[str, Any]) -> Padding:
    if is_int(value) and 0 <= value <= 100_000:
        return Padding(pixels=value)
    match = _PADDING_RE.fullmatch(value.strip()) if isinstance(value, str) else None
    if match is not None and float(match.group(1)) <= 1000:
        return Padding(fraction=float(match.group(1)) / 100.0)
    raise problem(
        f'expected pixels (e.g. 16) or a percentage of the subject\'s size (e.g. "5%"), got {describe(value)}'
    )


# The JSON Schema describes what a YAML file may say, which for these differs from the value kept.
output_format = Annotated[
    Literal["png", "webp", "jpeg"],
    yaml_rule(_format),
    WithJsonSchema({"enum": ["png", "webp", "jpeg", "jpg"]}),
]
background = Annotated[
    Optional[Tuple[int, int, int]],
    yaml_rule(_background),
    WithJsonSchema({"type": ["string", "null"], "pattern": "^#([0-9a-fA-F]{6}|[0-9a-fA-F]{3})$"}),
]
mask = Annotated[
    Literal["none", "also", "only"],
    yaml_rule(_mask),
    WithJsonSchema({"enum": [False, True, "only"]}),
]
crop_padding = Annotated[
    Padding,
    yaml_rule(_padding),
    WithJsonSchema(
        {
            "anyOf": [
                {"type": "integer", "minimum": 0, "maximum": 100_000},
                {"type": "string", "pattern": r"^\d+(\.\d+)?\s*%$"},
            ]
        }
    ),
]
