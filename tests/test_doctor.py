"""`rmbgd doctor`: one line per check, exit 0 when the installation is ready, 1 otherwise."""

from __future__ import annotations

import io
import json
import subprocess
import sys
import types
from pathlib import Path

import pytest

from rmbgd.runtime import doctor
from rmbgd.runtime.doctor import device as doctor_device, folders as doctor_folders
from rmbgd.config import parse_config
from tests.support.daemon import REPO, base_config, subprocess_env, write_config
from tests.support.unprivileged import as_unprivileged, folder_for_unprivileged

CHECKS = ("config", "packages", "device", "model", "folders", "inotify", "pipeline")


def run_doctor(*args: str, hf_home: Path, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "rmbgd", "doctor", *args],
        capture_output=True, text=True, timeout=300, cwd=str(REPO),
        env={**subprocess_env(hf_home), **(env or {})},
    )


def lines_by_check(stdout: str) -> dict:
    found = {}
    for line in stdout.splitlines():
        status, _, rest = line.partition(" ")
        name, sep, text = rest.strip().partition(": ")
        if sep:
            found[name] = (status, text)
    return found


def test_doctor_passes_on_a_good_config(tmp_path, tiny_model, hf_home):
    (tmp_path / "inbox" / "a" / "b").mkdir(parents=True)
    config = write_config(tmp_path / "config.yaml", base_config(tmp_path, tiny_model))
    result = run_doctor("--config", str(config), hf_home=hf_home)
    assert result.returncode == 0, result.stdout + result.stderr
    checks = lines_by_check(result.stdout)
    for name in CHECKS:
        assert name in checks, f"no {name} line in:\n{result.stdout}"
        assert checks[name][0] in ("ok", "warn"), f"{name}: {checks[name]}"
    assert checks["model"][0] == "ok" and str(tiny_model) in checks["model"][1]
    assert "3 folder(s)" in checks["inotify"][1]
    assert "images/s" in checks["pipeline"][1]
    assert result.stdout.splitlines()[-1] == "everything needed is in place"
    assert result.stderr == ""
    # Nothing of the user's was touched: the run went into a temporary folder.
    assert not (tmp_path / "outbox").exists() and not (tmp_path / "errors").exists()
    assert [p.name for p in (tmp_path / "inbox").iterdir()] == ["a"]


def test_doctor_fails_on_a_missing_model_and_an_unusable_folder(tmp_path, capfd):
    # In-process (the command's own function); the command line: the good config above.
    (tmp_path / "outbox").write_text("a file where a folder should be")
    config = write_config(tmp_path / "config.yaml", base_config(tmp_path, tmp_path / "no-such-model"))
    out = io.StringIO()
    capfd.readouterr()
    code = doctor.main(str(config), out=out)
    result = types.SimpleNamespace(returncode=code, stdout=out.getvalue(), stderr=capfd.readouterr().err)
    assert result.returncode == 1, result.stdout + result.stderr
    assert result.stderr == ""
    checks = lines_by_check(result.stdout)
    assert checks["model"] == ("FAIL", f"model.name: {tmp_path / 'no-such-model'}: the folder does not exist")
    assert checks["folders"][0] == "FAIL"
    assert checks["folders"][1].startswith("paths.outbox: exists but is not a folder")
    # The other checks still ran: the installation itself is fine.
    assert checks["pipeline"][0] == "ok"
    assert result.stdout.splitlines()[-1] == "2 problem(s) found"


def test_doctor_with_a_hub_model_missing_from_the_offline_cache_says_what_to_do(tmp_path, monkeypatch, capfd):
    # In-process: the cache and the offline switch are set here, as a process gets them from
    # HF_HOME and HF_HUB_OFFLINE (read at call time by rmbgd.model.hub, the cache's path from
    # huggingface_hub's constants).
    import huggingface_hub

    cache = tmp_path / "hf-cache"
    cache.mkdir()
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(cache))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    config = write_config(tmp_path / "config.yaml", base_config(tmp_path, "ZhengPeng7/BiRefNet"))
    out = io.StringIO()
    capfd.readouterr()
    assert doctor.main(str(config), out=out) == 1
    assert capfd.readouterr().err == ""
    status, text = lines_by_check(out.getvalue())["model"]
    assert status == "FAIL"
    assert f"not in this machine's Hugging Face cache ({cache})" in text and "rmbgd fetch-model" in text


def test_doctor_with_a_bad_config_stops_at_the_config_line(tmp_path, hf_home):
    config = tmp_path / "config.yaml"
    config.write_text("paths: {inbox: /x}\nbatch: {size: eight}\n")
    result = run_doctor("--config", str(config), hf_home=hf_home)
    assert result.returncode == 1
    assert result.stdout.startswith("FAIL config: ")
    assert "batch.size" in result.stdout


def test_doctor_help_and_a_bad_config_do_not_import_torch(tmp_path):
    config = tmp_path / "config.yaml"
    config.write_text("nonsense: 1\n")
    code = (
        "import sys\nfrom rmbgd import cli\n"
        "try:\n    cli.main(['doctor', '--help'])\nexcept SystemExit:\n    pass\n"
        f"cli.main(['doctor', '--config', {str(config)!r}])\n"
        "sys.exit(3 if 'torch' in sys.modules else 0)"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=str(REPO), timeout=60)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "usage: rmbgd doctor" in result.stdout


def test_unwritable_folder_is_a_failed_line(tmp_path):
    for user_tmp in folder_for_unprivileged(tmp_path):
        locked = user_tmp / "locked"
        locked.mkdir(mode=0o555)
        cfg = parse_config(
            {"paths": {"inbox": str(user_tmp / "inbox"), "outbox": str(locked / "outbox"),
                       "errors": str(user_tmp / "errors"), "done": None}},
            user_tmp,
        )
        as_unprivileged(_expect_outbox_refused, cfg)


def _expect_outbox_refused(cfg) -> None:
    results = doctor.check_folders(cfg)
    assert [r.status for r in results] == ["FAIL"]
    assert results[0].text.startswith("paths.outbox: cannot be created:")
    assert "not writable by this user" in results[0].text


# --------------------------------------------------------------------------- why no CUDA


@pytest.mark.parametrize(
    ("facts", "expected"),
    [
        ({"cuda_build": None, "visible_devices": None, "driver": "550.54", "error": None}, "CPU-only build"),
        # A CPU-only wheel is the reason even where the variable hides the GPUs as well.
        ({"cuda_build": None, "visible_devices": "", "driver": None, "error": None}, "CPU-only build"),
        ({"cuda_build": "12.4", "visible_devices": "", "driver": "550.54", "error": "x"}, "CUDA_VISIBLE_DEVICES is ''"),
        ({"cuda_build": "12.4", "visible_devices": "-1", "driver": None, "error": None}, "CUDA_VISIBLE_DEVICES is '-1'"),
        ({"cuda_build": "12.4", "visible_devices": None, "driver": None, "error": "Found no NVIDIA driver"},
         "no NVIDIA driver is loaded"),
        ({"cuda_build": "12.4", "visible_devices": "0", "driver": "470.1", "error": "driver too old"},
         "NVIDIA driver 470.1 is loaded but CUDA 12.4 (torch's build) did not start: driver too old"),
    ],
)
def test_cuda_unavailable_reason(facts, expected):
    assert expected in doctor.cuda_unavailable_reason(**facts)


def fake_torch(cuda_build, init_error=None):
    def init():
        if init_error:
            raise RuntimeError(init_error)

    return types.SimpleNamespace(version=types.SimpleNamespace(cuda=cuda_build), cuda=types.SimpleNamespace(init=init))


def test_cuda_facts_from_a_cpu_only_torch(monkeypatch, tmp_path):
    monkeypatch.setattr(doctor_device, "_NVIDIA_DRIVER", tmp_path / "absent")
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    facts = doctor_device._cuda_facts(fake_torch(None, init_error="never called"))
    assert facts == {"cuda_build": None, "visible_devices": None, "driver": None, "error": None}


def test_cuda_facts_with_a_driver_that_fails(monkeypatch, tmp_path):
    driver = tmp_path / "version"
    driver.write_text("NVRM version: NVIDIA UNIX x86_64 Kernel Module  470.82.01  Thu Oct 28 2021\n")
    monkeypatch.setattr(doctor_device, "_NVIDIA_DRIVER", driver)
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "0")
    facts = doctor_device._cuda_facts(fake_torch("12.4", init_error="The NVIDIA driver on your system is\n too old"))
    assert facts == {
        "cuda_build": "12.4", "visible_devices": "0", "driver": "470.82.01",
        "error": "The NVIDIA driver on your system is too old",
    }
    assert "470.82.01 is loaded but CUDA 12.4" in doctor.cuda_unavailable_reason(**facts)


# --------------------------------------------------------------------------- pure verdicts


@pytest.mark.parametrize(
    ("folders", "watches", "status"),
    [(10, 8192, "ok"), (5000, 8192, "warn"), (8192, 8192, "FAIL"), (10, None, "warn")],
)
def test_inotify_verdict(folders, watches, status):
    result = doctor.inotify_verdict(folders, watches, 128)
    assert result.status == status
    if status == "FAIL":
        assert "max_user_watches" in result.text and "watch.polling" in result.text


def test_local_model_problems(tmp_path, tiny_model):
    assert doctor.local_model_problem(tiny_model, trust_remote_code=True) is None
    assert "trust_remote_code is false" in doctor.local_model_problem(tiny_model, trust_remote_code=False)
    folder = tmp_path / "m"
    folder.mkdir()
    assert "no config.json" in doctor.local_model_problem(folder, True)
    (folder / "config.json").write_text(json.dumps({"auto_map": {"AutoConfig": "configuration_x.XConfig"}}))
    assert doctor.local_model_problem(folder, True) == "config.json's auto_map names configuration_x.py, which is missing"
    (folder / "configuration_x.py").write_text("")
    assert doctor.local_model_problem(folder, True).startswith("no weights")
    (folder / "model.safetensors").write_bytes(b"")
    assert doctor.local_model_problem(folder, True) is None


def test_model_code_packages_come_from_the_models_own_code(tmp_path):
    (tmp_path / "config.json").write_text("{}")
    (tmp_path / "modeling.py").write_text("import torch\nfrom timm.models import x\n  import einops\n")
    cfg = types.SimpleNamespace(name=str(tmp_path), revision=None)
    assert doctor.model_code_packages(cfg) == ("timm", "einops")


def test_an_inbox_folder_on_another_filesystem_fails(tmp_path, monkeypatch):
    cfg = parse_config(
        {"paths": {"inbox": str(tmp_path / "inbox"), "outbox": str(tmp_path / "out"),
                   "errors": str(tmp_path / "errors"), "done": None}},
        tmp_path,
    )
    mounted = tmp_path / "inbox" / "usb"
    monkeypatch.setattr(doctor_folders, "_inbox_folders", lambda inbox: iter([(inbox, 1), (inbox / "a", 1), (mounted, 2)]))
    (result,) = doctor.check_folders(cfg)
    assert result.status == "FAIL"
    assert result.text.startswith(f"paths.inbox: {mounted} is on another filesystem than the inbox")
