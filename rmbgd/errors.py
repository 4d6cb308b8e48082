"""One line describing an exception, for logs, `.error.json` sidecars and one-line errors.

Imports nothing, so that every layer may use it (see the import contracts in pyproject.toml).
"""

from __future__ import annotations

from typing import Optional


def first_line(value: object) -> str:
    """The first line of ``str(value)``, stripped; empty when there is none."""
    lines = str(value).strip().splitlines()
    return lines[0].strip() if lines else ""


def describe(exc: BaseException, *, kind: bool = True, limit: Optional[int] = None) -> str:
    """``"Type: first line of the message"``, or the line alone when ``kind`` is false; the
    type's name alone when the message is empty. ``limit`` caps the length (of the line)."""
    line = first_line(exc)
    if limit is not None:
        line = line[:limit]
    if not line:
        return type(exc).__name__
    return f"{type(exc).__name__}: {line}" if kind else line
