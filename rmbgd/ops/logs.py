"""JSON-lines logging: one object per line on stdout, for journald and `jq`.

structlog events and everything third-party libraries send through the stdlib `logging`
module or `warnings` end up in the same stream with the same fields, so an operator never has
to parse two formats.

Under systemd, stdout is a journal stream and each line gets its syslog priority as a `<N>`
prefix, which journald strips and files as PRIORITY=, so `journalctl -p err` selects errors
while `journalctl -o cat` still shows the bare JSON.

`logging.file` keeps a copy in a file through a WatchedFileHandler: before each line it checks
that the path still names the file it has open, so logrotate's rename-and-create (or a plain
`rm`) is followed without any signal; `reopen()` forces it for those who prefer a postrotate
`systemctl reload`. copytruncate works too, since the file is opened for appending.

When the reader of stdout goes away (`rmbgd run | head`, a `jq` that exited, a journald that
lost the stream) the first write fails with EPIPE. Nothing can be logged any more, so the
handler says so once on stderr, stops writing and raises a flag (reader_gone()) that the
daemon's and `rmbgd process`'s main loops read: they stop as for SIGTERM and exit with
EXIT_LOG_READER_GONE.
"""

from __future__ import annotations

import logging
import logging.handlers
import os
import signal
import sys
import threading
from pathlib import Path
from typing import IO, Any, Callable, Optional

import structlog

LEVELS = {"debug": logging.DEBUG, "info": logging.INFO, "warning": logging.WARNING, "error": logging.ERROR}

# The exit status after the log reader went away: the one a shell reports for a program that
# SIGPIPE ended (`yes | head`), and not 0, so that systemd's Restart=on-failure brings a daemon
# whose journal stream broke back with a fresh one instead of leaving it stopped.
EXIT_LOG_READER_GONE = 128 + signal.SIGPIPE

# Set by the stdout handler on EPIPE; read by the main loops (a handler must not stop anything).
_reader_gone = threading.Event()

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


def journal_priority(levelno: int) -> int:
    """The syslog priority journald files a line under (sd-daemon(3): `<3>` is an error)."""
    if levelno >= logging.CRITICAL:
        return 2
    if levelno >= logging.ERROR:
        return 3
    if levelno >= logging.WARNING:
        return 4
    if levelno >= logging.INFO:
        return 6
    return 7


def is_journal_stream(stream: IO[str], environ: Optional[dict] = None) -> bool:
    """Whether `stream` is the journal connection systemd announced in $JOURNAL_STREAM.

    The variable is inherited by children whose stdout was redirected elsewhere (a pipe, a
    file), so only a matching device and inode count; those would keep a stray `<6>`.
    """
    env = os.environ if environ is None else environ
    announced = env.get("JOURNAL_STREAM", "")
    dev, sep, ino = announced.partition(":")
    if not sep:
        return False
    try:
        st = os.fstat(stream.fileno())
        return st.st_dev == int(dev) and st.st_ino == int(ino)
    except (AttributeError, OSError, ValueError):
        # No file descriptor (a StringIO in tests) or a malformed variable: not the journal.
        return False


def reader_gone() -> bool:
    """Whether stdout's reader went away: the daemon then stops, as after a SIGTERM."""
    return _reader_gone.is_set()


class _StdoutHandler(logging.StreamHandler):
    """JSON lines on stdout, until the reader of stdout goes away (EPIPE)."""

    def emit(self, record: logging.LogRecord) -> None:
        if _reader_gone.is_set():
            return  # no write attempt once the pipe is known to be broken
        super().emit(record)

    def handleError(self, record: logging.LogRecord) -> None:
        # Called by emit() with the exception being handled; the stdlib default would print a
        # "--- Logging error ---" traceback on stderr for this and every later line.
        if not isinstance(sys.exc_info()[1], BrokenPipeError):
            super().handleError(record)
            return
        if _reader_gone.is_set():
            return
        _reader_gone.set()
        _silence(self.stream)
        try:
            sys.stderr.write(
                "rmbgd: the log reader went away (stdout: broken pipe); stopping after the files in flight\n"
            )
            sys.stderr.flush()
        except (OSError, ValueError):
            return  # stderr went with it (`2>&1 | head`): nobody is left to tell


def _silence(stream: IO[str]) -> None:
    """Point the broken stream's descriptor at /dev/null.

    The interpreter flushes stdout once more at exit; the part of a line still buffered would
    fail again and print "Exception ignored ... BrokenPipeError" on stderr.
    """
    try:
        fd = stream.fileno()
    except (AttributeError, OSError, ValueError):
        return  # not a real file (a test's StringIO): nothing is flushed at exit
    devnull = os.open(os.devnull, os.O_WRONLY)
    try:
        os.dup2(devnull, fd)
    finally:
        os.close(devnull)


class _JournalHandler(_StdoutHandler):
    def format(self, record: logging.LogRecord) -> str:
        return f"<{journal_priority(record.levelno)}>{super().format(record)}"


def _json_formatter() -> logging.Formatter:
    return structlog.stdlib.ProcessorFormatter(
        foreign_pre_chain=[*_SHARED, _add_origin],
        processors=[
            structlog.stdlib.ProcessorFormatter.remove_processors_meta,
            structlog.processors.format_exc_info,
            structlog.processors.JSONRenderer(sort_keys=False, default=str),
        ],
    )


class _SinkHandler(logging.Handler):
    """Each record as the event dict a JSON line would hold, handed to a callable instead of
    being written (`rmbgd process` on a terminal shows some of them as lines)."""

    def __init__(self, sink: Callable[[dict], None]) -> None:
        super().__init__()
        self._sink = sink
        self.setFormatter(structlog.stdlib.ProcessorFormatter(
            foreign_pre_chain=[*_SHARED, _add_origin],
            processors=[
                structlog.stdlib.ProcessorFormatter.remove_processors_meta,
                structlog.processors.format_exc_info,
                self._deliver,
            ],
        ))

    def _deliver(self, logger: Any, method: str, event_dict: dict) -> str:
        self._sink(event_dict)
        return ""  # a formatter's chain must end in a string; nothing is written

    def emit(self, record: logging.LogRecord) -> None:
        try:
            self.format(record)
        except Exception:
            self.handleError(record)


class _LogFile(logging.handlers.WatchedFileHandler):
    """A watched log file whose write errors are reported once, as JSON on stdout.

    The stdlib default prints a traceback to stderr for every failing line, which under
    systemd lands in the journal between the JSON lines.
    """

    def __init__(self, path: Path) -> None:
        super().__init__(os.fspath(path), encoding="utf-8")
        self.setFormatter(_json_formatter())
        self._reported = False
        self._failed_now = False
        self._retired = False

    def retire(self) -> None:
        # A thread that picked this handler up just before set_file() swapped it out must
        # not reopen the file (and leak the descriptor) after it was closed.
        self._retired = True
        self.close()

    def emit(self, record: logging.LogRecord) -> None:
        if self._retired:
            return
        self._failed_now = False
        try:
            super().emit(record)
        except Exception:
            # Reopening after a rotation happens outside the stdlib's own error handling, and
            # an exception here would surface in whatever code called log.info().
            self.handleError(record)
        if not self._failed_now:
            self._reported = False

    def handleError(self, record: logging.LogRecord) -> None:
        self._failed_now = True
        if self._reported:
            return
        # Set first: the line below comes back through this handler and fails again.
        self._reported = True
        error = sys.exc_info()[1]
        get_logger().error(
            "log_file_failed",
            file=self.baseFilename,
            error=f"{type(error).__name__}: {error}" if error else "unknown error",
            note="lines are missing from the file until it can be written again",
        )


# The handler of `logging.file`, swapped as a whole by set_file()/reopen().
_file_handler: Optional[_LogFile] = None
_file_lock = threading.Lock()


def configure(
    level: str = "info",
    stream: Optional[IO[str]] = None,
    file: Optional[Path] = None,
    sink: Optional[Callable[[dict], None]] = None,
) -> None:
    """Route everything to `stream` (stdout) as JSON lines, and to `file` when given; with
    `sink`, each record's event dict goes to that callable instead of `stream`.

    Raises OSError when `file` cannot be opened; stdout logging is set up before that, so
    the caller can still log why.
    """
    global _file_handler
    out = stream or sys.stdout
    handler: logging.Handler
    if sink is not None:
        handler = _SinkHandler(sink)
    else:
        handler = _JournalHandler(out) if is_journal_stream(out) else _StdoutHandler(out)
        handler.setFormatter(_json_formatter())
    _reader_gone.clear()
    root = logging.getLogger()
    with _file_lock:
        for old in list(root.handlers):
            root.removeHandler(old)
            if old is _file_handler:
                old.retire()
        _file_handler = None
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
    if file is not None:
        set_file(file)


def set_file(path: Optional[Path]) -> None:
    """Log to `path` from now on (None: stop logging to a file), e.g. after a reload.

    The new file is opened before the old one is let go, so on an OSError (missing folder
    permissions, a full disk) the previous file stays in use and the caller can say why.
    """
    global _file_handler
    root = logging.getLogger()
    with _file_lock:
        new = None
        if path is not None:
            Path(path).parent.mkdir(parents=True, exist_ok=True)
            new = _LogFile(Path(path))
        old, _file_handler = _file_handler, new
        # One assignment, so a line logged meanwhile by another thread goes to exactly one
        # of the two files, never to both or neither.
        root.handlers = [h for h in root.handlers if h is not old] + ([new] if new else [])
        if old is not None:
            old.retire()


def log_file() -> Optional[Path]:
    """The file currently logged to, if any."""
    handler = _file_handler
    return Path(handler.baseFilename) if handler is not None else None


def reopen() -> None:
    """Open `logging.file` afresh; harmless when there is none. The daemon calls it on SIGHUP.

    The watched handler has already followed a rotation by itself; this only makes the
    usual logrotate `postrotate systemctl reload rmbgd` do what operators expect of it.
    """
    current = log_file()
    if current is not None:
        set_file(current)


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
