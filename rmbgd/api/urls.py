"""URL inputs of the HTTP API, fetched without letting a request reach the daemon's own network.

A URL must be http or https with a host and no credentials. The host is resolved once and every
address it resolves to must be one the public internet can reach (`refusal`); the connection
then goes to one of those addresses, with the Host header and the TLS server name (SNI) naming
the host, so a DNS answer that changes between the check and the connection (DNS rebinding)
cannot send the request elsewhere. A redirect is a new URL and is checked the same way, at most
`max_redirects` times. The body is read in chunks and abandoned once it passes `max_bytes`, and
one deadline covers the whole fetch, redirects included. Proxies from the environment are not
used: a proxy would make the address check meaningless.
"""

from __future__ import annotations

import ipaddress
import socket
import time
from dataclasses import dataclass
from typing import Callable, List, Optional, Sequence, Union

import httpx

from rmbgd.errors import describe

Address = Union[ipaddress.IPv4Address, ipaddress.IPv6Address]
# (host, port) -> the addresses it resolves to, as text, in the resolver's order.
Resolver = Callable[[str, int], List[str]]

_REDIRECTS = (301, 302, 303, 307, 308)
# IPv6 prefixes that carry an IPv4 address inside: a request to one reaches that IPv4 host.
_NAT64 = ipaddress.IPv6Network("64:ff9b::/96")
_NAT64_LOCAL = ipaddress.IPv6Network("64:ff9b:1::/48")
_UNIQUE_LOCAL = ipaddress.IPv6Network("fc00::/7")
_CHUNK = 64 * 1024


class UrlError(Exception):
    """A URL input that cannot be used; `status` is the HTTP status the API answers with."""

    status = 502


class BadUrl(UrlError):
    status = 400


class UrlRefused(UrlError):
    status = 403


class TooLarge(UrlError):
    status = 413


class FetchFailed(UrlError):
    status = 502


def refusal(address: Address) -> Optional[str]:
    """Why a request must not go to `address` (None: a public address).

    IPv6 forms that embed an IPv4 address (IPv4-mapped, NAT64, 6to4, Teredo) are judged by
    the IPv4 address they reach."""
    if isinstance(address, ipaddress.IPv6Address):
        inner = _embedded_ipv4(address)
        if inner is not None:
            why = refusal(inner)
            return None if why is None else f"{why} (inside {address})"
        if address in _UNIQUE_LOCAL:
            return "unique-local"
    for why, test in (
        ("unspecified", address.is_unspecified),
        ("loopback", address.is_loopback),
        ("link-local", address.is_link_local),
        ("multicast", address.is_multicast),
        ("reserved", address.is_reserved),
        ("private", address.is_private),
    ):
        if test:
            return why
    # What is left and still not global: shared address space (100.64.0.0/10) and the like.
    return None if address.is_global else "not globally reachable"


def _embedded_ipv4(address: ipaddress.IPv6Address) -> Optional[ipaddress.IPv4Address]:
    if address.ipv4_mapped is not None:
        return address.ipv4_mapped
    if address in _NAT64 or address in _NAT64_LOCAL:
        return ipaddress.IPv4Address(int(address) & 0xFFFFFFFF)
    if address.sixtofour is not None:
        return address.sixtofour
    if address.teredo is not None:
        return address.teredo[1]  # (server, client): the client is who a packet reaches
    return None


def parse_url(text: str) -> httpx.URL:
    """`text` as an http(s) URL with a host, or BadUrl saying what is wrong."""
    try:
        url = httpx.URL(text)
    except (httpx.InvalidURL, TypeError, ValueError) as exc:
        raise BadUrl(f"not a URL: {exc}") from None
    if url.scheme not in ("http", "https"):
        raise BadUrl(f"only http and https URLs are fetched, not {url.scheme or 'a relative URL'}")
    if not url.host:
        raise BadUrl("the URL has no host")
    if url.userinfo:
        raise BadUrl("URLs with a user name or password are not fetched")
    return url


def system_resolver(host: str, port: int) -> List[str]:
    """The addresses `host` resolves to, each once, in the system resolver's order."""
    found = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    addresses: List[str] = []
    for *_ignored, sockaddr in found:
        if sockaddr[0] not in addresses:
            addresses.append(sockaddr[0])
    return addresses


@dataclass(frozen=True)
class FetchLimits:
    max_bytes: int
    timeout_seconds: float = 30.0
    max_redirects: int = 3
    allow_private: bool = False


def fetch(
    text: str,
    limits: FetchLimits,
    *,
    resolver: Resolver = system_resolver,
    transport: Optional[httpx.BaseTransport] = None,
) -> bytes:
    """The body behind the URL `text`; raises a UrlError subclass for anything else."""
    deadline = time.monotonic() + limits.timeout_seconds
    url = parse_url(text)
    with httpx.Client(follow_redirects=False, trust_env=False, transport=transport) as client:
        for _hop in range(limits.max_redirects + 1):
            addresses = _checked_addresses(url, limits, resolver)
            with _open(client, url, addresses, deadline) as response:
                location = response.headers.get("location")
                if response.status_code in _REDIRECTS and location:
                    try:
                        url = parse_url(str(url.join(location)))
                    except BadUrl as exc:
                        raise FetchFailed(f"a redirect to an unusable URL: {exc}") from None
                    continue
                if response.status_code != 200:
                    raise FetchFailed(f"the URL answered HTTP {response.status_code}")
                return _read_capped(response, limits.max_bytes, deadline)
    raise FetchFailed(f"more than {limits.max_redirects} redirects")


def _checked_addresses(url: httpx.URL, limits: FetchLimits, resolver: Resolver) -> List[Address]:
    host = url.host
    try:
        # A literal address is checked as it is, without asking a resolver.
        literal: Optional[Address] = ipaddress.ip_address(host)
    except ValueError:
        literal = None
    if literal is not None:
        addresses: Sequence[Address] = [literal]
    else:
        try:
            found = resolver(host, _port(url))
        except (OSError, UnicodeError) as exc:
            raise FetchFailed(f"cannot resolve {host}: {exc}") from None
        addresses = [ipaddress.ip_address(text.split("%", 1)[0]) for text in found]
        if not addresses:
            raise FetchFailed(f"{host} resolves to no address")
    if not limits.allow_private:
        for address in addresses:
            why = refusal(address)
            if why is not None:
                # Refused if any address is: which one a connection would use is not ours to
                # guess, and a name that mixes public and private answers is suspect anyway.
                raise UrlRefused(f"{host} resolves to a {why} address ({address}); http.allow_private_urls is off")
    return list(addresses)


def _port(url: httpx.URL) -> int:
    return url.port or (443 if url.scheme == "https" else 80)


class _open:
    """The response of the first address that answers, streamed; closed on exit."""

    def __init__(self, client: httpx.Client, url: httpx.URL, addresses: List[Address], deadline: float) -> None:
        self._client, self._url, self._addresses, self._deadline = client, url, addresses, deadline
        self._response: Optional[httpx.Response] = None

    def __enter__(self) -> httpx.Response:
        last: Optional[Exception] = None
        host_header = self._url.netloc.decode("ascii")
        for address in self._addresses:
            pinned = self._url.copy_with(host=str(address))
            request = self._client.build_request(
                "GET",
                pinned,
                # Images are compressed already; asking for no transfer encoding keeps the
                # size limit a limit on what the server sends.
                headers={"Host": host_header, "Accept": "image/*, */*;q=0.5", "Accept-Encoding": "identity"},
                timeout=_remaining(self._deadline),
                # TLS is verified against the host, not the address it was reached at.
                extensions={"sni_hostname": self._url.host} if self._url.scheme == "https" else {},
            )
            try:
                self._response = self._client.send(request, stream=True)
                return self._response
            except httpx.ConnectError as exc:
                last = exc  # the next address may answer
            except httpx.HTTPError as exc:
                raise FetchFailed(f"fetching {self._url.host} failed: {describe(exc)}") from None
        reason = describe(last) if last is not None else "no address to connect to"
        raise FetchFailed(f"cannot connect to {self._url.host}: {reason}")

    def __exit__(self, *exc_info: object) -> None:
        if self._response is not None:
            self._response.close()


def _read_capped(response: httpx.Response, max_bytes: int, deadline: float) -> bytes:
    declared = response.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > max_bytes:
        raise TooLarge(f"the URL's body is {int(declared)} bytes, over the limit of {max_bytes}")
    body = bytearray()
    try:
        for chunk in response.iter_bytes(_CHUNK):
            body += chunk
            if len(body) > max_bytes:
                raise TooLarge(f"the URL's body is over the limit of {max_bytes} bytes")
            if time.monotonic() > deadline:
                raise FetchFailed("the download took too long")
    except httpx.HTTPError as exc:
        raise FetchFailed(f"the download failed: {describe(exc)}") from None
    return bytes(body)


def _remaining(deadline: float) -> float:
    left = deadline - time.monotonic()
    if left <= 0:
        raise FetchFailed("the download took too long")
    return left
