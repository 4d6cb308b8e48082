"""The status file: what a running instance is doing, for `rmbgd status` and for people.

Each instance keeps one small JSON document, `<state dir>/<host>-<pid>.json`, rewritten
atomically (temporary file, fsync, rename) so a reader never sees half of one. One file per
instance because several may share a state folder: the per-GPU template units, or daemons on
other hosts working on the same network inbox (whose state folder is then shared with it).

The state folder is `state.dir`, or `<inbox>/.rmbgd/state` when that is null: a place that
follows from the config alone, so `rmbgd status --config FILE` in an operator's shell finds
what the daemon under systemd wrote, with no environment to reproduce ($STATE_DIRECTORY is
only set for the service). The folder is hidden inside the inbox, so it is never taken as work.

This module writes the file; its format is rmbgd.ops.statusdoc's, whether its writer still
runs rmbgd.ops.liveness's, and `rmbgd status`'s report rmbgd.ops.statusreport's.
"""

from __future__ import annotations

import json
import os
import threading
import time
from pathlib import Path
from typing import Any, Dict, Mapping, Optional

from rmbgd import __version__
from rmbgd.errors import describe
from rmbgd.intake.names import PRIVATE_DIR
from rmbgd.ops.liveness import prune
from rmbgd.output.fsops import replace_atomically
from rmbgd.ops.ratemeter import RateMeter
from rmbgd.ops.statusdoc import (
    HEARTBEAT_SECONDS,
    SCHEMA,
    SUFFIX,
    boot_id,
    iso,
    process_start,
    short_hostname,
    summary_line,
)

# Counts change many times a second under load; more frequent rewrites would only cost fsyncs.
MIN_WRITE_INTERVAL_SECONDS = 1.0

# "failed": the start failed; `startup_error` says why. Final, like "stopped".
STATES = ("starting", "loading", "ready", "reloading", "stopping", "stopped", "failed")


def default_state_dir(cfg: Any) -> Path:
    """The state folder of a Config: `state.dir`, else hidden in the inbox."""
    configured = cfg.state.dir
    return configured if configured is not None else cfg.paths.inbox / PRIVATE_DIR / "state"


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
            "boot_id": boot_id(),
            "proc_start": process_start(self.pid),
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

    def set_http(self, counts: Mapping[str, Any]) -> None:
        """The HTTP API's counts (requests by status, images, in flight), when it is on."""
        with self._lock:
            if self._doc.get("http") != counts:
                self._doc["http"] = dict(counts)
                self._dirty = True

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
            error=describe(exc),
            note="`rmbgd status` shows stale data until this is fixed; processing goes on",
        )


def write_atomically(path: Path, doc: Mapping[str, Any]) -> None:
    replace_atomically(path, (json.dumps(doc, indent=2, sort_keys=False) + "\n").encode("utf-8"))


# --------------------------------------------------------------------------- `rmbgd status`
