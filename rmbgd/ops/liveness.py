"""Whether the instance behind a status file still runs, and pruning the files of dead ones.

Decided from the file, not from its own say-so: on the same host by its pid *and* that
process's start time (a reused pid is another process), after a reboot never, and for other
hosts by how long ago the file was last rewritten.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, List, Mapping, Optional, Tuple

from rmbgd.ops.statusdoc import (
    HEARTBEAT_SECONDS,
    SUFFIX,
    boot_id,
    human_duration,
    process_start,
    read_status,
    short_hostname,
)

# No rewrite for this long means the daemon is dead (elsewhere) or stuck (here).
STALE_AFTER_SECONDS = 6 * HEARTBEAT_SECONDS


@dataclass
class Instance:
    path: Path
    doc: Dict[str, Any]
    # True: alive; False: stopped or dead; None: cannot tell (another host gone quiet).
    running: Optional[bool]
    note: str
    # Seconds since the file was last rewritten.
    age: float


def judge(doc: Mapping[str, Any], now: Optional[float] = None) -> Tuple[Optional[bool], str]:
    """Whether the instance that wrote `doc` still runs, and why we think so."""
    now = time.time() if now is None else now
    age = max(0.0, now - float(doc.get("updated_unix") or 0.0))
    pid = doc.get("pid")
    if doc.get("state") == "stopped":
        return False, f"stopped at {doc.get('updated')}"
    if doc.get("state") == "failed":
        return False, f"failed to start: {_startup_error(doc)}"
    if doc.get("host") != short_hostname():
        if age > STALE_AFTER_SECONDS:
            return None, f"on host {doc.get('host')}, silent for {human_duration(age)}: probably dead"
        return True, f"on host {doc.get('host')}"
    boot = boot_id()
    if boot and doc.get("boot_id") and boot != doc.get("boot_id"):
        return False, "died: the host has rebooted since"
    if not isinstance(pid, int) or not _pid_alive(pid, doc.get("proc_start")):
        return False, f"died: process {pid} is gone without stopping cleanly"
    if age > STALE_AFTER_SECONDS:
        return True, f"no update for {human_duration(age)}: the daemon may be hung"
    return True, ""


def _startup_error(doc: Mapping[str, Any]) -> str:
    failure = doc.get("startup_error")
    error = failure.get("error") if isinstance(failure, dict) else None
    return str(error) if error else "no reason recorded"


# Kept on purpose: two /proc reads tell a reused pid from ours without psutil (a compiled dependency).
def _pid_alive(pid: int, proc_start: Any) -> bool:
    start = process_start(pid)
    if start is not None:
        # Same pid, other start time: the pid was reused by an unrelated process.
        return proc_start is None or start == proc_start
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        # Alive, owned by another user, and /proc hides it (hidepid).
        return True
    return True


def list_instances(directory: Path, now: Optional[float] = None) -> List[Instance]:
    """Every status file in `directory`, live ones first, then the most recent.

    A missing folder is an empty list; an unreadable one raises OSError.
    """
    now = time.time() if now is None else now
    try:
        names = sorted(os.listdir(directory))
    except FileNotFoundError:
        return []
    found: List[Instance] = []
    for name in names:
        if name.startswith(".") or not name.endswith(SUFFIX):
            continue
        path = Path(directory) / name
        try:
            doc = read_status(path)
        except (OSError, ValueError, UnicodeDecodeError):
            # Someone else's file, or one being replaced right now: not ours to judge.
            continue
        running, note = judge(doc, now)
        age = max(0.0, now - float(doc.get("updated_unix") or 0.0))
        found.append(Instance(path, doc, running, note, age))
    found.sort(key=lambda i: (i.running is not True, -float(i.doc.get("updated_unix") or 0.0)))
    return found


def prune(directory: Path, keep: Optional[Path] = None) -> List[Path]:
    """Remove the files of this host's instances that are no longer running.

    Called when a new instance starts, so the folder holds the live instances plus, after
    they stop, the last ones to report on. Other hosts' files are theirs to clean up.
    """
    removed: List[Path] = []
    for inst in list_instances(directory):
        if inst.path == keep or inst.running is not False:
            continue
        if inst.doc.get("host") != short_hostname():
            continue
        try:
            inst.path.unlink()
        except FileNotFoundError:
            continue
        removed.append(inst.path)
    return removed
