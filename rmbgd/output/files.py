"""What a publisher writes for one input: its output files, made by render, published here."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True, eq=False)
class OutputFile:
    """One file to publish for an input: `suffix` replaces the input's extension."""

    suffix: str
    data: bytes

    def __repr__(self) -> str:
        return f"OutputFile({self.suffix!r}, {len(self.data)} bytes)"
