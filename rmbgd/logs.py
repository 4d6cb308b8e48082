"""JSON-lines logging: one object per line on stdout, for journald and `jq`.

structlog events and everything third-party libraries send through the stdlib `logging`
module or `warnings` end up in the same stream with the same fields, so an operator never has
to parse two formats.
"""

from __future__ import annotations

import logging
import sys
import threading
from typing import IO, Optional

import structlog

LEVELS = {"debug": logging.DEBUG, "info": logging.INFO, "warning": logging.WARNING, "error": logging.ERROR}

_SHARED = [
    structlog.contextvars.merge_contextvars,
    structlog.stdlib.add_log_level,
    structlog.processors.TimeStamper(fmt="iso", utc=True, key="timestamp"),
]


def _add_origin(logger: logging.Logger, method: str, event_dict: dict) -> dict:
    # Records from other libraries carry their logger name so an operator can tell torch's
    # warnings from rmbgd's own events.
    record = event_dict.get("_record")
    if record is not None and not record.name.startswith("rmbgd"):
        event_dict.setdefault("logger", record.name)
    return event_dict


def configure(level: str = "info", stream: Optional[IO[str]] = None) -> None:
    handler = logging.StreamHandler(stream or sys.stdout)
    handler.setFormatter(
        structlog.stdlib.ProcessorFormatter(
            foreign_pre_chain=[*_SHARED, _add_origin],
            processors=[
                structlog.stdlib.ProcessorFormatter.remove_processors_meta,
                structlog.processors.format_exc_info,
                structlog.processors.JSONRenderer(sort_keys=False, default=str),
            ],
        )
    )
    root = logging.getLogger()
    for old in list(root.handlers):
        root.removeHandler(old)
    root.addHandler(handler)
    # Third-party chatter only from WARNING up; rmbgd's own events at the configured level.
    root.setLevel(logging.WARNING)
    set_level(level)

    structlog.configure(
        processors=[*_SHARED, structlog.stdlib.ProcessorFormatter.wrap_for_formatter],
        logger_factory=structlog.stdlib.LoggerFactory(),
        wrapper_class=structlog.stdlib.BoundLogger,
        cache_logger_on_first_use=True,
    )
    logging.captureWarnings(True)
    threading.excepthook = _log_thread_crash


def set_level(level: str) -> None:
    logging.getLogger("rmbgd").setLevel(LEVELS[level])


def get_logger(name: str = "rmbgd") -> structlog.stdlib.BoundLogger:
    return structlog.get_logger(name)


def _log_thread_crash(args: threading.ExceptHookArgs) -> None:
    if args.exc_type is SystemExit:
        return
    get_logger().critical(
        "thread_crashed",
        thread=getattr(args.thread, "name", None),
        exc_info=(args.exc_type, args.exc_value, args.exc_traceback),
    )
