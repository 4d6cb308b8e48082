"""The status file: what a running instance is doing, for `rmbgd status` and for people.

Each instance keeps one small JSON document, `<state dir>/<host>-<pid>.json`, rewritten
atomically (temporary file, fsync, rename) so a reader never sees half of one. One file per
instance because several may share a state folder: the per-GPU template units, or daemons on
other hosts working on the same network inbox (whose state folder is then shared with it).

The state folder is `state.dir`, or `<inbox>/.rmbgd/state` when that is null: a place that
follows from the config alone, so `rmbgd status --config FILE` in an operator's shell finds
what the daemon under systemd wrote, with no environment to reproduce ($STATE_DIRECTORY is
only set for the service). The folder is hidden inside the inbox, so it is never taken as work.

Whether an instance still runs is decided from the file, not from its own say-so: on the same
host by its pid *and* that process's start time (a reused pid is another process), after a
reboot never, and for other hosts by how long ago the file was last rewritten.
"""

from __future__ import annotations

import collections
import json
import os
import socket
import threading
import time
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Deque, Dict, List, Mapping, Optional, Tuple

from rmbgd import __version__
from rmbgd.intake.names import PRIVATE_DIR

SCHEMA = 1
SUFFIX = ".json"
# A live daemon rewrites its file at least this often, even when nothing changes, so that
# readers on other hosts can tell a live instance from one that died without cleaning up.
HEARTBEAT_SECONDS = 10.0
# Counts change many times a second under load; more frequent rewrites would only cost fsyncs.
MIN_WRITE_INTERVAL_SECONDS = 1.0
# No rewrite for this long means the daemon is dead (elsewhere) or stuck (here).
STALE_AFTER_SECONDS = 6 * HEARTBEAT_SECONDS
RATE_WINDOW_SECONDS = 60.0

# "failed": the start failed; `startup_error` says why. Final, like "stopped".
STATES = ("starting", "loading", "ready", "reloading", "stopping", "stopped", "failed")


def default_state_dir(cfg: Any) -> Path:
    """The state folder of a Config: `state.dir`, else hidden in the inbox."""
    configured = cfg.state.dir
    return configured if configured is not None else cfg.paths.inbox / PRIVATE_DIR / "state"


def short_hostname() -> str:
    return socket.gethostname().split(".")[0] or "host"


def iso(ts: float) -> str:
    return datetime.fromtimestamp(ts, timezone.utc).isoformat(timespec="seconds").replace("+00:00", "Z")


def _boot_id() -> Optional[str]:
    try:
        return Path("/proc/sys/kernel/random/boot_id").read_text().strip() or None
    except OSError:
        return None


def _process_start(pid: int) -> Optional[int]:
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


class RateMeter:
    """Images per second over a sliding window, from a running total of finished files."""

    def __init__(self, window_seconds: float = RATE_WINDOW_SECONDS, clock=time.monotonic) -> None:
        self.window = window_seconds
        self._clock = clock
        self._samples: Deque[Tuple[float, int]] = collections.deque()

    def add(self, total: int, now: Optional[float] = None) -> None:
        now = self._clock() if now is None else now
        self._samples.append((now, total))
        # Keep one sample older than the window, so the window is always fully covered.
        while len(self._samples) > 2 and self._samples[1][0] <= now - self.window:
            self._samples.popleft()

    def rate(self) -> Optional[float]:
        """None until there is a second of history to judge from."""
        if len(self._samples) < 2:
            return None
        (t0, n0), (t1, n1) = self._samples[0], self._samples[-1]
        if t1 - t0 < 1.0:
            return None
        return max(0, n1 - n0) / (t1 - t0)

    def eta_seconds(self, backlog: int) -> Optional[float]:
        rate = self.rate()
        if backlog <= 0:
            return 0.0
        if not rate:
            return None
        return backlog / rate


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


class StatusWriter:
    """Keeps this instance's status file up to date; never raises (a failure is logged once).

    The daemon calls `set_state()` at each phase (written at once), `tick()` from its main
    loop with the current counts (written when due), and `record_error()` from any thread.
    """

    def __init__(
        self,
        directory: Path,
        *,
        config: Optional[Path] = None,
        instance: Optional[str] = None,
        log: Any = None,
        clock=time.time,
        monotonic=time.monotonic,
    ) -> None:
        self.directory = Path(directory)
        self.host = short_hostname()
        self.pid = os.getpid()
        self.instance = instance or f"{self.host}-{self.pid}"
        self.path = self.directory / f"{self.instance}{SUFFIX}"
        self._log = log
        self._clock = clock
        self._monotonic = monotonic
        self._rate = RateMeter(clock=monotonic)
        self._lock = threading.Lock()
        self._write_lock = threading.Lock()
        self._dirty = True
        self._last_write: Optional[float] = None
        self._failed_logged = False
        self._prepared = False
        started = clock()
        self._doc: Dict[str, Any] = {
            "schema": SCHEMA,
            "rmbgd": __version__,
            "instance": self.instance,
            "host": self.host,
            "pid": self.pid,
            "boot_id": _boot_id(),
            "proc_start": _process_start(self.pid),
            "config": str(config) if config is not None else None,
            "state": "starting",
            "started": iso(started),
            "started_unix": started,
            "updated": None,
            "updated_unix": None,
            "uptime_seconds": 0.0,
            "model": None,
            "device": None,
            "processed": 0,
            "failed": 0,
            "queued": 0,
            "in_flight": 0,
            "rate": None,
            "eta_seconds": None,
            "last_error": None,
            "startup_error": None,
        }

    # -- what the daemon calls ----------------------------------------------------------------
    def set(self, **fields: Any) -> None:
        """Merge fields (model, device, batch_size, ...) into the document; written when due."""
        with self._lock:
            self._doc.update(fields)
            self._dirty = True

    def set_state(self, state: str, **fields: Any) -> bool:
        """Enter a phase (one of STATES) and write the file now."""
        self.set(state=state, **fields)
        return self.write()

    def record_error(self, input: Any, stage: str, error: str) -> None:
        """The latest failed file, shown by `rmbgd status` until the next one."""
        with self._lock:
            self._doc["last_error"] = {
                "time": iso(self._clock()),
                "input": str(input),
                "stage": stage,
                "error": error,
            }
            self._dirty = True

    def tick(self, processed: int, failed: int, queued: int, in_flight: int) -> bool:
        """Current counts; rewrites the file when they changed (at most once a second) and
        at least every HEARTBEAT_SECONDS. Cheap enough to call on every loop iteration.

        True when it rewrote the file just now (the moment to refresh systemd's STATUS= with
        summary() too); a failure to write is logged, not raised.
        """
        now = self._monotonic()
        with self._lock:
            counts = {"processed": processed, "failed": failed, "queued": queued, "in_flight": in_flight}
            if any(self._doc[k] != v for k, v in counts.items()):
                self._doc.update(counts)
                self._dirty = True
            self._rate.add(processed + failed, now)
            if self._last_write is None:
                due = True
            else:
                since = now - self._last_write
                due = since >= HEARTBEAT_SECONDS or (self._dirty and since >= MIN_WRITE_INTERVAL_SECONDS)
        if due:
            self.write()
        return due

    def summary(self) -> str:
        """The one-line STATUS= text for the counts given at the last tick()."""
        return summary_line(self.snapshot())

    def snapshot(self) -> Dict[str, Any]:
        with self._lock:
            doc = dict(self._doc)
            backlog = doc["queued"] + doc["in_flight"]
            rate = self._rate.rate()
            eta = self._rate.eta_seconds(backlog)
        doc["rate"] = round(rate, 3) if rate is not None else None
        doc["eta_seconds"] = round(eta, 1) if eta is not None else None
        now = self._clock()
        doc["updated"] = iso(now)
        doc["updated_unix"] = now
        doc["uptime_seconds"] = round(now - doc["started_unix"], 1)
        return doc

    def fail(self, error: str) -> bool:
        """The final write after a failed start: state `failed` with the reason and time.

        A failure to write is not logged: the daemon's `startup_failed` line, which follows,
        is the one thing to say, and often names the same unusable folder.
        """
        with self._lock:
            self._doc.update(state="failed", startup_error={"time": iso(self._clock()), "error": error})
            self._dirty = True
        return self.write(report=False)

    def write(self, report: bool = True) -> bool:
        """Rewrite the file now; False (logged once, if `report`) when that is impossible."""
        with self._write_lock:
            doc = self.snapshot()
            with self._lock:
                self._dirty = False
                self._last_write = self._monotonic()
                self._doc.update(rate=doc["rate"], eta_seconds=doc["eta_seconds"])
            try:
                if not self._prepared:
                    self.directory.mkdir(parents=True, exist_ok=True)
                    prune(self.directory, keep=self.path)
                    self._prepared = True
                write_atomically(self.path, doc)
            except OSError as exc:
                if report:
                    self._report(exc)
                return False
            self._failed_logged = False
            return True

    def close(self, **fields: Any) -> bool:
        """The final write, state `stopped`, with the last counts; the file stays for
        `rmbgd status` to report on until the next start on this host."""
        return self.set_state("stopped", **fields)

    # -- internals ----------------------------------------------------------------------------
    def _report(self, exc: OSError) -> None:
        if self._failed_logged or self._log is None:
            return
        self._failed_logged = True
        self._log.warning(
            "status_write_failed",
            file=str(self.path),
            error=f"{type(exc).__name__}: {exc}",
            note="`rmbgd status` shows stale data until this is fixed; processing goes on",
        )


def write_atomically(path: Path, doc: Mapping[str, Any]) -> None:
    data = (json.dumps(doc, indent=2, sort_keys=False) + "\n").encode("utf-8")
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o644)
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
            fh.flush()
            # Without it, a crash soon after the rename can leave an empty file behind on
            # filesystems that order data after metadata.
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def read_status(path: Path) -> Dict[str, Any]:
    """One status document; OSError when unreadable, ValueError when it is not one."""
    with open(path, "rb") as fh:
        doc = json.loads(fh.read(1024 * 1024).decode("utf-8"))
    if not isinstance(doc, dict) or doc.get("schema") != SCHEMA:
        raise ValueError(f"{path}: not an rmbgd status file (schema {SCHEMA})")
    return doc


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
    boot = _boot_id()
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
    start = _process_start(pid)
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


# --------------------------------------------------------------------------- `rmbgd status`

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
