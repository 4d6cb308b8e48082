"""Doctor checks: the configured folders (looked at, not created) and the inotify limits."""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Any, Iterator, List, Optional, Tuple

from rmbgd.runtime.doctor.result import FAIL, OK, SKIP, WARN, Result

_INOTIFY = Path("/proc/sys/fs/inotify")


def check_folders(cfg: Any) -> List[Result]:
    from rmbgd.config import check_folders as config_folder_problems

    problems = config_folder_problems(cfg)
    if problems:
        return [Result(FAIL, "folders", problem) for problem in problems]
    inbox = cfg.paths.inbox
    foreign = _other_filesystems(inbox)
    if foreign:
        return [
            Result(
                FAIL,
                "folders",
                f"paths.inbox: {foreign} is on another filesystem than the inbox, whose work area "
                f"({inbox / '.rmbgd' / 'work'}) files are renamed into: files there would fail to be claimed; "
                "keep the whole inbox on one filesystem",
            )
        ]
    missing = [f"{key} ({path})" for key, path in _folder_items(cfg) if not path.exists()]
    text = "writable, none inside another; the inbox and its work area on one filesystem"
    if missing:
        return [Result(OK, "folders", f"{text}; to be created at start: {', '.join(missing)}")]
    return [Result(OK, "folders", text)]


def _folder_items(cfg: Any) -> List[Tuple[str, Path]]:
    paths = cfg.paths
    items = [("paths.inbox", paths.inbox), ("paths.outbox", paths.outbox), ("paths.errors", paths.errors)]
    if paths.done is not None:
        items.append(("paths.done", paths.done))
    return items


def _inbox_folders(inbox: Path) -> Iterator[Tuple[Path, int]]:
    """(folder, st_dev) for the inbox and every folder below it, links not followed."""
    try:
        yield inbox, os.stat(inbox).st_dev
    except OSError:
        return
    stack = [inbox]
    while stack:
        folder = stack.pop()
        try:
            entries = list(os.scandir(folder))
        except OSError:
            continue
        for entry in entries:
            try:
                if entry.is_dir(follow_symlinks=False):
                    stack.append(Path(entry.path))
                    yield Path(entry.path), entry.stat(follow_symlinks=False).st_dev
            except OSError:
                continue


def _other_filesystems(inbox: Path) -> Optional[Path]:
    root_dev = None
    for folder, dev in _inbox_folders(inbox):
        if root_dev is None:
            root_dev = dev
        elif dev != root_dev:
            return folder
    return None


def check_inotify(cfg: Any, limits: Path = _INOTIFY) -> Result:
    if cfg.watch.polling:
        return Result(OK, "inotify", "not used (watch.polling: true)")
    if not sys.platform.startswith("linux"):
        return Result(SKIP, "inotify", "not Linux")
    watches = _read_int(limits / "max_user_watches")
    instances = _read_int(limits / "max_user_instances")
    folders = sum(1 for _ in _inbox_folders(cfg.paths.inbox))
    return inotify_verdict(folders, watches, instances)


def inotify_verdict(folders: int, watches: Optional[int], instances: Optional[int]) -> Result:
    """One watch per inbox folder; the limits are per user, shared with every other program."""
    if watches is None:
        return Result(WARN, "inotify", f"cannot read the limits in {_INOTIFY}; the inbox has {folders} folder(s)")
    text = f"the inbox has {folders} folder(s), one watch each; fs.inotify.max_user_watches = {watches}"
    if instances is not None:
        text += f", max_user_instances = {instances}"
    fix = (
        f"raise it, e.g. `sysctl fs.inotify.max_user_watches={max(524288, 4 * folders)}` (and in "
        "/etc/sysctl.d/ to keep it), or set watch.polling: true"
    )
    if folders >= watches:
        return Result(FAIL, "inotify", f"{text}: too few; {fix}")
    if instances is not None and instances < 1:
        return Result(FAIL, "inotify", f"{text}: no inotify instance allowed; raise fs.inotify.max_user_instances")
    if folders > watches // 2:
        return Result(WARN, "inotify", f"{text}: other programs share that limit; {fix}")
    return Result(OK, "inotify", text)


def _read_int(path: Path) -> Optional[int]:
    try:
        return int(path.read_text().strip())
    except (OSError, ValueError):
        return None
