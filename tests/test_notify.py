"""The sd_notify client against a real AF_UNIX datagram socket, as systemd would bind it."""

from __future__ import annotations

import os
import shutil
import socket
import tempfile
import time
import uuid
from pathlib import Path

import pytest

from rmbgd.ops import notify
from rmbgd.ops.notify import Notifier, socket_address, watchdog_interval
from tests.support.logcapture import CapturedLog

# sun_path holds 108 bytes; a deep TMPDIR must not turn into a bind() error.
MAX_SUN_PATH = 100


class Receiver:
    """The service manager's end: a bound datagram socket we read messages from."""

    def __init__(self, address: str | bytes) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(address)
        self.sock.settimeout(5.0)

    def next(self) -> list[str]:
        data = self.sock.recv(4096)
        return data.decode("utf-8").split("\n")

    def pending(self) -> bool:
        self.sock.setblocking(False)
        try:
            self.sock.recv(4096, socket.MSG_PEEK)
            return True
        except BlockingIOError:
            return False
        finally:
            self.sock.settimeout(5.0)

    def close(self) -> None:
        self.sock.close()


@pytest.fixture
def socket_dir(tmp_path):
    if len(str(tmp_path / "notify.sock")) <= MAX_SUN_PATH:
        yield tmp_path
        return
    short = tempfile.mkdtemp(prefix="rmbgd-notify-", dir="/tmp")
    yield Path(short)
    shutil.rmtree(short, ignore_errors=True)


@pytest.fixture
def receiver(socket_dir):
    path = str(socket_dir / "notify.sock")
    rx = Receiver(path)
    rx.path = path
    yield rx
    rx.close()


@pytest.fixture
def abstract_receiver():
    name = f"rmbgd-test-{uuid.uuid4().hex}"
    rx = Receiver(b"\0" + name.encode())
    rx.env_value = "@" + name
    yield rx
    rx.close()


def test_without_notify_socket_everything_is_a_silent_no_op(monkeypatch):
    monkeypatch.delenv("NOTIFY_SOCKET", raising=False)
    log = CapturedLog()
    n = Notifier(log=log)
    assert not n.enabled
    assert n.ready("ok") and n.status("x") and n.watchdog() and n.reloading()
    assert n.stopping() and n.extend_timeout(10)
    assert n._sock is None
    assert log.entries == []


def test_reads_notify_socket_from_the_environment(monkeypatch, receiver):
    monkeypatch.setenv("NOTIFY_SOCKET", receiver.path)
    n = Notifier()
    assert n.enabled and n.shown_address == receiver.path
    assert n.ready()
    assert receiver.next() == ["READY=1"]
    n.close()


def test_exact_messages_in_order(receiver):
    n = Notifier(receiver.path)
    n.ready(status="processed 0, failed 0, queued 0")
    n.status("processed 3, failed 1,\nqueued 2")
    n.watchdog()
    n.extend_timeout(30_000_000)
    n.stopping()
    assert receiver.next() == ["READY=1", "STATUS=processed 0, failed 0, queued 0"]
    # A newline would have started a second assignment.
    assert receiver.next() == ["STATUS=processed 3, failed 1, queued 2"]
    assert receiver.next() == ["WATCHDOG=1"]
    assert receiver.next() == ["EXTEND_TIMEOUT_USEC=30000000"]
    assert receiver.next() == ["STOPPING=1"]
    assert not receiver.pending()
    n.close()


def test_reloading_carries_the_monotonic_clock(receiver):
    # The same clock systemd reads: CLOCK_MONOTONIC, not Python's (possibly other) monotonic.
    n = Notifier(receiver.path)
    before = time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000
    n.reloading()
    after = time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000
    reloading, stamp = receiver.next()
    assert reloading == "RELOADING=1"
    key, value = stamp.split("=")
    assert key == "MONOTONIC_USEC"
    assert before <= int(value) <= after
    n.close()


def test_abstract_address(monkeypatch, abstract_receiver):
    monkeypatch.setenv("NOTIFY_SOCKET", abstract_receiver.env_value)
    n = Notifier()
    assert n.enabled and n.address.startswith(b"\0")
    assert n.shown_address == abstract_receiver.env_value
    assert n.watchdog()
    assert abstract_receiver.next() == ["WATCHDOG=1"]
    n.close()


def test_long_status_is_cut(receiver):
    n = Notifier(receiver.path)
    n.status("x" * 5000)
    (line,) = receiver.next()
    assert line == "STATUS=" + "x" * notify.MAX_STATUS_CHARS
    n.close()


def test_missing_socket_is_logged_once_and_never_raises(socket_dir):
    log = CapturedLog()
    n = Notifier(str(socket_dir / "gone.sock"), log=log)
    assert n.enabled
    assert n.ready() is False
    assert n.watchdog() is False
    assert n.status("x") is False
    assert log.names() == ["notify_failed"]
    fields = log.entries[0]
    assert fields["log_level"] == "warning" and "gone.sock" in fields["socket"]
    assert "FileNotFoundError" in fields["error"]


def test_recovers_when_the_socket_comes_back(socket_dir):
    path = str(socket_dir / "later.sock")
    n = Notifier(path, log=CapturedLog())
    assert n.watchdog() is False
    rx = Receiver(path)
    try:
        assert n.watchdog() is True
        assert rx.next() == ["WATCHDOG=1"]
    finally:
        rx.close()
        n.close()


@pytest.mark.timeout(120)  # a send that blocked on the full queue would never return
def test_a_manager_that_stops_reading_cannot_hang_the_daemon(monkeypatch, receiver):
    monkeypatch.setattr(notify, "SEND_TIMEOUT_SECONDS", 0.05)
    log = CapturedLog()
    n = Notifier(receiver.path, log=log)
    for i in range(5000):
        if not n.status(f"{i} " + "y" * 150):
            break
    else:
        pytest.fail("the receiver's queue never filled up")
    assert n.watchdog() is False
    assert log.names() == ["notify_failed"]
    # Once the manager reads again, notifications flow again.
    while receiver.pending():
        receiver.next()
    assert n.watchdog() is True
    n.close()


@pytest.mark.parametrize("raw", ["relative.sock", "vsock:2:1234"])
def test_an_address_that_is_not_a_unix_socket_disables_notify(raw):
    log = CapturedLog()
    n = Notifier(raw, log=log)
    assert not n.enabled
    assert n.ready() is True
    assert log.names() == ["notify_disabled"]


def test_socket_address_forms():
    assert socket_address(None) is None
    assert socket_address("") is None
    assert socket_address("/run/systemd/notify") == "/run/systemd/notify"
    assert socket_address("@foo") == b"\0foo"


@pytest.mark.parametrize(
    "env, expected",
    [
        ({}, None),
        ({"WATCHDOG_USEC": "180000000"}, 90.0),
        ({"WATCHDOG_USEC": "1000000", "WATCHDOG_PID": str(os.getpid())}, 0.5),
        ({"WATCHDOG_USEC": "1000000", "WATCHDOG_PID": str(os.getpid() + 1)}, None),
        ({"WATCHDOG_USEC": "1000000", "WATCHDOG_PID": "nope"}, None),
        ({"WATCHDOG_USEC": "0"}, None),
        ({"WATCHDOG_USEC": "-5"}, None),
        ({"WATCHDOG_USEC": "soon"}, None),
    ],
)
def test_watchdog_interval(env, expected):
    assert watchdog_interval(env) == expected


def test_watchdog_interval_reads_the_environment(monkeypatch):
    monkeypatch.setenv("WATCHDOG_USEC", "4000000")
    monkeypatch.delenv("WATCHDOG_PID", raising=False)
    assert watchdog_interval() == 2.0


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def test_watchdog_pings_at_its_interval_only_while_healthy(receiver):
    clock = Clock()
    dog = notify.Watchdog(Notifier(receiver.path), interval=5.0, clock=clock)
    assert dog.enabled
    assert dog.tick(healthy=True)                 # at once after start
    clock.now += 1
    assert not dog.tick(healthy=True)             # not due yet
    clock.now += 5
    assert not dog.tick(healthy=False)            # due, but a hung pipeline stays silent
    clock.now += 60
    assert not dog.tick(healthy=False)
    assert dog.tick(healthy=True)                 # healthy again: pings resume
    assert [receiver.next(), receiver.next()] == [["WATCHDOG=1"], ["WATCHDOG=1"]]
    assert not receiver.pending()
    dog.notifier.close()


def test_watchdog_interval_comes_from_the_environment(monkeypatch, receiver):
    monkeypatch.setenv("NOTIFY_SOCKET", receiver.path)
    monkeypatch.setenv("WATCHDOG_USEC", "3000000")
    monkeypatch.setenv("WATCHDOG_PID", str(os.getpid()))
    dog = notify.Watchdog(Notifier())
    assert dog.interval == 1.5 and dog.enabled
    monkeypatch.delenv("WATCHDOG_USEC")
    assert not notify.Watchdog(Notifier()).enabled
    assert not notify.Watchdog(Notifier("")).enabled


def test_watchdog_without_notify_socket_does_nothing(monkeypatch):
    monkeypatch.delenv("NOTIFY_SOCKET", raising=False)
    dog = notify.Watchdog(Notifier(), interval=1.0)
    assert not dog.enabled and not dog.tick(healthy=True)


@pytest.mark.parametrize("abstract", [False, True], ids=["path", "abstract"])
def test_the_support_socket_for_daemon_tests(tmp_path, monkeypatch, abstract):
    from tests.support.notify import NotifySocket, NotifyTimeout

    with NotifySocket(tmp_path, abstract=abstract) as sd:
        for key, value in sd.env(watchdog_usec=2_000_000, watchdog_pid=os.getpid()).items():
            monkeypatch.setenv(key, value)
        n = Notifier()
        dog = notify.Watchdog(n)
        assert dog.interval == 1.0
        n.status("starting")
        n.reloading()
        n.ready("processed 0")
        dog.tick(True)
        assert sd.wait_for("STATUS=") == ["STATUS=starting"]
        assert sd.next()[0] == "RELOADING=1"
        assert sd.wait_for("READY=1") == ["READY=1", "STATUS=processed 0"]
        assert sd.wait_for("WATCHDOG=1") == ["WATCHDOG=1"]
        with pytest.raises(NotifyTimeout):
            sd.next(timeout=0.2)
        n.close()
