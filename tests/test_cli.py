"""The command line as users call it: exit codes, one-line errors, no tracebacks."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from rmbgd import __version__
from tests.support.daemon import REPO


def rmbgd(*args, env=None, timeout=120):
    return subprocess.run(
        [sys.executable, "-m", "rmbgd", *args],
        capture_output=True, text=True, timeout=timeout, env=env, cwd=str(REPO),
    )


def config_file(tmp_path, **overrides):
    data = {
        "paths": {
            "inbox": str(tmp_path / "inbox"),
            "outbox": str(tmp_path / "outbox"),
            "errors": str(tmp_path / "errors"),
            "done": None,
        }
    }
    for key, value in overrides.items():
        data[key] = value
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


def test_version_and_help():
    result = rmbgd("--version")
    assert result.returncode == 0
    assert result.stdout.strip() == f"rmbgd {__version__}"
    for args in (["--help"], ["run", "--help"], ["check", "--help"]):
        result = rmbgd(*args)
        assert result.returncode == 0 and "usage: rmbgd" in result.stdout


def test_check_ok(tmp_path):
    result = rmbgd("check", "--config", str(config_file(tmp_path)))
    assert result.returncode == 0, result.stderr
    assert result.stderr == ""


def test_check_example_config_is_valid():
    result = rmbgd("check", "--config", str(REPO / "config.example.yaml"))
    assert result.returncode == 0, result.stderr


def test_check_reports_dotted_key_without_traceback(tmp_path):
    path = config_file(tmp_path, batch={"size": "eight"})
    result = rmbgd("check", "--config", str(path))
    assert result.returncode == 2
    assert result.stderr.strip() == "batch.size: expected an integer, got 'eight'"
    assert "Traceback" not in result.stderr


def test_check_rejects_unknown_key_and_nested_folders(tmp_path):
    path = config_file(tmp_path, watch={"settle_secs": 1})
    result = rmbgd("check", "--config", str(path))
    assert result.returncode == 2
    assert result.stderr.startswith("watch.settle_secs: unknown key")

    data = yaml.safe_load(path.read_text())
    data.pop("watch")
    data["paths"]["outbox"] = str(tmp_path / "inbox" / "out")
    path.write_text(yaml.safe_dump(data))
    result = rmbgd("check", "--config", str(path))
    assert result.returncode == 2
    assert "paths.outbox: must not be inside paths.inbox" in result.stderr


def test_check_missing_file():
    result = rmbgd("check", "--config", "/nonexistent/rmbgd.yaml")
    assert result.returncode == 2
    assert "/nonexistent/rmbgd.yaml" in result.stderr and "Traceback" not in result.stderr


def test_run_with_bad_config_logs_json_and_exits_2(tmp_path):
    path = config_file(tmp_path, batch={"size": 0})
    result = rmbgd("run", "--config", str(path))
    assert result.returncode == 2
    lines = [json.loads(line) for line in result.stdout.splitlines()]
    assert lines[-1]["event"] == "startup_failed"
    assert lines[-1]["error"].startswith("batch.size:")
    assert "Traceback" not in result.stderr + result.stdout


# `rmbgd run` with the hub out of reach (exit 1, the one line, the refusal logged):
# test_startup_failures.py's test_unreachable_hub_with_an_empty_cache; the message without a
# revision: test_model.py's test_hub_id_with_a_hub_that_refuses_connections.
# `rmbgd run` with a local model folder that does not exist (exit 1, the one line):
# test_startup_failures.py's test_regression_status_after_a_failed_start_names_the_reason.
