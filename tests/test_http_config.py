"""The `http:` section: parsing, its problems as `http.KEY: ...` lines, and what `check`/`run` verify."""

from __future__ import annotations

import json
import os
import queue
import signal
import subprocess
import sys
import threading
from pathlib import Path

import pytest

from rmbgd.api import checks
from rmbgd.config import ConfigError, HttpConfig, load_config
from tests.test_cli import config_file, rmbgd
from tests.support.daemon import REPO, subprocess_env

PATHS = "paths:\n  inbox: in\n  outbox: out\n  errors: err\n  done: null\n"


def without(packages: str, *args: str, env=None) -> subprocess.CompletedProcess:
    """`python -m rmbgd ARGS` with `packages` looking uninstalled."""
    command = [sys.executable, "-m", "tests.support.hidepkgs", packages, "--", "-m", "rmbgd", *args]
    return subprocess.run(command, capture_output=True, text=True, timeout=120, env=env, cwd=str(REPO))


def load(tmp_path: Path, http: str):
    path = tmp_path / "config.yaml"
    path.write_text(PATHS + "http:\n" + http)
    return load_config(path)


def problems(tmp_path: Path, http: str) -> list:
    with pytest.raises(ConfigError) as info:
        load(tmp_path, http)
    return info.value.problems


def test_http_is_off_by_default(tmp_path):
    path = tmp_path / "config.yaml"
    path.write_text(PATHS)
    cfg = load_config(path)
    assert cfg.http == HttpConfig()
    assert cfg.http.port is None and cfg.http.address == "127.0.0.1" and cfg.http.token_file is None
    assert cfg.http.max_body_mb == 50 and cfg.http.allow_private_urls is False
    assert cfg.http.priority == "interactive"
    assert checks.problems(cfg) == [] and checks.warnings(cfg) == []


def test_http_keys_parse(tmp_path):
    cfg = load(tmp_path, "  port: 8080\n  address: 0.0.0.0\n  token_file: secret/token\n  max_body_mb: 1.5\n"
                         "  allow_private_urls: true\n  priority: FAIR\n  busy_wait_seconds: 0\n"
                         "  fetch_timeout_seconds: 5\n")
    assert cfg.http == HttpConfig(port=8080, address="0.0.0.0", token_file=tmp_path / "secret" / "token",
                                  max_body_mb=1.5, allow_private_urls=True, priority="fair",
                                  busy_wait_seconds=0.0, fetch_timeout_seconds=5.0)
    assert cfg.http.max_body_bytes == 1536 * 1024


def test_empty_http_section_is_the_defaults(tmp_path):
    assert load(tmp_path, "").http == HttpConfig()


@pytest.mark.parametrize(
    "http, expected",
    [
        ("  port: web\n", "http.port: expected an integer, got 'web'"),
        ("  port: 70000\n", "http.port: must be at most 65535, got 70000"),
        ("  address: 'a b'\n", "http.address: expected an IP address or a host name, got 'a b'"),
        ("  max_body_mb: 0\n", "http.max_body_mb: must be greater than 0, got 0"),
        ("  allow_private_urls: yes please\n", "http.allow_private_urls: expected true or false, got 'yes please'"),
        ("  priority: urgent\n", "http.priority: expected interactive or fair, got 'urgent'"),
        ("  busy_wait_seconds: -1\n", "http.busy_wait_seconds: must be at least 0, got -1"),
        ("  tokenfile: t\n", "http.tokenfile: unknown key; did you mean 'token_file'?"),
    ],
)
def test_http_problems_name_the_key(tmp_path, http, expected):
    assert problems(tmp_path, http) == [expected]


@pytest.mark.parametrize("address", ["0.0.0.0", "::", "192.168.1.10", "example.org"])
def test_non_loopback_address_needs_a_token_file(tmp_path, address):
    assert problems(tmp_path, f"  port: 8080\n  address: '{address}'\n") == [
        f"http.token_file: required when http.address ({address}) is not a loopback address: "
        "anyone who can reach the port could use the daemon"
    ]
    # With a token file, or with the API off, the same address is fine.
    assert load(tmp_path, f"  port: 8080\n  address: '{address}'\n  token_file: t\n").http.address == address
    assert load(tmp_path, f"  address: '{address}'\n").http.port is None


@pytest.mark.parametrize("address", ["127.0.0.1", "127.0.0.2", "::1", "localhost"])
def test_loopback_addresses_need_no_token(tmp_path, address):
    assert load(tmp_path, f"  port: 8080\n  address: '{address}'\n").http.token_file is None


def test_check_refuses_an_unreadable_token_file_and_warns_about_a_shared_one(tmp_path):
    token = tmp_path / "token"
    path = config_file(tmp_path, http={"port": 8080, "token_file": str(token)})
    result = rmbgd("check", "--config", str(path))
    assert result.returncode == 2
    assert result.stderr == f"http.token_file: cannot read {token}: No such file or directory\n"

    token.write_text("s3cret\n")
    os.chmod(token, 0o644)
    result = rmbgd("check", "--config", str(path))
    assert result.returncode == 0, result.stderr
    assert result.stderr == f"warning: http.token_file: {token} can be read by other users (mode 644); chmod 600 it\n"
    os.chmod(token, 0o600)
    result = rmbgd("check", "--config", str(path))
    assert (result.returncode, result.stderr) == (0, "")


def test_check_names_the_http_extra_when_it_is_missing(tmp_path):
    path = config_file(tmp_path, http={"port": 8080})
    result = without("fastapi,uvicorn", "check", "--config", str(path))
    assert result.returncode == 2
    assert result.stderr == (
        "http.port: the HTTP API needs fastapi, uvicorn, which is not installed; pip install 'rmbgd[http]'\n"
    )
    # Off, it does not matter.
    path = config_file(tmp_path)
    assert without("fastapi,uvicorn", "check", "--config", str(path)).returncode == 0


def test_run_without_the_http_extra_fails_with_one_startup_failed_line(tmp_path):
    path = config_file(tmp_path, http={"port": 0}, model={"name": str(tmp_path / "no-model"), "device": "cpu"})
    result = without("fastapi", "run", "--config", str(path), env=subprocess_env(tmp_path / "hf"))
    assert result.returncode == 2
    records = [json.loads(line) for line in result.stdout.splitlines()]
    assert [r["event"] for r in records] == ["startup_failed"]
    assert "pip install 'rmbgd[http]'" in records[0]["error"]
    assert records[0]["error"].startswith("http.port: ")


def test_the_daemon_runs_without_the_http_extra_when_the_api_is_off(tmp_path, tiny_model):
    # Regression: the daemon module imported FastAPI whatever http.port said.
    path = config_file(tmp_path, model={"name": str(tiny_model), "device": "cpu", "input_size": 64})
    command = [sys.executable, "-m", "tests.support.hidepkgs", "fastapi,uvicorn,starlette,httpx,python_multipart,multipart",
               "--", "-m", "rmbgd", "run", "--config", str(path)]
    proc = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=str(REPO),
                            env=subprocess_env(tmp_path / "hf"))
    lines: "queue.Queue" = queue.Queue()

    def read() -> None:
        for line in proc.stdout:
            lines.put(line)
        lines.put(None)  # the process closed its stdout: it ended

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    try:
        events = []
        while "ready" not in events and "startup_failed" not in events:
            line = lines.get(timeout=120)
            assert line is not None, f"the daemon ended after {events}: {proc.stderr.read()[-2000:]}"
            events.append(json.loads(line)["event"])
        assert events[-1] == "ready", events
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(60) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(10)
        reader.join(10)
    assert proc.stderr.read() == ""
