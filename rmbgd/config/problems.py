"""How config problems read: `dotted.key: what is wrong` lines, values described for the user."""

from __future__ import annotations

import difflib
import math
import re
from typing import Mapping, Sequence

__all__ = ["Problems", "describe", "finite", "is_int", "is_number", "one_line", "text_problem", "unknown_key"]


def one_line(text: str) -> str:
    return " ".join(str(text).split())


def describe(value: object) -> str:
    """How a YAML value reads back to the user in a `got ...` clause."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str):
        shown = value if len(value) <= 60 else value[:57] + "..."
        return repr(shown)
    if is_int(value) and value.bit_length() > 200:
        # YAML's base-60 ints (`1:2:3:...`) can exceed what str() of an int may print.
        digits = int(value.bit_length() * math.log10(2)) + 1
        return f"{'-' if value < 0 else ''}an integer of about {digits} digits"
    if isinstance(value, (int, float)):
        return repr(value)
    if isinstance(value, Mapping):
        return "a mapping"
    if isinstance(value, (list, tuple)):
        return "a list"
    if isinstance(value, bytes):
        return "binary data"
    return f"a {type(value).__name__}"


def is_int(value: object) -> bool:
    # bool is an int subclass, and YAML 1.1 turns `yes`/`on` into booleans.
    return isinstance(value, int) and not isinstance(value, bool)


def is_number(value: object) -> bool:
    return is_int(value) or isinstance(value, float)


def finite(value: int | float) -> bool:
    """Whether `value` is a float that is not NaN or infinite (an int too large for a float is not)."""
    try:
        return math.isfinite(value)
    except OverflowError:
        return False


class Problems:
    def __init__(self) -> None:
        self.items: list[str] = []

    def add(self, key: str, message: str) -> None:
        self.items.append(f"{key}: {message}")


# A key that can stand in a `dotted.key: problem` line as it is; others are quoted instead.
_PLAIN_KEY_RE = re.compile(r"[\w-]{1,60}")


def unknown_key(key: object, allowed: Sequence[str], prefix: str, label: str = "config") -> str:
    """The problem line for `key`, which is not one of `allowed` in the mapping at `prefix`."""
    close = difflib.get_close_matches(key, allowed, n=1) if isinstance(key, str) else []
    name = key if isinstance(key, str) else describe(key) if is_int(key) else ""
    if _PLAIN_KEY_RE.fullmatch(name):
        dotted = f"{prefix}.{name}" if prefix else name
        message = "unknown key"
    else:
        # Spaces, colons, newlines or a float, null or bool key would garble the key part.
        dotted = prefix or label
        message = f"unknown key {describe(key)}" + ("" if prefix else " at the top level")
    # Only ten sections exist, so the full list is always worth showing at the top.
    if not prefix or not close:
        message += f" (expected one of: {', '.join(allowed)})"
    if close:
        message += f"; did you mean '{close[0]}'?"
    return f"{dotted}: {message}"


def text_problem(value: str) -> str | None:
    """Why `value` cannot be a name or a path, or None."""
    if "\0" in value:
        return "must not contain a NUL character"
    try:
        # A `"\ud800"` escape in YAML gives a lone surrogate, which no file name can hold.
        value.encode("utf-8")
    except UnicodeEncodeError:
        return f"must be valid Unicode text, got {describe(value)}"
    return None
