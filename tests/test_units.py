"""The systemd units: what they promise, kept in step, and accepted by systemd-analyze."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from rmbgd.runtime.daemon import DRAIN_TIMEOUT_SECONDS
from tests.support.daemon import REPO

UNITS = REPO / "systemd"
PLAIN = UNITS / "rmbgd.service"
TEMPLATE = UNITS / "rmbgd@.service"
CHECK = UNITS / "check-units"
VENV_RMBGD = Path(sys.executable).parent / "rmbgd"
# Settings that differ between the two units on purpose; everything else must match.
TEMPLATE_ONLY = {("Service", "Environment"), ("Service", "SyslogIdentifier"), ("Unit", "Description"),
                 ("Unit", "Conflicts")}


def parse(path: Path) -> list[tuple[str, str, str]]:
    """(section, key, value) for every assignment, duplicates and order kept."""
    entries, section = [], None
    for raw in path.read_text().splitlines():
        line = raw.strip()
        if not line or line.startswith(("#", ";")):
            continue
        if line.startswith("["):
            section = line.strip("[]")
            continue
        key, _, value = line.partition("=")
        entries.append((section, key.strip(), value.strip()))
    return entries


def values(path: Path, key: str, section: str = "Service") -> list[str]:
    return [v for s, k, v in parse(path) if s == section and k == key]


def seconds(text: str) -> float:
    total = 0.0
    for number, unit in re.findall(r"(\d+(?:\.\d+)?)\s*(min|s|ms|h)?", text):
        total += float(number) * {"min": 60, "h": 3600, "ms": 0.001}.get(unit, 1)
    return total


@pytest.mark.parametrize("unit", [PLAIN, TEMPLATE], ids=["plain", "template"])
def test_the_unit_promises(unit):
    def one(key):
        return values(unit, key)

    assert one("Type") == ["notify"]
    assert one("NotifyAccess") == ["main"]
    assert one("Restart") == ["on-failure"]
    assert one("KillMode") == ["mixed"]
    assert one("ExecReload") == ["/bin/kill -HUP $MAINPID"]
    assert one("ExecStart") == ["/opt/rmbgd/.venv/bin/rmbgd run --config /etc/rmbgd/config.yaml"]
    assert one("ExecStartPre") == ["/opt/rmbgd/.venv/bin/rmbgd check --config /etc/rmbgd/config.yaml"]
    # A config error (exit 2) must not become a restart loop.
    assert one("RestartPreventExitStatus") == ["2"]
    # The drain must be allowed to finish before systemd sends SIGKILL.
    (stop,) = one("TimeoutStopSec")
    assert seconds(stop) > DRAIN_TIMEOUT_SECONDS
    (watchdog,) = one("WatchdogSec")
    assert seconds(watchdog) >= 60
    assert one("CacheDirectory") == ["rmbgd"] and one("StateDirectory") == ["rmbgd"]
    assert one("User") == ["rmbgd"]
    assert one("SupplementaryGroups") == ["video render"]
    assert one("ProtectSystem") == ["strict"] and one("ReadWritePaths") == ["-/srv/rmbgd"]
    assert one("LogsDirectory") == ["rmbgd"]
    for key in ("NoNewPrivileges", "PrivateTmp", "ProtectHome"):
        assert one(key) == ["yes"], key
    assert one("DevicePolicy") == ["closed"]
    assert any("nvidia" in v for v in one("DeviceAllow"))
    assert "@system-service" in one("SystemCallFilter")
    # It would break PyTorch, whose kernels and JIT need writable+executable memory.
    assert one("MemoryDenyWriteExecute") == []
    assert values(unit, "WantedBy", "Install") == ["multi-user.target"]


def test_the_template_selects_its_gpu():
    env = values(TEMPLATE, "Environment")
    assert "CUDA_VISIBLE_DEVICES=%i" in env
    assert "CUDA_DEVICE_ORDER=PCI_BUS_ID" in env
    assert values(TEMPLATE, "Conflicts", "Unit") == ["rmbgd.service"]
    assert not any(v.startswith("CUDA_VISIBLE_DEVICES") for v in values(PLAIN, "Environment"))


def test_both_units_are_otherwise_the_same():
    def comparable(path):
        return [(s, k, v) for s, k, v in parse(path) if (s, k) not in TEMPLATE_ONLY]

    assert comparable(PLAIN) == comparable(TEMPLATE)
    shared_env = [v for v in values(TEMPLATE, "Environment") if not v.startswith("CUDA_")]
    assert shared_env == values(PLAIN, "Environment")


def needs_systemd_analyze():
    if shutil.which("systemd-analyze") is None:
        pytest.skip("systemd-analyze is not installed; .ci/run says so too")
    if not os.access(VENV_RMBGD, os.X_OK):
        pytest.skip(f"{VENV_RMBGD} is not installed")


def run_check(root: Path) -> subprocess.CompletedProcess:
    return subprocess.run(
        ["bash", str(root / "systemd" / "check-units")],
        capture_output=True, text=True, timeout=120,
        env={**os.environ, "RMBGD_BIN": str(VENV_RMBGD)},
    )


def test_check_units_passes():
    needs_systemd_analyze()
    result = run_check(REPO)
    assert result.returncode == 0, result.stdout + result.stderr
    scores = re.findall(r"security (\S+): exposure ([0-9.]+)", result.stdout)
    assert [name for name, _ in scores] == ["rmbgd.service", "rmbgd@0.service"]
    assert all(float(score) <= 3.0 for _, score in scores), scores


def copy_units(tmp_path: Path) -> Path:
    (tmp_path / "systemd").mkdir()
    for path in (PLAIN, TEMPLATE, CHECK):
        shutil.copy(path, tmp_path / "systemd" / path.name)
    return tmp_path


def test_check_units_fails_on_a_misspelt_setting(tmp_path):
    needs_systemd_analyze()
    root = copy_units(tmp_path)
    unit = root / "systemd" / "rmbgd@.service"
    unit.write_text(unit.read_text().replace("ProtectHome=yes", "ProtectHome=yess"))
    result = run_check(root)
    assert result.returncode == 1
    assert "verify rmbgd@0.service failed" in result.stderr and "yess" in result.stderr


def test_check_units_fails_when_hardening_is_lost(tmp_path):
    needs_systemd_analyze()
    root = copy_units(tmp_path)
    unit = root / "systemd" / "rmbgd.service"
    weakened = [
        line for line in unit.read_text().splitlines()
        if not line.startswith(("ProtectSystem=", "SystemCallFilter=", "RestrictAddressFamilies=",
                                "CapabilityBoundingSet=", "ReadWritePaths="))
    ]
    unit.write_text("\n".join(weakened) + "\n")
    result = run_check(root)
    assert result.returncode == 1
    assert re.search(r"security rmbgd.service: exposure [0-9.]+ is above 3.0", result.stderr)


def test_check_units_skips_without_systemd_analyze(tmp_path):
    root = copy_units(tmp_path)
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    # Only what the script needs before it looks for systemd-analyze.
    for tool in ("dirname", "bash"):
        found = shutil.which(tool)
        assert found
        (bin_dir / tool).symlink_to(found)
    result = subprocess.run(
        [str(bin_dir / "bash"), str(root / "systemd" / "check-units")],
        capture_output=True, text=True, timeout=60, env={"PATH": str(bin_dir)},
    )
    assert result.returncode == 0
    assert "SKIPPED: systemd-analyze is not installed" in result.stderr
