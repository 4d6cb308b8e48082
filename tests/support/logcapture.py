"""A logger for unit tests, built on structlog's own `structlog.testing.LogCapture`.

Code under test takes its logger as an argument; `CapturedLog` is one, a real structlog
bound logger whose events end in `entries` (dicts with "event", "log_level" and the fields,
as `structlog.testing.capture_logs` gives them) instead of stdout. Unlike `capture_logs` it
changes no global structlog configuration, so tests that run a daemon or other loggers in
threads beside it are not affected. (For waiting on events that other threads log, in order,
see `WaitableLog` below and tests/support/inprocess.py.)
"""

from __future__ import annotations

import logging
import threading
from typing import Any, List

import structlog
from structlog.testing import LogCapture


class CapturedLog:
    def __init__(self, capture: LogCapture = None) -> None:
        self._capture = capture if capture is not None else LogCapture()
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


class _NotifyingCapture(LogCapture):
    def __init__(self, changed: threading.Condition) -> None:
        super().__init__()
        self._changed = changed

    def __call__(self, logger: Any, method_name: str, event_dict: dict) -> Any:
        with self._changed:
            try:
                return super().__call__(logger, method_name, event_dict)  # raises DropEvent
            finally:
                self._changed.notify_all()


class WaitableLog(CapturedLog):
    """A CapturedLog that other threads log to while the test waits for an event."""

    def __init__(self) -> None:
        self._changed = threading.Condition()
        super().__init__(_NotifyingCapture(self._changed))

    @property
    def entries(self) -> List[dict]:
        with self._changed:
            return list(self._capture.entries)

    def wait_for(self, name: str, timeout: float) -> dict:
        """The first event called `name`, logged already or within `timeout` seconds."""
        with self._changed:
            if not self._changed.wait_for(lambda: any(e["event"] == name for e in self._capture.entries), timeout):
                raise AssertionError(f"no {name!r} within {timeout}s: {[e['event'] for e in self._capture.entries]}")
        return self.of(name)[0]
