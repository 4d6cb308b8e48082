"""Per-folder output settings: `profiles:` globs matched against a file's path under the inbox.

One daemon can serve `inbox/white/` (white JPEGs), `inbox/crop/` (cropped PNGs) and the rest
(plain PNGs) at once. The first profile whose glob matches wins; files no profile matches use
the top-level `output:` section.

Glob rules, on the path relative to the inbox with `/` between folders:
- `*` matches within one name (never a `/`), `?` one character, `[abc]` one of a set;
- `**` as a whole path segment matches any number of folders, none included;
- a pattern ending in `/` matches everything below that folder (`white/` = `white/**`).
Matching is case-sensitive, like the filesystem.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import PurePath
from typing import Any, Iterable, Optional

__all__ = ["Profile", "compile_glob", "glob_problem", "output_for"]


@dataclass(frozen=True)
class Profile:
    match: str
    output: Any  # OutputConfig; typed loosely so config.py and this module do not import each other
    pattern: re.Pattern[str]

    def matches(self, rel: PurePath) -> bool:
        return self.pattern.fullmatch(rel.as_posix()) is not None


def glob_problem(glob: str) -> Optional[str]:
    """Why `glob` cannot be a profile's match, or None when it can."""
    if glob.startswith("/"):
        return f"must be relative to the inbox, got {glob!r}"
    segments = glob.rstrip("/").split("/")
    if any(segment in ("", ".", "..") for segment in segments):
        return f"must not contain empty, '.' or '..' folders, got {glob!r}"
    for segment in segments:
        if "**" in segment and segment != "**":
            return f"'**' must be a whole folder name (e.g. 'a/**/b.png'), got {glob!r}"
        if segment.count("[") != segment.count("]"):
            return f"unbalanced '[' in {glob!r}"
    return None


def compile_glob(glob: str) -> re.Pattern[str]:
    if glob.endswith("/"):
        glob += "**"
    segments = glob.split("/")
    parts = []
    for index, segment in enumerate(segments):
        last = index == len(segments) - 1
        if segment == "**":
            # Zero or more whole folders; at the end, anything at all below.
            parts.append(".*" if last else "(?:[^/]+/)*")
        else:
            parts.append(_segment_regex(segment) + ("" if last else "/"))
    return re.compile("".join(parts))


def _segment_regex(segment: str) -> str:
    out = []
    i = 0
    while i < len(segment):
        char = segment[i]
        if char == "*":
            out.append("[^/]*")
        elif char == "?":
            out.append("[^/]")
        elif char == "[":
            end = segment.index("]", i + 1)
            body = segment[i + 1 : end]
            negate = body.startswith("!")
            body = re.escape(body[1:] if negate else body).replace("\\-", "-")
            out.append(f"[{'^' if negate else ''}{body}]")
            i = end
        else:
            out.append(re.escape(char))
        i += 1
    return "".join(out)


def output_for(profiles: Iterable[Profile], default: Any, rel: PurePath) -> Any:
    """The output settings for the file at `rel` under the inbox: the first match wins."""
    for profile in profiles:
        if profile.matches(rel):
            return profile.output
    return default
