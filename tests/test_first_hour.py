"""What a new user meets in the first hour (issue 15): messages that say what to do next,
`process` leaving nothing behind when it cannot start, and a colour lost to a YAML comment."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import huggingface_hub.constants
import numpy as np
import pytest
import yaml
from PIL import Image

from rmbgd.config import ModelConfig, commented_out_colours
from rmbgd.model.hub import ModelLoadError, locate_model
from tests.support.daemon import REPO, subprocess_env


def rmbgd(*args: str, env: dict, timeout: float = 180) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "rmbgd", *args], capture_output=True, text=True, timeout=timeout,
        env=env, cwd=str(REPO), stdin=subprocess.DEVNULL,
    )


def startup_error(stdout: str) -> str:
    (record,) = [r for r in map(json.loads, stdout.splitlines()) if r.get("event") == "startup_failed"]
    return record["error"]


@pytest.fixture
def photo(tmp_path) -> Path:
    path = tmp_path / "photos" / "a.png"
    path.parent.mkdir()
    Image.fromarray(np.full((20, 30, 3), 200, np.uint8)).save(path)
    return path


def test_regression_offline_hint_names_this_machines_cache(tmp_path, monkeypatch):
    cache = tmp_path / "hf-cache"
    cache.mkdir()
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(cache))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(ModelLoadError) as info:
        locate_model(ModelConfig(name="ZhengPeng7/BiRefNet"))
    message = str(info.value)
    assert f"not in this machine's Hugging Face cache ({cache})" in message
    assert "copy the model folder to this machine" in message
    assert " there " not in message


def test_regression_process_without_config_points_at_the_model_option(tmp_path, photo, hf_home):
    result = rmbgd("process", str(photo.parent), "--out", str(tmp_path / "out"), "--json", env=subprocess_env(hf_home))
    assert result.returncode == 1, result.stdout + result.stderr
    error = startup_error(result.stdout)
    assert error.startswith("--model: cannot download 'ZhengPeng7/BiRefNet'")
    assert error.endswith("give that folder with --model DIR")
    assert "model.name" not in error


def test_regression_process_removes_the_out_folder_it_made_when_the_model_fails(tmp_path, photo, hf_home):
    env = subprocess_env(hf_home)
    missing_model = str(tmp_path / "no-model")
    # A folder that was there before the run stays, even empty; one the run made does not.
    (tmp_path / "kept").mkdir()
    result = rmbgd(
        "process", str(photo.parent), "--out", str(tmp_path / "new" / "out"), "--done", str(tmp_path / "kept"),
        "--model", missing_model, "--device", "cpu", "--json", env=env,
    )
    assert result.returncode == 1, result.stdout + result.stderr
    assert not (tmp_path / "new").exists()
    assert (tmp_path / "kept").is_dir() and not any((tmp_path / "kept").iterdir())
    error = startup_error(result.stdout)
    assert missing_model in error and "\n" not in error
    assert "summary" not in [r.get("event") for r in map(json.loads, result.stdout.splitlines())]
    assert photo.exists()


def test_regression_check_warns_about_a_background_lost_to_a_yaml_comment(tmp_path):
    config = tmp_path / "config.yaml"
    folders = {key: str(tmp_path / key) for key in ("inbox", "outbox", "errors")}
    config.write_text(
        yaml.safe_dump({"paths": {**folders, "done": None}})
        + "output:\n  format: png\n  background: #ffffff   # white\n"
    )
    result = rmbgd("check", "--config", str(config), env=subprocess_env(tmp_path / "hf"), timeout=60)
    assert result.returncode == 0, result.stderr
    assert result.stderr == (
        'warning: output.background: line 8: #ffffff starts a YAML comment, so the background came out '
        'null (transparent); quote the colour: background: "#ffffff"\n'
    )
    config.write_text(yaml.safe_dump({"paths": {**folders, "done": None}, "output": {"background": "#ffffff"}}))
    result = rmbgd("check", "--config", str(config), env=subprocess_env(tmp_path / "hf"), timeout=60)
    assert result.returncode == 0 and result.stderr == ""


def test_commented_out_colours_only_flags_unquoted_hashes():
    text = (
        "output:\n"
        "  background: '#ffffff'\n"
        "  background: \"#000\"\n"
        "  background: null  # transparent\n"
        "profiles:\n"
        "  - match: '*.jpg'\n"
        "    output: {format: jpeg}\n"
        "  - output:\n"
        "      background: #00ff00\n"
    )
    (warning,) = commented_out_colours(text)
    assert warning.startswith("profiles: background: line 9: #00ff00 starts a YAML comment")
