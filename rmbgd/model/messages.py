"""What the model libraries print while loading and running a model, turned into log events.

transformers, timm and the model's own code warn through `warnings`, `logging` and their
own progress output; these are caught and logged as model_warning events (the harmless
ones at debug).
"""

from __future__ import annotations

import contextlib
import logging
import re
import warnings
from collections.abc import Iterator
from typing import Any

_stdlib_log = logging.getLogger(__name__)
# Terminal control sequences (colours, bold) as transformers writes into its load report.
_ANSI_ESCAPE_RE = re.compile(r"\x1b\[[0-?]*[ -/]*[@-~]")
# Library messages logged at debug only: harmless, or said better by rmbgd itself.
_QUIET_LIBRARY_MESSAGES = (
    # BiRefNet's code imports timm's old module paths, which still work.
    re.compile(r"^Importing from timm\.models\.\w+ is deprecated"),
    # transformers' table of missing/unexpected weights: check_loading_info refuses the
    # model with the names, or (for computed buffers) moves to the legacy loader.
    re.compile(r"\bLOAD REPORT\b"),
)


def quiet_library_output() -> None:
    """Keep transformers and huggingface_hub off stdout/stderr; their records go to the root logger.

    stdout carries the daemon's JSON log, and stray progress bars or plain-text
    warnings on stderr would be noise in the journal. Process-wide on purpose:
    the daemon loads one model and these libraries do nothing else in it.
    """
    from huggingface_hub.utils import disable_progress_bars
    from transformers.utils import logging as transformers_logging

    transformers_logging.disable_progress_bar()
    transformers_logging.disable_default_handler()
    transformers_logging.enable_propagation()
    disable_progress_bars()
    # huggingface_hub has no switch for its stderr handler, but its logger
    # already propagates, so dropping the handler is enough.
    hub_logger = logging.getLogger("huggingface_hub")
    for handler in list(hub_logger.handlers):
        if type(handler) is logging.StreamHandler:
            hub_logger.removeHandler(handler)


@contextlib.contextmanager
def library_messages(log: Any) -> Iterator[None]:
    """Log what model code and transformers say meanwhile as clean one-line events.

    Remote model code calls warnings.warn (timm's deprecations), and transformers logs a
    coloured multi-line table when weights do not match. Both would otherwise reach the
    JSON log as one event holding terminal escape codes and line breaks. Each becomes one
    ``model_warning`` event with a one-line ``message`` (and any further lines as a
    ``details`` list), afterwards; known-harmless ones and what rmbgd reports itself go to
    debug. Process-wide on purpose, like quiet_library_output: nothing else in the
    process uses these libraries while the model loads.
    """
    collector = _RecordCollector()
    library_logger = logging.getLogger("transformers")
    propagate = library_logger.propagate
    library_logger.addHandler(collector)
    library_logger.propagate = False
    caught: list[warnings.WarningMessage] = []
    try:
        with warnings.catch_warnings(record=True) as caught:
            yield
    finally:
        library_logger.removeHandler(collector)
        library_logger.propagate = propagate
        for warning in caught:
            _log_library_message(log, str(warning.message), category=warning.category.__name__)
        for record in collector.records:
            _log_library_message(log, record.getMessage(), logger=record.name)


class _RecordCollector(logging.Handler):
    def __init__(self) -> None:
        super().__init__()
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)


def clean_lines(text: str) -> list[str]:
    """``text`` without terminal escape codes, as its non-empty lines, each stripped."""
    lines = (_ANSI_ESCAPE_RE.sub("", line).strip() for line in str(text).splitlines())
    return [line for line in lines if line]


def _log_library_message(log: Any, text: str, **origin: str) -> None:
    lines = clean_lines(text) or ["(no message)"]
    fields: dict[str, Any] = {**origin, "message": lines[0]}
    if len(lines) > 1:
        fields["details"] = lines[1:]
    quiet = any(pattern.search(lines[0]) for pattern in _QUIET_LIBRARY_MESSAGES)
    if log is None:
        _stdlib_log.log(logging.DEBUG if quiet else logging.WARNING, "model_warning %s", fields)
        return
    emit = getattr(log, "debug", None) if quiet else getattr(log, "warning", log.info)
    if emit is not None:
        emit("model_warning", **fields)


def log_warning_event(log: Any, event: str, **fields: Any) -> None:
    if log is None:
        _stdlib_log.warning("%s %s", event, fields)
        return
    getattr(log, "warning", log.info)(event, **fields)
