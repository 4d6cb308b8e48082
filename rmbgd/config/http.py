"""The `http:` section: the optional HTTP API on the daemon's batch queue (rmbgd.api)."""

from __future__ import annotations

import ipaddress
from typing import Annotated, Any, Optional

from pydantic import ConfigDict, Field, model_validator
from pydantic.dataclasses import dataclass

from rmbgd.config import kinds
from rmbgd.config.kinds import problem

__all__ = ["FAIR", "INTERACTIVE", "HttpConfig", "is_loopback"]

# http.priority values: requests go ahead of the inbox files waiting for the model, or
# queue with them in arrival order.
INTERACTIVE, FAIR = "interactive", "fair"

_PRIORITY = kinds.choice("interactive|fair", "interactive or fair", [INTERACTIVE, FAIR])


def is_loopback(address: str) -> bool:
    """Whether a listen address only takes connections from this host."""
    if address.lower().rstrip(".") == "localhost":
        return True
    try:
        return ipaddress.ip_address(address).is_loopback
    except ValueError:
        # Any other host name may resolve to anything: taken as reachable from outside.
        return False


def _doc(text: str) -> Any:
    return Field(description=text)


@dataclass(frozen=True, config=ConfigDict(extra="forbid"))
class HttpConfig:
    # None: no HTTP API, and FastAPI/uvicorn are never imported. 0 lets the kernel pick a
    # free port (the daemon logs which); useful in tests.
    port: Annotated[kinds.integer(0, 65535, nullable=True), _doc("HTTP API port; null: no HTTP API.")] = None
    address: Annotated[kinds.host, _doc("Listen address; a non-loopback one requires token_file.")] = "127.0.0.1"
    token_file: Annotated[
        kinds.optional_path, _doc("File holding the bearer token every request but GET /healthz must carry.")
    ] = None
    max_body_mb: Annotated[
        kinds.number(above=0), _doc("Larger request bodies (and URL downloads) are refused with 413.")
    ] = 50.0
    allow_private_urls: Annotated[
        kinds.boolean, _doc("Allow URL inputs that resolve to loopback, private or link-local addresses.")
    ] = False
    priority: Annotated[
        _PRIORITY, _doc("interactive: requests go ahead of waiting inbox files; fair: in arrival order.")
    ] = INTERACTIVE
    # Requests count against pipeline.max_in_flight with the inbox's files; when it is full a
    # request waits this long for room, then gets 503 with Retry-After.
    busy_wait_seconds: Annotated[
        kinds.number(at_least=0), _doc("How long a request waits for room when the pipeline is full, then 503.")
    ] = 2.0
    fetch_timeout_seconds: Annotated[
        kinds.number(above=0), _doc("Most time one URL download may take, redirects included.")
    ] = 30.0

    @property
    def max_body_bytes(self) -> int:
        return int(self.max_body_mb * 1024 * 1024)

    @model_validator(mode="after")
    def _token_when_exposed(self) -> "HttpConfig":
        if self.port is not None and self.token_file is None and not is_loopback(self.address):
            raise problem(
                f"required when http.address ({self.address}) is not a loopback address: "
                "anyone who can reach the port could use the daemon",
                at="token_file",
            )
        return self

    def listen_url(self, port: Optional[int] = None) -> str:
        host = f"[{self.address}]" if ":" in self.address else self.address
        return f"http://{host}:{self.port if port is None else port}"
