import signal
from pathlib import Path

import pytest

from tests.support.daemon import DaemonProcess, base_config, subprocess_env, write_config
from tests.support.tinymodel import build_tiny_model


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory) -> Path:
    return build_tiny_model(tmp_path_factory.mktemp("tiny-model"))


@pytest.fixture(scope="session")
def hf_home(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("hf-home")


class Daemons:
    """Starts real daemons for a test and guarantees they are gone afterwards."""

    def __init__(self, root: Path, model: Path, hf_home: Path) -> None:
        self.root = root
        self.model = model
        self.hf_home = hf_home
        self.started = []

    def config(self, name: str = "config.yaml", **sections) -> Path:
        return write_config(self.root / name, base_config(self.root, self.model, **sections))

    def start(self, config: Path = None, wait_ready: bool = True, env: dict = None, **sections) -> DaemonProcess:
        config = config or self.config(**sections)
        daemon = DaemonProcess(config, {**subprocess_env(self.hf_home), **(env or {})})
        self.started.append(daemon)
        if wait_ready:
            daemon.wait_for("ready", timeout=120)
        return daemon

    def cleanup(self) -> None:
        for daemon in self.started:
            if daemon.proc.poll() is None:
                daemon.signal(signal.SIGKILL)
            daemon.kill()


@pytest.fixture
def daemons(tmp_path, tiny_model, hf_home):
    pool = Daemons(tmp_path, tiny_model, hf_home)
    yield pool
    pool.cleanup()


@pytest.fixture
def folders(tmp_path):
    class F:
        inbox = tmp_path / "inbox"
        outbox = tmp_path / "outbox"
        errors = tmp_path / "errors"
        done = tmp_path / "done"

    return F


@pytest.fixture(scope="session")
def slow_model(tmp_path_factory) -> Path:
    """The tiny model with 250 ms of simulated accelerator time per call."""
    return build_tiny_model(tmp_path_factory.mktemp("slow-model"), delay_ms_per_call=250.0)
