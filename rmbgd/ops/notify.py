"""The systemd notify protocol (sd_notify(3)), written out so rmbgd needs no libsystemd.

A service of Type=notify tells the service manager how it is doing by sending datagrams of
newline-separated `KEY=value` lines to the AF_UNIX socket named in $NOTIFY_SOCKET: a file
system path, or an abstract address written with a leading `@`. Outside systemd the
variable is unset and every call here does nothing, so the daemon can call them
unconditionally.

Sending must never take the daemon down: a failure is logged once and otherwise ignored,
because the worst a lost notification can do is make systemd restart us (watchdog) or
report a stale status, both better than a crash in the middle of a batch.
"""

from __future__ import annotations

import os
import socket
import threading
import time
from typing import Any, Mapping, Optional

from rmbgd.errors import describe

# Kept on purpose: one sendto() of text lines needs no libsystemd binding or extra dependency.

# A full socket buffer on systemd's side must not stall the main loop for long; a
# notification that cannot go out within this is dropped (and logged once).
SEND_TIMEOUT_SECONDS = 1.0
# systemd truncates STATUS= in `systemctl status`; a long line only costs bandwidth.
MAX_STATUS_CHARS = 200


def monotonic_usec() -> int:
    """CLOCK_MONOTONIC in microseconds, the clock systemd compares MONOTONIC_USEC= against."""
    return time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000


def socket_address(raw: Optional[str]) -> Optional[str | bytes]:
    """The address to sendto() for a $NOTIFY_SOCKET value, or None when there is none.

    `@name` is Linux's abstract namespace, which on the wire starts with a NUL byte.
    Anything that is neither absolute nor abstract is not a socket systemd gave us.
    """
    if not raw:
        return None
    if raw.startswith("@"):
        return b"\0" + os.fsencode(raw[1:])
    if raw.startswith("/"):
        return raw
    return None


def watchdog_interval(environ: Optional[Mapping[str, str]] = None) -> Optional[float]:
    """Seconds between WATCHDOG=1 pings, half of $WATCHDOG_USEC as sd_watchdog_enabled(3)
    advises, or None when systemd expects none from this process.

    $WATCHDOG_PID names the process the watchdog is meant for; a child that inherited the
    variables must not ping in its parent's name.
    """
    env = os.environ if environ is None else environ
    raw_usec = env.get("WATCHDOG_USEC", "")
    try:
        usec = int(raw_usec)
    except ValueError:
        return None
    if usec <= 0:
        return None
    raw_pid = env.get("WATCHDOG_PID")
    if raw_pid:
        try:
            if int(raw_pid) != os.getpid():
                return None
        except ValueError:
            return None
    return usec / 2_000_000


def _one_line(text: str) -> str:
    # A newline would start a new KEY=value assignment in the datagram.
    flat = " ".join(str(text).split())
    return flat[:MAX_STATUS_CHARS]


class Notifier:
    """Sends notifications to the service manager; a no-op without $NOTIFY_SOCKET."""

    def __init__(self, address: Optional[str] = None, log: Any = None) -> None:
        """`address` is a $NOTIFY_SOCKET value; None reads the environment."""
        raw = os.environ.get("NOTIFY_SOCKET") if address is None else address
        self.address = socket_address(raw)
        self._log = log
        self._sock: Optional[socket.socket] = None
        # The main loop pings the watchdog while other threads may report status.
        self._lock = threading.Lock()
        self._failed_logged = False
        if raw and self.address is None and log is not None:
            log.warning("notify_disabled", reason=f"NOTIFY_SOCKET is not a socket address: {raw!r}")

    @property
    def enabled(self) -> bool:
        return self.address is not None

    @property
    def shown_address(self) -> Optional[str]:
        """The address as $NOTIFY_SOCKET writes it, for logs."""
        if isinstance(self.address, bytes):
            return "@" + self.address[1:].decode("utf-8", "replace")
        return self.address

    def send(self, *assignments: str) -> bool:
        """Send `KEY=value` lines as one datagram; True if it went out (or nothing to do)."""
        if self.address is None:
            return True
        message = "\n".join(assignments).encode("utf-8")
        with self._lock:
            try:
                if self._sock is None:
                    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC)
                    sock.settimeout(SEND_TIMEOUT_SECONDS)
                    self._sock = sock
                self._sock.sendto(message, self.address)
                return True
            except OSError as exc:
                error = exc
                # A fresh socket next time: the old one may be what is broken.
                self._close_locked()
        self._failed(error)
        return False

    def _failed(self, exc: OSError) -> None:
        if self._failed_logged or self._log is None:
            return
        self._failed_logged = True
        self._log.warning(
            "notify_failed",
            socket=self.shown_address,
            error=describe(exc),
            note="further notify errors are not logged",
        )

    # -- the messages rmbgd sends -----------------------------------------------------------
    def ready(self, status: Optional[str] = None) -> bool:
        """Start-up (or a reload) is complete: the model is warm and the watcher runs."""
        lines = ["READY=1"]
        if status:
            lines.append(f"STATUS={_one_line(status)}")
        return self.send(*lines)

    def status(self, text: str) -> bool:
        """The one-line summary shown by `systemctl status`."""
        return self.send(f"STATUS={_one_line(text)}")

    def watchdog(self) -> bool:
        """Still healthy; systemd restarts the service when these stop for WatchdogSec."""
        return self.send("WATCHDOG=1")

    def reloading(self) -> bool:
        """A reload began; systemd needs the time to order it against the READY=1 that ends it."""
        return self.send("RELOADING=1", f"MONOTONIC_USEC={monotonic_usec()}")

    def stopping(self) -> bool:
        return self.send("STOPPING=1")

    def extend_timeout(self, usec: int) -> bool:
        """Ask for `usec` more from now before the current start/stop timeout fires."""
        return self.send(f"EXTEND_TIMEOUT_USEC={max(0, int(usec))}")

    def close(self) -> None:
        with self._lock:
            self._close_locked()

    def _close_locked(self) -> None:
        if self._sock is not None:
            sock, self._sock = self._sock, None
            sock.close()


class Watchdog:
    """Pings WATCHDOG=1 every `interval` seconds, but only while the caller vouches for health.

    Stopping the pings is the whole point: when the watcher thread has died or a model call
    hangs on the GPU, systemd sees the silence after WatchdogSec= and restarts the service.
    """

    def __init__(self, notifier: Notifier, interval: Optional[float] = None, clock=time.monotonic) -> None:
        self.notifier = notifier
        self.interval = watchdog_interval() if interval is None else interval
        self._clock = clock
        self._last: Optional[float] = None

    @property
    def enabled(self) -> bool:
        return self.interval is not None and self.notifier.enabled

    def tick(self, healthy: bool) -> bool:
        """Call on every main-loop iteration; True when a ping went out."""
        if not healthy or not self.enabled:
            return False
        now = self._clock()
        if self._last is not None and now - self._last < self.interval:
            return False
        self._last = now
        return self.notifier.watchdog()
