"""The configured folders: probing them for `rmbgd check`, creating them at start."""

from __future__ import annotations

import os
from pathlib import Path

from rmbgd.config.problems import Problems
from rmbgd.config.schema import Config, ConfigError

__all__ = ["check_folders", "prepare_folders"]

_FOLDER_KEYS = ("inbox", "outbox", "errors", "done")


def _folders(cfg: Config) -> list[tuple[str, Path]]:
    return [
        (f"paths.{key}", getattr(cfg.paths, key))
        for key in _FOLDER_KEYS
        if getattr(cfg.paths, key) is not None
    ]


def _resolved(path: Path) -> Path:
    try:
        return path.resolve()
    except (OSError, RuntimeError):
        # A symlink loop; the folder probe reports it, the nesting check uses the plain path.
        return path


def _probe_folder(path: Path, inbox: bool) -> str | None:
    """Why `path` cannot serve as a working folder, or None if it can (or can be created)."""
    try:
        if path.is_dir():
            # The inbox must also be listable; the others are only written into.
            needed = (os.R_OK if inbox else 0) | os.W_OK | os.X_OK
            if os.access(path, needed):
                return None
            words = ((os.R_OK, "readable"), (os.W_OK, "writable"), (os.X_OK, "searchable"))
            missing = [w for flag, w in words if needed & flag and not os.access(path, flag)]
            return f"folder is not {' or '.join(missing) or 'accessible'} by this user ({path})"
        if path.is_symlink():
            return f"is a broken symbolic link ({path})"
        if path.exists():
            return f"exists but is not a folder ({path})"
    except OSError as err:
        return f"cannot access {path}: {err.strerror or err}"

    # Missing: it is fine if the nearest thing that does exist is a folder we may write in.
    ancestor = path.parent
    while True:
        try:
            if ancestor.exists() or ancestor.is_symlink():
                break
        except OSError as err:
            return f"cannot be created: cannot access {ancestor}: {err.strerror or err} ({path})"
        if ancestor.parent == ancestor:
            break
        ancestor = ancestor.parent
    if not ancestor.is_dir():
        return f"cannot be created: {ancestor} is not a folder ({path})"
    if not os.access(ancestor, os.W_OK | os.X_OK):
        return f"cannot be created: {ancestor} is not writable by this user ({path})"
    return None


def check_folders(cfg: Config) -> list[str]:
    """Problems with the configured folders, as `paths.KEY: ...` lines; creates nothing."""
    problems = Problems()
    folders = _folders(cfg)
    for key, path in folders:
        reason = _probe_folder(path, inbox=key == "paths.inbox")
        if reason:
            problems.add(key, reason)

    resolved = [(key, path, _resolved(path)) for key, path in folders]

    def shown(path: Path, real: Path) -> str:
        return str(path) if path == real else f"{path}, which is {real}"

    # The watcher recurses into the inbox and outputs mirror its tree, so any overlap
    # would feed the daemon its own results or move files out from under it.
    for i, (key_a, path_a, real_a) in enumerate(resolved):
        for key_b, path_b, real_b in resolved[i + 1 :]:
            if real_a == real_b:
                problems.add(key_b, f"must differ from {key_a} (both are {shown(path_b, real_b)})")
            elif real_b.is_relative_to(real_a):
                problems.add(key_b, f"must not be inside {key_a} ({shown(path_b, real_b)})")
            elif real_a.is_relative_to(real_b):
                problems.add(key_a, f"must not be inside {key_b} ({shown(path_a, real_a)})")

    # Anything rmbgd writes into the inbox would be taken as an input; its own default state
    # folder is hidden there, but a configured one or a log file is not.
    inbox = _resolved(cfg.paths.inbox)
    for key, path in (("state.dir", cfg.state.dir), ("logging.file", cfg.logging.file)):
        if path is not None and _resolved(path).is_relative_to(inbox):
            problems.add(key, f"must not be inside paths.inbox ({path})")
    if cfg.logging.file is not None:
        reason = _probe_folder(cfg.logging.file.parent, inbox=False)
        if reason:
            problems.add("logging.file", reason)
    return problems.items


def prepare_folders(cfg: Config) -> None:
    """Create any missing configured folder (with parents); raises ConfigError on failure."""
    problems = Problems()
    for key, path in _folders(cfg):
        try:
            path.mkdir(parents=True, exist_ok=True)
        except FileExistsError:
            # mkdir's exist_ok only tolerates an existing directory.
            problems.add(key, f"exists but is not a folder ({path})")
        except OSError as err:
            problems.add(key, f"cannot create {path}: {err.strerror or err}")
    if problems.items:
        raise ConfigError(problems.items)
