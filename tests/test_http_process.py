"""The HTTP API in a real `rmbgd run` process with the tiny model: SIGTERM with a request in
flight, metrics, and `rmbgd status`. Network only to the daemon's own 127.0.0.1 port."""

from __future__ import annotations

import io
import re
import signal
import subprocess
import sys
import threading

import httpx
import numpy as np
import pytest
from PIL import Image

from tests.support.daemon import REPO, wait_until
from tests.support.photos import check_output, pattern
from tests.support.tinymodel import build_tiny_model

RGB = pattern(64, 48, (0.25, 0.25, 0.75, 0.75))


def png(rgb: np.ndarray = RGB) -> bytes:
    out = io.BytesIO()
    Image.fromarray(rgb).save(out, format="PNG")
    return out.getvalue()


@pytest.fixture(scope="module")
def held_model(tmp_path_factory):
    """The tiny model with 3 s of simulated accelerator time per call: a request is still in
    the model while the test reads the metrics and signals the daemon."""
    return build_tiny_model(tmp_path_factory.mktemp("held-model"), delay_ms_per_call=3000.0)


def test_sigterm_lets_the_request_in_flight_finish_and_refuses_new_ones(daemons, held_model, tmp_path):
    config = daemons.config(model={"name": str(held_model)}, batch={"size": 1}, logging={"level": "debug"},
                            http={"port": 0}, metrics={"port": 0})
    daemon = daemons.start(config)
    metrics_url = f"http://127.0.0.1:{daemon.events('metrics_listening')[0]['port']}/metrics"
    url = f"http://127.0.0.1:{daemon.events('http_listening')[0]['port']}"
    client = httpx.Client(base_url=url, timeout=60, trust_env=False)
    assert client.get("/healthz").json() == {"status": "ready"}
    box: dict = {}

    def send():
        with httpx.Client(base_url=url, timeout=60, trust_env=False) as own:
            box["response"] = own.post("/v1/remove", content=png())

    thread = threading.Thread(target=send, daemon=True)
    thread.start()
    daemon.wait_for("batch_started")  # the request is in the model (for 3 s)
    # The gauge follows the main loop's tick, a moment after the model took the request.
    seen: dict = {}

    def in_flight_shown() -> bool:
        seen["metrics"] = httpx.get(metrics_url, timeout=30, trust_env=False).text
        return re.search(r"^rmbgd_http_in_flight 1\.0$", seen["metrics"], re.M) is not None

    wait_until(in_flight_shown, [daemon], timeout=2.5, what="rmbgd_http_in_flight 1.0")
    metrics = seen["metrics"]
    assert re.search(r'^rmbgd_http_requests_total\{status="200"\} 1\.0$', metrics, re.M), metrics

    daemon.signal(signal.SIGTERM)
    daemon.wait_for("stopping")
    health = client.get("/healthz")
    assert (health.status_code, health.json()) == (503, {"status": "stopping"})
    refused = client.post("/v1/remove", content=png())
    assert refused.status_code == 503
    thread.join(60)
    response = box["response"]
    assert response.status_code == 200
    out = tmp_path / "result.png"
    out.write_bytes(response.content)
    check_output(out, RGB)
    assert daemon.wait_exit(60) == 0
    client.close()
    events = [r["event"] for r in daemon.records]
    assert events.index("http_listening") < events.index("ready") < events.index("stopping") < events.index("stopped")
    statuses = sorted(r["status"] for r in daemon.events("http_request"))
    assert statuses == [200, 200, 503, 503]
    assert daemon.stderr_lines == [] and daemon.non_json == []

    # `rmbgd status` shows what the HTTP side did.
    result = subprocess.run([sys.executable, "-m", "rmbgd", "status", "--config", str(config)],
                            capture_output=True, text=True, timeout=120, cwd=str(REPO))
    http_line = [line for line in result.stdout.splitlines() if line.strip().startswith("http:")]
    assert http_line, result.stdout
    assert "4 requests (200: 2, 503: 2), 1 images done, 0 failed" in http_line[0]
