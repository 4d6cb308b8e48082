"""A stand-in for the Hugging Face hub on 127.0.0.1, and a hub address nothing answers on.

Tests reach the hub only through HF_ENDPOINT pointing at one of these, so what they see
is the same on a machine without network and on a connected laptop.
"""

from __future__ import annotations

import socket
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

from tests.support.fileserver import POLL_S


class FakeHubHandler(BaseHTTPRequestHandler):
    """Answers HEAD/GET .../REPO/resolve/REVISION/FILE the way huggingface.co does for a few repos."""

    # repo id -> (status, X-Error-Code); anything else gets a 500, like a hub in trouble.
    ANSWERS = {
        "rmbgd-tests/missing": (404, "RepoNotFound"),
        "briaai/RMBG-2.0": (401, "GatedRepo"),
    }

    def do_HEAD(self) -> None:  # noqa: N802 - http.server's naming
        self.server.requests.append((self.command, self.path))
        parts = self.path.split("?")[0].strip("/").split("/")
        repo = "/".join(parts[:2])
        revision = parts[3] if len(parts) > 3 else ""
        status, code = self.ANSWERS.get(repo, (500, ""))
        if repo == "rmbgd-tests/tiny" and revision == "no-such-revision":
            status, code = 404, "RevisionNotFound"
        self.send_response(status)
        if code:
            self.send_header("X-Error-Code", code)
        self.send_header("Content-Length", "0")
        self.end_headers()

    do_GET = do_HEAD

    def log_message(self, format: str, *args) -> None:
        pass  # the test's output is for the test


class FakeHub:
    def __init__(self) -> None:
        self.server = ThreadingHTTPServer(("127.0.0.1", 0), FakeHubHandler)
        self.server.requests = []
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        self._thread = threading.Thread(target=self.server.serve_forever, args=(POLL_S,), daemon=True)
        self._thread.start()

    @property
    def requests(self) -> list:
        """(method, path) of every request so far, in order."""
        return self.server.requests

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()
        self._thread.join(10)


class ClosedPort:
    """A loopback port held bound but never listening: a connection is refused at once.

    Held rather than released, so no other process can start listening there meanwhile.
    """

    def __init__(self) -> None:
        self._socket = socket.socket()
        self._socket.bind(("127.0.0.1", 0))
        self.port = self._socket.getsockname()[1]
        self.url = f"http://127.0.0.1:{self.port}"

    def close(self) -> None:
        self._socket.close()
