"""Running the real daemon as a subprocess and following its JSON log."""

from __future__ import annotations

import json
import os
import queue
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Callable, Dict, List, Optional

import yaml

REPO = Path(__file__).resolve().parents[2]


class LogTimeout(AssertionError):
    pass


class DaemonProcess:
    def __init__(self, config_path: Path, env: Dict[str, str]) -> None:
        self.config_path = config_path
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "rmbgd", "run", "--config", str(config_path)],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            stdin=subprocess.DEVNULL,
            env=env,
            cwd=str(REPO),
        )
        self.records: List[dict] = []
        self.non_json: List[str] = []
        self.stderr_lines: List[str] = []
        self._queue: "queue.Queue[dict]" = queue.Queue()
        self._seen = 0
        self._out = threading.Thread(target=self._read_stdout, daemon=True)
        self._err = threading.Thread(target=self._read_stderr, daemon=True)
        self._out.start()
        self._err.start()

    def _read_stdout(self) -> None:
        for raw in self.proc.stdout:
            line = raw.decode("utf-8", "replace").rstrip("\n")
            try:
                record = json.loads(line)
            except ValueError:
                self.non_json.append(line)
                continue
            self.records.append(record)
            self._queue.put(record)

    def _read_stderr(self) -> None:
        for raw in self.proc.stderr:
            self.stderr_lines.append(raw.decode("utf-8", "replace").rstrip("\n"))

    def wait_for(
        self,
        event: str,
        where: Optional[Callable[[dict], bool]] = None,
        timeout: float = 60.0,
    ) -> dict:
        """Next record (from the log's start) with this event name matching `where`."""
        deadline = time.monotonic() + timeout
        while True:
            while self._seen < len(self.records):
                record = self.records[self._seen]
                self._seen += 1
                if record.get("event") == event and (where is None or where(record)):
                    return record
            remaining = deadline - time.monotonic()
            if remaining <= 0 or (self.proc.poll() is not None and self._queue.empty() and not self._out.is_alive()):
                raise LogTimeout(
                    f"no {event!r} within {timeout}s; exit={self.proc.poll()} "
                    f"last events={[r.get('event') for r in self.records[-15:]]} stderr={self.stderr_lines[-5:]}"
                )
            try:
                self._queue.get(timeout=min(remaining, 0.2))
            except queue.Empty:
                pass

    def events(self, name: str) -> List[dict]:
        return [r for r in self.records if r.get("event") == name]

    def wait_count(self, names: tuple, count: int, timeout: float = 60.0) -> List[dict]:
        """Wait until `count` records in total with one of `names` have been logged."""
        deadline = time.monotonic() + timeout
        while True:
            found = [r for r in self.records if r.get("event") in names]
            if len(found) >= count:
                return found
            if time.monotonic() > deadline or self.proc.poll() is not None:
                raise LogTimeout(
                    f"{len(found)}/{count} of {names} within {timeout}s; exit={self.proc.poll()} "
                    f"last events={[r.get('event') for r in self.records[-15:]]} stderr={self.stderr_lines[-5:]}"
                )
            try:
                self._queue.get(timeout=0.2)
            except queue.Empty:
                pass

    def next_record(self, timeout: float) -> None:
        """Block until this daemon logs anything new, at most `timeout` seconds."""
        try:
            self._queue.get(timeout=timeout)
        except queue.Empty:
            pass

    def signal(self, signum: int = signal.SIGTERM) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signum)

    def stop(self, timeout: float = 60.0) -> int:
        self.signal(signal.SIGTERM)
        return self.wait_exit(timeout)

    def wait_exit(self, timeout: float = 60.0) -> int:
        try:
            code = self.proc.wait(timeout)
        finally:
            self._out.join(5)
            self._err.join(5)
        return code

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)
        self._out.join(5)
        self._err.join(5)


def wait_until(condition: Callable[[], bool], daemons: List[DaemonProcess], timeout: float, what: str) -> None:
    """Wait on the daemons' logs (not on a bare sleep) until `condition` holds."""
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise LogTimeout(f"{what} within {timeout}s")
        for daemon in daemons:
            daemon.next_record(0.05)


def write_config(path: Path, data: dict) -> Path:
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return path


def base_config(root: Path, model_dir: Path, **sections) -> dict:
    data = {
        "paths": {
            "inbox": str(root / "inbox"),
            "outbox": str(root / "outbox"),
            "errors": str(root / "errors"),
            "done": str(root / "done"),
        },
        "watch": {"settle_seconds": 0.3, "rescan_seconds": 2.0, "writer_timeout_seconds": 60.0},
        "batch": {"size": 4, "max_wait_ms": 100},
        "model": {"name": str(model_dir), "device": "cpu", "input_size": 64},
        "pipeline": {"workers": 2},
    }
    for key, value in sections.items():
        data.setdefault(key, {})
        if isinstance(value, dict):
            data[key].update(value)
        else:
            data[key] = value
    return data


def subprocess_env(hf_home: Path) -> Dict[str, str]:
    env = dict(os.environ)
    # Hermetic: no hub access attempts, dynamic-module cache in the test's temp dir.
    env["HF_HOME"] = str(hf_home)
    env["HF_HUB_OFFLINE"] = "1"
    env["PYTHONUNBUFFERED"] = "1"
    env.setdefault("OMP_NUM_THREADS", "1")
    return env
