"""The HTTP API's routes against a fake backend, through a real uvicorn server on 127.0.0.1."""

from __future__ import annotations

import json
import socket
import threading
import time
from concurrent.futures import Future

import httpx
import pytest
import uvicorn

from rmbgd.api.app import MAX_BATCH_URLS, READY, STARTING, STOPPING, ApiError, ApiSettings, Result, create_app
from rmbgd.api.auth import Token
from tests.support.fileserver import serve_files

PNG = b"\x89PNG\r\n\x1a\n" + b"\0" * 32
JPEG = b"\xff\xd8\xff\xe0" + b"\0" * 32


class FakeBackend:
    """Answers at once: images (PNG or JPEG magic) come back as `cut:<first bytes>`; anything
    else fails with 422. `hold` keeps remove's futures pending until released."""

    def __init__(self) -> None:
        self.current = READY
        self.hold = False
        self.overloaded = False
        self.pending: list[Future] = []
        self.published: list[tuple] = []

    def state(self):
        return self.current

    def options(self, params):
        fmt = params.get("format", "png")
        if fmt not in ("png", "webp", "jpeg"):
            raise ApiError(400, f"format: must be one of png, webp, jpeg, got '{fmt}'")
        return {"format": fmt}

    def _answer(self, data, value):
        future: Future = Future()
        if not data.startswith((PNG[:8], JPEG[:3])):
            future.set_exception(ApiError(422, "not an image: unsupported or unrecognised image format"))
        elif self.hold:
            self.pending.append(future)
        else:
            future.set_result(value)
        return future

    def remove(self, data, options):
        if self.overloaded:
            raise ApiError(503, "too many requests in flight", retry_after=1)
        return self._answer(data, Result(b"cut:" + data[:4], f"image/{options['format']}"))

    def publish(self, data, options, batch_id, index, url):
        self.published.append((batch_id, index, url))
        return self._answer(data, f"http/{batch_id}/{index}.png")


class Log:
    def __init__(self):
        self.events = []
        self._lock = threading.Lock()

    def info(self, event, **fields):
        with self._lock:
            self.events.append((event, fields))

    debug = info


class Served:
    def __init__(self, backend, settings):
        self.log = Log()
        self.app = create_app(backend, settings, self.log)
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.url = f"http://127.0.0.1:{self.sock.getsockname()[1]}"
        self.server = uvicorn.Server(uvicorn.Config(self.app, log_config=None, lifespan="off"))
        self.thread = threading.Thread(target=self.server.run, kwargs={"sockets": [self.sock]}, daemon=True)
        self.thread.start()
        deadline = time.monotonic() + 30
        while not self.server.started:
            if time.monotonic() > deadline or not self.thread.is_alive():
                raise RuntimeError("uvicorn did not start")
            time.sleep(0.01)
        self.client = httpx.Client(base_url=self.url, timeout=30, trust_env=False)

    def stop(self):
        self.client.close()
        self.server.should_exit = True
        self.thread.join(30)
        self.sock.close()


@pytest.fixture
def backend():
    return FakeBackend()


@pytest.fixture
def serve():
    made = []

    def start(backend, **settings):
        settings.setdefault("max_body_bytes", 10_000)
        made.append(Served(backend, ApiSettings(**settings)))
        return made[-1]

    yield start
    for served in made:
        served.stop()


@pytest.fixture
def files():
    """A file server on 127.0.0.1 for URL inputs: /a.png, /a.jpg; anything else 404."""
    with serve_files({"/a.png": PNG, "/a.jpg": JPEG, "/text": b"hello"}) as url:
        yield url


def error_of(response):
    assert response.headers["content-type"].startswith("application/json")
    return response.json()["error"]


@pytest.mark.parametrize("state, status", [(READY, 200), (STARTING, 503), (STOPPING, 503)])
def test_healthz_reflects_the_daemons_state(serve, backend, state, status):
    backend.current = state
    response = serve(backend).client.get("/healthz")
    assert (response.status_code, response.json()) == (status, {"status": state})


def test_remove_takes_the_raw_body(serve, backend):
    response = serve(backend).client.post("/v1/remove", content=PNG, headers={"content-type": "image/png"})
    assert response.status_code == 200
    assert response.content == b"cut:" + PNG[:4] and response.headers["content-type"] == "image/png"


def test_remove_takes_a_multipart_file(serve, backend):
    response = serve(backend).client.post("/v1/remove?format=webp", files={"file": ("a.jpg", JPEG, "image/jpeg")})
    assert response.status_code == 200
    assert response.content == b"cut:" + JPEG[:4] and response.headers["content-type"] == "image/webp"


def test_multipart_without_a_file_field(serve, backend):
    response = serve(backend).client.post("/v1/remove", files={"photo": ("a.jpg", JPEG, "image/jpeg")})
    assert response.status_code == 400 and error_of(response).startswith("file:")


def test_remove_fetches_a_json_url(serve, backend, files):
    served = serve(backend, allow_private_urls=True)  # the file server is on loopback
    response = served.client.post("/v1/remove", json={"url": f"{files}/a.jpg"})
    assert response.status_code == 200 and response.content == b"cut:" + JPEG[:4]


def test_a_url_to_a_private_address_is_refused(serve, backend, files):
    response = serve(backend).client.post("/v1/remove", json={"url": f"{files}/a.jpg"})
    assert response.status_code == 403 and "loopback" in error_of(response)


def test_a_url_that_cannot_be_fetched_is_a_bad_gateway(serve, backend, files):
    response = serve(backend, allow_private_urls=True).client.post("/v1/remove", json={"url": f"{files}/missing"})
    assert response.status_code == 502 and "HTTP 404" in error_of(response)


@pytest.mark.parametrize(
    "kwargs, status, problem",
    [
        ({"content": b"", "headers": {"content-type": "image/png"}}, 400, "has no image"),
        ({"content": b"{nope", "headers": {"content-type": "application/json"}}, 400, "not valid JSON"),
        ({"json": {"link": "x"}}, 400, "url: required"),
        ({"json": {"url": "ftp://example.com/a.png"}}, 400, "only http and https"),
        ({"content": b"plain text", "headers": {"content-type": "text/plain"}}, 422, "not an image"),
    ],
)
def test_remove_errors(serve, backend, kwargs, status, problem):
    response = serve(backend).client.post("/v1/remove", **kwargs)
    assert response.status_code == status and problem in error_of(response)


def test_a_bad_option_is_a_400_naming_it(serve, backend):
    response = serve(backend).client.post("/v1/remove?format=gif", content=PNG)
    assert response.status_code == 400 and error_of(response).startswith("format:")


def test_a_declared_body_over_the_limit_is_refused(serve, backend):
    response = serve(backend, max_body_bytes=100).client.post("/v1/remove", content=PNG * 10)
    assert response.status_code == 413 and "http.max_body_mb" in error_of(response)


def test_a_streamed_body_over_the_limit_is_refused_while_streaming(serve, backend):
    sent = []

    def chunks():
        for _ in range(1000):
            sent.append(1)
            yield b"x" * 1000

    response = serve(backend, max_body_bytes=5000).client.post("/v1/remove", content=chunks())
    assert response.status_code == 413


def test_token_is_required_except_for_healthz(serve, backend):
    served = serve(backend, token=Token(b"s3cr3t"))
    assert served.client.get("/healthz").status_code == 200
    missing = served.client.post("/v1/remove", content=PNG)
    wrong = served.client.post("/v1/remove", content=PNG, headers={"authorization": "Bearer nope"})
    right = served.client.post("/v1/remove", content=PNG, headers={"authorization": "Bearer s3cr3t"})
    assert (missing.status_code, wrong.status_code, right.status_code) == (401, 401, 200)
    assert "Bearer" in error_of(missing)


@pytest.mark.parametrize("state, retry_after", [(STARTING, "5"), (STOPPING, None)])
def test_not_ready_is_503(serve, backend, state, retry_after):
    backend.current = state
    response = serve(backend).client.post("/v1/remove", content=PNG)
    assert response.status_code == 503 and state in error_of(response)
    assert response.headers.get("retry-after") == retry_after


def test_overloaded_is_503_with_retry_after(serve, backend):
    backend.overloaded = True
    response = serve(backend).client.post("/v1/remove", content=PNG)
    assert response.status_code == 503 and response.headers["retry-after"] == "1"


def test_a_client_that_goes_away_has_its_job_cancelled(serve, backend):
    backend.hold = True
    served = serve(backend)
    with pytest.raises(httpx.ReadTimeout):
        served.client.post("/v1/remove", content=PNG, timeout=httpx.Timeout(10.0, read=0.5))
    deadline = time.monotonic() + 30
    while not (backend.pending and backend.pending[0].cancelled()):
        assert time.monotonic() < deadline, "the held job was never cancelled"
        time.sleep(0.02)


def test_batch_streams_one_line_per_url_then_a_summary(serve, backend, files):
    served = serve(backend, allow_private_urls=True)
    urls = [f"{files}/a.png", f"{files}/missing", f"{files}/a.jpg", f"{files}/text"]
    with served.client.stream("POST", "/v1/batch", json={"urls": urls}) as response:
        assert response.status_code == 200
        assert response.headers["content-type"].startswith("application/x-ndjson")
        lines = [json.loads(line) for line in response.iter_lines() if line]
    *results, summary = lines
    assert summary["event"] == "summary" and (summary["processed"], summary["failed"]) == (2, 2)
    by_index = {line["index"]: line for line in results}
    assert sorted(by_index) == [0, 1, 2, 3]
    assert [by_index[i]["url"] for i in range(4)] == urls
    assert by_index[0]["status"] == "done" and by_index[0]["output"] == f"http/{summary['batch']}/0.png"
    assert by_index[1]["status"] == "failed" and "HTTP 404" in by_index[1]["error"]
    assert by_index[3]["status"] == "failed" and "not an image" in by_index[3]["error"]


@pytest.mark.parametrize("document", [{"urls": []}, {"urls": "http://x"}, {"urls": [1]}, {"urls": ["http://x"] * (MAX_BATCH_URLS + 1)}])
def test_batch_needs_a_list_of_urls(serve, backend, document):
    response = serve(backend, max_body_bytes=1_000_000).client.post("/v1/batch", json=document)
    assert response.status_code == 400 and error_of(response).startswith("urls:")


def test_each_request_is_logged(serve, backend):
    served = serve(backend)
    served.client.post("/v1/remove", content=PNG)
    served.client.post("/v1/remove", content=b"")
    deadline = time.monotonic() + 10
    while len([e for e in served.log.events if e[0] == "http_request"]) < 2:
        assert time.monotonic() < deadline
        time.sleep(0.01)
    (_, ok), (_, bad) = [e for e in served.log.events if e[0] == "http_request"][:2]
    assert (ok["method"], ok["path"], ok["status"], ok["bytes"], ok["client"]) == ("POST", "/v1/remove", 200, 8, "127.0.0.1")
    assert bad["status"] == 400 and bad["ms"] >= 0


def test_openapi_docs_are_served(serve, backend):
    served = serve(backend)
    assert served.client.get("/docs").status_code == 200
    paths = served.client.get("/openapi.json").json()["paths"]
    assert {"/healthz", "/v1/remove", "/v1/batch"} <= set(paths)
