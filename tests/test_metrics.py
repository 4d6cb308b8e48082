"""The Prometheus endpoint on a loopback port, scraped over real HTTP."""

from __future__ import annotations

import socket
import subprocess
import sys
import types
import urllib.request

import pytest
import yaml

from rmbgd.ops import metrics
from rmbgd.config import parse_config
from tests.support.daemon import REPO

pytest.importorskip("prometheus_client")


def scrape(port: int) -> dict[str, float]:
    text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10).read().decode()
    samples = {}
    for line in text.splitlines():
        if line and not line.startswith("#"):
            name, _, value = line.rpartition(" ")
            samples[name] = float(value)
    return samples


@pytest.fixture
def live():
    m = metrics.start(0, "127.0.0.1")
    yield m
    m.close()


def test_counters_histograms_and_gauges(live):
    assert live.port and live.port > 0
    for _ in range(3):
        live.file_done()
    live.file_failed("decode")
    live.file_failed(None)
    live.batch_done(4, 120.0)
    live.batch_done(8, 900.0)
    live.set_queue(17)
    live.set_in_flight(5)
    live.set_info(model="ZhengPeng7/BiRefNet", device="cuda:0")
    s = scrape(live.port)
    assert s["rmbgd_files_processed_total"] == 3
    assert s['rmbgd_files_failed_total{stage="decode"}'] == 1
    assert s['rmbgd_files_failed_total{stage="unknown"}'] == 1
    # Every known stage exists from the start, so rate() works before the first failure.
    assert s['rmbgd_files_failed_total{stage="inference"}'] == 0
    assert s["rmbgd_batch_duration_seconds_count"] == 2
    assert s["rmbgd_batch_duration_seconds_sum"] == pytest.approx(1.02)
    assert s['rmbgd_batch_duration_seconds_bucket{le="0.25"}'] == 1
    assert s["rmbgd_batch_size_sum"] == 12
    assert s["rmbgd_queue_depth"] == 17
    assert s["rmbgd_in_flight"] == 5
    assert any(k.startswith("rmbgd_info{") and 'model="ZhengPeng7/BiRefNet"' in k for k in s)
    # The usual process metrics come along; nothing of prometheus-client's global registry.
    assert "process_resident_memory_bytes" in s


def test_no_gpu_memory_without_cuda(live, monkeypatch):
    monkeypatch.delitem(sys.modules, "torch", raising=False)
    assert not any(k.startswith("rmbgd_gpu_memory") for k in scrape(live.port))


def fake_torch(initialized: bool = True, fail: bool = False) -> types.ModuleType:
    def mem_get_info(index):
        if fail:
            raise RuntimeError("CUDA error: an illegal memory access was encountered")
        return (1000 + index, 8000)

    cuda = types.SimpleNamespace(
        is_available=lambda: True,
        is_initialized=lambda: initialized,
        device_count=lambda: 2,
        mem_get_info=mem_get_info,
        memory_allocated=lambda index: 100 * (index + 1),
        memory_reserved=lambda index: 200 * (index + 1),
    )
    return types.SimpleNamespace(cuda=cuda)


def test_gpu_memory_per_device_once_cuda_is_up(live, monkeypatch):
    monkeypatch.setitem(sys.modules, "torch", fake_torch())
    s = scrape(live.port)
    assert s['rmbgd_gpu_memory_allocated_bytes{device="cuda:1"}'] == 200
    assert s['rmbgd_gpu_memory_reserved_bytes{device="cuda:0"}'] == 200
    assert s['rmbgd_gpu_memory_free_bytes{device="cuda:1"}'] == 1001
    assert s['rmbgd_gpu_memory_total_bytes{device="cuda:0"}'] == 8000


def test_a_scrape_never_initialises_cuda_itself(live, monkeypatch):
    monkeypatch.setitem(sys.modules, "torch", fake_torch(initialized=False))
    assert not any(k.startswith("rmbgd_gpu_memory") for k in scrape(live.port))


def test_a_gpu_error_does_not_break_the_scrape(live, monkeypatch):
    monkeypatch.setitem(sys.modules, "torch", fake_torch(fail=True))
    live.file_done()
    s = scrape(live.port)
    assert s["rmbgd_files_processed_total"] == 1
    assert not any(k.startswith("rmbgd_gpu_memory") for k in s)


def test_a_taken_port_is_a_clear_startup_error(live):
    with pytest.raises(metrics.MetricsUnavailable) as info:
        metrics.start(live.port, "127.0.0.1")
    assert str(info.value).startswith(f"metrics.port: cannot listen on 127.0.0.1:{live.port}: ")


def test_missing_package_is_a_clear_startup_error(monkeypatch):
    monkeypatch.setitem(sys.modules, "prometheus_client", None)
    with pytest.raises(metrics.MetricsUnavailable) as info:
        metrics.start(0)
    assert str(info.value) == (
        "metrics.port: the prometheus-client package is not installed; "
        "pip install 'rmbgd[metrics]' (or set metrics.port: null)"
    )


def test_close_frees_the_port():
    m = metrics.start(0)
    port = m.port
    m.close()
    with socket.socket() as s:
        s.bind(("127.0.0.1", port))


def config(tmp_path, **sections):
    data = {"paths": {"inbox": "in", "outbox": "out", "errors": "err", "done": None}, **sections}
    return parse_config(data, tmp_path)


def test_off_by_default_and_never_imported(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "prometheus_client", None)
    m = metrics.from_config(config(tmp_path))
    assert isinstance(m, metrics.NullMetrics) and m.port is None
    m.file_done()
    m.file_failed("decode")
    m.batch_done(3, 10.0)
    m.set_queue(2)
    m.set_in_flight(1)
    m.set_info(model="x")
    m.close()
    assert metrics.problems(config(tmp_path)) == []


def test_from_config_starts_the_endpoint(tmp_path):
    m = metrics.from_config(config(tmp_path, metrics={"port": 0, "address": "127.0.0.1"}))
    try:
        assert isinstance(m, metrics.Metrics)
        assert "rmbgd_queue_depth" in scrape(m.port)
    finally:
        m.close()


def test_check_reports_a_missing_package(tmp_path, monkeypatch):
    cfg = config(tmp_path, metrics={"port": 9464})
    assert metrics.problems(cfg) == []
    monkeypatch.setattr(metrics.importlib.util, "find_spec", lambda name: None)
    assert metrics.problems(cfg) == [
        "metrics.port: the prometheus-client package is not installed; "
        "pip install 'rmbgd[metrics]' (or set metrics.port: null)"
    ]


def test_check_command_passes_with_metrics_configured(tmp_path):
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump({
        "paths": {"inbox": str(tmp_path / "in"), "outbox": str(tmp_path / "out"),
                  "errors": str(tmp_path / "err"), "done": None},
        "metrics": {"port": 9464},
    }))
    result = subprocess.run(
        [sys.executable, "-m", "rmbgd", "check", "--config", str(path)],
        capture_output=True, text=True, timeout=120, cwd=str(REPO),
    )
    assert result.returncode == 0, result.stderr
