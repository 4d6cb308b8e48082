"""Typed readers over one section's mapping, each recording its own problem line."""

from __future__ import annotations

import re
from typing import Any, Mapping

from rmbgd.config.problems import Problems, describe, finite, is_int, is_number, text_problem

__all__ = ["BAD", "Section"]

# Marks a value that failed validation; the problem is already recorded.
BAD: Any = object()



class Section:
    """Typed readers over one mapping; each records its own problem and returns BAD."""

    def __init__(self, name: str, data: Mapping[Any, Any], problems: Problems) -> None:
        self.name = name
        self.data = data
        self.problems = problems

    def _key(self, name: str) -> str:
        return f"{self.name}.{name}"

    def integer(self, name: str, default: int, lo: int, hi: int | None = None) -> int:
        if name not in self.data:
            return default
        value = self.data[name]
        if not is_int(value):
            self.problems.add(self._key(name), f"expected an integer, got {describe(value)}")
            return BAD
        return self._in_range(name, value, lo, hi)

    def number(self, name: str, default: float, above: float | None = None, at_least: float | None = None) -> float:
        """A float strictly greater than `above` (or at least `at_least`); ints are widened."""
        if name not in self.data:
            return default
        value = self.data[name]
        if not is_number(value):
            self.problems.add(self._key(name), f"expected a number, got {describe(value)}")
            return BAD
        if not finite(value):
            self.problems.add(self._key(name), f"must be a finite number, got {describe(value)}")
            return BAD
        if above is not None and value <= above:
            self.problems.add(
                self._key(name), f"must be greater than {above:g}, got {describe(value)}"
            )
            return BAD
        if at_least is not None and value < at_least:
            self.problems.add(self._key(name), f"must be at least {at_least:g}, got {describe(value)}")
            return BAD
        return float(value)

    def _in_range(self, name: str, value: int, lo: int, hi: int | None) -> int:
        if value < lo:
            self.problems.add(self._key(name), f"must be at least {lo}, got {describe(value)}")
            return BAD
        if hi is not None and value > hi:
            self.problems.add(self._key(name), f"must be at most {hi}, got {describe(value)}")
            return BAD
        return value

    def boolean(self, name: str, default: bool) -> bool:
        if name not in self.data:
            return default
        value = self.data[name]
        if not isinstance(value, bool):
            self.problems.add(self._key(name), f"expected true or false, got {describe(value)}")
            return BAD
        return value

    def string(self, name: str, default: str | None, nullable: bool = False) -> str | None:
        if name not in self.data:
            return default
        value = self.data[name]
        if value is None and nullable:
            return None
        if not isinstance(value, str):
            what = "a string or null" if nullable else "a string"
            self.problems.add(self._key(name), f"expected {what}, got {describe(value)}")
            return BAD
        if not value.strip():
            self.problems.add(self._key(name), "must not be empty")
            return BAD
        reason = text_problem(value)
        if reason:
            self.problems.add(self._key(name), reason)
            return BAD
        return value

    def choice(self, name: str, default: str, pattern: re.Pattern[str], expected: str) -> str:
        if name not in self.data:
            return default
        value = self.data[name]
        normalized = value.strip().lower() if isinstance(value, str) else None
        if normalized is None or not pattern.fullmatch(normalized):
            self.problems.add(self._key(name), f"expected {expected}, got {describe(value)}")
            return BAD
        return normalized
