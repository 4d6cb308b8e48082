"""One daemon serving several output profiles at once, checked on real files; an image with
nothing to crop to goes to errors/ with the reason. The real daemon runs in-process with the
tiny model's mask from a fake segmenter (tests/support/inprocess.py)."""

import os
from pathlib import Path

import numpy as np
from PIL import Image

from tests.support.inprocess import inprocess  # noqa: F401 (a fixture)
from tests.support.photos import RED, pattern, save

ALL_DONE = ("file_done", "file_failed")

PROFILES = [
    {"match": "white/", "output": {"format": "jpeg", "background": "#ffffff"}},
    {"match": "crop/**", "output": {"crop": True, "crop_padding": 4, "mask": True}},
    {"match": "**/*.tif", "output": {"format": "webp", "mask": "only"}},
]


def drop(inbox: Path, staging: Path, rel: str, rgb: np.ndarray, fmt: str) -> None:
    path = save(rgb, staging / rel, fmt)
    (inbox / rel).parent.mkdir(parents=True, exist_ok=True)
    os.rename(path, inbox / rel)


def test_profiles_pick_the_output_per_folder(inprocess, folders, tmp_path):
    daemon = inprocess.start(profiles=PROFILES)
    staging = tmp_path / "staging"
    # RED box at x 40..120, y 30..90 of 160x120 on BLUE, which the tiny model clears.
    rgb = pattern(160, 120, (0.25, 0.25, 0.75, 0.75))
    drop(folders.inbox, staging, "white/shoe.png", rgb, "PNG")
    drop(folders.inbox, staging, "crop/a/bag.png", rgb, "PNG")
    drop(folders.inbox, staging, "plain.png", rgb, "PNG")
    drop(folders.inbox, staging, "scan.tif", rgb, "TIFF")
    # All BLUE: the model keeps nothing, so there is no subject to crop to.
    drop(folders.inbox, staging, "crop/empty.png", pattern(64, 48, (0.0, 0.0, 0.0, 0.0)), "PNG")
    records = daemon.wait_count(ALL_DONE, 5)
    (failed,) = [r for r in records if r["event"] == "file_failed"]
    assert failed["stage"] == "crop" and "no subject found" in failed["error"]
    assert (folders.errors / "crop/empty.png").is_file()
    assert (folders.errors / "crop/empty.png.error.json").is_file()

    out = folders.outbox
    produced = sorted(str(p.relative_to(out)) for p in out.rglob("*") if p.is_file())
    assert produced == ["crop/a/bag.mask.png", "crop/a/bag.png", "plain.png", "scan.mask.png", "white/shoe.jpg"]

    with Image.open(out / "white/shoe.jpg") as im:
        assert (im.format, im.mode, im.size) == ("JPEG", "RGB", (160, 120))
        white = np.asarray(im).astype(int)
    assert np.abs(white[2:20, 2:28] - 255).max() <= 6, "background composited to white"
    assert np.abs(white[2:20, 2:28] - 255).mean() < 1
    assert np.abs(white[45:75, 55:105] - RED).mean() < 4, "subject kept"

    with Image.open(out / "crop/a/bag.png") as im:
        cropped = np.asarray(im)
    # The box (80x60) plus 4 px of padding a side, give or take the mask's soft edge.
    assert abs(cropped.shape[1] - 88) <= 4 and abs(cropped.shape[0] - 68) <= 4, cropped.shape
    with Image.open(out / "crop/a/bag.mask.png") as im:
        assert im.mode == "L"
        assert np.array_equal(np.asarray(im), cropped[..., 3]), "the mask file is the result's alpha"

    with Image.open(out / "plain.png") as im:
        assert (im.mode, im.size) == ("RGBA", (160, 120))
    with Image.open(out / "scan.mask.png") as im:
        assert (im.mode, im.size) == ("L", (160, 120))

    also = [r for r in records if r.get("also")]
    assert [Path(p).name for r in also for p in r["also"]] == ["bag.mask.png"]
    assert daemon.stop() == 0
    assert daemon.crashes() == []
