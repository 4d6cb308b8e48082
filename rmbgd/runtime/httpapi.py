"""The daemon's HTTP side (http.port set), mixed into Daemon (daemon.py).

Its life follows the daemon's: the port is bound while starting, the routes are served once
`ready`, and on a stop new requests get 503 (and /healthz says `stopping`) while the ones
already admitted get their answers, within the drain bound; then the server stops and the
pipeline drains as always. Whatever is still unanswered after that gets 503.
"""

from __future__ import annotations

import time
from typing import Any

from rmbgd.api.auth import TokenFileError, read_token
from rmbgd.errors import describe
from rmbgd.runtime.lifecycle import TICK_SECONDS, StartupError

__all__ = ["HttpSide"]


class HttpSide:
    """Daemon's hooks for the HTTP API; every one does nothing when it is off."""

    # HttpServer and HttpJobs (httpserver.py, httpjobs.py) once the API is on: imported only
    # then, since they need the `http` extra (FastAPI, uvicorn), which need not be installed.
    _http_server: Any = None
    _http: Any = None
    _http_token: Any = None

    def _http_serve(self, instance: str) -> None:
        """Take the port and answer from now on: 503 `starting` until `_http_ready`."""
        if self.cfg.http.port is None:
            return
        if self.cfg.http.token_file is not None:
            try:
                self._http_token = read_token(self.cfg.http.token_file)
            except TokenFileError as exc:
                raise StartupError(str(exc)) from None
            if self._http_token.warning:
                self.log.warning("http_token_file_readable", file=str(self.cfg.http.token_file),
                                 warning=self._http_token.warning)
        from rmbgd.runtime.httpserver import HttpServer

        self._http_server = HttpServer(self.cfg.http, self.log)
        self._http_server.bind()  # says which packages are missing before anything imports them
        from rmbgd.api.app import ApiSettings, create_app
        from rmbgd.runtime.httpjobs import HttpJobs

        # The pipeline exists once ready, before the first request is admitted.
        self._http = HttpJobs(self.cfg, lambda job: self._pipeline.submit(job), lambda: self._counters.busy,
                              lambda: self._max_in_flight, self._feed.wake, instance)
        http = self.cfg.http
        settings = ApiSettings(max_body_bytes=http.max_body_bytes, token=self._http_token,
                               allow_private_urls=http.allow_private_urls,
                               fetch_timeout_seconds=http.fetch_timeout_seconds,
                               on_request=self._http_answered)
        self._http_server.start(create_app(self._http, settings, self.log), on_crash=self._http_crashed)

    def _http_ready(self) -> None:
        if self._http is not None:
            from rmbgd.api.app import READY

            self._http.set_state(READY)

    def _http_abort(self) -> None:
        """The start failed or was stopped: close the port at once."""
        if self._http_server is not None:
            self._http_server.stop(1.0)

    def _http_answered(self, status: int, seconds: float) -> None:
        self._http.stats.request(status)
        self._service.http_request(status, seconds)

    def _http_crashed(self, exc: BaseException) -> None:
        self.log.error("http_server_died", error=describe(exc))

    def _http_tick(self) -> None:
        if self._http is not None:
            in_flight = self._http.in_flight
            self._service.http_tick(in_flight, self._http.stats.snapshot(in_flight))

    def _http_alive(self) -> bool:
        return self._http_server is None or self._http_server.alive()

    def _held_elsewhere(self) -> int:
        # The inbox leaves alone the slots that requests hold or wait for (httpjobs.py).
        return self._http.held() if self._http is not None else 0

    def _http_refuse(self) -> None:
        """From now on new requests get 503 and /healthz says `stopping`."""
        if self._http is not None:
            from rmbgd.api.app import STOPPING

            self._http.set_state(STOPPING)

    def _http_drain(self, timeout: float) -> None:
        """Wait (ticking) for the admitted requests' answers, then stop serving."""
        if self._http is None:
            if self._http_server is not None:
                self._http_server.stop(0)
            return
        deadline = time.monotonic() + timeout
        while not self._http.wait_idle(TICK_SECONDS):
            self._check_forced()
            if time.monotonic() > deadline:
                self.log.warning("http_drain_timeout", seconds=timeout, in_flight=self._http.in_flight)
                break
        # The answers are on their way out: a few seconds more to send them.
        self._http_server.stop(max(1.0, deadline - time.monotonic()))

    def _http_close(self) -> None:
        if self._http is not None:
            self._http.close()
            self._http_tick()  # the final counts, for the status file's last write
