"""The status file's format: schema, naming, timestamps, the writer's identity (host, boot,
process start), reading one back, and its one-line summary.
"""

from __future__ import annotations

import json
import socket
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Dict, Mapping, Optional

SCHEMA = 1
SUFFIX = ".json"
# A live daemon rewrites its file at least this often, even when nothing changes, so that
# readers on other hosts can tell a live instance from one that died without cleaning up.
HEARTBEAT_SECONDS = 10.0


def short_hostname() -> str:
    return socket.gethostname().split(".")[0] or "host"


def iso(ts: float) -> str:
    return datetime.fromtimestamp(ts, timezone.utc).isoformat(timespec="seconds").replace("+00:00", "Z")


def boot_id() -> Optional[str]:
    try:
        return Path("/proc/sys/kernel/random/boot_id").read_text().strip() or None
    except OSError:
        return None


def process_start(pid: int) -> Optional[int]:
    """The process's start time in clock ticks since boot (proc(5), stat field 22)."""
    try:
        raw = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    # The command name (field 2) may itself contain spaces and parentheses.
    fields = raw[raw.rfind(")") + 2 :].split()
    try:
        return int(fields[19])
    except (IndexError, ValueError):
        return None


def read_status(path: Path) -> Dict[str, Any]:
    """One status document; OSError when unreadable, ValueError when it is not one."""
    with open(path, "rb") as fh:
        doc = json.loads(fh.read(1024 * 1024).decode("utf-8"))
    if not isinstance(doc, dict) or doc.get("schema") != SCHEMA:
        raise ValueError(f"{path}: not an rmbgd status file (schema {SCHEMA})")
    return doc


def human_duration(seconds: float) -> str:
    seconds = max(0, int(round(seconds)))
    if seconds < 60:
        return f"{seconds} s"
    minutes, seconds = divmod(seconds, 60)
    if minutes < 60:
        return f"{minutes} min {seconds:02d} s" if minutes < 10 else f"{minutes} min"
    hours, minutes = divmod(minutes, 60)
    if hours < 24:
        return f"{hours} h {minutes:02d} min"
    days, hours = divmod(hours, 24)
    return f"{days} d {hours} h"


def summary_line(doc: Mapping[str, Any]) -> str:
    """One line for systemd's STATUS= and for the log: counts, rate and ETA of the backlog."""
    parts = [
        f"processed {doc.get('processed', 0)}",
        f"failed {doc.get('failed', 0)}",
        f"queued {doc.get('queued', 0)}",
        f"in flight {doc.get('in_flight', 0)}",
    ]
    rate = doc.get("rate")
    if rate is not None:
        parts.append(f"{rate:.1f} img/s")
    eta = doc.get("eta_seconds")
    if eta:
        parts.append(f"backlog done in ~{human_duration(eta)}")
    return ", ".join(parts)
