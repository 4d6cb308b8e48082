"""The one naming rule for published files, shared by the daemon's and `rmbgd process`'s publishers."""

from __future__ import annotations

import os
from pathlib import Path, PurePath

from rmbgd.output.files import companion_target, result_target


def test_result_mirrors_the_input_path_with_the_format_suffix(tmp_path):
    assert result_target(tmp_path, PurePath("shop/a/photo.jpeg"), ".webp") == tmp_path / "shop" / "a" / "photo.webp"
    assert result_target(tmp_path, PurePath("noext"), ".png") == tmp_path / "noext.png"


def test_result_name_is_shortened_to_fit_name_max(tmp_path):
    limit = os.pathconf(tmp_path, "PC_NAME_MAX")
    stem = "x" * limit
    target = result_target(tmp_path, PurePath(stem), ".png")
    assert target.name.endswith(".png") and len(target.name.encode()) <= limit


def test_companion_is_named_after_the_name_the_result_got(tmp_path):
    taken = tmp_path / "y-1.png"
    assert companion_target(taken, ".png", ".mask.png") == tmp_path / "y-1.mask.png"
    # An intent written by an old version has no suffix: the whole name is the stem.
    assert companion_target(tmp_path / "y", "", ".mask.png") == tmp_path / "y.mask.png"


def test_companion_of_a_name_at_name_max_still_fits(tmp_path):
    limit = os.pathconf(tmp_path, "PC_NAME_MAX")
    result = Path(tmp_path / ("z" * (limit - 4) + ".png"))
    mask = companion_target(result, ".png", ".mask.png")
    assert mask.name.endswith(".mask.png") and len(mask.name.encode()) <= limit
