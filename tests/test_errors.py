"""rmbgd.errors.describe: the one way an exception becomes one line."""

from __future__ import annotations

import pytest

from rmbgd.errors import describe, first_line


@pytest.mark.parametrize(
    "exc, kind, limit, expected",
    [
        (ValueError("bad value"), True, None, "ValueError: bad value"),
        (ValueError("bad value"), False, None, "bad value"),
        (ValueError("  first  \nsecond\n"), True, None, "ValueError: first"),
        (ValueError(""), True, None, "ValueError"),
        (ValueError("   \n "), False, None, "ValueError"),
        (OSError(28, "No space left on device"), True, None, "OSError: [Errno 28] No space left on device"),
        (RuntimeError("x" * 500), False, 300, "x" * 300),
        (KeyError("k"), True, None, "KeyError: 'k'"),
    ],
)
def test_describe(exc, kind, limit, expected):
    assert describe(exc, kind=kind, limit=limit) == expected


def test_first_line_of_plain_text():
    assert first_line("  one\ntwo") == "one"
    assert first_line("") == ""


def test_every_layer_describes_with_the_one_helper():
    # The helpers this replaced (pipeline._describe, backends._first_line, hub.first_line,
    # images._one_line) must not come back.
    from pathlib import Path

    package = Path(__file__).resolve().parent.parent / "rmbgd"
    found = [
        f"{path}: {name}"
        for path in package.rglob("*.py")
        for name in ("def _describe(exc", "def _first_line(", "def first_line(", "def _one_line(exc")
        if name in path.read_text() and path.name != "errors.py"
    ]
    assert found == []
