"""The HTTP API's server: uvicorn in its own thread of the daemon, signals left to the daemon.

It starts while the daemon starts (a port in use is a `startup_failed`, before the model
loads), answering 503 `starting` until the daemon is `ready` (the backend's state). uvicorn
never touches signal handlers (the lifecycle owns SIGTERM and SIGINT); the daemon stops it with
`stop`, after the requests it admitted had their answers (see runtime/httpapi.py). FastAPI
and uvicorn are imported only when the API is on.
"""

from __future__ import annotations

import contextlib
import socket
import threading
import time
from typing import Any, Callable, Optional

from rmbgd.api.checks import INSTALL_HINT, missing_packages
from rmbgd.config.http import HttpConfig
from rmbgd.runtime.lifecycle import StartupError

__all__ = ["HttpServer"]

# How long the server may take to start listening, and its own last wait for open
# connections when it stops (the daemon has already waited for the requests' answers).
_START_S = 10.0
_GRACE_S = 5


class HttpServer:
    def __init__(self, cfg: HttpConfig, log: Any) -> None:
        self._cfg = cfg
        self._log = log
        self._socket: Optional[socket.socket] = None
        self._server: Any = None
        self._thread: Optional[threading.Thread] = None
        self.port: Optional[int] = None

    def bind(self) -> None:
        """Check the packages and take the port; StartupError with the one-line reason."""
        missing = missing_packages()
        if missing:
            raise StartupError(
                f"http.port: the HTTP API needs {', '.join(missing)}, which is not installed; {INSTALL_HINT}"
            )
        address, port = self._cfg.address, self._cfg.port
        try:
            family, kind, proto, _, where = socket.getaddrinfo(
                address, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE
            )[0]
            sock = socket.socket(family, kind, proto)
        except OSError as exc:
            raise StartupError(f"http.address: cannot listen on {address}: {exc.strerror or exc}") from None
        try:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            sock.bind(where)
        except OSError as exc:
            sock.close()
            raise StartupError(
                f"http.port: cannot listen on {address} port {port}: {exc.strerror or exc}"
            ) from None
        sock.set_inheritable(False)
        self._socket = sock
        self.port = sock.getsockname()[1]

    def start(self, app: Any, on_crash: Callable[[BaseException], None]) -> None:
        """Serve `app` (after `bind`) in a thread; returns once it listens."""
        import uvicorn

        config = uvicorn.Config(
            app,
            log_config=None,
            access_log=False,  # the app logs each request as `http_request`
            lifespan="off",
            timeout_graceful_shutdown=_GRACE_S,
            server_header=False,
        )
        class Server(uvicorn.Server):
            # The daemon's lifecycle owns the signals: uvicorn must not replace its handlers.
            def capture_signals(self) -> Any:
                return contextlib.nullcontext()

        self._server = Server(config)

        def serve() -> None:
            try:
                self._server.run(sockets=[self._socket])
            except BaseException as exc:  # noqa: BLE001 - the thread's boundary: reported to the daemon
                on_crash(exc)

        self._thread = threading.Thread(target=serve, name="rmbgd-http", daemon=True)
        self._thread.start()
        deadline = time.monotonic() + _START_S
        while not self._server.started and self._thread.is_alive() and time.monotonic() < deadline:
            time.sleep(0.01)
        if not self._server.started:
            raise StartupError(f"http.port: the HTTP server did not start listening on port {self.port}")
        self._log.info("http_listening", address=self._cfg.address, port=self.port,
                       url=self._cfg.listen_url(self.port))

    def alive(self) -> bool:
        return self._thread is None or self._thread.is_alive()

    def stop(self, timeout: float) -> bool:
        """Stop accepting, close the connections; False when it would not end within `timeout`."""
        if self._thread is None:
            if self._socket is not None:
                self._socket.close()
            return True
        self._server.should_exit = True
        self._thread.join(timeout)
        if self._thread.is_alive():
            self._server.force_exit = True
            self._thread.join(1.0)
        return not self._thread.is_alive()
