"""Output settings in the config: the new `output:` keys and per-folder `profiles:`."""

from __future__ import annotations

import textwrap
from pathlib import Path, PurePath

import pytest

from rmbgd.config import (
    MASK_ALSO,
    MASK_NONE,
    MASK_ONLY,
    ConfigError,
    OutputConfig,
    Padding,
    load_config,
)
from rmbgd.config.profiles import GlobError, compile_glob, glob_problem

PATHS = """\
paths:
  inbox: in
  outbox: out
  errors: err
  done: null
"""


def load(tmp_path: Path, text: str):
    path = tmp_path / "config.yaml"
    path.write_text(PATHS + textwrap.dedent(text))
    return load_config(path)


def problems(tmp_path: Path, text: str) -> list[str]:
    with pytest.raises(ConfigError) as info:
        load(tmp_path, text)
    return info.value.problems


# --------------------------------------------------------------------------- output keys


def test_defaults_keep_the_plain_transparent_png() -> None:
    out = OutputConfig()
    assert (out.format, out.background, out.crop, out.mask, out.max_size) == ("png", None, False, MASK_NONE, None)
    assert (out.refine_foreground, out.keep_exif, out.suffix) == (False, False, ".png")


def test_every_output_key_parses(tmp_path: Path) -> None:
    cfg = load(tmp_path, """\
        output:
          format: JPG
          background: "#FfA"
          jpeg_quality: 80
          crop: true
          crop_padding: "12.5%"
          mask: true
          max_size: 1600
          refine_foreground: true
          keep_exif: true
        """)
    out = cfg.output
    assert out.format == "jpeg" and out.suffix == ".jpg"
    assert out.background == (255, 255, 170)
    assert out.jpeg_quality == 80 and out.crop and out.crop_padding == Padding(fraction=0.125)
    assert out.mask == MASK_ALSO and out.max_size == 1600
    assert out.refine_foreground and out.keep_exif


@pytest.mark.parametrize(
    "snippet, expected",
    [
        ("format: gif", "output.format: expected png, webp or jpeg, got 'gif'"),
        ("format: jpeg", 'output.format: jpeg has no transparency: set output.background'),
        ("background: white", "output.background: expected null or a colour like \"#ffffff\""),
        ("background: '#12345'", "output.background: expected null or a colour"),
        ("mask: maybe", "output.mask: expected false, true or only, got 'maybe'"),
        ("crop_padding: -3", "output.crop_padding: expected pixels (e.g. 16) or a percentage"),
        ("crop_padding: 0.05", "output.crop_padding: expected pixels (e.g. 16) or a percentage"),
        ("max_size: 0", "output.max_size: must be at least 1, got 0"),
        ("jpeg_quality: 101", "output.jpeg_quality: must be at most 100, got 101"),
        ("crop: 1", "output.crop: expected true or false, got 1"),
    ],
)
def test_bad_output_values_name_their_key(tmp_path: Path, snippet: str, expected: str) -> None:
    found = problems(tmp_path, f"output:\n  {snippet}\n")
    assert any(p.startswith(expected) for p in found), found


def test_mask_only_needs_no_background_for_jpeg(tmp_path: Path) -> None:
    cfg = load(tmp_path, "output: {format: jpeg, mask: only}\n")
    assert cfg.output.mask == MASK_ONLY and cfg.output.suffix == ".mask.png"


def test_crop_padding_in_pixels_and_null_max_size(tmp_path: Path) -> None:
    cfg = load(tmp_path, "output: {crop_padding: 16, max_size: null}\n")
    assert cfg.output.crop_padding == Padding(pixels=16) and cfg.output.max_size is None


# --------------------------------------------------------------------------- profiles

PROFILES = """\
output:
  format: webp
  max_size: 2000
profiles:
  - match: white/
    output: {format: jpeg, background: "#ffffff"}
  - match: crop/**/*.png
    output: {crop: true, mask: true}
  - match: "white/special/*"
    output: {format: png}
"""


def test_first_matching_profile_wins_and_inherits_the_rest(tmp_path: Path) -> None:
    cfg = load(tmp_path, PROFILES)
    white = cfg.output_for(PurePath("white/special/a.jpg"))
    # The earlier white/ entry wins over the later, more specific one.
    assert (white.format, white.background) == ("jpeg", (255, 255, 255))
    assert white.max_size == 2000, "keys a profile does not name come from output:"
    crop = cfg.output_for(PurePath("crop/a/b/c.png"))
    assert (crop.format, crop.crop, crop.mask) == ("webp", True, MASK_ALSO)
    assert cfg.output_for(PurePath("crop/a/b/c.jpg")) is cfg.output
    assert cfg.output_for(PurePath("a.png")) is cfg.output
    assert cfg.output_for(PurePath("whitewash/a.png")) is cfg.output


@pytest.mark.parametrize(
    "glob, path, matched",
    [
        ("*.png", "a.png", True),
        ("*.png", "sub/a.png", False),
        ("**/*.png", "a.png", True),
        ("**/*.png", "x/y/a.png", True),
        ("a/**", "a/b/c/d.jpg", True),
        ("a/**", "ab/c.jpg", False),
        ("a/", "a/x.jpg", True),
        ("a/**/z/*.jpg", "a/z/q.jpg", True),
        ("a/**/z/*.jpg", "a/b/c/z/q.jpg", True),
        ("a/**/z/*.jpg", "a/b/c/zz/q.jpg", False),
        ("shot-??.jpg", "shot-01.jpg", True),
        ("shot-??.jpg", "shot-1.jpg", False),
        ("[ab]*/x.jpg", "beta/x.jpg", True),
        ("[!ab]*/x.jpg", "beta/x.jpg", False),
        ("Sale/*", "sale/a.jpg", False),
        ("a+b (1)/*.jpg", "a+b (1)/x.jpg", True),
        ("a[!x]b", "a/b", False),
        ("[a-c-]x", "-x", True),
        ("x[^]", "x^", True),
        ("**/a/**/b", "ab/a/b", True),
        ("*a*b", "xaybab", True),
        ("*a*b", "xaybx", False),
    ],
)
def test_glob_rules(glob: str, path: str, matched: bool) -> None:
    assert glob_problem(glob) is None
    assert (compile_glob(glob).fullmatch(path) is not None) is matched


@pytest.mark.parametrize(
    "snippet, expected",
    [
        ("profiles: {white: 1}", "profiles: expected a list of {match, output} mappings"),
        ("profiles: [white]", "profiles[0]: expected a mapping with match and output"),
        ("profiles: [{output: {crop: true}}]", "profiles[0].match: required"),
        ("profiles: [{match: /abs/*, output: {}}]", "profiles[0].match: must be relative to the inbox"),
        ("profiles: [{match: ../up/*, output: {}}]", "profiles[0].match: must not contain empty, '.' or '..'"),
        ("profiles: [{match: 'a/**b', output: {}}]", "profiles[0].match: '**' must be a whole folder name"),
        ("profiles: [{match: 'a/[b', output: {}}]", "profiles[0].match: unbalanced '['"),
        ("profiles: [{match: 'a]b[', output: {}}]", "profiles[0].match: unbalanced ']'"),
        ("profiles: [{match: '[z-a]/', output: {}}]", "profiles[0].match: bad range 'z-a' in '[z-a]/'"),
        ("profiles: [{match: 'a/[]/b', output: {}}]", "profiles[0].match: empty set '[]' in 'a/[]/b'"),
        ("profiles: [{match: 'a/[!]', output: {}}]", "profiles[0].match: empty set '[!]'"),
        ("profiles: [{match: a/, output: null}]", "profiles[0].output: expected a mapping of output settings"),
        ("profiles: [{match: a/, output: {formt: png}}]", "profiles[0].output.formt: unknown key; did you mean 'format'?"),
        ("profiles: [{match: a/, output: {format: jpeg}}]", "profiles[0].output.format: jpeg has no transparency"),
        ("profiles: [{match: a/, output: {crop: true}, extra: 1}]", "profiles[0].extra: unknown key"),
    ],
)
def test_bad_profiles_name_their_entry(tmp_path: Path, snippet: str, expected: str) -> None:
    found = problems(tmp_path, snippet + "\n")
    assert any(p.startswith(expected) for p in found), found


def test_a_profile_may_supply_the_background_jpeg_needs(tmp_path: Path) -> None:
    cfg = load(tmp_path, "output: {background: '#000000'}\nprofiles: [{match: a/, output: {format: jpeg}}]\n")
    assert cfg.output_for(PurePath("a/x.png")).format == "jpeg"


def test_an_inherited_problem_is_reported_once(tmp_path: Path) -> None:
    found = problems(tmp_path, "output: {format: jpeg}\nprofiles: [{match: a/, output: {crop: true}}]\n")
    assert [p.split(":")[0] for p in found] == ["output.format"], found


def test_regression_bad_profile_glob_is_a_problem_not_a_crash() -> None:
    # Finding 1: these reached re.compile and raised re.error out of `rmbgd check`.
    for glob in ("[z-a]/", "a/[]/b", "[!]", "a]b[c", "[\\-!]"):
        problem = glob_problem(glob)
        assert problem and repr(glob) in problem, (glob, problem)
        with pytest.raises(GlobError):
            compile_glob(glob)


@pytest.mark.timeout(60)
def test_many_stars_match_in_linear_time() -> None:
    # A naive translation tries every way to split the name among the stars: hours, not ms.
    assert compile_glob("*a" * 30 + "*b").fullmatch("a" * 250) is None
    assert compile_glob("**/a/" * 15 + "b").fullmatch("a/" * 300 + "c") is None
    assert compile_glob("*a" * 30 + "*b").fullmatch("a" * 250 + "b") is not None
