"""Command line: `rmbgd run`, `rmbgd check`, `rmbgd process`, `rmbgd doctor`, `rmbgd config-schema`, `--version`.

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
    _config_option(run)

    check = commands.add_parser(
        "check",
        help="validate the config and the folders without starting",
        description="Validate the config file and the folders it names. Exit 0 when valid; "
        "otherwise print every problem as 'dotted.key: what is wrong' on stderr and exit 2.",
    )
    _config_option(check)

    fetch = commands.add_parser(
        "fetch-model",
        help="download the configured model, e.g. to prepare an offline machine",
        description="Download model.name (at model.revision, if set) from the Hugging Face hub into "
        "the Hugging Face cache (HF_HOME), or into DIR. Copy that cache, or DIR, to an offline "
        "machine; with DIR, point model.name at it there. Prints the model's folder; on failure "
        "prints one line on stderr and exits 1 (2 for a config error).",
    )
    _config_option(fetch)
    fetch.add_argument("--to", metavar="DIR", help="download into this folder instead of the cache")

    commands.add_parser(
        "config-schema",
        help="print the config file's JSON Schema",
        description="Print the JSON Schema of the YAML config on stdout, for editors that validate and "
        "complete YAML (config.schema.json in the repository is this output).",
    )

    status = commands.add_parser(
        "status",
        help="show what the running instance(s) of a config are doing",
        description="Print uptime, model, device, processed/failed counts, queue and the last "
        "error of every instance using this config, from the status files in its state folder "
        "(state.dir). Exit 0 when one is running, 3 when none is, 4 when the folder is unreadable.",
    )
    _config_option(status, required=False)
    status.add_argument("--state-dir", metavar="DIR", help="read this state folder instead of the config's")
    status.add_argument("--json", action="store_true", help="print the status documents as JSON")

    doctor = commands.add_parser(
        "doctor",
        help="check this installation: packages, device, model, folders, a pipeline run",
        description="Check that this machine is ready, without touching anything of yours: the Python "
        "packages the model needs, torch and the device (and why CUDA is not used, if it is not), the "
        "model (a local folder or the Hugging Face cache; nothing is downloaded), the folders and "
        "inotify limits (with --config), and a run of the whole pipeline on generated images with a "
        "built-in stand-in model in a temporary folder, with its images/s. One line per check; exit 0 "
        "when everything needed is in place, 1 otherwise. Without --config the defaults are checked.",
    )
    _config_option(doctor, required=False)

    process = commands.add_parser(
        "process",
        help="remove the background of some files or folders once, then exit",
        description="Process the files given, and every file below the folders given, through the "
        "daemon's pipeline and model, then exit. Results go to --out, mirroring each file's path below "
        "the folder it was found in (a file given directly lands at the top). Inputs are never "
        "changed or moved, unless --done says where to move them after success. Hidden and "
        "partial-download names inside folders are skipped. On a terminal: a progress bar and a "
        "summary on stderr; otherwise (or with --json) the daemon's JSON log on stdout, ending with "
        "a 'summary' event. Exit 0 when every file succeeded, 1 when any failed or the model cannot "
        "be loaded, 2 for a usage or config error, 130 when interrupted (Ctrl-C finishes the files "
        "in flight; a second Ctrl-C exits at once).",
    )
    process.add_argument(
        "paths", nargs="+", metavar="PATH", help="image files, or folders to process every file below"
    )
    process.add_argument("--out", required=True, metavar="DIR", help="folder for the results (created if missing)")
    process.add_argument(
        "--config",
        metavar="PATH",
        help="YAML config whose model, batch, pipeline, input, output and profiles sections apply "
        "(its paths and watch sections are ignored); without it the defaults apply",
    )
    process.add_argument(
        "--model",
        metavar="NAME_OR_DIR",
        help="Hugging Face model id or local model folder (default: the config's model.name)",
    )
    process.add_argument(
        "--device", metavar="DEVICE", help="auto, cpu, cuda or cuda:N (default: the config's model.device)"
    )
    process.add_argument(
        "--done", metavar="DIR", help="move each original here after its result is written, mirroring its path"
    )
    process.add_argument("--json", action="store_true", help="JSON log lines on stdout even on a terminal")
    return parser


def _config_option(command: argparse.ArgumentParser, required: bool = True) -> None:
    command.add_argument("--config", required=required, metavar="PATH", help="YAML config file")


def main(argv: Optional[List[str]] = None) -> int:
    args = _parser().parse_args(argv)
    if args.command == "check":
        return _check(args.config)
    if args.command == "config-schema":
        from rmbgd.config.json_schema import config_schema_text

        sys.stdout.write(config_schema_text())
        return 0
    if args.command == "fetch-model":
        return _fetch_model(args.config, args.to)
    if args.command == "status":
        return _status(args.config, args.state_dir, args.json)
    if args.command == "process":
        return _process(args)
    if args.command == "doctor":
        from rmbgd.runtime import doctor

        return doctor.main(args.config)
    return _run(args.config)


def _check(path: str) -> int:
    from pathlib import Path

    from rmbgd.config import ConfigError, check_folders, load_config

    try:
        cfg = load_config(path)
    except ConfigError as exc:
        for problem in exc.problems:
            sys.stderr.write(f"{problem}\n")
        return EXIT_USAGE
    from rmbgd.api import checks as http_checks
    from rmbgd.ops import metrics

    problems = check_folders(cfg) + metrics.problems(cfg) + http_checks.problems(cfg)
    for problem in problems:
        sys.stderr.write(f"{problem}\n")
    if problems:
        return EXIT_USAGE
    from rmbgd.config import commented_out_colours

    # Read again: load_config already read it, so it is UTF-8 text of a sane size.
    try:
        text = Path(path).expanduser().read_text(encoding="utf-8-sig")
    except (OSError, UnicodeDecodeError):
        text = ""  # replaced since it was loaded: the warnings are only a courtesy
    for warning in commented_out_colours(text) + http_checks.warnings(cfg):
        sys.stderr.write(f"warning: {warning}\n")
    sys.stdout.write(f"{path}: ok\n")
    return 0


def _fetch_model(path: str, to: Optional[str]) -> int:
    from pathlib import Path

    from rmbgd.config import ConfigError, load_config
    from rmbgd.model.hub import ModelLoadError, fetch_model

    try:
        cfg = load_config(path)
    except ConfigError as exc:
        for problem in exc.problems:
            sys.stderr.write(f"{problem}\n")
        return EXIT_USAGE
    try:
        folder = fetch_model(cfg.model, to=Path(to) if to else None)
    except ModelLoadError as exc:
        sys.stderr.write(f"{exc}\n")
        return 1
    sys.stdout.write(f"{folder}\n")
    return 0


def _status(path: Optional[str], state_dir: Optional[str], as_json: bool) -> int:
    from pathlib import Path

    from rmbgd.config import ConfigError, load_config
    from rmbgd.ops.statusfile import default_state_dir
    from rmbgd.ops.statusreport import report

    if state_dir:
        directory = Path(state_dir)
    elif path:
        try:
            directory = default_state_dir(load_config(path))
        except ConfigError as exc:
            for problem in exc.problems:
                sys.stderr.write(f"{problem}\n")
            return EXIT_USAGE
    else:
        sys.stderr.write("rmbgd status: give --config PATH (or --state-dir DIR)\n")
        return EXIT_USAGE
    text, code = report(directory, as_json=as_json)
    sys.stdout.write(text)
    return code


def _run(path: str) -> int:
    from rmbgd.ops import logs
    from rmbgd.config import ConfigError, check_folders, load_config

    logs.configure("info")
    log = logs.get_logger()
    from rmbgd.api import checks as http_checks
    from rmbgd.ops import metrics

    try:
        cfg = load_config(path)
        problems = check_folders(cfg) + metrics.problems(cfg) + http_checks.problems(cfg)
        if problems:
            raise ConfigError(problems)
    except ConfigError as exc:
        _startup_failed(log, exc.problems[0], more=exc.problems[1:])
        return EXIT_USAGE
    except Exception:  # the CLI boundary: a bug in rmbgd's validation, logged as JSON with its traceback
        log.critical("crashed", exc_info=True)
        return 1
    logs.set_level(cfg.logging.level)
    try:
        logs.set_file(cfg.logging.file)
    except OSError as exc:
        _startup_failed(log, f"logging.file: cannot open {cfg.logging.file}: {exc.strerror or exc}")
        return 1

    from rmbgd.runtime.daemon import Daemon, StartupError

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


def _process(args: argparse.Namespace) -> int:
    from rmbgd.ops import logs
    from rmbgd.runtime import oneshot
    from rmbgd.config import ConfigError
    from rmbgd.runtime.daemon import StartupError, stderr_is_terminal

    report = oneshot.TerminalReport(sys.stderr) if stderr_is_terminal() and not args.json else oneshot.Report()
    # On a terminal the log's records go to the report, which shows warnings and errors.
    logs.configure("info", stream=sys.stdout, sink=report.log_sink)
    log = logs.get_logger()
    try:
        cfg = oneshot.load_settings(args.config, model=args.model, device=args.device)
    except ConfigError as exc:
        _startup_failed(log, exc.problems[0], more=exc.problems[1:])
        return EXIT_USAGE
    logs.set_level(cfg.logging.level)
    # After the config, which creates nothing: --out and --done are only created for a run
    # that can go ahead.
    try:
        work = oneshot.plan(args.paths, out=args.out, done=args.done)
    except oneshot.UsageError as exc:
        sys.stderr.write(f"rmbgd process: error: {exc}\n")
        return EXIT_USAGE
    runner = oneshot.Runner(cfg, work, log, report)
    runner.install_signal_handlers()
    try:
        return runner.run()
    except StartupError as exc:
        report.close()
        oneshot.remove_created(work)
        _startup_failed(log, _without_config(str(exc)) if args.config is None else str(exc))
        return 1
    except Exception:  # the CLI boundary: a bug in rmbgd, logged with its traceback
        report.close()
        log.critical("crashed", exc_info=True)
        return 1


def _without_config(error: str) -> str:
    # `process` without --config has no model.name to set: the model comes from --model.
    if not error.startswith("model.name: "):
        return error
    error = "--model: " + error[len("model.name: ") :]
    at = error.find("set model.name to that local directory")
    if at >= 0:
        return error[:at] + "give that folder with --model DIR"
    return error + "; without --config, give a local model folder with --model DIR"


def _startup_failed(log, error: str, more: Optional[List[str]] = None) -> None:
    log.error("startup_failed", error=error, **({"more_errors": more} if more else {}))
    # A person at a terminal gets the reason in plain words too; under systemd stderr is the
    # journal and an extra non-JSON line would break `journalctl -o cat | jq`.
    if sys.stderr.isatty():
        sys.stderr.write(f"rmbgd: {error}\n")
