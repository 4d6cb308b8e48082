"""A stand-in for systemd's end of the notify protocol, for tests of the real daemon.

Binds an AF_UNIX datagram socket like the service manager does, collects every message in a
background thread, and lets a test wait for the next one with a given assignment:

    with NotifySocket(tmp_path) as sd:
        env = {**subprocess_env(hf_home), **sd.env(watchdog_usec=2_000_000)}
        ... start the daemon with env ...
        sd.wait_for("READY=1")
        sd.wait_for("WATCHDOG=1")
"""

from __future__ import annotations

import os
import shutil
import socket
import tempfile
import threading
import time
import uuid
from pathlib import Path
from typing import Dict, List, Optional

# sun_path holds 108 bytes; pytest's tmp_path can be deeper than that.
_MAX_SUN_PATH = 100


class NotifyTimeout(AssertionError):
    pass


class NotifySocket:
    def __init__(self, directory: Optional[Path] = None, abstract: bool = False) -> None:
        self._cleanup: Optional[str] = None
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        if abstract:
            name = f"rmbgd-test-{uuid.uuid4().hex}"
            self.sock.bind(b"\0" + name.encode())
            self.address = "@" + name
        else:
            base = Path(directory) if directory is not None else None
            if base is None or len(str(base / "notify.sock")) > _MAX_SUN_PATH:
                self._cleanup = tempfile.mkdtemp(prefix="rmbgd-sd-", dir="/tmp")
                base = Path(self._cleanup)
            self.address = str(base / "notify.sock")
            self.sock.bind(self.address)
        self.sock.settimeout(0.1)
        # Each message as its list of KEY=value lines, in arrival order, with its arrival time.
        self.messages: List[List[str]] = []
        self.times: List[float] = []
        self._seen = 0
        self._cond = threading.Condition()
        self._closed = False
        self._thread = threading.Thread(target=self._read, name="notify-socket", daemon=True)
        self._thread.start()

    def env(self, watchdog_usec: Optional[int] = None, watchdog_pid: Optional[int] = None) -> Dict[str, str]:
        """Environment for the daemon under test. WATCHDOG_PID is left out by default: the
        daemon's pid is not known before it starts (systemd sets it to the main pid)."""
        env = {"NOTIFY_SOCKET": self.address}
        if watchdog_usec is not None:
            env["WATCHDOG_USEC"] = str(watchdog_usec)
        if watchdog_pid is not None:
            env["WATCHDOG_PID"] = str(watchdog_pid)
        return env

    def _read(self) -> None:
        while not self._closed:
            try:
                data = self.sock.recv(65536)
            except socket.timeout:
                continue
            except OSError:
                return
            with self._cond:
                self.messages.append(data.decode("utf-8", "replace").split("\n"))
                self.times.append(time.monotonic())
                self._cond.notify_all()

    def next(self, timeout: float = 30.0) -> List[str]:
        """The next message not yet returned by next() or wait_for()."""
        deadline = time.monotonic() + timeout
        with self._cond:
            while self._seen >= len(self.messages):
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    raise NotifyTimeout(f"no notify message within {timeout}s; got {self.messages}")
                self._cond.wait(remaining)
            self._seen += 1
            return self.messages[self._seen - 1]

    def wait_for(self, assignment: str, timeout: float = 60.0) -> List[str]:
        """Skip ahead to the next message holding `assignment` (e.g. "READY=1") or a line
        starting with it (e.g. "STATUS=")."""
        deadline = time.monotonic() + timeout
        while True:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise NotifyTimeout(f"no message with {assignment!r} within {timeout}s; got {self.messages}")
            message = self.next(remaining)
            prefix = assignment.endswith("=")
            if any(line == assignment or (prefix and line.startswith(assignment)) for line in message):
                return message

    def all(self) -> List[List[str]]:
        with self._cond:
            return list(self.messages)

    def close(self) -> None:
        self._closed = True
        self.sock.close()
        self._thread.join(5)
        if self._cleanup:
            shutil.rmtree(self._cleanup, ignore_errors=True)
        elif not self.address.startswith("@"):
            try:
                os.unlink(self.address)
            except FileNotFoundError:
                return

    def __enter__(self) -> "NotifySocket":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
