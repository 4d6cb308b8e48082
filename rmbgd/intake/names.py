"""Which names in the inbox are work and which are someone else's business."""

from __future__ import annotations

from pathlib import PurePath

# Names that downloaders, browsers, editors and rsync-like tools use while a file is still
# arriving; they become real work only once renamed to their final name.
PARTIAL_SUFFIXES = (".part", ".tmp", ".crdownload", ".partial", ".download")

# The daemon's private area inside the inbox (claimed files); hidden, so it is never work.
PRIVATE_DIR = ".rmbgd"


def is_ignored_name(name: str) -> bool:
    """True for a single path component that must not be treated as work."""
    if not name or name.startswith("."):
        return True
    if name.endswith("~"):
        return True
    return name.lower().endswith(PARTIAL_SUFFIXES)


def is_ignored(rel: PurePath) -> bool:
    """True when any component of a path relative to the inbox is hidden or partial.

    Every component counts, so a hidden folder hides everything below it (the private
    work area among them) and a folder being synced as `photos.part/` waits too.
    """
    return any(is_ignored_name(part) for part in rel.parts)
