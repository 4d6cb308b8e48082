"""Command line: `rmbgd run`, `rmbgd check`, `--version`.

User errors (a bad config, a model that cannot be loaded) end in one readable line and a
non-zero exit, never a traceback; only a bug in rmbgd itself shows one.
"""

from __future__ import annotations

import argparse
import sys
from typing import List, Optional

from rmbgd import __version__

EXIT_USAGE = 2


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="rmbgd",
        description="Background-removal daemon: watches an inbox folder and writes transparent PNGs.",
    )
    parser.add_argument("--version", action="version", version=f"rmbgd {__version__}")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND")
    commands.required = True

    run = commands.add_parser(
        "run",
        help="run the daemon in the foreground until SIGTERM or SIGINT",
        description="Run the daemon in the foreground. Logs are JSON lines on stdout. "
        "The first SIGTERM/SIGINT finishes the batch in flight and exits 0; a second one exits at once.",
    )
    run.add_argument("--config", required=True, metavar="PATH", help="YAML config file")

    check = commands.add_parser(
        "check",
        help="validate the config and the folders without starting",
        description="Validate the config file and the folders it names. Exit 0 when valid; "
        "otherwise print every problem as 'dotted.key: what is wrong' on stderr and exit 2.",
    )
    check.add_argument("--config", required=True, metavar="PATH", help="YAML config file")
    return parser


def main(argv: Optional[List[str]] = None) -> int:
    args = _parser().parse_args(argv)
    if args.command == "check":
        return _check(args.config)
    return _run(args.config)


def _check(path: str) -> int:
    from rmbgd.config import ConfigError, check_folders, load_config

    try:
        cfg = load_config(path)
    except ConfigError as exc:
        for problem in exc.problems:
            sys.stderr.write(f"{problem}\n")
        return EXIT_USAGE
    problems = check_folders(cfg)
    for problem in problems:
        sys.stderr.write(f"{problem}\n")
    if problems:
        return EXIT_USAGE
    sys.stdout.write(f"{path}: ok\n")
    return 0


def _run(path: str) -> int:
    from rmbgd import logs
    from rmbgd.config import ConfigError, check_folders, load_config

    logs.configure("info")
    log = logs.get_logger()
    try:
        cfg = load_config(path)
        problems = check_folders(cfg)
        if problems:
            raise ConfigError(problems)
    except ConfigError as exc:
        _startup_failed(log, exc.problems[0], more=exc.problems[1:])
        return EXIT_USAGE
    logs.set_level(cfg.logging.level)

    from rmbgd.daemon import Daemon, StartupError

    daemon = Daemon(cfg, log)
    daemon.install_signal_handlers()
    try:
        return daemon.run()
    except StartupError as exc:
        _startup_failed(log, str(exc))
        return 1
    except Exception:  # the CLI boundary: a bug in rmbgd, logged as JSON with its traceback
        log.critical("crashed", exc_info=True)
        return 1


def _startup_failed(log, error: str, more: Optional[List[str]] = None) -> None:
    log.error("startup_failed", error=error, **({"more_errors": more} if more else {}))
    # A person at a terminal gets the reason in plain words too; under systemd stderr is the
    # journal and an extra non-JSON line would break `journalctl -o cat | jq`.
    if sys.stderr.isatty():
        sys.stderr.write(f"rmbgd: {error}\n")
