"""The one lifecycle `rmbgd run` and `rmbgd process` share: signals, the second-signal exit,
the `ready` event, the in-flight limit, the drain. In-process, with stand-ins for the phases."""

from __future__ import annotations

import signal
import threading
from typing import Any, List, Tuple

import pytest

from rmbgd.batching.job import Counters
from rmbgd.config import parse_config
from rmbgd.runtime import lifecycle
from rmbgd.runtime.daemon import Daemon
from rmbgd.runtime.lifecycle import EXIT_FORCED, EXIT_OK, Lifecycle, in_flight_limit
from rmbgd.runtime.oneshot import Runner


class Log:
    def __init__(self) -> None:
        self.records: List[Tuple[str, str, dict]] = []

    def __getattr__(self, level: str):
        return lambda event, **fields: self.records.append((level, event, fields))

    def events(self) -> List[str]:
        return [event for _level, event, _fields in self.records]


class Exited(Exception):
    def __init__(self, code: int) -> None:
        super().__init__(code)
        self.code = code


class Pipeline:
    """Stands in for the pipeline: done draining once `release` is set."""

    def __init__(self) -> None:
        self.release = threading.Event()
        self.stopped = False

    def stop_intake(self) -> None:
        self.stopped = True

    def wait(self, timeout: float) -> bool:
        return self.release.wait(timeout)


class Toy(Lifecycle):
    def __init__(self, cfg, log, on_drain_tick=lambda toy: None, load=lambda: None) -> None:
        super().__init__(cfg, log, Counters())
        self.phases: List[str] = []
        self.pipeline = Pipeline()
        self._on_drain_tick = on_drain_tick
        self._load = load

    def _starting(self) -> None:
        self.phases.append("starting")

    def _load_model(self) -> Any:
        self.phases.append("load")
        self._load()
        return type("Segmenter", (), {"device": "cpu", "dtype": "float32"})()

    def _stop_during_startup(self) -> int:
        self.phases.append("stopped during startup")
        return self._stop_code()

    def _open(self, segmenter: Any) -> None:
        self.phases.append("open")

    def _main_loop(self) -> int:
        self.phases.append("main loop")
        self._on_signal(signal.SIGTERM, None)  # as if a SIGTERM arrived while running
        return self._stop_code()

    def _shutdown(self, code: int) -> int:
        self.phases.append("drain")
        self._drain(self.pipeline)
        return code

    def _draining(self) -> None:
        self._on_drain_tick(self)


@pytest.fixture
def cfg(tmp_path):
    return parse_config(
        {"paths": {"inbox": ".", "outbox": ".", "errors": ".", "done": None},
         "batch": {"size": 2}, "pipeline": {"workers": 1, "max_in_flight": 5}},
        tmp_path,
    )


@pytest.fixture
def exits(monkeypatch):
    def fake_exit(code: int) -> None:
        raise Exited(code)

    monkeypatch.setattr(lifecycle.os, "_exit", fake_exit)


def test_regression_run_and_process_share_one_lifecycle():
    # Issue 13: `rmbgd run` and `rmbgd process` each counted signals, logged `ready`, held
    # an in-flight limit and drained in their own copy of the code.
    for command in (Daemon, Runner):
        assert issubclass(command, Lifecycle)
        for shared in ("_on_signal", "_check_forced", "_while_loading", "_drain", "_has_room", "_log_starting"):
            assert getattr(command, shared) is getattr(Lifecycle, shared), (command, shared)


def test_phases_in_order_and_ready_carries_the_model(cfg):
    log = Log()
    toy = Toy(cfg, log)
    toy.pipeline.release.set()
    assert toy.run() == EXIT_OK
    assert toy.phases == ["starting", "load", "open", "main loop", "drain"]
    (ready,) = [fields for _level, event, fields in log.records if event == "ready"]
    assert (ready["device"], ready["dtype"], ready["batch_size"], ready["workers"]) == ("cpu", "float32", 2, 1)
    assert toy.pipeline.stopped


def test_second_signal_during_the_drain_exits_at_once_with_130(cfg, exits):
    log = Log()

    def second_signal(toy: Toy) -> None:
        toy._on_signal(signal.SIGINT, None)

    toy = Toy(cfg, log, on_drain_tick=second_signal)
    with pytest.raises(Exited) as exited:
        toy.run()
    assert exited.value.code == EXIT_FORCED == 130
    level, event, fields = log.records[-1]
    assert (level, event) == ("warning", "stopped")
    assert fields["forced"] is True and fields["reason"] == "second signal, stopping at once"
    assert {"processed", "failed", "in_flight"} <= set(fields)


def test_a_stop_while_the_model_loads_ends_the_run_before_anything_opens(cfg, exits):
    log = Log()
    loaded = threading.Event()
    toy = Toy(cfg, log, load=lambda: loaded.wait(30))
    toy._load_model = lambda: toy._watched(lambda: loaded.wait(30))  # loads until released
    threading.Timer(0.05, toy._on_signal, (signal.SIGTERM, None)).start()
    try:
        with pytest.raises(Exited) as exited:
            toy.run()
    finally:
        loaded.set()
    assert exited.value.code == EXIT_OK
    assert toy.phases == ["starting", "stopped during startup"]
    assert "ready" not in log.events()


def test_drain_gives_up_after_its_timeout(cfg):
    toy = Toy(cfg, Log())
    assert toy._drain(toy.pipeline, timeout=0.0) is False
    toy.pipeline.release.set()
    assert toy._drain(toy.pipeline, timeout=0.0) is True


def test_in_flight_limit_holds_a_batch_and_parked_files_give_their_slot_back(cfg, tmp_path):
    assert in_flight_limit(cfg) == 5
    small = parse_config(
        {"paths": {"inbox": ".", "outbox": ".", "errors": ".", "done": None},
         "batch": {"size": 8}, "pipeline": {"workers": 1, "max_in_flight": 3}},
        tmp_path,
    )
    assert in_flight_limit(small) == 8, "a batch must be able to fill"
    toy = Toy(cfg, Log())
    for _ in range(5):
        toy._counters.started()
    assert not toy._has_room()
    toy._counters.park()
    assert toy._has_room()
