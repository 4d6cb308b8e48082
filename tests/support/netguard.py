"""Refuse network traffic to anything but this machine, in tests and in what they start.

Installed in the pytest process by tests/conftest.py and in every Python subprocess the
tests start by tests/support/netguard_site/sitecustomize.py (put on PYTHONPATH by the
conftest). The check runs before the system call, so nothing leaves the machine: an
address other than loopback raises ForbiddenNetworkAccess, and a host name other than
localhost is refused before it is looked up (a DNS query is traffic too). UNIX sockets
and loopback addresses work as before.

Code under test may catch the exception (the hub probe catches everything), so each
refusal is also appended to the file named by RMBGD_NETGUARD_REPORT; the conftest fails
the test that was running when a refusal was recorded, whichever process made it.

Standalone on purpose: the sitecustomize loads it by path, before anything is importable.
"""

from __future__ import annotations

import ipaddress
import os
import socket

REPORT_ENV = "RMBGD_NETGUARD_REPORT"
_LOCAL_NAMES = {"localhost", "localhost.localdomain", "ip6-localhost", "ip6-loopback"}

_real = {}


class ForbiddenNetworkAccess(RuntimeError):
    """A test (or a process it started) tried to reach beyond this machine.

    Not an OSError: code that handles network failures must not mistake it for one.
    """


def is_local_host(host) -> bool:
    if host is None:
        return True  # a passive lookup (bind to any address) sends nothing
    if isinstance(host, bytes):
        host = host.decode("idna", "replace")
    host = str(host).strip("[]").split("%", 1)[0].rstrip(".").lower()
    if host in _LOCAL_NAMES or host.endswith(".localhost") or host == "":
        return True
    try:
        address = ipaddress.ip_address(host)
    except ValueError:
        return False
    mapped = getattr(address, "ipv4_mapped", None)
    return address.is_loopback or address.is_unspecified or bool(mapped and mapped.is_loopback)


def _check(family, address, what: str) -> None:
    if family == getattr(socket, "AF_UNIX", None) or family not in (socket.AF_INET, socket.AF_INET6):
        return
    if isinstance(address, (tuple, list)) and address and is_local_host(address[0]):
        return
    refuse(address, what)


def refuse(address, what: str) -> None:
    test = os.environ.get("PYTEST_CURRENT_TEST", "(no test running)").rsplit(" (", 1)[0]
    message = (
        f"network access beyond loopback refused: {what} {address!r} in {test} "
        f"(pid {os.getpid()}); tests may only reach 127.0.0.1, ::1 or localhost"
    )
    report = os.environ.get(REPORT_ENV)
    if report:
        try:
            with open(report, "a", encoding="utf-8") as fh:
                fh.write(message + "\n")
        except OSError:
            pass  # the exception below still stops the traffic
    raise ForbiddenNetworkAccess(message)


def install() -> None:
    """Patch the socket module of this interpreter (idempotent)."""
    if _real:
        return
    sock = socket.socket
    _real.update(
        connect=sock.connect, connect_ex=sock.connect_ex, sendto=sock.sendto,
        sendmsg=getattr(sock, "sendmsg", None), getaddrinfo=socket.getaddrinfo,
        gethostbyname=socket.gethostbyname, gethostbyname_ex=socket.gethostbyname_ex,
    )

    def connect(self, address):
        _check(self.family, address, "connect to")
        return _real["connect"](self, address)

    def connect_ex(self, address):
        _check(self.family, address, "connect to")
        return _real["connect_ex"](self, address)

    def sendto(self, data, *args):
        _check(self.family, args[-1], "send to")
        return _real["sendto"](self, data, *args)

    def sendmsg(self, buffers, *args):
        if len(args) >= 3 and args[2] is not None:
            _check(self.family, args[2], "send to")
        return _real["sendmsg"](self, buffers, *args)

    def getaddrinfo(host, *args, **kwargs):
        if not is_local_host(host):
            refuse(host, "name lookup of")
        return _real["getaddrinfo"](host, *args, **kwargs)

    def gethostbyname(host):
        if not is_local_host(host):
            refuse(host, "name lookup of")
        return _real["gethostbyname"](host)

    def gethostbyname_ex(host):
        if not is_local_host(host):
            refuse(host, "name lookup of")
        return _real["gethostbyname_ex"](host)

    sock.connect = connect
    sock.connect_ex = connect_ex
    sock.sendto = sendto
    if _real["sendmsg"] is not None:
        sock.sendmsg = sendmsg
    socket.getaddrinfo = getaddrinfo
    socket.gethostbyname = gethostbyname
    socket.gethostbyname_ex = gethostbyname_ex
