"""`rmbgd process`'s command line made concrete: the inputs it names, and its destinations.

The files named, and every file below the folders named, become Sources; --out and --done
are checked (and made) before anything else happens, so a usage error costs no model load.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path, PurePath
from typing import List, Optional, Sequence, Tuple

from rmbgd.intake.names import is_ignored_name
from rmbgd.output.fsops import walk_files


class UsageError(Exception):
    """The command line asks for something impossible (exit 2, before the model loads)."""


# --------------------------------------------------------------------------- inputs


@dataclass(eq=False)
class Source:
    """One input: what the pipeline reads as a Claim (`path`, `rel`), plus delivery state.

    `rel` is the path below the folder it was found in (just its name for a file given
    directly): outputs mirror it and `profiles:` globs match it, as they do inbox paths.
    """

    rel: PurePath
    path: Path
    shown: str  # the path as the user would type it, for terminal messages
    write_failures: int = 0
    outputs: Optional[List[Path]] = None  # once published, a retry only retires the original


@dataclass
class Plan:
    sources: List[Source]
    out: Path
    done: Optional[Path]
    ignored: List[Tuple[str, str]] = field(default_factory=list)  # (path, reason)
    # Folders `plan` made for --out/--done (deepest last), removed again if the run never starts.
    created: List[Path] = field(default_factory=list)


def plan(paths: Sequence[str], out: str, done: Optional[str] = None) -> Plan:
    """Expand the arguments into inputs and check the destinations; raises UsageError."""
    roots = []
    for raw in paths:
        path = Path(os.path.abspath(os.path.expanduser(raw)))
        if not os.path.lexists(path):
            raise UsageError(f"no such file or folder: {raw}")
        if not (path.is_dir() or path.is_file()):
            raise UsageError(f"not a regular file or folder: {raw}")
        roots.append((raw, path))
    out_dir = _destination("--out", out, roots)
    done_dir = _destination("--done", done, roots) if done is not None else None
    # Created only once every argument is known to be usable.
    created: List[Path] = []
    for option, raw, path in (("--out", out, out_dir), ("--done", done, done_dir)):
        if path is not None:
            created += _create(option, raw, path)
    result = Plan(sources=[], out=out_dir, done=done_dir, created=created)
    seen = set()
    for raw, path in roots:
        found = _below(raw, path, result.ignored) if path.is_dir() else [Source(PurePath(path.name), path, raw)]
        for source in found:
            # The same file named twice (or given and also found in a folder) is done once.
            # Its own name is not resolved: a link is an input of its own (that fails), never
            # a stand-in for its target.
            real = os.path.join(os.path.realpath(source.path.parent), source.path.name)
            if real not in seen:
                seen.add(real)
                result.sources.append(source)
    return result


def _destination(option: str, raw: str, roots: List[Tuple[str, Path]]) -> Path:
    path = Path(os.path.abspath(os.path.expanduser(raw)))
    if os.path.lexists(path) and not path.is_dir():
        raise UsageError(f"{option} {raw}: exists and is not a folder")
    real = Path(os.path.realpath(path))
    for shown, root in roots:
        if root.is_dir() and real.is_relative_to(os.path.realpath(root)):
            # Results (or moved originals) inside an input folder would be inputs next time.
            raise UsageError(f"{option} {raw}: must not be inside the input folder {shown}")
    return path


def _create(option: str, raw: str, path: Path) -> List[Path]:
    """Make `path` (and missing parents); return the folders this made, outermost first."""
    missing = []
    for folder in (path, *path.parents):
        if os.path.lexists(folder):
            break
        missing.append(folder)
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise UsageError(f"{option} {raw}: cannot create: {exc.strerror or exc}") from None
    if not os.access(path, os.W_OK | os.X_OK):
        raise UsageError(f"{option} {raw}: folder is not writable by this user")
    return missing[::-1]


def remove_created(work: Plan) -> None:
    """Remove the folders `plan` made, if still empty: a run that never started leaves none."""
    for folder in reversed(work.created):
        try:
            folder.rmdir()
        except OSError:
            # Not empty (someone put something there meanwhile) or already gone: leave it.
            continue


def _below(raw: str, top: Path, ignored: List[Tuple[str, str]]) -> List[Source]:
    """Every file under `top`, hidden and partial names skipped, symlinked folders not entered."""
    sources = []
    for entry in walk_files(top, skip=lambda entry: is_ignored_name(entry.name)):
        path = Path(entry.path)
        rel = path.relative_to(top)
        shown = os.path.join(raw, str(rel))
        if entry.is_symlink() and entry.is_dir():
            ignored.append((shown, "symbolic link to a folder: not followed"))
        elif entry.is_file() or entry.is_symlink():
            # A dangling link stays in, to fail with its reason rather than vanish unreported.
            sources.append(Source(rel, path, shown))
        else:
            # FIFOs, sockets and devices are never opened, as in the daemon.
            ignored.append((shown, "not a regular file"))
    sources.sort(key=lambda source: source.rel.as_posix())
    return sources
