from pathlib import PurePath

import pytest

from rmbgd.intake.names import is_ignored


@pytest.mark.parametrize(
    "rel",
    [".hidden.jpg", "a/.x/b.jpg", "x.jpg.part", "x.JPG.PART", "x.tmp", "x.crdownload", "x.partial",
     "x.download", "x.jpg~", ".rmbgd/work/h-1/x.jpg", "sync.part/x.jpg"],
)
def test_ignored(rel):
    assert is_ignored(PurePath(rel))


@pytest.mark.parametrize("rel", ["x.jpg", "a/b/x.png", "partial.jpg", "x.tmp.jpg", "weird name ü.webp"])
def test_not_ignored(rel):
    assert not is_ignored(PurePath(rel))
