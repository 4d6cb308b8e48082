"""Config fuzzing: no YAML document may crash `rmbgd check`, `rmbgd run` or a SIGHUP reload.

Documents start from the valid config the daemon tests use and get broken at random: values of
the wrong type, numbers out of range, NaN and infinities, nested junk, unknown keys, sections
or the whole document that are not mappings, bad profile globs, YAML tags and aliases, bytes
that are not UTF-8. Whatever comes in, the answer is exit 2 with `dotted.key: problem` lines
(or `<file>: problem`), or exit 0 for a document that happens to be valid; never a traceback.

Most examples run in-process through `rmbgd.cli.main`; a handful of the nastiest run as real
subprocesses, and an in-process daemon reloads a series of them from its config file.
"""

from __future__ import annotations

import copy
import dataclasses
import io
import json
import logging
import re
import shutil
import subprocess
import sys
import tempfile
import threading
import typing
import warnings
from contextlib import redirect_stderr, redirect_stdout
from pathlib import Path

import pytest
import structlog
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from rmbgd import cli
from rmbgd.config import Config, load_config
from rmbgd.ops import logs
from tests.support.daemon import REPO, base_config, write_config
from tests.support.inprocess import inprocess  # noqa: F401 (a fixture)
from tests.support.logcapture import CapturedLog
from tests.support.photos import pattern, save

# A problem line: its key in dotted form (`profiles[0].output.format`), then what is wrong.
PROBLEM_RE = re.compile(r"[\w\[\]\.-]+: \S")
TRACEBACK_MARKERS = ("Traceback (most recent call last)", "\n  File \"")

FUZZ = settings(
    max_examples=200,
    deadline=None,
    database=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)

# Every section of the config file: the dataclass-typed fields of Config.
SECTIONS = {name: kind for name, kind in typing.get_type_hints(Config).items() if dataclasses.is_dataclass(kind)}
KNOWN_KEYS = [(section, f.name) for section, cls in SECTIONS.items() for f in dataclasses.fields(cls)]
OUTPUT_KEYS = [f.name for f in dataclasses.fields(SECTIONS["output"])]

# One folder for the in-process examples: check and run only probe the folders a config names
# (all below here), they create nothing.
FUZZ_ROOT = Path(tempfile.mkdtemp(prefix="rmbgd-config-fuzz-"))
BASE = base_config(FUZZ_ROOT, FUZZ_ROOT / "model")


# --------------------------------------------------------------------------- strategies

EDGE_NUMBERS = st.sampled_from(
    [0, -1, 1, 31, 33, 4097, 65536, 10**9, 2**63, 10**400, -(10**400),
     0.0, -0.0, 1e-300, 1e308, float("nan"), float("inf"), float("-inf")]
)
SCALARS = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(),
    EDGE_NUMBERS,
    st.floats(allow_nan=True, allow_infinity=True),
    st.text(max_size=20),
    # Lone surrogates survive a YAML round trip as "\uD800" escapes.
    st.text(st.characters(categories=["Cs", "Zs", "Cc", "Lu"]), max_size=5),
    st.binary(max_size=8),
    st.dates(),
    st.sampled_from(["auto", "dynamic", "cuda:0", "#ffffff", "5%", "", " ", "~", ".", "..", "/", "png", "jpeg"]),
)
KEYS = st.one_of(
    st.text(max_size=12),
    st.sampled_from(["a b", "x: y", "line\nbreak", "max-size", "Size", "__class__", "<<"]),
    st.integers(),
    st.none(),
    st.booleans(),
    st.floats(allow_nan=False),
)
JUNK = st.recursive(
    SCALARS,
    lambda children: st.lists(children, max_size=4) | st.dictionaries(KEYS, children, max_size=4),
    max_leaves=10,
)
GLOBS = st.one_of(
    st.text(alphabet="ab*?[]!-/.^\\z", max_size=12),
    st.sampled_from(["[z-a]/", "a/[]/b", "[!]", "a]b[", "**", "a/**b", "/abs", "../up", "a//b", "[\\-!]x"]),
)


@st.composite
def profiles(draw: st.DrawFn) -> object:
    items = []
    for _ in range(draw(st.integers(1, 3))):
        item = {"match": draw(GLOBS | JUNK), "output": draw(st.dictionaries(st.sampled_from(OUTPUT_KEYS), JUNK, max_size=3))}
        if draw(st.booleans()):
            item[draw(KEYS)] = draw(JUNK)
        items.append(item)
    return items


@st.composite
def mutated(draw: st.DrawFn) -> object:
    """The base config with one to three random breakages; sometimes not a mapping at all."""
    # Hypothesis favours the ends of a range, so the rare branches test a middle value.
    if draw(st.integers(0, 19)) == 7:
        return draw(JUNK)
    data = copy.deepcopy(BASE)
    for _ in range(draw(st.integers(1, 3))):
        kind = draw(st.sampled_from(["value", "value", "number", "drop", "unknown", "section", "profiles"]))
        section, key = draw(st.sampled_from(KNOWN_KEYS))
        if kind in ("value", "number"):
            if not isinstance(data.get(section), dict):
                data[section] = {}
            data[section][key] = draw(JUNK if kind == "value" else EDGE_NUMBERS)
        elif kind == "drop":
            target = data.get(section)
            if isinstance(target, dict) and key in target:
                del target[key]
            else:
                data.pop(section, None)
        elif kind == "unknown":
            target = data.get(section) if draw(st.booleans()) else data
            if isinstance(target, dict):
                target[draw(KEYS)] = draw(JUNK)
        elif kind == "section":
            data[section] = draw(JUNK)
        else:
            data["profiles"] = draw(profiles())
    return data


# Documents no mutation of a Python value can produce: tags, aliases, raw syntax.
NASTY_DOCUMENTS = {
    "alias_bomb": b"a: &a [x, x, x, x, x, x, x, x, x]\n"
    + b"".join(b"%c: &%c [*%c, *%c, *%c, *%c, *%c, *%c, *%c, *%c, *%c]\n" % ((c,) * 2 + (c - 1,) * 9) for c in range(98, 108))
    + b"paths: *k\n",
    "python_tag": b"paths: !!python/object/apply:os.system ['echo pwned']\n",
    "python_name": b"model: {name: !!python/name:os.system ''}\n",
    "int_tag_junk": b"batch: {size: !!int eight}\n",
    "bool_tag_junk": b"watch: {polling: !!bool maybe}\n",
    "bad_date": b"watch: {settle_seconds: 2001-02-30}\n",
    "year_zero": b"watch: {settle_seconds: 0000-01-01}\n",
    "long_digits": b"batch: {size: " + b"9" * 5000 + b"}\n",
    "base60_giant": b"watch: {settle_seconds: 1" + b":0" * 3000 + b"}\n",
    "recursive_alias": b"paths: &p [*p]\n",
    "merge_non_mapping": b"watch: {<<: 5, settle_seconds: 1}\n",
    "unhashable_key": b"? [a, b]\n: 1\n",
    "duplicate_key": b"batch: {size: 1, size: 2}\n",
    "two_documents": b"paths: {}\n---\nbatch: {}\n",
    "deep_nesting": b"a: " + b"[" * 1500 + b"]" * 1500 + b"\n",
    "not_utf8": b"paths:\n  inbox: caf\xe9\n",
    "utf16": "paths: {inbox: x}\n".encode("utf-16"),
    "nul_byte": b"paths: {inbox: \"a\\0b\"}\n",
    "surrogate_path": b"paths: {inbox: \"\\ud800\", outbox: o, errors: e, done: null}\n",
    "long_names": b"paths: {inbox: '" + b"a" * 5000 + b"', outbox: '" + b"b/" * 3000 + b"', errors: e, done: null}\n"
    + b"logging: {file: '" + b"c" * 300 + b"/x.log'}\nmetrics: {port: 0, address: '" + b"d" * 300 + b"'}\n",
    "tab_indent": b"paths:\n\tinbox: x\n",
    "root_list": b"- paths\n- batch\n",
    "root_scalar": b"just a string\n",
    "empty": b"",
    "comment_only": b"# nothing here\n",
    "bad_glob_range": b"paths: {inbox: i, outbox: o, errors: e, done: null}\nprofiles: [{match: '[z-a]/', output: {}}]\n",
    "bad_glob_empty_set": b"paths: {inbox: i, outbox: o, errors: e, done: null}\nprofiles: [{match: 'a/[]/b', output: {}}]\n",
    "odd_key": b'"key: with\\nbreak": 1\nwatch: {"a b": 1}\n',
}


# Bytes that are not UTF-8 (a Latin-1 é, a cut sequence, an encoded surrogate), a BOM in the
# middle, control characters.
DAMAGE = st.one_of(
    st.binary(min_size=1, max_size=4),
    st.sampled_from([b"\xff", b"\xe9", b"\xc3", b"\xed\xa0\x80", b"\xef\xbb\xbf", b"\x00", b"\x1b[31m", b"\t", b"\r"]),
)


@st.composite
def documents(draw: st.DrawFn) -> bytes:
    """A YAML file's bytes: a mutated config, sometimes with raw damage or a nasty document."""
    if draw(st.integers(0, 9)) == 4:
        return draw(st.sampled_from(sorted(NASTY_DOCUMENTS.values())))
    text = yaml.safe_dump(draw(mutated()), allow_unicode=draw(st.booleans()), sort_keys=False)
    raw = text.encode("utf-8", "surrogatepass")
    if draw(st.integers(0, 9)) == 4:
        at = draw(st.integers(0, len(raw)))
        raw = raw[:at] + draw(DAMAGE) + raw[at:]
    return raw


# --------------------------------------------------------------------------- checks


@pytest.fixture(autouse=True, scope="module")
def restore_process_state():
    """`run` configures the process's logging for the examples run in-process; undo that,
    and remove the examples' folder."""
    root = logging.getLogger()
    saved = (list(root.handlers), root.level, logging.getLogger("rmbgd").level, threading.excepthook,
             warnings.showwarning)
    saved_structlog = structlog.get_config()
    yield
    root.handlers[:] = saved[0]
    root.setLevel(saved[1])
    logging.getLogger("rmbgd").setLevel(saved[2])
    threading.excepthook = saved[3]
    logging.captureWarnings(False)
    warnings.showwarning = saved[4]
    structlog.configure(**saved_structlog)
    shutil.rmtree(FUZZ_ROOT, ignore_errors=True)


def cli_in_process(*argv: str) -> tuple[int, str, str]:
    out, err = io.StringIO(), io.StringIO()
    with redirect_stdout(out), redirect_stderr(err):
        code = cli.main(list(argv))
    return code, out.getvalue(), err.getvalue()


def assert_problem_line(line: str, config: Path) -> None:
    assert "\n" not in line
    assert PROBLEM_RE.match(line) or line.startswith(f"{config}:"), f"not a 'dotted.key: problem' line: {line!r}"


def assert_no_traceback(*texts: str) -> None:
    for text in texts:
        for marker in TRACEBACK_MARKERS:
            assert marker not in text, text[-2000:]


def assert_check_answer(code: int, out: str, err: str, config: Path) -> None:
    assert_no_traceback(out, err)
    if code == 0:
        assert out == f"{config}: ok\n" and err == ""
        return
    assert code == 2, (code, out, err)
    lines = err.splitlines()
    assert lines, "exit 2 without saying why"
    for line in lines:
        assert_problem_line(line, config)


def assert_run_refused(code: int, out: str, err: str, config: Path) -> None:
    assert_no_traceback(out, err)
    assert code == 2, (code, out[-2000:], err[-2000:])
    records = [json.loads(line) for line in out.splitlines()]
    assert [r["event"] for r in records] == ["startup_failed"], records
    failed = records[0]
    assert failed["level"] == "error" and "exception" not in failed
    for line in [failed["error"], *failed.get("more_errors", [])]:
        assert_problem_line(line, config)


def write_document(raw: bytes) -> Path:
    path = FUZZ_ROOT / "config.yaml"
    path.write_bytes(raw)
    return path


@FUZZ
@given(raw=documents())
def test_check_and_run_answer_any_document_with_problem_lines(raw: bytes) -> None:
    config = write_document(raw)
    code, out, err = cli_in_process("check", "--config", str(config))
    assert_check_answer(code, out, err, config)
    if code == 2:
        # `run` validates the same way before it starts anything, so it is safe in-process
        # exactly when check refused the document.
        assert_run_refused(*cli_in_process("run", "--config", str(config)), config)


@settings(FUZZ, max_examples=100)
@given(glob=GLOBS)
def test_any_profile_glob_is_accepted_or_named_as_the_problem(glob: str) -> None:
    data = {**copy.deepcopy(BASE), "profiles": [{"match": glob, "output": {"crop": True}}]}
    config = write_document(yaml.safe_dump(data).encode())
    code, out, err = cli_in_process("check", "--config", str(config))
    assert_check_answer(code, out, err, config)
    if code == 2:
        assert all(line.startswith("profiles[0].match: ") for line in err.splitlines()), err


@pytest.mark.parametrize("name", sorted(NASTY_DOCUMENTS))
def test_nasty_documents_in_process(name: str) -> None:
    config = write_document(NASTY_DOCUMENTS[name])
    code, out, err = cli_in_process("check", "--config", str(config))
    assert_check_answer(code, out, err, config)
    assert code == 2, f"{name} was accepted"
    assert_run_refused(*cli_in_process("run", "--config", str(config)), config)


def test_config_path_that_is_a_folder_or_below_a_file(tmp_path: Path) -> None:
    (tmp_path / "file").write_text("x")
    for config in (tmp_path, tmp_path / "file" / "config.yaml", tmp_path / "missing.yaml"):
        code, out, err = cli_in_process("check", "--config", str(config))
        assert code == 2 and err.startswith(f"{config}: cannot read: "), (config, err)
        assert_run_refused(*cli_in_process("run", "--config", str(config)), config)


# --------------------------------------------------------------------------- real processes

# What a real process adds: its own stack depth, memory and integer limits, stdout and stderr.
# Every document runs in-process above; bad globs also in the regression tests below.
SUBPROCESS_CASES = ["not_utf8", "alias_bomb", "base60_giant", "deep_nesting"]


def rmbgd(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "rmbgd", *args], capture_output=True, text=True,
                          cwd=str(REPO), timeout=120, stdin=subprocess.DEVNULL)


@pytest.mark.parametrize("name", SUBPROCESS_CASES)
def test_nasty_documents_in_a_real_process(tmp_path: Path, name: str) -> None:
    config = tmp_path / "config.yaml"
    config.write_bytes(NASTY_DOCUMENTS[name])
    checked = rmbgd("check", "--config", str(config))
    assert_check_answer(checked.returncode, checked.stdout, checked.stderr, config)
    assert checked.returncode == 2
    ran = rmbgd("run", "--config", str(config))
    assert ran.stderr == ""
    assert_run_refused(ran.returncode, ran.stdout, ran.stderr, config)


# --------------------------------------------------------------------------- finding 1: bad globs

BAD_GLOBS = ["[z-a]/", "a/[]/b"]


@pytest.mark.parametrize("glob", BAD_GLOBS)
def test_regression_bad_profile_glob_check_exits_2_naming_the_key(tmp_path: Path, glob: str) -> None:
    data = base_config(tmp_path, tmp_path / "model", profiles=[{"match": glob, "output": {"crop": True}}])
    config = write_config(tmp_path / "config.yaml", data)
    checked = rmbgd("check", "--config", str(config))
    assert checked.returncode == 2, checked.stderr
    assert checked.stderr.startswith("profiles[0].match: "), checked.stderr
    assert len(checked.stderr.splitlines()) == 1
    assert_no_traceback(checked.stderr)


@pytest.mark.parametrize("glob", BAD_GLOBS)
def test_regression_bad_profile_glob_run_logs_startup_failed_and_exits_2(tmp_path: Path, glob: str) -> None:
    data = base_config(tmp_path, tmp_path / "model", profiles=[{"match": glob, "output": {"crop": True}}])
    config = write_config(tmp_path / "config.yaml", data)
    ran = rmbgd("run", "--config", str(config))
    assert ran.returncode == 2, ran.stderr[-2000:]
    assert ran.stderr == ""
    (record,) = [json.loads(line) for line in ran.stdout.splitlines()]
    assert record["event"] == "startup_failed" and record["error"].startswith("profiles[0].match: ")


def reload_with(daemon, config: Path, raw: bytes | None) -> dict:
    """Write `raw` (None: leave the path as it is) as the daemon's config, ask for a reload
    (SIGHUP's handler) and return the reload's outcome record."""
    seen = len(daemon.records)
    if raw is not None:
        config.write_bytes(raw)
    daemon.hangup()
    outcome: list[dict] = []

    def answered() -> bool:
        outcome[:] = [r for r in daemon.records[seen:] if r.get("event") in ("reload_failed", "reloaded")]
        return bool(outcome)

    daemon.wait_until(answered, timeout=60, what="reload_failed or reloaded after SIGHUP")
    assert daemon.alive(), f"the daemon died on a reload: {daemon.records[-3:]}"
    return outcome[0]


def process_one(daemon, folders, name: str) -> None:
    save(pattern(48, 48, (0.2, 0.2, 0.7, 0.7)), folders.inbox / name, "PNG")
    daemon.wait_for("file_done", lambda r: r["input"].endswith(name), timeout=60)


@pytest.fixture
def reloadable(inprocess, tmp_path):
    """(an in-process daemon, its config file): reloads read that file, as `rmbgd run`'s do.
    A real daemon's SIGHUP reload (and reload_failed) is tests/test_service.py's."""
    config = write_config(tmp_path / "config.yaml", base_config(tmp_path, tmp_path / "model", logging={"level": "debug"}))
    level = logging.getLogger("rmbgd").level
    yield inprocess.start(cfg=load_config(config)), config
    # A reload applies logging.file and logging.level to this process's logging, as it does
    # to the daemon's: undo that for the tests after this one.
    logs.set_file(None)
    logging.getLogger("rmbgd").setLevel(level)


def test_regression_bad_profile_glob_reload_fails_and_the_daemon_keeps_working(reloadable, folders):
    daemon, config = reloadable
    good = config.read_bytes()
    for glob in BAD_GLOBS:
        data = yaml.safe_load(good)
        data["profiles"] = [{"match": glob, "output": {"crop": True}}]
        outcome = reload_with(daemon, config, yaml.safe_dump(data).encode())
        assert outcome["event"] == "reload_failed", outcome
        assert outcome["error"].startswith("profiles[0].match: "), outcome
        assert "exception" not in outcome
    process_one(daemon, folders, "after-bad-globs.png")
    assert daemon.stop() == 0
    assert daemon.crashes() == []


# --------------------------------------------------------------------------- reload fuzzing


def test_reload_of_generated_configs_never_stops_the_daemon(reloadable, folders, tmp_path):
    daemon, config = reloadable
    good = config.read_bytes()
    outcomes: list[str] = []

    @settings(max_examples=40, deadline=None, database=None,
              suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
    @given(raw=documents())
    def reload_one(raw: bytes) -> None:
        # Keep the daemon's folders: a document the daemon accepts then only changes live settings.
        text = raw.replace(str(FUZZ_ROOT).encode(), str(tmp_path).encode())
        outcome = reload_with(daemon, config, text)
        outcomes.append(outcome["event"])
        # A bug in the validation is logged with its traceback (`exception`): none may be.
        assert "exception" not in outcome, outcome.get("exception")
        if outcome["event"] == "reload_failed":
            for line in [outcome["error"], *outcome.get("more_errors", [])]:
                assert_problem_line(line, config)

    reload_one()
    assert "reload_failed" in outcomes
    # The file itself gone, or a folder in its place (an editor's or a deploy tool's doing).
    config.unlink()
    assert reload_with(daemon, config, None)["error"] == f"{config}: cannot read: No such file or directory"
    config.mkdir()
    assert reload_with(daemon, config, None)["error"] == f"{config}: cannot read: Is a directory"
    config.rmdir()
    assert reload_with(daemon, config, good)["event"] == "reloaded"
    process_one(daemon, folders, "after-fuzz.png")
    assert daemon.stop() == 0
    assert daemon.crashes() == []


@pytest.mark.parametrize("error", [RuntimeError("a bug\nover two lines"), PermissionError(13, "Permission denied")])
def test_reload_turns_any_failure_into_reload_failed_and_keeps_the_config(tmp_path, monkeypatch, error):
    from rmbgd.runtime import daemon as daemon_mod
    from rmbgd.config import load_config

    config = write_config(tmp_path / "config.yaml", base_config(tmp_path, tmp_path / "model"))
    cfg = load_config(config)
    log = CapturedLog()
    daemon = daemon_mod.Daemon(cfg, log)

    def broken(path, **kwargs):
        raise error

    monkeypatch.setattr(daemon_mod, "load_config", broken)
    daemon._reload()
    assert daemon.cfg is cfg
    [fields] = [e for e in log.entries if e["event"].startswith("reload")]
    assert (fields["log_level"], fields["event"]) == ("error", "reload_failed")
    assert fields["error"].startswith(f"{config}: cannot be checked: {type(error).__name__}: ")
    assert "\n" not in fields["error"]
    # A bug keeps its traceback in the JSON log, for the report that fixes it.
    assert fields["exc_info"] is True
