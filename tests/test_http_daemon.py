"""The HTTP API served by a real (in-process) daemon: requests go through the daemon's own
pipeline, next to the inbox's files. Network only to 127.0.0.1 servers the tests start."""

from __future__ import annotations

import http.server
import io
import json
import threading
from pathlib import Path

import httpx
import numpy as np
import pytest
from PIL import Image

from tests.support.inprocess import FakeSegmenter, inprocess  # noqa: F401 (a fixture)
from tests.support.photos import BLUE, RED, check_output, pattern, save

RGB = pattern(64, 48, (0.25, 0.25, 0.75, 0.75))


def encoded(rgb: np.ndarray = RGB, fmt: str = "PNG") -> bytes:
    out = io.BytesIO()
    Image.fromarray(rgb).save(out, format=fmt)
    return out.getvalue()


def coloured(colour: tuple) -> np.ndarray:
    """RGB marked by its top-left pixel's colour (what FakeSegmenter records per model call)."""
    rgb = RGB.copy()
    rgb[0, 0] = colour
    return rgb


class Api:
    """An in-process daemon with the HTTP API on a free 127.0.0.1 port, and a client for it."""

    def __init__(self, daemon) -> None:
        self.daemon = daemon
        listening = daemon.wait_for("http_listening")
        self.url = f"http://127.0.0.1:{listening['port']}"
        self.client = httpx.Client(base_url=self.url, timeout=30, trust_env=False)

    def close(self) -> None:
        self.client.close()


@pytest.fixture
def api(inprocess):
    made = []

    def start(segmenter=None, **sections):
        http = {"port": 0, **sections.pop("http", {})}
        made.append(Api(inprocess.start(segmenter=segmenter, http=http, **sections)))
        return made[-1]

    yield start
    for one in made:
        one.close()


def error_of(response) -> str:
    assert response.headers["content-type"].startswith("application/json"), response.headers
    return response.json()["error"]


def result_png(tmp_path: Path, response, name: str = "result.png") -> Path:
    assert response.status_code == 200, response.text
    assert response.headers["content-type"] == "image/png"
    path = tmp_path / name
    path.write_bytes(response.content)
    return path


# --------------------------------------------------------------------------- /v1/remove


def test_remove_takes_a_raw_body_and_answers_the_cut_out(api, tmp_path):
    server = api()
    response = server.client.post("/v1/remove", content=encoded(), headers={"content-type": "image/png"})
    check_output(result_png(tmp_path, response), RGB)
    assert server.client.get("/healthz").json() == {"status": "ready"}
    # Nothing of the request is left in the folders.
    cfg = server.daemon.cfg
    assert [p for p in cfg.paths.outbox.rglob("*") if p.is_file()] == []
    assert list(cfg.paths.errors.rglob("*")) == []
    assert server.daemon.crashes() == []
