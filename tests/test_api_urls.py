"""URL inputs of the HTTP API: the address rule on literals, fetches from servers on 127.0.0.1.

Nothing here sends a packet anywhere but loopback: the rule is a pure function tested on
address literals, and names that "resolve" to other addresses do so through an injected
resolver, refused before any connection (the network guard would fail the test otherwise).
"""

from __future__ import annotations

import http.server
import ipaddress
import threading

import httpx
import pytest

from rmbgd.api.urls import BadUrl, FetchFailed, FetchLimits, TooLarge, UrlRefused, fetch, parse_url, refusal
from tests.support.fileserver import POLL_S

# ------------------------------------------------------------------ the address rule, pure


@pytest.mark.parametrize(
    "literal, why",
    [
        ("127.0.0.1", "loopback"),
        ("127.8.9.10", "loopback"),
        ("10.0.0.1", "private"),
        ("172.16.5.4", "private"),
        ("192.168.1.1", "private"),
        ("169.254.169.254", "link-local"),  # the cloud metadata service
        ("0.0.0.0", "unspecified"),
        ("224.0.0.1", "multicast"),
        ("240.0.0.1", "reserved"),
        ("255.255.255.255", "reserved"),
        ("100.64.0.1", "not globally reachable"),  # carrier-grade NAT
        ("192.0.2.10", "private"),  # documentation
        ("::1", "loopback"),
        ("::", "unspecified"),
        ("fe80::1", "link-local"),
        ("fd00::1", "unique-local"),
        ("fc12:3456::1", "unique-local"),
        ("ff02::1", "multicast"),
        ("2001:db8::1", "private"),  # documentation
        ("::ffff:127.0.0.1", "loopback (inside ::ffff:7f00:1)"),
        ("::ffff:10.1.2.3", "private (inside ::ffff:a01:203)"),
        ("::ffff:169.254.169.254", "link-local (inside ::ffff:a9fe:a9fe)"),
        ("64:ff9b::a00:1", "private (inside 64:ff9b::a00:1)"),  # NAT64 of 10.0.0.1
        ("2002:7f00:1::1", "loopback (inside 2002:7f00:1::1)"),  # 6to4 of 127.0.0.1
    ],
)
def test_addresses_a_request_must_not_reach(literal, why):
    assert refusal(ipaddress.ip_address(literal)) == why


@pytest.mark.parametrize(
    "literal",
    ["93.184.215.14", "8.8.8.8", "1.1.1.1", "2606:4700:4700::1111", "2a00:1450:4001:80b::200e", "::ffff:8.8.8.8",
     "64:ff9b::808:808"],
)
def test_public_addresses_pass(literal):
    assert refusal(ipaddress.ip_address(literal)) is None


@pytest.mark.parametrize(
    "text, problem",
    [
        ("ftp://example.com/a.jpg", "only http and https"),
        ("file:///etc/passwd", "only http and https"),
        ("/relative/a.jpg", "only http and https"),
        ("http://", "no host"),
        ("https://user:secret@example.com/a.jpg", "user name or password"),
        ("http://[::1/a.jpg", "not a URL"),
    ],
)
def test_unusable_urls(text, problem):
    with pytest.raises(BadUrl, match=problem):
        parse_url(text)


# ------------------------------------------------------------------ fetches, loopback only


class _Handler(http.server.BaseHTTPRequestHandler):
    def log_message(self, *args):  # the test reads what it needs from the server's record
        return

    def do_GET(self):
        server = self.server
        server.seen.append((self.path, self.headers.get("Host")))
        route = server.routes.get(self.path)
        if route is None:
            self.send_error(404)
            return
        route(self)


class LocalServer:
    """An HTTP server on 127.0.0.1 with per-path handlers; records each request's path and Host."""

    def __init__(self) -> None:
        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
        self.httpd.daemon_threads = True
        self.httpd.seen = []
        self.httpd.routes = {}
        self.port = self.httpd.server_address[1]
        self.thread = threading.Thread(target=self.httpd.serve_forever, args=(POLL_S,), name="test-http", daemon=True)
        self.thread.start()

    @property
    def seen(self):
        return self.httpd.seen

    def route(self, path, handler):
        self.httpd.routes[path] = handler

    def url(self, path, host="127.0.0.1"):
        return f"http://{host}:{self.port}{path}"

    def stop(self):
        self.httpd.shutdown()
        self.httpd.server_close()
        self.thread.join(10)


@pytest.fixture
def server():
    running = LocalServer()
    yield running
    running.stop()


def body(data, status=200, headers=()):
    def handler(request):
        request.send_response(status)
        for name, value in headers:
            request.send_header(name, value)
        request.send_header("Content-Length", str(len(data)))
        request.end_headers()
        request.wfile.write(data)

    return handler


def redirect(location):
    def handler(request):
        request.send_response(302)
        request.send_header("Location", location)
        request.send_header("Content-Length", "0")
        request.end_headers()

    return handler


PRIVATE_OK = FetchLimits(max_bytes=1_000_000, timeout_seconds=10.0, allow_private=True)


def loopback_resolver(calls):
    def resolve(host, port):
        calls.append(host)
        return {"files.test": ["127.0.0.1"], "inside.test": ["10.0.0.5"], "mixed.test": ["93.184.215.14", "192.168.0.9"]}[host]

    return resolve


def test_fetch_returns_the_body(server):
    server.route("/a.jpg", body(b"\xff\xd8 jpeg bytes"))
    assert fetch(server.url("/a.jpg"), PRIVATE_OK) == b"\xff\xd8 jpeg bytes"


def test_loopback_is_refused_before_any_connection(server):
    server.route("/a.jpg", body(b"secret"))
    with pytest.raises(UrlRefused, match="loopback"):
        fetch(server.url("/a.jpg"), FetchLimits(max_bytes=1000))
    assert server.seen == []


def test_the_name_is_resolved_once_and_the_checked_address_is_the_one_connected_to(server):
    # No second lookup between the check and the connection (DNS rebinding); the server sees
    # the name in Host, not the address.
    server.route("/a.jpg", body(b"ok"))
    calls = []
    assert fetch(server.url("/a.jpg", host="files.test"), PRIVATE_OK, resolver=loopback_resolver(calls)) == b"ok"
    assert calls == ["files.test"]
    assert server.seen == [("/a.jpg", f"files.test:{server.port}")]


def test_a_name_resolving_to_a_private_address_is_refused_without_a_connection():
    calls = []
    with pytest.raises(UrlRefused, match=r"inside\.test resolves to a private address \(10\.0\.0\.5\)"):
        fetch("http://inside.test/a.jpg", FetchLimits(max_bytes=1000), resolver=loopback_resolver(calls))
    assert calls == ["inside.test"]


def test_a_name_with_any_private_address_is_refused():
    with pytest.raises(UrlRefused, match="192.168.0.9"):
        fetch("https://mixed.test/a.jpg", FetchLimits(max_bytes=1000), resolver=loopback_resolver([]))


def test_each_redirect_is_checked_again():
    # A public server (a transport standing in for it) redirects to a name that resolves to a
    # private address: refused before anything connects to it.
    hops = []

    def public(request):
        hops.append(request)
        assert request.url.host == "93.184.215.14" and request.headers["host"] == "cdn.test"
        return httpx.Response(302, headers={"Location": "http://inside.test/next"})

    with pytest.raises(UrlRefused, match=r"inside\.test resolves to a private address \(10\.0\.0\.5\)"):
        fetch(
            "http://cdn.test/start",
            FetchLimits(max_bytes=1000),
            resolver=lambda host, port: {"cdn.test": ["93.184.215.14"], "inside.test": ["10.0.0.5"]}[host],
            transport=httpx.MockTransport(public),
        )
    assert len(hops) == 1


def test_redirects_are_followed_up_to_three(server):
    server.route("/r0", redirect("/r1"))
    server.route("/r1", redirect("/r2"))
    server.route("/r2", redirect(server.url("/r3")))
    server.route("/r3", body(b"there"))
    assert fetch(server.url("/r0"), PRIVATE_OK) == b"there"
    server.route("/r3", redirect("/r4"))
    server.route("/r4", body(b"too far"))
    with pytest.raises(FetchFailed, match="more than 3 redirects"):
        fetch(server.url("/r0"), PRIVATE_OK)
    assert "/r4" not in [path for path, _ in server.seen]


def test_a_redirect_to_another_scheme_fails(server):
    server.route("/r", redirect("file:///etc/passwd"))
    with pytest.raises(FetchFailed, match="only http and https"):
        fetch(server.url("/r"), PRIVATE_OK)


def test_a_declared_body_over_the_limit_is_refused_unread(server):
    server.route("/big", body(b"x" * 5000))
    with pytest.raises(TooLarge, match="5000 bytes"):
        fetch(server.url("/big"), FetchLimits(max_bytes=4096, allow_private=True))


def test_an_undeclared_body_over_the_limit_is_abandoned(server):
    def endless(request):
        request.send_response(200)
        request.end_headers()  # no Content-Length: read until the connection closes
        try:
            for _ in range(10_000):
                request.wfile.write(b"y" * 65536)
        except (BrokenPipeError, ConnectionResetError):
            return  # the client gave up, as it should

    server.route("/endless", endless)
    with pytest.raises(TooLarge, match="over the limit of 100000 bytes"):
        fetch(server.url("/endless"), FetchLimits(max_bytes=100_000, allow_private=True))


def test_an_error_status_is_a_failed_fetch(server):
    with pytest.raises(FetchFailed, match="HTTP 404"):
        fetch(server.url("/missing"), PRIVATE_OK)


def test_a_name_that_does_not_resolve_is_a_failed_fetch():
    def nowhere(host, port):
        raise OSError(-2, "Name or service not known")

    with pytest.raises(FetchFailed, match="cannot resolve nowhere.test"):
        fetch("http://nowhere.test/a.jpg", PRIVATE_OK, resolver=nowhere)


def test_a_stalled_server_fails_within_the_timeout(server):
    release = threading.Event()

    def stall(request):
        release.wait(30)

    server.route("/stall", stall)
    try:
        with pytest.raises(FetchFailed):
            fetch(server.url("/stall"), FetchLimits(max_bytes=1000, timeout_seconds=0.5, allow_private=True))
    finally:
        release.set()


def test_https_connects_to_the_address_and_verifies_the_name():
    # What goes on the wire, without a TLS server: the request is addressed to the checked
    # address, and the TLS server name (SNI, which the certificate is checked against) and
    # the Host header are the URL's host.
    sent = []

    def record(request):
        sent.append(request)
        return httpx.Response(200, content=b"png")

    limits = FetchLimits(max_bytes=1000)
    got = fetch(
        "https://img.test/a.png",
        limits,
        resolver=lambda host, port: ["93.184.215.14"],
        transport=httpx.MockTransport(record),
    )
    assert got == b"png"
    (request,) = sent
    assert (request.url.scheme, request.url.host, request.url.port) == ("https", "93.184.215.14", None)
    assert request.headers["host"] == "img.test"
    assert request.extensions["sni_hostname"] == "img.test"


def test_proxies_from_the_environment_are_not_used(server, monkeypatch):
    # A proxy would make the address check meaningless (it connects, not us).
    monkeypatch.setenv("HTTP_PROXY", "http://127.0.0.1:9")
    monkeypatch.setenv("http_proxy", "http://127.0.0.1:9")
    server.route("/a.jpg", body(b"direct"))
    assert fetch(server.url("/a.jpg"), PRIVATE_OK) == b"direct"
