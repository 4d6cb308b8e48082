"""The guard that keeps the suite off the network (tests/support/netguard.py) really guards.

It must refuse any address beyond loopback before the system call, in this process and in
the subprocesses tests start, fail the test even when the code under test swallows the
refusal, and leave loopback and UNIX sockets alone.
"""

from __future__ import annotations

import errno
import os
import socket
import subprocess
import sys
import textwrap

import pytest

from tests.support import netguard
from tests.support.daemon import REPO

FORBIDDEN = ["192.0.2.1", "10.0.0.1", "2001:db8::1", "example.com"]


@pytest.fixture
def private_report(tmp_path, monkeypatch):
    """Refusals this test provokes on purpose go to its own report, not to the suite's."""
    report = tmp_path / "refused.log"
    monkeypatch.setenv(netguard.REPORT_ENV, str(report))
    return report


@pytest.fixture
def listener():
    # The kernel completes connections into the backlog; nothing needs to accept them.
    with socket.create_server(("127.0.0.1", 0)) as server:
        yield server.getsockname()[1]


@pytest.mark.parametrize("host", ["192.0.2.1", "10.0.0.1"])
def test_connect_beyond_loopback_is_refused_before_the_syscall(host, private_report, listener):
    with socket.socket() as sock:
        sock.setblocking(False)
        with pytest.raises(netguard.ForbiddenNetworkAccess, match=host):
            sock.connect((host, 80))
        with pytest.raises(netguard.ForbiddenNetworkAccess):
            sock.connect_ex((host, 80))
        # Had a connect to `host` started, this socket would be busy (EALREADY/EINPROGRESS)
        # and a second connect could not go elsewhere.
        assert sock.connect_ex(("127.0.0.1", listener)) in (0, errno.EINPROGRESS)
    refused = private_report.read_text()
    assert host in refused and "test_connect_beyond_loopback_is_refused_before_the_syscall" in refused


def test_udp_send_beyond_loopback_is_refused_before_the_syscall(private_report):
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        with pytest.raises(netguard.ForbiddenNetworkAccess, match="192.0.2.1"):
            sock.sendto(b"x", ("192.0.2.1", 53))
        # A datagram sent from an unbound socket binds it to a port first: still unbound.
        assert sock.getsockname() == ("0.0.0.0", 0)


@pytest.mark.parametrize("host", FORBIDDEN)
def test_lookups_and_connections_by_name_are_refused(host, private_report):
    with pytest.raises(netguard.ForbiddenNetworkAccess, match=host):
        socket.create_connection((host, 443), timeout=1)
    if not host[0].isdigit() and ":" not in host:
        for lookup in (socket.getaddrinfo, socket.gethostbyname):
            with pytest.raises(netguard.ForbiddenNetworkAccess, match=host):
                lookup(host, *([443] if lookup is socket.getaddrinfo else []))


@pytest.mark.parametrize("host", ["127.0.0.1", "localhost", "::1"])
def test_loopback_still_works(host):
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    if family == socket.AF_INET6 and not socket.has_ipv6:
        pytest.skip("this Python has no IPv6 support")
    try:
        server = socket.create_server((host, 0), family=family)
    except OSError as exc:
        pytest.skip(f"no {host} loopback interface here: {exc}")
    with server, socket.create_connection((host, server.getsockname()[1]), timeout=10) as client:
        conn, _ = server.accept()
        with conn:
            client.sendall(b"ping")
            assert conn.recv(4) == b"ping"


def test_unix_sockets_still_work(tmp_path):
    path = str(tmp_path / "s.sock")
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as rx, socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as tx:
        rx.bind(path)
        tx.sendto(b"READY=1", path)
        tx.connect(path)
        tx.send(b"WATCHDOG=1")
        assert [rx.recv(64), rx.recv(64)] == [b"READY=1", b"WATCHDOG=1"]


def test_subprocesses_are_guarded_too(tmp_path):
    report = tmp_path / "refused.log"
    code = "import socket; socket.create_connection(('192.0.2.1', 80), timeout=1)"
    env = {**os.environ, netguard.REPORT_ENV: str(report)}
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120)
    assert result.returncode == 1
    assert "ForbiddenNetworkAccess" in result.stderr and "192.0.2.1" in result.stderr
    assert "192.0.2.1" in report.read_text()


def test_a_swallowed_refusal_still_fails_the_test(tmp_path):
    # The hub probe catches every exception; the guard's report must still fail the test.
    (tmp_path / "test_swallow.py").write_text(textwrap.dedent(
        """
        import socket

        def test_swallows_it():
            try:
                socket.create_connection(("192.0.2.1", 80), timeout=1)
            except Exception:
                pass

        def test_stays_home():
            socket.getaddrinfo("localhost", 80)
        """
    ))
    result = subprocess.run(
        [sys.executable, "-m", "pytest", "-p", "tests.conftest", "-p", "no:cacheprovider",
         "-o", "addopts=", "--rootdir", str(tmp_path), str(tmp_path / "test_swallow.py")],
        capture_output=True, text=True, timeout=300, cwd=str(REPO),
        env={**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])},
    )
    assert result.returncode == 1, result.stdout + result.stderr
    assert "1 failed, 1 passed" in result.stdout, result.stdout
    assert "network access beyond loopback refused: name lookup of '192.0.2.1'" in result.stdout
    assert "test_swallow.py::test_swallows_it" in result.stdout
