"""Shared fixtures, and the guard that keeps every test on this machine.

Before anything else is imported: the hub (HF_ENDPOINT) is a loopback port nothing answers
on unless a test points it at the fake hub, and the network guard is installed here and,
through PYTHONPATH, in every Python subprocess the tests start (tests/support/netguard.py).
"""

import atexit
import logging
import os
import signal
import sys
import tempfile
import threading
from pathlib import Path

from tests.support import netguard
from tests.support.fakehub import ClosedPort, FakeHub

_HUB_NOWHERE = ClosedPort()
os.environ["HF_ENDPOINT"] = _HUB_NOWHERE.url
os.environ["HF_HUB_DISABLE_TELEMETRY"] = "1"
_fd, NETGUARD_REPORT = tempfile.mkstemp(prefix="rmbgd-netguard-", suffix=".log")
os.close(_fd)
# Writable by the unprivileged children of the permission tests too.
os.chmod(NETGUARD_REPORT, 0o666)
os.environ[netguard.REPORT_ENV] = NETGUARD_REPORT
_SITE = str(Path(__file__).resolve().parent / "support" / "netguard_site")
os.environ["PYTHONPATH"] = os.pathsep.join(
    [_SITE] + [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p and p != _SITE]
)
netguard.install()
if "huggingface_hub" in sys.modules:  # read HF_ENDPOINT at import: too late for the variable
    from huggingface_hub import constants as _hub_constants

    _hub_constants.ENDPOINT = _HUB_NOWHERE.url
    _hub_constants.HUGGINGFACE_CO_URL_TEMPLATE = _HUB_NOWHERE.url + "/{repo_id}/resolve/{revision}/{filename}"

import pytest  # noqa: E402

from tests.support.daemon import DaemonProcess, base_config, subprocess_env, write_config  # noqa: E402
from tests.support.tinymodel import BIREFNET_LITE_CODE, build_birefnet_lite, build_tiny_model  # noqa: E402


def _refusals_since(offset: int) -> list:
    with open(NETGUARD_REPORT, encoding="utf-8") as fh:
        fh.seek(offset)
        return fh.read().splitlines()


def _guarded(item):
    # A refusal can be swallowed by the code under test (the hub probe catches everything)
    # or happen in a subprocess: the report file sees them all.
    offset = os.path.getsize(NETGUARD_REPORT)
    try:
        return (yield)
    finally:
        refused = _refusals_since(offset)
        if refused:
            pytest.fail("\n".join(refused), pytrace=False)


pytest_runtest_setup = pytest.hookimpl(wrapper=True)(_guarded)
pytest_runtest_call = pytest.hookimpl(wrapper=True)(_guarded)
pytest_runtest_teardown = pytest.hookimpl(wrapper=True)(_guarded)


# Modules whose tests start real processes (torch's import alone takes seconds each), run
# first, whole: started last, one of them would keep a worker busy after the other is done.
# Slowest first; every other module keeps its place after them.
RUN_FIRST = (
    "test_bench.py", "test_faults.py", "test_real_birefnet.py", "test_daemon.py", "test_backends.py",
    "test_model_daemon.py", "test_startup_failures.py", "test_process.py", "test_logs.py",
    "test_service.py", "test_doctor.py", "test_config_fuzz.py", "test_http_process.py", "test_http_daemon.py",
)


def pytest_xdist_auto_num_workers(config):
    # `-n auto`: one worker more than cores. Many tests wait (daemons' settle times and drains,
    # servers' shutdowns) while the rest compute, and a third worker fills those waits: 226 s
    # against 238 s for two, on 2 cores, same tree, one run after the other. Capped by
    # --maxprocesses (pyproject.toml).
    return len(os.sched_getaffinity(0)) + 1


def pytest_collection_modifyitems(config, items):
    first = {name: rank for rank, name in enumerate(RUN_FIRST)}
    items.sort(key=lambda item: first.get(item.path.name, len(RUN_FIRST)))


def _remove_report(creator: int = os.getpid()) -> None:
    if os.getpid() == creator:  # not in a forked child (tests/support/unprivileged.py)
        try:
            os.unlink(NETGUARD_REPORT)
        except FileNotFoundError:
            pass


# Also when pytest stops before unconfiguring (an interrupted run).
atexit.register(_remove_report)


def pytest_unconfigure(config):
    _HUB_NOWHERE.close()
    _remove_report()


@pytest.fixture
def hub_nowhere() -> str:
    """The hub's address for a hub that is out of reach: connections are refused at once."""
    return _HUB_NOWHERE.url


@pytest.fixture(scope="session")
def fake_hub_server():
    hub = FakeHub()
    yield hub
    hub.close()


@pytest.fixture
def fake_hub(fake_hub_server) -> str:
    """The fake hub's address; fake_hub_server.requests lists what it was asked."""
    fake_hub_server.requests.clear()
    return fake_hub_server.url


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory) -> Path:
    return build_tiny_model(tmp_path_factory.mktemp("tiny-model"))


@pytest.fixture(scope="session")
def birefnet_lite(tmp_path_factory) -> Path:
    """The real BiRefNet_lite code (the 2025-02 code as published: transformers 5 needs rmbgd's
    legacy loader for it) with random weights; skipped where the code or its packages are absent."""
    if not BIREFNET_LITE_CODE.is_dir():
        pytest.skip(f"the real BiRefNet_lite code is not here ({BIREFNET_LITE_CODE})")
    for package in ("timm", "kornia", "einops"):
        pytest.importorskip(package)
    return build_birefnet_lite(tmp_path_factory.mktemp("birefnet") / "BiRefNet_lite")


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


@pytest.fixture
def cli_in_process(monkeypatch):
    """`rmbgd run` in this process (`cli.main`); signal handlers and logging restored."""
    import structlog

    from rmbgd.runtime.daemon import Daemon

    saved_signals = {sig: signal.getsignal(sig) for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP)}
    root = logging.getLogger()
    handlers, level = list(root.handlers), root.level
    excepthook = threading.excepthook
    monkeypatch.delenv("NOTIFY_SOCKET", raising=False)
    # Should the start succeed after all, stop at once instead of serving until the timeout.
    monkeypatch.setattr(Daemon, "_main_loop", lambda self: 0)
    yield
    for sig, handler in saved_signals.items():
        signal.signal(sig, handler)
    root.handlers = handlers
    root.setLevel(level)
    structlog.reset_defaults()
    logging.captureWarnings(False)
    threading.excepthook = excepthook


@pytest.fixture(scope="session", autouse=True)
def in_process_watchers_end():
    """The in-process watchers stopped by the last tests, which no later teardown checked
    (tests/support/inprocess.py, QuickStopWatcher). A fixture, not a session hook: a failing
    teardown here fails the run under xdist, where a worker's session hook could not."""
    yield
    inprocess = sys.modules.get("tests.support.inprocess")
    if inprocess is not None and inprocess.join_stopped_watchers():
        pytest.fail("in-process daemon watchers still running at the end of the session", pytrace=False)
