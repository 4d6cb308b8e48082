"""Validation of the `output` section and of the `profiles` that override it per folder."""

from __future__ import annotations

import dataclasses
import re
from typing import Any, Mapping

from rmbgd.config.problems import Problems, check_unknown, describe, is_int
from rmbgd.config.profiles import GlobError, Profile, compile_glob
from rmbgd.config.schema import MASK_ALSO, MASK_NONE, MASK_ONLY, OutputConfig, Padding
from rmbgd.config.section import BAD, Section

__all__ = ["parse_output", "parse_profiles"]


_FORMAT_ALIASES = {"png": "png", "webp": "webp", "jpeg": "jpeg", "jpg": "jpeg"}
_MASK_VALUES = {False: MASK_NONE, True: MASK_ALSO, "only": MASK_ONLY}
_COLOUR_RE = re.compile(r"#([0-9a-f]{6}|[0-9a-f]{3})")
_PADDING_RE = re.compile(r"(\d+(?:\.\d+)?)\s*%")


def parse_output(s: Section, base: OutputConfig) -> OutputConfig:
    """The `output` section, or a profile's overrides of it: keys not given keep `base`'s value."""

    def given(name: str, read: Any) -> Any:
        return read(s) if name in s.data else getattr(base, name)

    fmt = given("format", _output_format)
    background = given("background", _background)
    mask = given("mask", _mask_mode)
    max_size = getattr(base, "max_size")
    if s.data.get("max_size") is not None:
        max_size = s.integer("max_size", 0, 1, 1_000_000)
    elif "max_size" in s.data:
        max_size = None
    out = OutputConfig(
        format=fmt,
        background=background,
        jpeg_quality=s.integer("jpeg_quality", base.jpeg_quality, 1, 100),
        crop=s.boolean("crop", base.crop),
        crop_padding=given("crop_padding", _padding),
        mask=mask,
        max_size=max_size,
        refine_foreground=s.boolean("refine_foreground", base.refine_foreground),
        keep_exif=s.boolean("keep_exif", base.keep_exif),
        png_compress_level=s.integer("png_compress_level", base.png_compress_level, 0, 9),
        clean_transparent=s.boolean("clean_transparent", base.clean_transparent),
    )
    # A profile that changes none of the three inherits the combination, already judged.
    judged_here = base == OutputConfig() or any(k in s.data for k in ("format", "background", "mask"))
    if judged_here and out.format == "jpeg" and out.background is None and out.mask != MASK_ONLY:
        s.problems.add(
            f"{s.name}.format",
            "jpeg has no transparency: set output.background (e.g. \"#ffffff\") or use png or webp",
        )
    return out


def _output_format(s: Section) -> str:
    value = s.data.get("format")
    fmt = _FORMAT_ALIASES.get(value.strip().lower()) if isinstance(value, str) else None
    if fmt is None:
        s.problems.add(s._key("format"), f"expected png, webp or jpeg, got {describe(value)}")
        return BAD
    return fmt


def _background(s: Section) -> tuple[int, int, int] | None:
    value = s.data.get("background")
    if value is None:
        return None
    match = _COLOUR_RE.fullmatch(value.strip().lower()) if isinstance(value, str) else None
    if match is None:
        s.problems.add(
            s._key("background"),
            f'expected null or a colour like "#ffffff" (quoted: # starts a YAML comment), got {describe(value)}',
        )
        return BAD
    digits = match.group(1)
    if len(digits) == 3:
        digits = "".join(d * 2 for d in digits)
    return (int(digits[0:2], 16), int(digits[2:4], 16), int(digits[4:6], 16))


def _mask_mode(s: Section) -> str:
    value = s.data.get("mask")
    key = value.strip().lower() if isinstance(value, str) else value
    if isinstance(key, (bool, str)) and key in _MASK_VALUES:
        return _MASK_VALUES[key]
    s.problems.add(s._key("mask"), f"expected false, true or only, got {describe(value)}")
    return BAD


def _padding(s: Section) -> Padding:
    value = s.data.get("crop_padding")
    if is_int(value) and 0 <= value <= 100_000:
        return Padding(pixels=value)
    match = _PADDING_RE.fullmatch(value.strip()) if isinstance(value, str) else None
    if match is not None and float(match.group(1)) <= 1000:
        return Padding(fraction=float(match.group(1)) / 100.0)
    s.problems.add(
        s._key("crop_padding"),
        f'expected pixels (e.g. 16) or a percentage of the subject\'s size (e.g. "5%"), got {describe(value)}',
    )
    return BAD


def parse_profiles(raw: object, base: OutputConfig, problems: Problems) -> tuple[Profile, ...]:
    if raw is None:
        return ()
    if not isinstance(raw, list):
        problems.add("profiles", f"expected a list of {{match, output}} mappings, got {describe(raw)}")
        return ()
    profiles = []
    for index, item in enumerate(raw):
        key = f"profiles[{index}]"
        if not isinstance(item, Mapping):
            problems.add(key, f"expected a mapping with match and output, got {describe(item)}")
            continue
        check_unknown(item, ["match", "output"], key, problems)
        glob = item.get("match")
        reason = "required" if glob is None else None
        if reason is None and (not isinstance(glob, str) or not glob.strip()):
            reason = f"expected a glob under the inbox such as 'white/**', got {describe(glob)}"
        pattern = None
        if reason is None:
            try:
                pattern = compile_glob(glob)
            except GlobError as err:
                reason = str(err)
        if reason:
            problems.add(f"{key}.match", reason)
        overrides = item.get("output")
        if not isinstance(overrides, Mapping):
            problems.add(f"{key}.output", f"expected a mapping of output settings, got {describe(overrides)}")
            continue
        allowed = [f.name for f in dataclasses.fields(OutputConfig)]
        check_unknown(overrides, allowed, f"{key}.output", problems)
        output = parse_output(Section(f"{key}.output", overrides, problems), base)
        if pattern is not None:
            profiles.append(Profile(match=glob, output=output, pattern=pattern))
    return tuple(profiles)
