"""`rmbgd status`: the instances in a state folder as text or JSON, and the exit code."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any, List, Mapping, Optional, Tuple

from rmbgd.ops.liveness import Instance, list_instances
from rmbgd.ops.statusdoc import human_duration

# LSB init-script status codes, which `systemctl status` also follows.
EXIT_RUNNING = 0
EXIT_NOT_RUNNING = 3
EXIT_UNKNOWN = 4


def report(directory: Path, as_json: bool = False, now: Optional[float] = None) -> Tuple[str, int]:
    """The text `rmbgd status` prints, and its exit code: 0 when an instance runs, 3 when
    none does, 4 when the state folder cannot be read."""
    now = time.time() if now is None else now
    try:
        instances = list_instances(directory, now)
    except OSError as exc:
        reason = f"cannot read the state folder {directory}: {exc.strerror or exc}"
        if as_json:
            return _json({"state_dir": str(directory), "running": None, "error": reason}), EXIT_UNKNOWN
        return f"rmbgd: {reason}\n", EXIT_UNKNOWN
    running = any(i.running is True for i in instances)
    code = EXIT_RUNNING if running else EXIT_NOT_RUNNING
    if as_json:
        listed = [
            {**i.doc, "running": i.running, "note": i.note, "age_seconds": round(i.age, 1),
             "file": str(i.path)}
            for i in instances
        ]
        return _json({"state_dir": str(directory), "running": running, "instances": listed}), code
    return _render(directory, instances, running, now), code


def _json(data: Mapping[str, Any]) -> str:
    return json.dumps(data, indent=2) + "\n"


def _render(directory: Path, instances: List[Instance], running: bool, now: float) -> str:
    if not instances:
        return (
            f"rmbgd is not running: no status file in {directory}\n"
            "(it has not started with this config yet, or its state.dir is elsewhere)\n"
        )
    lines: List[str] = []
    if not running:
        lines.append(f"rmbgd is not running (no live instance in {directory}); the last one:")
        instances = instances[:1]
    for inst in instances:
        lines.extend(_render_one(inst, now))
    return "\n".join(lines) + "\n"


def _render_one(inst: Instance, now: float) -> List[str]:
    doc = inst.doc
    started = float(doc.get("started_unix") or now)
    ended = now if inst.running else float(doc.get("updated_unix") or now)
    if inst.running is True:
        head = f"running, {doc.get('state')}"
    elif inst.running is None:
        head = "unknown"
    else:
        head = {"stopped": "stopped", "failed": "failed"}.get(doc.get("state"), "dead")
    lines = [
        f"rmbgd {doc.get('instance')}: {head} (pid {doc.get('pid')}, "
        f"{'up' if inst.running else 'ran for'} {human_duration(ended - started)} since {doc.get('started')})"
    ]
    if inst.note:
        lines.append(f"  note:       {inst.note}")
    if doc.get("config"):
        lines.append(f"  config:     {doc['config']}")
    if doc.get("model"):
        on = f" on {doc['device']}" if doc.get("device") else ""  # no device before the model loaded
        lines.append(f"  model:      {doc['model']}{on}")
    if doc.get("state") != "failed":  # nothing was taken on before a failed start
        lines.append(
            f"  files:      {doc.get('processed', 0)} processed, {doc.get('failed', 0)} failed, "
            f"{doc.get('queued', 0)} queued, {doc.get('in_flight', 0)} in flight"
        )
    http = doc.get("http")
    if isinstance(http, dict):
        statuses = ", ".join(f"{code}: {n}" for code, n in (http.get("by_status") or {}).items())
        lines.append(
            f"  http:       {http.get('requests', 0)} requests{f' ({statuses})' if statuses else ''}, "
            f"{http.get('images_done', 0)} images done, {http.get('images_failed', 0)} failed, "
            f"{http.get('in_flight', 0)} in flight"
        )
    if inst.running and doc.get("rate") is not None:
        rate = f"  rate:       {doc['rate']:.1f} images/s"
        if doc.get("eta_seconds"):
            rate += f", backlog done in ~{human_duration(doc['eta_seconds'])}"
        lines.append(rate)
    error = doc.get("last_error")
    if isinstance(error, dict):
        where = f"{error.get('input')} ({error.get('stage')})"
        lines.append(f"  last error: {error.get('time')} {where}: {error.get('error')}")
    lines.append(f"  updated:    {human_duration(inst.age)} ago ({inst.path})")
    return lines
