"""The daemon as systemd sees it: the notify sequence, watchdog, reload, status, progress."""

import json
import os
import signal
import subprocess
import sys
import time

import yaml

from tests.support.daemon import REPO, base_config, write_config
from tests.support.inprocess import FakeSegmenter, inprocess  # noqa: F401 (a fixture)
from tests.support.notify import NotifySocket
from tests.support.photos import pattern, save


def test_notify_sequence_watchdog_reload_and_stop(daemons, folders, tmp_path):
    with NotifySocket(tmp_path) as sd:
        config = daemons.config(logging={"progress_seconds": 0.5})
        daemon = daemons.start(config, env=sd.env(watchdog_usec=1_000_000))

        ready = sd.wait_for("READY=1")
        assert any(line.startswith("STATUS=") for line in ready), "READY carries a status line"
        assert daemon.events("ready"), "READY=1 only once the daemon logged ready"
        sd.wait_for("WATCHDOG=1", timeout=10)
        sd.wait_for("WATCHDOG=1", timeout=10)  # periodic, at half of WATCHDOG_USEC

        rgb = pattern(80, 80, (0.1, 0.1, 0.6, 0.6))
        for i in range(3):
            save(rgb, folders.inbox / f"s{i}.png", "PNG")
        daemon.wait_count(("file_done",), 3)
        # Statuses sent while the files were under way may still be queued unread: the
        # first one after this point need not count all three. Wait for one that does.
        deadline = time.monotonic() + 60
        while True:
            status = sd.wait_for("STATUS=", timeout=60)
            if any("3" in line for line in status if line.startswith("STATUS=")):
                break
            assert time.monotonic() < deadline, f"no STATUS= counting 3 files; got {sd.all()}"

        # A live change: batch size; and one that needs a restart: the model.
        data = yaml.safe_load(config.read_text())
        data["batch"]["size"] = 7
        data["model"]["input_size"] = 96
        config.write_text(yaml.safe_dump(data))
        daemon.signal(signal.SIGHUP)
        reloading = sd.wait_for("RELOADING=1")
        assert any(line.startswith("MONOTONIC_USEC=") and int(line.split("=")[1]) > 0 for line in reloading)
        sd.wait_for("READY=1")
        reloaded = daemon.wait_for("reloaded")
        assert "batch" in reloaded["changed"]
        assert reloaded["needs_restart"] == ["model"]

        # An invalid config is rejected and the old one stays.
        data["batch"]["size"] = "eight"
        config.write_text(yaml.safe_dump(data))
        daemon.signal(signal.SIGHUP)
        failed = daemon.wait_for("reload_failed")
        assert failed["error"] == "batch.size: expected an integer, got 'eight'"
        sd.wait_for("READY=1")
        save(rgb, folders.inbox / "after.png", "PNG")
        daemon.wait_for("file_done", lambda r: r["input"].endswith("after.png"))

        daemon.signal(signal.SIGTERM)
        sd.wait_for("STOPPING=1")
        assert daemon.wait_exit(60) == 0


def test_status_command_reports_a_running_instance(inprocess, folders, tmp_path):
    # The daemon in-process (the instance is this process), `rmbgd status` a real command.
    config = write_config(tmp_path / "config.yaml", base_config(tmp_path, "fake-segmenter"))
    daemon = inprocess.start()
    save(pattern(60, 60, (0, 0, 1, 1)), folders.inbox / "x.png", "PNG")
    daemon.wait_for("file_done")

    def status():
        return subprocess.run([sys.executable, "-m", "rmbgd", "status", "--config", str(config), "--json"],
                              capture_output=True, text=True, cwd=str(REPO), timeout=60)

    # The status file is rewritten at most once a second: wait on the daemon's log until it
    # has caught up with the processed file.
    from tests.support.daemon import wait_until

    def shows_processed():
        result = status()
        doc = json.loads(result.stdout)
        return result.returncode == 0 and any(i.get("processed") == 1 for i in doc["instances"])

    wait_until(shows_processed, [daemon], timeout=30, what="rmbgd status shows the processed file")
    doc = json.loads(status().stdout)
    (inst,) = [i for i in doc["instances"] if i["running"]]
    assert inst["state"] == "ready" and inst["pid"] == os.getpid()
    assert inst["device"] == "cpu"
    human = subprocess.run([sys.executable, "-m", "rmbgd", "status", "--config", str(config)],
                           capture_output=True, text=True, cwd=str(REPO), timeout=60)
    assert human.returncode == 0 and "ready" in human.stdout

    assert daemon.stop() == 0
    assert daemon.crashes() == []
    after = status()
    assert after.returncode == 3, "no instance running after the stop"
    assert json.loads(after.stdout)["instances"][0]["state"] == "stopped"


def test_progress_events_while_there_is_work(inprocess, folders):
    # 250 ms a model call, as the slow tiny model (conftest.slow_model) takes.
    daemon = inprocess.start(segmenter=FakeSegmenter(call_seconds=0.25), logging={"progress_seconds": 0.3},
                             batch={"size": 1, "max_wait_ms": 0})
    rgb = pattern(40, 40, (0, 0, 1, 1))
    for i in range(8):
        save(rgb, folders.inbox / f".p{i}.png", "PNG")
        (folders.inbox / f".p{i}.png").rename(folders.inbox / f"p{i}.png")
    progress = daemon.wait_for("progress", timeout=60)
    for key in ("processed", "failed", "queued", "in_flight", "images_per_s", "eta_s"):
        assert key in progress
    daemon.wait_count(("file_done",), 8)
    assert daemon.stop() == 0
    assert daemon.crashes() == []
