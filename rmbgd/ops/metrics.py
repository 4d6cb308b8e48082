"""Prometheus metrics on `metrics.port`, through the optional prometheus-client package.

Off by default; with `metrics.port: null` the package is never imported, so it is an extra
(`pip install 'rmbgd[metrics]'`), not a dependency. The daemon gets a `NullMetrics` then and
calls the same methods, so no call site needs an `if`.

Every metric lives in a registry of its own rather than prometheus-client's global one, so
the endpoint shows exactly rmbgd's metrics plus the usual process ones, and tests can start
several servers in one process.
"""

from __future__ import annotations

import importlib.util
import sys
from typing import Any, Iterable, List, Optional

from rmbgd import __version__

INSTALL_HINT = "pip install 'rmbgd[metrics]' (or set metrics.port: null)"
# The stages of a file_failed event; listed up front so each series exists (at 0) before the
# first failure, and rate() over it works from the start.
FAILURE_STAGES = ("detect", "decode", "inference", "encode", "write", "retire")
# A batch takes tens of milliseconds on a large GPU and up to minutes on a CPU.
BATCH_SECONDS_BUCKETS = (0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0)
BATCH_SIZE_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 1024)
# An HTTP request: a few milliseconds (an error) to a model call and more behind a queue.
HTTP_SECONDS_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)


class MetricsUnavailable(Exception):
    """One line saying why the metrics endpoint cannot start, naming the config key."""


def problems(cfg: Any) -> List[str]:
    """What `rmbgd check` reports about the metrics settings, without importing anything."""
    if cfg.metrics.port is None:
        return []
    if importlib.util.find_spec("prometheus_client") is None:
        return [f"metrics.port: the prometheus-client package is not installed; {INSTALL_HINT}"]
    return []


class NullMetrics:
    """What the daemon holds when metrics are off: every method does nothing."""

    port: Optional[int] = None

    def file_done(self) -> None:
        return None

    def file_failed(self, stage: Optional[str] = None) -> None:
        return None

    def batch_done(self, size: int, ms: float) -> None:
        return None

    def set_queue(self, n: int) -> None:
        return None

    def set_in_flight(self, n: int) -> None:
        return None

    def http_request(self, status: int, seconds: float) -> None:
        return None

    def set_http_in_flight(self, n: int) -> None:
        return None

    def set_info(self, **labels: Any) -> None:
        return None

    def close(self) -> None:
        return None


class Metrics(NullMetrics):
    """The live metrics and their HTTP endpoint (a daemon thread of prometheus-client's)."""

    def __init__(self, prom: Any, registry: Any) -> None:
        self._registry = registry
        self._server: Any = None
        self._thread: Any = None
        self.files_done = prom.Counter(
            "rmbgd_files_processed", "Inputs written to the outbox.", registry=registry
        )
        self.files_failed = prom.Counter(
            "rmbgd_files_failed", "Inputs moved to the errors folder, by stage.", ["stage"], registry=registry
        )
        for stage in FAILURE_STAGES:
            self.files_failed.labels(stage=stage)
        self.batch_seconds = prom.Histogram(
            "rmbgd_batch_duration_seconds",
            "Time of one model call (a batch).",
            buckets=BATCH_SECONDS_BUCKETS,
            registry=registry,
        )
        self.batch_size = prom.Histogram(
            "rmbgd_batch_size", "Images in one model call.", buckets=BATCH_SIZE_BUCKETS, registry=registry
        )
        self.queue = prom.Gauge(
            "rmbgd_queue_depth", "Complete files in the inbox waiting to be claimed.", registry=registry
        )
        self.in_flight = prom.Gauge(
            "rmbgd_in_flight", "Files claimed and not finished yet.", registry=registry
        )
        self.http_requests = prom.Counter(
            "rmbgd_http_requests", "HTTP API requests answered, by status code.", ["status"], registry=registry
        )
        self.http_seconds = prom.Histogram(
            "rmbgd_http_request_duration_seconds", "Time from an HTTP request's arrival to its answer.",
            buckets=HTTP_SECONDS_BUCKETS, registry=registry,
        )
        self.http_in_flight = prom.Gauge(
            "rmbgd_http_in_flight", "Images of HTTP requests admitted and not answered yet.", registry=registry
        )
        self.info = prom.Info("rmbgd", "Version, model and device.", registry=registry)
        self.info.info({"version": __version__})
        registry.register(_GpuMemoryCollector(prom))

    def file_done(self) -> None:
        self.files_done.inc()

    def file_failed(self, stage: Optional[str] = None) -> None:
        self.files_failed.labels(stage=stage or "unknown").inc()

    def batch_done(self, size: int, ms: float) -> None:
        self.batch_size.observe(size)
        self.batch_seconds.observe(ms / 1000.0)

    def set_queue(self, n: int) -> None:
        self.queue.set(n)

    def set_in_flight(self, n: int) -> None:
        self.in_flight.set(n)

    def http_request(self, status: int, seconds: float) -> None:
        self.http_requests.labels(status=str(status)).inc()
        self.http_seconds.observe(seconds)

    def set_http_in_flight(self, n: int) -> None:
        self.http_in_flight.set(n)

    def set_info(self, **labels: Any) -> None:
        """e.g. set_info(model=..., device=...), once the model is loaded."""
        self.info.info({"version": __version__, **{k: str(v) for k, v in labels.items()}})

    def close(self) -> None:
        if self._server is not None:
            server, self._server = self._server, None
            server.shutdown()
            server.server_close()
            self._thread.join(5)


class _GpuMemoryCollector:
    """GPU memory per device, read from torch at scrape time.

    Only when the daemon itself has already imported torch and initialised CUDA: a scrape
    must neither pay for importing torch nor create a CUDA context of its own.
    """

    def __init__(self, prom: Any) -> None:
        self._family = prom.core.GaugeMetricFamily

    def describe(self) -> Iterable[Any]:
        # Nothing to describe up front: the devices are only known once CUDA is up.
        return []

    def collect(self) -> Iterable[Any]:
        torch = sys.modules.get("torch")
        if torch is None or not torch.cuda.is_available() or not torch.cuda.is_initialized():
            return []
        families = {
            "allocated": self._family(
                "rmbgd_gpu_memory_allocated_bytes", "GPU memory held by tensors.", labels=["device"]
            ),
            "reserved": self._family(
                "rmbgd_gpu_memory_reserved_bytes", "GPU memory held by PyTorch's caching allocator.",
                labels=["device"],
            ),
            "free": self._family(
                "rmbgd_gpu_memory_free_bytes", "Free GPU memory (all processes).", labels=["device"]
            ),
            "total": self._family("rmbgd_gpu_memory_total_bytes", "GPU memory size.", labels=["device"]),
        }
        try:
            for index in range(torch.cuda.device_count()):
                device = f"cuda:{index}"
                free, total = torch.cuda.mem_get_info(index)
                families["allocated"].add_metric([device], torch.cuda.memory_allocated(index))
                families["reserved"].add_metric([device], torch.cuda.memory_reserved(index))
                families["free"].add_metric([device], free)
                families["total"].add_metric([device], total)
        except RuntimeError:
            # A GPU in trouble must not also break the scrape of every other metric; the
            # daemon's own watchdog deals with the GPU.
            return []
        return list(families.values())


def start(port: int, address: str = "127.0.0.1") -> Metrics:
    """Serve /metrics on address:port (0: any free port, see `.port`).

    Raises MetricsUnavailable with a one-line reason when prometheus-client is missing or
    the address cannot be bound, for the daemon to report as its startup failure.
    """
    try:
        import prometheus_client as prom
        import prometheus_client.core  # noqa: F401 - GaugeMetricFamily, for the GPU collector
    except ImportError:
        raise MetricsUnavailable(
            f"metrics.port: the prometheus-client package is not installed; {INSTALL_HINT}"
        ) from None
    registry = prom.CollectorRegistry(auto_describe=True)
    prom.ProcessCollector(registry=registry)
    prom.PlatformCollector(registry=registry)
    metrics = Metrics(prom, registry)
    try:
        server, thread = prom.start_http_server(port, addr=address, registry=registry)
    except OSError as exc:
        raise MetricsUnavailable(
            f"metrics.port: cannot listen on {address}:{port}: {exc.strerror or exc}"
        ) from None
    metrics._server, metrics._thread = server, thread
    metrics.port = server.server_port
    return metrics


def from_config(cfg: Any) -> NullMetrics:
    """Metrics for a Config: live when `metrics.port` is set, else a NullMetrics."""
    if cfg.metrics.port is None:
        return NullMetrics()
    return start(cfg.metrics.port, cfg.metrics.address)
