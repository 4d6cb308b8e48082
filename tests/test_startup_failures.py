"""Every way a model can fail to load ends `rmbgd run` with one clear line and exit code 1.

Most cases run the real command (`python -m rmbgd run`) in a subprocess, with HF_HOME in a
temporary folder; failures of the model's own code and settings run `rmbgd.cli.main` in-process
with the same checks. Answers from the Hugging Face hub (a missing or gated model, a wrong
revision) come from a small local HTTP server standing in for it (HF_ENDPOINT), so these
tests need no network and always see the same answers.
"""

from __future__ import annotations

import ctypes
import errno
import fcntl
import json
import os
import subprocess
import sys
import types
from pathlib import Path

import pytest
import yaml
from watchdog.observers import inotify_c

from rmbgd import cli
from rmbgd.ops import liveness
from rmbgd.runtime.daemon import Daemon
from rmbgd.intake.watcher import describe_watch_error
from rmbgd.intake.workarea import default_instance_name
from tests.support.daemon import REPO, base_config, subprocess_env
from tests.support.daemon import write_config as write_daemon_config
from tests.support.tinymodel import build_birefnet_lite, build_tiny_model, edit_weights

# Only a hang fails on this: a failure is expected within seconds of torch's import.
RUN_TIMEOUT_S = 240


def write_config(tmp_path: Path, **model) -> Path:
    model.setdefault("device", "cpu")
    model.setdefault("input_size", 64)
    data = {
        "paths": {
            "inbox": str(tmp_path / "inbox"),
            "outbox": str(tmp_path / "outbox"),
            "errors": str(tmp_path / "errors"),
            "done": None,
        },
        "model": model,
    }
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


def hub_env(tmp_path: Path, endpoint: str | None = None, offline: bool = False) -> dict:
    env = subprocess_env(tmp_path / "hf-home")
    env.pop("HF_TOKEN", None)
    env.pop("HUGGING_FACE_HUB_TOKEN", None)
    if not offline:
        env.pop("HF_HUB_OFFLINE", None)
        env.pop("TRANSFORMERS_OFFLINE", None)
    if endpoint is not None:
        env["HF_ENDPOINT"] = endpoint
    return env


def rmbgd(args: list, env: dict, hide: tuple = ()) -> subprocess.CompletedProcess:
    # hide: packages the command must find missing, installed here or not.
    prefix = ["-m", "tests.support.hidepkgs", ",".join(hide), "--"] if hide else []
    return subprocess.run(
        [sys.executable, *prefix, "-m", "rmbgd", *args],
        capture_output=True, text=True, timeout=RUN_TIMEOUT_S, env=env, cwd=str(REPO),
    )


def startup_failure(config: Path, env: dict, hide: tuple = (), records_seen: list | None = None) -> str:
    """Run the daemon, check it failed the way a user error must; return its one line (and
    put every JSON record in `records_seen`, when given)."""
    result = rmbgd(["run", "--config", str(config)], env, hide)
    assert result.returncode == 1, (result.stdout, result.stderr)
    assert "Traceback" not in result.stdout + result.stderr
    assert result.stderr == ""  # not a terminal: everything is in the JSON log
    assert "\\u001b" not in result.stdout  # no terminal colours (transformers' load report)
    records = [json.loads(line) for line in result.stdout.splitlines()]
    failures = [record for record in records if record["event"] == "startup_failed"]
    assert len(failures) == 1 and records[-1] is failures[0]
    assert "ready" not in [record["event"] for record in records]
    error = failures[0]["error"]
    assert "\n" not in error
    if records_seen is not None:
        records_seen.extend(records)
    return error


# --------------------------------------------------------------------------- model not found


@pytest.fixture
def hub_in_process(monkeypatch, tmp_path, fake_hub):
    """This process's huggingface_hub online, at the fake hub, with an empty cache and no
    token, as hub_env gives a subprocess (huggingface_hub read its environment at import)."""
    from huggingface_hub import constants

    for name in ("HF_TOKEN", "HUGGING_FACE_HUB_TOKEN", "HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("HF_ENDPOINT", fake_hub)
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(constants, "ENDPOINT", fake_hub)
    monkeypatch.setattr(constants, "HUGGINGFACE_CO_URL_TEMPLATE", fake_hub + "/{repo_id}/resolve/{revision}/{filename}")
    (tmp_path / "hf-cache").mkdir()
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hf-cache"))
    monkeypatch.setattr(constants, "HF_TOKEN_PATH", str(tmp_path / "no-token"))
    monkeypatch.setattr(constants, "HF_STORED_TOKENS_PATH", str(tmp_path / "no-stored-tokens"))


# The hub's answers in-process (cli.main, as model_failure_in_process runs it); the hub's
# environment read by a real process: the offline and unreachable cases below.
def test_hub_model_not_found(tmp_path, cli_in_process, hub_in_process, capfd):
    error = model_failure_in_process(write_config(tmp_path, name="rmbgd-tests/missing"), capfd)
    assert error.startswith("model.name: 'rmbgd-tests/missing' was not found on the Hugging Face hub")
    assert "HF_TOKEN" in error


def test_hub_revision_not_found(tmp_path, cli_in_process, hub_in_process, capfd):
    config = write_config(tmp_path, name="rmbgd-tests/tiny", revision="no-such-revision")
    error = model_failure_in_process(config, capfd)
    assert error == (
        "model.revision: 'no-such-revision' does not exist in 'rmbgd-tests/tiny' on the Hugging Face hub"
    )


def test_gated_model_without_a_token(tmp_path, cli_in_process, hub_in_process, capfd):
    error = model_failure_in_process(write_config(tmp_path, name="briaai/RMBG-2.0"), capfd)
    assert error.startswith("model.name: 'briaai/RMBG-2.0' is gated on the Hugging Face hub")
    assert "licence" in error and "https://huggingface.co/briaai/RMBG-2.0" in error
    assert "HF_TOKEN" in error


# --------------------------------------------------------------------------- no hub


def test_hf_hub_offline_with_an_empty_cache(tmp_path, fake_hub, fake_hub_server):
    error = startup_failure(
        write_config(tmp_path, name="ZhengPeng7/BiRefNet_lite"), hub_env(tmp_path, fake_hub, offline=True)
    )
    assert fake_hub_server.requests == []  # offline means not even one request
    assert error.startswith(
        "model.name: cannot download 'ZhengPeng7/BiRefNet_lite' from the Hugging Face hub "
        "(HF_HUB_OFFLINE is set) and it is not in this machine's Hugging Face cache ("
    )
    assert str(tmp_path / "hf-home") in error
    assert "rmbgd fetch-model --config PATH" in error
    assert "set model.name to that local directory" in error


def test_unreachable_hub_with_an_empty_cache(tmp_path, hub_nowhere):
    # The example config's model id with the hub out of reach (HF_ENDPOINT: a loopback port
    # that refuses), on any machine: on a connected one the real hub is never asked.
    records: list = []
    error = startup_failure(
        write_config(tmp_path, name="ZhengPeng7/BiRefNet", revision="main"),
        hub_env(tmp_path, hub_nowhere),
        records_seen=records,
    )
    assert error.startswith(
        "model.name: cannot download 'ZhengPeng7/BiRefNet' at revision 'main' from the Hugging Face "
        "hub (no network access?)"
    )
    assert "rmbgd fetch-model --config PATH" in error
    assert "local" in error and "directory" in error
    # The refusal came from the port the test chose, not from a hub elsewhere.
    unreachable = [r for r in records if r["event"] == "model_hub_unreachable"]
    assert len(unreachable) == 1 and "Connection refused" in unreachable[0]["error"], unreachable


# --------------------------------------------------------------------------- model code


def test_model_code_needing_birefnets_packages(tmp_path):
    # The packages are hidden from the daemon, so this runs whether they are installed or not.
    missing = ("timm", "kornia", "einops")
    model_dir = build_tiny_model(tmp_path / "needs-timm")
    modeling = model_dir / "modeling_tinyseg.py"
    modeling.write_text("".join(f"import {name}\n" for name in missing) + modeling.read_text())
    error = startup_failure(
        write_config(tmp_path, name=str(model_dir)), hub_env(tmp_path, offline=True), hide=missing
    )
    assert error == (
        "model.name: the model's code needs the Python packages 'einops', 'kornia', 'timm', which "
        "are not installed: pip install 'rmbgd[birefnet]' (BiRefNet's code needs timm, kornia, einops)"
    )


def model_failure_in_process(config: Path, capfd) -> str:
    """`rmbgd run` in this process (the model loaded the real way, torch being imported here
    already), checked as startup_failure checks a subprocess; its one line. For failures of
    the model's code and settings, and the fake hub's answers (hub_in_process); what a real
    process reads from its environment (HF_HUB_OFFLINE, HF_ENDPOINT) and hidden packages
    need a subprocess."""
    capfd.readouterr()
    code = cli.main(["run", "--config", str(config)])
    out, err = capfd.readouterr()
    assert code == 1, (out, err)
    assert "Traceback" not in out + err
    assert err == ""  # not a terminal: everything is in the JSON log
    assert "\u001b" not in out
    records = [json.loads(line) for line in out.splitlines()]
    failures = [record for record in records if record["event"] == "startup_failed"]
    assert len(failures) == 1 and records[-1] is failures[0]
    assert "ready" not in [record["event"] for record in records]
    error = failures[0]["error"]
    assert "\n" not in error
    return error


def test_model_code_needing_another_package(tmp_path, cli_in_process, capfd):
    model_dir = build_tiny_model(tmp_path / "needs-pkg")
    modeling = model_dir / "modeling_tinyseg.py"
    modeling.write_text("import rmbgd_no_such_package\n" + modeling.read_text())
    error = model_failure_in_process(write_config(tmp_path, name=str(model_dir)), capfd)
    assert error == (
        "model.name: the model's code needs the Python package 'rmbgd_no_such_package', "
        "which is not installed: pip install rmbgd_no_such_package"
    )


def test_remote_code_not_trusted(tmp_path, tiny_model, cli_in_process, capfd):
    config = write_config(tmp_path, name=str(tiny_model), trust_remote_code=False)
    error = model_failure_in_process(config, capfd)
    assert error == (
        f"model.trust_remote_code: '{tiny_model}' needs its own Python code to run; "
        "set model.trust_remote_code: true if you trust that code"
    )


def test_regression_incomplete_checkpoint_does_not_start(tmp_path):
    # A weight missing from model.safetensors: transformers alone would initialise it at
    # random and the daemon would write meaningless masks.
    model_dir = build_tiny_model(tmp_path / "incomplete")
    edit_weights(model_dir, lambda state: state.pop("head.bias"))
    error = startup_failure(write_config(tmp_path, name=str(model_dir)), hub_env(tmp_path, offline=True))
    assert error == (
        f"model.name: cannot load '{model_dir}': its weights do not match its code: "
        "1 weight(s) missing from the checkpoint (head.bias) "
        "(an incomplete download, or weights for other code?)"
    )


def test_real_birefnet_lite_missing_a_weight_does_not_start(tmp_path, birefnet_lite, cli_in_process, capfd):
    # The real code's loading report, through `rmbgd run` (in this process: the line, not
    # the environment, is what is checked; the subprocess case is the incomplete checkpoint).
    broken = build_birefnet_lite(tmp_path / "BiRefNet_lite_broken", post_init=True, weights_from=birefnet_lite)
    edit_weights(broken, lambda state: state.pop("decoder.conv_out1.0.weight"))
    config = write_config(tmp_path, name=str(broken), input_size=128)
    error = model_failure_in_process(config, capfd)
    assert error.startswith(f"model.name: cannot load '{broken}': its weights do not match its code: ")
    assert "1 weight(s) missing from the checkpoint (decoder.conv_out1.0.weight)" in error


def test_regression_float16_on_the_cpu_does_not_start(tmp_path, tiny_model, cli_in_process, capfd):
    config = write_config(tmp_path, name=str(tiny_model), dtype="float16")
    error = model_failure_in_process(config, capfd)
    assert error.startswith("model.dtype: float16 on the CPU runs about 100 times slower than float32")
    assert "set model.dtype: float32 (or auto)" in error


# --------------------------------------------------------------------------- fetch-model


def fetch_failure(config: Path, env: dict, *extra: str) -> str:
    result = rmbgd(["fetch-model", "--config", str(config), *extra], env)
    assert result.returncode == 1, (result.stdout, result.stderr)
    assert result.stdout == ""
    assert "Traceback" not in result.stderr
    lines = result.stderr.splitlines()
    assert len(lines) == 1
    return lines[0]


def test_fetch_model_with_hf_hub_offline(tmp_path, fake_hub, fake_hub_server):
    error = fetch_failure(
        write_config(tmp_path, name="ZhengPeng7/BiRefNet"), hub_env(tmp_path, fake_hub, offline=True)
    )
    assert fake_hub_server.requests == []
    assert error.startswith("model.name: cannot fetch 'ZhengPeng7/BiRefNet': HF_HUB_OFFLINE is set")


def test_fetch_model_without_network(tmp_path, hub_nowhere):
    error = fetch_failure(
        write_config(tmp_path, name="ZhengPeng7/BiRefNet_lite"),
        hub_env(tmp_path, hub_nowhere),
        "--to",
        str(tmp_path / "models"),
    )
    assert error.startswith(
        "model.name: cannot fetch 'ZhengPeng7/BiRefNet_lite': the Hugging Face hub is out of reach ("
    )
    assert not (tmp_path / "models").exists()


def test_fetch_model_of_a_gated_model(tmp_path, fake_hub):
    error = fetch_failure(write_config(tmp_path, name="briaai/RMBG-2.0"), hub_env(tmp_path, fake_hub))
    assert error.startswith("model.name: 'briaai/RMBG-2.0' is gated on the Hugging Face hub")


def test_fetch_model_with_a_bad_config(tmp_path):
    config = write_config(tmp_path, name="ZhengPeng7/BiRefNet", dtype="half")
    result = rmbgd(["fetch-model", "--config", str(config)], hub_env(tmp_path, offline=True))
    assert result.returncode == 2
    assert result.stderr == "model.dtype: expected auto, float16, bfloat16 or float32, got 'half'\n"


# --------------------------------------------------------------------------- `rmbgd status` after it


def test_regression_status_after_a_failed_start_names_the_reason(tmp_path):
    """Finding 7: `rmbgd status` called a failed start "dead ... gone without stopping cleanly".
    The failed start is the local model folder that does not exist."""
    missing = tmp_path / "models" / "BiRefNet"
    config = write_config(tmp_path, name=str(missing))
    error = startup_failure(config, hub_env(tmp_path, offline=True))
    assert error == (
        f"model.name: {missing} is not a model directory (no config.json): the path does not exist"
    )
    result = rmbgd(["status", "--config", str(config)], hub_env(tmp_path, offline=True))
    assert result.returncode == 3, result.stdout + result.stderr
    lines = result.stdout.splitlines()
    assert lines[1].startswith("rmbgd ") and ": failed (pid " in lines[1]
    assert f"  note:       failed to start: {error}" in lines
    assert "(no config.json)" in result.stdout and "without stopping cleanly" not in result.stdout


# --------------------------------------------------------------------------- not the user's config


@pytest.fixture
def in_process(cli_in_process, monkeypatch):
    """`rmbgd run` in this process with a stand-in model."""
    monkeypatch.setattr(Daemon, "_load_model", lambda self: types.SimpleNamespace(device="cpu", dtype="float32"))


def failed_in_process(tmp_path: Path, capsys) -> str:
    """Run `rmbgd run` in this process; check it failed like a user error must; return the line."""
    config = write_daemon_config(tmp_path / "config.yaml", base_config(tmp_path, tmp_path / "model"))
    code = cli.main(["run", "--config", str(config)])
    captured = capsys.readouterr()
    assert code == 1, captured
    assert "Traceback" not in captured.out + captured.err
    records = [json.loads(line) for line in captured.out.splitlines()]
    assert records[-1]["event"] == "startup_failed", [r["event"] for r in records]
    assert "crashed" not in [r["event"] for r in records] and "ready" not in [r["event"] for r in records]
    error = records[-1]["error"]
    assert "\n" not in error
    # `rmbgd status` shows it, and the work area is free for the next start.
    (instance,) = liveness.list_instances(tmp_path / "inbox" / ".rmbgd" / "state")
    assert instance.doc["state"] == "failed" and instance.doc["startup_error"]["error"] == error
    return error


def test_regression_inotify_watch_limit_is_a_startup_failure_with_the_fix(tmp_path, capsys, in_process, monkeypatch):
    """Finding 8: the inotify watch limit printed a crash traceback."""
    def inotify_add_watch(fd, path, mask):  # the libc call, failing as the kernel does
        ctypes.set_errno(errno.ENOSPC)
        return -1

    monkeypatch.setattr(inotify_c, "inotify_add_watch", inotify_add_watch)
    error = failed_in_process(tmp_path, capsys)
    assert error.startswith(f"cannot watch {tmp_path / 'inbox'}: the inotify watch limit is reached (fs.inotify.max_user_watches")
    assert "`sysctl fs.inotify.max_user_watches=" in error and error.endswith("or set watch.polling: true")
    assert not (tmp_path / "inbox" / ".rmbgd" / "work" / default_instance_name()).exists()


def test_regression_inotify_instance_limit_is_a_startup_failure_with_the_fix(tmp_path, capsys, in_process, monkeypatch):
    def inotify_init():
        ctypes.set_errno(errno.EMFILE)
        return -1

    monkeypatch.setattr(inotify_c, "inotify_init", inotify_init)
    error = failed_in_process(tmp_path, capsys)
    assert "the inotify instance limit is reached (fs.inotify.max_user_instances" in error
    assert "`sysctl fs.inotify.max_user_instances=" in error and "watch.polling: true" in error


def test_regression_a_locked_work_area_is_a_startup_failure_naming_the_holder(tmp_path, capsys, in_process):
    """Finding 8: a work area locked by another process printed a crash traceback."""
    instance = default_instance_name()  # this process's, which the daemon in it will use
    work = tmp_path / "inbox" / ".rmbgd" / "work" / instance
    work.mkdir(parents=True)
    fd = os.open(work / ".lock", os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)  # another open file: a conflicting lock
        error = failed_in_process(tmp_path, capsys)
    finally:
        os.close(fd)
    assert error.startswith(f"the work area {work} is locked by another running process named {instance} ")
    assert "give each host or container its own host name" in error


@pytest.mark.parametrize(
    ("code", "name", "now", "expected_fix"),
    [
        (errno.ENOSPC, "max_user_watches", 8192, "`sysctl fs.inotify.max_user_watches=524288`"),
        (errno.ENOSPC, "max_user_watches", 1048576, "`sysctl fs.inotify.max_user_watches=2097152`"),
        (errno.ENOSPC, "max_user_watches", None, "`sysctl fs.inotify.max_user_watches=524288`"),
        (errno.EMFILE, "max_user_instances", 128, "`sysctl fs.inotify.max_user_instances=1024`"),
    ],
)
def test_describe_watch_error(code, name, now, expected_fix):
    limits = {name: now}
    error = describe_watch_error(OSError(code, "limit"), Path("/srv/in"), limits.get)
    shown = f"fs.inotify.{name} = {now}" if now is not None else f"fs.inotify.{name};"
    assert error.startswith("cannot watch /srv/in: the inotify ") and shown in error
    assert f"raise it with {expected_fix} (and in /etc/sysctl.d/ to keep it), or set watch.polling: true" in error


def test_describe_other_watch_errors():
    error = describe_watch_error(OSError(errno.ENOENT, "No such file or directory"), Path("/srv/in"), {}.get)
    assert error == "paths.inbox: cannot watch /srv/in: No such file or directory"
