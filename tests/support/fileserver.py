"""A file server on 127.0.0.1 for URL inputs: fixed paths to fixed bytes, anything else 404."""

from __future__ import annotations

import contextlib
import http.server
import threading
from typing import Iterator, Mapping

# How often a test server's serve_forever looks for shutdown(): its default (0.5 s) is what
# each server's stop used to wait, about 0.45 s per test that starts one.
POLL_S = 0.02


@contextlib.contextmanager
def serve_files(served: Mapping[str, bytes], content_type: str = "") -> Iterator[str]:
    """Serve `served` (path -> body, query strings ignored) until the block ends; yields the base URL.

    `content_type`, when given, is sent with every body (e.g. a wrong one, to show it is not trusted).
    """

    class Handler(http.server.BaseHTTPRequestHandler):
        def log_message(self, *args):
            return

        def do_GET(self):
            data = served.get(self.path.split("?", 1)[0])
            if data is None:
                self.send_error(404)
                return
            self.send_response(200)
            if content_type:
                self.send_header("Content-Type", content_type)
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=httpd.serve_forever, args=(POLL_S,), daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{httpd.server_address[1]}"
    finally:
        httpd.shutdown()
        httpd.server_close()
        thread.join(10)
