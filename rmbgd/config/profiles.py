"""Per-folder output settings: `profiles:` globs matched against a file's path under the inbox.

One daemon can serve `inbox/white/` (white JPEGs), `inbox/crop/` (cropped PNGs) and the rest
(plain PNGs) at once. The first profile whose glob matches wins; files no profile matches use
the top-level `output:` section.

Glob rules, on the path relative to the inbox with `/` between folders:
- `*` matches within one name (never a `/`), `?` one character, `[abc]` one of a set;
- `**` as a whole path segment matches any number of folders, none included;
- a pattern ending in `/` matches everything below that folder (`white/` = `white/**`).
Matching is case-sensitive, like the filesystem.

Kept on purpose instead of wcmatch: its `**` costs O(n^k) for k of them (wcmatch 12.0.3,
GLOBSTAR, a non-matching `**/a/**/a/...` on a 40-folder path: 6 `**` 1.3 s per file, 7 7.3 s,
8 34 s), where this translation stays linear (2 us for any k; usual globs 0.2-0.6 us against
wcmatch's 1-3 us); and it takes `[z-a]`, `a/[]/b`, `a/[/b`, `/x` or `a/../b` silently as
never-matching or literal text, not as a problem to report.
"""

from __future__ import annotations

import functools
import itertools
import re
from pathlib import PurePath
from typing import Any, Iterable, Iterator, Optional

__all__ = ["GlobError", "compile_glob", "glob_problem", "matches", "output_for"]


class GlobError(ValueError):
    """A profile's glob that cannot be used; the message says why, naming the glob."""


def glob_problem(glob: str) -> Optional[str]:
    """Why `glob` cannot be a profile's match, or None when it can."""
    try:
        compile_glob(glob)
    except GlobError as err:
        return str(err)
    return None


def compile_glob(glob: str) -> re.Pattern[str]:
    """The regex for `glob` (see the module's rules); raises GlobError for any unusable glob."""
    shown = _shown(glob)
    if glob.startswith("/"):
        raise GlobError(f"must be relative to the inbox, got {shown}")
    if glob.endswith("/"):
        glob += "**"
    segments = glob.split("/")
    if any(segment in ("", ".", "..") for segment in segments):
        raise GlobError(f"must not contain empty, '.' or '..' folders, got {shown}")
    names = itertools.count()
    # The runs of whole names between `**`s; runs of `**` mean the same as one.
    groups: list[list[str]] = [[]]
    for segment in segments:
        if segment == "**":
            if groups[-1] or len(groups) == 1:
                groups.append([])
        elif "**" in segment:
            raise GlobError(f"'**' must be a whole folder name (e.g. 'a/**/b.png'), got {shown}")
        else:
            groups[-1].append(_segment_regex(segment, shown, names))
    regex = "/".join(groups[0])
    sep = "/" if groups[0] else ""
    for group in groups[1:-1]:
        # A run between two `**` is placed at its leftmost match for good: no match is lost
        # that way, and many `**` cost linear time instead of trying every split of the path.
        regex += sep + _locked("(?:[^/]+/)*?" + "/".join(group) + "/", f"g{next(names)}")
        sep = ""
    if len(groups) > 1:
        # At the end, `**` is anything at all below; before a last run, any folders.
        regex += sep + ("(?:[^/]+/)*" + "/".join(groups[-1]) if groups[-1] else ".*")
    try:
        return re.compile(regex)
    except re.error as err:  # the translation above should rule this out; never a crash
        raise GlobError(f"cannot be used as a glob ({err.msg}): {shown}") from None


def _shown(glob: str) -> str:
    return repr(glob if len(glob) <= 60 else glob[:57] + "...")


def _locked(pattern: str, name: str) -> str:
    """`pattern` matched once, at its leftmost place, and never backtracked into.

    A lookahead is not re-entered once it matched; the backreference then consumes what it
    found. This is an atomic group written so that Python before 3.11 accepts it."""
    return f"(?=(?P<{name}>{pattern}))(?P={name})"


def _segment_regex(segment: str, shown: str, names: Iterator[int]) -> str:
    """One folder or file name's glob as a regex that never matches a `/`."""
    pieces: list[list[str]] = [[]]  # the fixed-length parts around the `*`s
    i = 0
    while i < len(segment):
        char = segment[i]
        if char == "*":
            pieces.append([])
        elif char == "?":
            pieces[-1].append("[^/]")
        elif char == "[":
            end = segment.find("]", i + 1)
            if end < 0:
                raise GlobError(f"unbalanced '[' in {shown}")
            pieces[-1].append(_set_regex(segment[i + 1 : end], shown))
            i = end
        elif char == "]":
            raise GlobError(f"unbalanced ']' in {shown} (a set is written '[abc]')")
        else:
            pieces[-1].append(re.escape(char))
        i += 1
    texts = ["".join(piece) for piece in pieces]
    if len(texts) == 1:
        return texts[0]
    # `*a*b*c`: each middle piece is placed at its leftmost match for good (enough for
    # fixed-length pieces), so many stars cost linear time, not every split of the name.
    middle = "".join(_locked(f"[^/]*?{text}", f"g{next(names)}") for text in texts[1:-1])
    return f"{texts[0]}{middle}[^/]*{texts[-1]}"


def _set_regex(body: str, shown: str) -> str:
    negate = body.startswith("!")
    if negate:
        body = body[1:]
    if not body:
        raise GlobError(f"empty set '[{'!' if negate else ''}]' in {shown}")
    out = []
    i = 0
    while i < len(body):
        # `a-z` is a range; a `-` first or last stands for itself.
        if i + 2 < len(body) and body[i + 1] == "-":
            low, high = body[i], body[i + 2]
            if low > high:
                raise GlobError(f"bad range '{low}-{high}' in {shown} (the first must not come after the last)")
            out.append(f"{re.escape(low)}-{re.escape(high)}")
            i += 3
        else:
            out.append(re.escape(body[i]))
            i += 1
    # A negated set still matches within one name only, like `*` and `?`.
    return f"[^/{''.join(out)}]" if negate else f"[{''.join(out)}]"


@functools.lru_cache(maxsize=256)
def _compiled(glob: str) -> re.Pattern[str]:
    return compile_glob(glob)


def matches(glob: str, rel: PurePath) -> bool:
    """Whether the file at `rel` under the inbox matches the profile glob `glob` (a valid one)."""
    return _compiled(glob).fullmatch(rel.as_posix()) is not None


def output_for(profiles: Iterable[Any], default: Any, rel: PurePath) -> Any:
    """The output settings for the file at `rel` under the inbox: the first match wins."""
    for profile in profiles:
        if profile.matches(rel):
            return profile.output
    return default
