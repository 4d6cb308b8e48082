"""What a publisher writes for one input: its output files, made by render, published here,
and the one rule both publishers (the daemon's and `rmbgd process`'s) name them by."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path, PurePath

from rmbgd.output.fsops import shorten_name


@dataclass(frozen=True, eq=False)
class OutputFile:
    """One file to publish for an input: `suffix` replaces the input's extension."""

    suffix: str
    data: bytes

    def __repr__(self) -> str:
        return f"OutputFile({self.suffix!r}, {len(self.data)} bytes)"


def result_target(root: Path, rel: PurePath, suffix: str) -> Path:
    """The name wanted for the result of the input at `rel` (below its folder) under `root`:
    its stem with `suffix`; a name at NAME_MAX with a short or no extension is shortened so
    that it does not outgrow it. The publisher takes x-1.png, x-2.png, … when it is taken."""
    return root / rel.parent / shorten_name(PurePath(rel.name).stem, suffix)


def companion_target(result: Path, result_suffix: str, suffix: str) -> Path:
    """The name of a file published with `result` (its mask): named after the name the
    result got, not the one wanted (x-1.png → x-1.mask.png), so they stay recognisably a pair."""
    name = result.name
    stem = name[: len(name) - len(result_suffix)] if result_suffix else name
    return result.with_name(shorten_name(stem, suffix))
