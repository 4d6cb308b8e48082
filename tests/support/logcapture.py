"""A logger for unit tests, built on structlog's own `structlog.testing.LogCapture`.

Code under test takes its logger as an argument; `CapturedLog` is one, a real structlog
bound logger whose events end in `entries` (dicts with "event", "log_level" and the fields,
as `structlog.testing.capture_logs` gives them) instead of stdout. Unlike `capture_logs` it
changes no global structlog configuration, so tests that run a daemon or other loggers in
threads beside it are not affected. (For waiting on events that other threads log, in order,
see tests/support/inprocess.py.)
"""

from __future__ import annotations

import logging
from typing import Any, List

import structlog
from structlog.testing import LogCapture


class CapturedLog:
    def __init__(self) -> None:
        self._capture = LogCapture()
        self._logger = structlog.wrap_logger(
            structlog.ReturnLogger(),
            processors=[self._capture],
            wrapper_class=structlog.make_filtering_bound_logger(logging.DEBUG),
            cache_logger_on_first_use=False,
        )

    def __getattr__(self, name: str) -> Any:
        # debug, info, warning, error, critical, exception, bind: the bound logger's own.
        return getattr(self._logger, name)

    @property
    def entries(self) -> List[dict]:
        return self._capture.entries

    def names(self, *levels: str) -> List[str]:
        """The events' names in order; only those at `levels` if any are given."""
        return [e["event"] for e in self.entries if not levels or e["log_level"] in levels]

    def of(self, name: str) -> List[dict]:
        return [e for e in self.entries if e["event"] == name]

    def fields(self, name: str) -> dict:
        """The last event called `name` (failing the test if there is none)."""
        found = self.of(name)
        assert found, f"no {name} event in {self.names()}"
        return found[-1]
