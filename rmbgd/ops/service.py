"""How the daemon shows itself to the machine around it: systemd notifications and the
watchdog, the status file `rmbgd status` reads, Prometheus metrics, and `progress` events.

The daemon reports phases and counts here; this module decides what goes where and how often,
so the main loop stays about files.
"""

from __future__ import annotations

import contextlib
import threading
import time
from typing import Any, Dict, Iterator, Optional

from rmbgd.ops import metrics as metrics_mod
from rmbgd.config import Config
from rmbgd.ops.notify import Notifier, Watchdog
from rmbgd.ops.statusfile import StatusWriter, default_state_dir

# While the model loads, ask systemd for this much more start time every EXTEND_EVERY seconds,
# so a slow first download or a big checkpoint never trips TimeoutStartSec.
EXTEND_USEC = 90_000_000
EXTEND_EVERY_SECONDS = 30.0


class Service:
    def __init__(self, cfg: Config, log: Any, instance: Optional[str] = None) -> None:
        self._log = log
        self.notifier = Notifier(log=log)
        self.watchdog = Watchdog(self.notifier)
        self.status = StatusWriter(default_state_dir(cfg), config=cfg.source, instance=instance, log=log)
        self.metrics: metrics_mod.NullMetrics = metrics_mod.NullMetrics()
        self._progress_every = cfg.logging.progress_seconds
        self._next_progress: Optional[float] = None

    # -- phases -----------------------------------------------------------------------------
    def starting(self, cfg: Config) -> None:
        """Raises metrics.MetricsUnavailable (a start-up error) when the endpoint cannot open."""
        self.status.set_state("starting")
        self.metrics = metrics_mod.from_config(cfg)
        if cfg.metrics.port is not None:
            self._log.info("metrics_listening", address=cfg.metrics.address, port=self.metrics.port)

    @contextlib.contextmanager
    def loading_model(self, name: str) -> Iterator[None]:
        self.status.set_state("loading", model=name)
        done = threading.Event()

        def keep_extending() -> None:
            while True:
                self.notifier.extend_timeout(EXTEND_USEC)
                if done.wait(EXTEND_EVERY_SECONDS):
                    return

        extender = None
        if self.notifier.enabled:
            extender = threading.Thread(target=keep_extending, name="rmbgd-extend-timeout", daemon=True)
            extender.start()
        try:
            yield
        finally:
            done.set()
            if extender is not None:
                extender.join(5)

    def ready(self, *, model: str, device: str, **fields: Any) -> None:
        self.status.set_state("ready", model=model, device=device, **fields)
        self.metrics.set_info(model=model, device=device)
        self.notifier.ready(self.status.summary())

    def reloading(self) -> None:
        self.notifier.reloading()
        self.status.set_state("reloading")

    def reloaded(self, progress_seconds: float) -> None:
        self._progress_every = progress_seconds
        self._next_progress = None
        self.status.set_state("ready")
        self.notifier.ready(self.status.summary())

    def stopping(self) -> None:
        self.notifier.stopping()
        self.status.set_state("stopping")

    def failed(self, error: str) -> None:
        """The start failed: `rmbgd status` and `systemctl status` show why."""
        self.status.fail(error)
        self.notifier.status(f"failed to start: {error}")
        self.metrics.close()
        self.notifier.close()

    def stopped(self, counts: Dict[str, int]) -> None:
        self.status.close(**counts)
        self.metrics.close()
        self.notifier.close()

    # -- work -------------------------------------------------------------------------------
    def file_done(self) -> None:
        self.metrics.file_done()

    def file_failed(self, input: Any, stage: str, error: str) -> None:
        self.metrics.file_failed(stage)
        self.status.record_error(input, stage, error)

    def batch_done(self, size: int, ms: float) -> None:
        self.metrics.batch_done(size, ms)

    def http_request(self, status: int, seconds: float) -> None:
        self.metrics.http_request(status, seconds)

    def http_tick(self, in_flight: int, counts: Dict[str, Any]) -> None:
        self.metrics.set_http_in_flight(in_flight)
        self.status.set_http(counts)

    def tick(self, *, processed: int, failed: int, queued: int, in_flight: int, healthy: bool) -> None:
        """Called every main-loop iteration; cheap unless something is due."""
        if self.status.tick(processed, failed, queued, in_flight):
            self.notifier.status(self.status.summary())
        self.metrics.set_queue(queued)
        self.metrics.set_in_flight(in_flight)
        self.watchdog.tick(healthy)
        self._progress(queued, in_flight)

    def _progress(self, queued: int, in_flight: int) -> None:
        if not self._progress_every:
            return
        now = time.monotonic()
        if queued + in_flight == 0:
            self._next_progress = None  # idle: the next burst starts a fresh period
            return
        if self._next_progress is None:
            self._next_progress = now + self._progress_every
            return
        if now < self._next_progress:
            return
        self._next_progress = now + self._progress_every
        snap = self.status.snapshot()
        self._log.info(
            "progress",
            processed=snap["processed"],
            failed=snap["failed"],
            queued=queued,
            in_flight=in_flight,
            images_per_s=snap["rate"],
            eta_s=snap["eta_seconds"],
        )
