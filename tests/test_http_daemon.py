"""The HTTP API served by a real (in-process) daemon: requests go through the daemon's own
pipeline, next to the inbox's files. Network only to 127.0.0.1 servers the tests start."""

from __future__ import annotations

import io
import json
import signal
import socket
import threading
from pathlib import Path

import httpx
import numpy as np
import pytest
from PIL import Image

from tests.support import inprocess as inprocess_module
from tests.support.inprocess import FakeSegmenter, inprocess  # noqa: F401 (a fixture)
from tests.support.fileserver import serve_files
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
        # A held model would keep the daemon's drain waiting (and a second stop forces an exit).
        getattr(one.daemon.segmenter, "release", lambda: None)()
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


def test_remove_takes_a_multipart_file(api, tmp_path):
    server = api()
    response = server.client.post("/v1/remove", files={"file": ("photo.jpg", encoded(fmt="PNG"), "image/png")})
    check_output(result_png(tmp_path, response), RGB)


@pytest.fixture
def files():
    """A file server on 127.0.0.1 for URL inputs: /a.png, /b.png; anything else 404."""
    served = {"/a.png": encoded(), "/b.png": encoded(coloured((200, 10, 10))), "/text": b"hello, not an image"}
    with serve_files(served, content_type="text/plain") as url:  # sniffed, not trusted
        yield url


def test_remove_fetches_a_json_url(api, files, tmp_path):
    server = api(http={"allow_private_urls": True})
    response = server.client.post("/v1/remove", json={"url": f"{files}/a.png"})
    check_output(result_png(tmp_path, response), RGB)


def test_a_url_to_a_private_address_is_refused_unless_allowed(api, files):
    server = api()
    response = server.client.post("/v1/remove", json={"url": f"{files}/a.png"})
    assert response.status_code == 403
    assert "loopback" in error_of(response)
    response = server.client.post("/v1/remove", json={"url": f"{files}/missing.png"})
    assert response.status_code == 403  # refused before any connection is made


def test_a_url_that_cannot_be_fetched_is_a_bad_gateway(api, files):
    server = api(http={"allow_private_urls": True})
    response = server.client.post("/v1/remove", json={"url": f"{files}/missing.png"})
    assert response.status_code == 502
    assert "404" in error_of(response)


def test_options_override_the_output_section(api):
    server = api()
    response = server.client.post("/v1/remove?format=webp", content=encoded())
    assert (response.status_code, response.headers["content-type"]) == (200, "image/webp")
    response = server.client.post("/v1/remove", params={"format": "jpeg", "background": "ffffff"}, content=encoded())
    assert (response.status_code, response.headers["content-type"]) == (200, "image/jpeg")
    with Image.open(io.BytesIO(response.content)) as im:
        assert (im.format, im.mode, im.size) == ("JPEG", "RGB", (64, 48))
    response = server.client.post("/v1/remove?mask=only", content=encoded())
    assert response.status_code == 200
    with Image.open(io.BytesIO(response.content)) as im:
        assert (im.format, im.mode, im.size) == ("PNG", "L", (64, 48))
    response = server.client.post("/v1/remove?max_size=32", content=encoded())
    with Image.open(io.BytesIO(response.content)) as im:
        assert im.size == (32, 24)


@pytest.mark.parametrize(
    "query, problem",
    [
        ("format=gif", "format: expected png, webp or jpeg, got 'gif'"),
        ("format=jpeg", "format: jpeg has no transparency: give a background"),
        ("background=red", "background: expected a colour"),
        ("mask=maybe", "mask: expected false, true or only, got 'maybe'"),
        ("max_size=0", "max_size: must be at least 1, got 0"),
        ("colour=red", "colour: unknown parameter"),
    ],
)
def test_a_bad_option_is_a_400_naming_the_parameter(api, query, problem):
    server = api()
    response = server.client.post(f"/v1/remove?{query}", content=encoded())
    assert response.status_code == 400
    assert error_of(response).startswith(problem)


def test_errors_are_json_and_leave_nothing_behind(api):
    server = api(input={"max_pixels": 2000}, http={"max_body_mb": 0.01})
    cases = [
        (dict(content=b"hello, not an image"), 422, "not a supported image"),
        (dict(content=encoded()), 422, "above input.max_pixels"),  # 64x48 = 3072 pixels
        (dict(content=b""), 400, "the request has no image"),
        (dict(content=b"x" * 20_000), 413, "http.max_body_mb"),
        (dict(json={"link": "x"}), 400, "url: required"),
        (dict(content=b"{", headers={"content-type": "application/json"}), 400, "not valid JSON"),
    ]
    for kwargs, status, problem in cases:
        response = server.client.post("/v1/remove", **kwargs)
        assert response.status_code == status, (kwargs, response.text)
        assert problem in error_of(response), (kwargs, response.text)
    assert server.client.get("/v1/nothing").status_code == 404
    cfg = server.daemon.cfg
    assert [p for p in cfg.paths.outbox.rglob("*") if p.is_file()] == []
    assert list(cfg.paths.errors.rglob("*")) == []
    # Logged once each answer is sent: the last one may still be on its way.
    logged = server.daemon.wait_count(["http_request"], len(cases) + 1)
    assert [r["status"] for r in logged] == [422, 422, 400, 413, 400, 400, 404]
    assert server.daemon.crashes() == []


def test_a_model_failure_is_a_500_and_goes_nowhere(api):
    failing = FakeSegmenter(fail_predict=lambda colours: RuntimeError("boom") if (9, 9, 9) in colours else None)
    server = api(segmenter=failing)
    response = server.client.post("/v1/remove", content=encoded(coloured((9, 9, 9))))
    assert response.status_code == 500
    assert error_of(response) == "inference failed: RuntimeError: boom"
    # The daemon goes on serving, and its folders hold nothing of the request.
    assert server.client.post("/v1/remove", content=encoded()).status_code == 200
    assert list(server.daemon.cfg.paths.errors.rglob("*")) == []
    assert server.daemon.events("file_failed") == []
    assert server.daemon.crashes() == []


def test_the_token_guards_everything_but_healthz(api, tmp_path):
    token = tmp_path / "token"
    token.write_text("s3cret-token\n")
    token.chmod(0o600)
    server = api(http={"token_file": str(token)})
    assert server.client.get("/healthz").status_code == 200
    response = server.client.post("/v1/remove", content=encoded())
    assert response.status_code == 401 and "Bearer" in error_of(response)
    response = server.client.post("/v1/remove", content=encoded(), headers={"authorization": "Bearer wrong"})
    assert response.status_code == 401
    response = server.client.post("/v1/batch", json={"urls": ["http://x/"]})
    assert response.status_code == 401
    response = server.client.post("/v1/remove", content=encoded(), headers={"authorization": "Bearer s3cret-token"})
    assert response.status_code == 200
    assert server.daemon.events("http_token_file_readable") == []


def test_a_shared_token_file_is_warned_about(api, tmp_path):
    token = tmp_path / "token"
    token.write_text("s3cret-token")
    token.chmod(0o644)
    server = api(http={"token_file": str(token)})
    (warning,) = server.daemon.events("http_token_file_readable")
    assert "chmod 600" in warning["warning"]


def test_batch_publishes_each_result_and_streams_a_line_per_url(api, files, tmp_path):
    server = api(http={"allow_private_urls": True})
    urls = [f"{files}/a.png", f"{files}/missing.png", f"{files}/b.png", f"{files}/text"]
    with server.client.stream("POST", "/v1/batch", json={"urls": urls}) as response:
        assert response.status_code == 200
        assert response.headers["content-type"].startswith("application/x-ndjson")
        lines = [json.loads(line) for line in response.iter_lines() if line]
    summary = lines.pop()
    assert summary["event"] == "summary"
    assert (summary["processed"], summary["failed"]) == (2, 2)
    by_index = {line["index"]: line for line in lines}
    assert sorted(by_index) == [0, 1, 2, 3]
    for index, line in by_index.items():
        assert line["url"] == urls[index]
    assert [by_index[i]["status"] for i in range(4)] == ["done", "failed", "done", "failed"]
    assert "404" in by_index[1]["error"]
    assert "not a supported image" in by_index[3]["error"]
    outbox = server.daemon.cfg.paths.outbox
    batch = summary["batch"]
    assert by_index[0]["output"] == f"http/{batch}/0.png"
    assert by_index[2]["output"] == f"http/{batch}/2.png"
    check_output(outbox / by_index[0]["output"], RGB)
    check_output(outbox / by_index[2]["output"], coloured((200, 10, 10)))
    # Atomic publishing leaves no temp files; failures go nowhere.
    assert sorted(p.name for p in (outbox / "http" / batch).iterdir()) == ["0.png", "2.png"]
    assert list(server.daemon.cfg.paths.errors.rglob("*")) == []


def test_a_batch_refuses_private_urls_line_by_line(api, files):
    server = api()
    response = server.client.post("/v1/batch", json={"urls": [f"{files}/a.png", "ftp://example.org/x.png"]})
    lines = [json.loads(line) for line in response.text.splitlines()]
    assert lines[-1] == {"event": "summary", "batch": lines[-1]["batch"], "processed": 0, "failed": 2}
    errors = {line["index"]: line["error"] for line in lines[:-1]}
    assert "loopback" in errors[0] and errors[1].startswith("url: ")
    assert [p for p in server.daemon.cfg.paths.outbox.rglob("*") if p.is_file()] == []


def test_a_batch_larger_than_the_pipeline_queues_instead_of_failing(api, files):
    # Requests of /v1/remove get 503 at once when the pipeline is full (busy_wait_seconds 0);
    # a batch's URLs wait their turn.
    server = api(batch={"size": 1}, pipeline={"max_in_flight": 1}, http={"allow_private_urls": True, "busy_wait_seconds": 0})
    urls = [f"{files}/a.png?{n}" for n in range(6)]
    response = server.client.post("/v1/batch", json={"urls": urls})
    lines = [json.loads(line) for line in response.text.splitlines()]
    assert lines[-1]["processed"] == 6, lines
    assert sorted(line["output"].rsplit("/", 1)[1] for line in lines[:-1]) == [f"{n}.png" for n in range(6)]


@pytest.mark.parametrize("document", [{"urls": []}, {"urls": "http://x/"}, {"urls": [1]}, {"url": "x"}])
def test_batch_needs_a_list_of_urls(api, document):
    response = api().client.post("/v1/batch", json=document)
    assert response.status_code == 400
    assert error_of(response).startswith("urls:")


# --------------------------------------------------------------------------- the shared queue


class Gated(FakeSegmenter):
    """A FakeSegmenter whose model calls wait for `release()`; `entered` counts calls started."""

    def __init__(self, **kwargs) -> None:
        self.gate = threading.Event()
        self.started = threading.Semaphore(0)
        super().__init__(fail_predict=self._hold, **kwargs)

    def _hold(self, colours):
        self.started.release()
        if not self.gate.wait(30):
            return RuntimeError("the test never released the model")
        return None

    def wait_call(self) -> None:
        assert self.started.acquire(timeout=30), "no model call started"

    def release(self) -> None:
        self.gate.set()


def post_in_background(server, **kwargs):
    """POST /v1/remove from a thread; returns (thread, box) where box gets the response."""
    box: dict = {}

    def send():
        try:
            with httpx.Client(base_url=server.url, timeout=60, trust_env=False) as client:
                box["response"] = client.post("/v1/remove", **kwargs)
        except httpx.HTTPError as exc:
            box["error"] = exc

    thread = threading.Thread(target=send, daemon=True)
    thread.start()
    return thread, box


def test_a_full_pipeline_answers_503_with_retry_after(api):
    model = Gated()
    server = api(segmenter=model, batch={"size": 1}, pipeline={"max_in_flight": 1},
                 http={"busy_wait_seconds": 0})
    thread, box = post_in_background(server, content=encoded())
    model.wait_call()
    response = server.client.post("/v1/remove", content=encoded())
    assert response.status_code == 503
    assert response.headers["retry-after"] == "1"
    assert "pipeline.max_in_flight" in error_of(response)
    model.release()
    thread.join(30)
    assert box["response"].status_code == 200


def test_a_request_waits_briefly_for_room_before_giving_up(api):
    model = Gated()
    server = api(segmenter=model, batch={"size": 1}, pipeline={"max_in_flight": 1},
                 http={"busy_wait_seconds": 20})
    first, first_box = post_in_background(server, content=encoded())
    model.wait_call()
    second, second_box = post_in_background(server, content=encoded())
    # The second one waits for the slot (and holds back the inbox meanwhile); freed, it runs.
    server.daemon.wait_until(lambda: server.daemon.daemon._http.held() == 2, what="a request waiting for room")
    model.release()
    first.join(30)
    second.join(30)
    assert first_box["response"].status_code == 200
    assert second_box["response"].status_code == 200


def test_a_client_that_goes_away_before_the_model_has_its_job_dropped(api):
    model = Gated()
    server = api(segmenter=model, batch={"size": 1})
    busy, busy_box = post_in_background(server, content=encoded(coloured((1, 2, 3))))
    model.wait_call()
    # This one waits behind the busy model; its client gives up.
    with pytest.raises(httpx.TimeoutException):
        with httpx.Client(base_url=server.url, timeout=0.5, trust_env=False) as client:
            client.post("/v1/remove", content=encoded(coloured((4, 5, 6))))
    server.daemon.wait_for("http_request", lambda r: r["status"] == 499)
    model.release()
    busy.join(30)
    assert busy_box["response"].status_code == 200
    server.daemon.wait_until(lambda: server.daemon.daemon._http.in_flight == 0, what="the dropped job answered")
    assert (4, 5, 6) not in [colour for batch in model.batches for colour in batch]
    assert model.batches == [[(1, 2, 3)]]


def test_requests_that_arrive_together_share_a_model_call(api):
    model = Gated()
    server = api(segmenter=model, batch={"size": 4, "max_wait_ms": 0})
    first, first_box = post_in_background(server, content=encoded(coloured((1, 1, 1))))
    model.wait_call()
    http = server.daemon.daemon._http
    others = [post_in_background(server, content=encoded(coloured((2, 2, n)))) for n in range(3)]
    server.daemon.wait_until(lambda: sum(1 for job in list(http._jobs.values()) if job.queued_at) == 4,
                             what="three requests waiting for the model")
    model.release()
    for thread, box in [(first, first_box), *others]:
        thread.join(30)
        assert box["response"].status_code == 200
    assert model.batches[0] == [(1, 1, 1)]
    assert sorted(model.batches[1]) == [(2, 2, 0), (2, 2, 1), (2, 2, 2)]
    assert [r["size"] for r in server.daemon.events("batch_done")] == [1, 3]


def solid(colour: tuple) -> np.ndarray:
    rgb = np.empty((48, 64, 3), np.uint8)
    rgb[:] = colour
    return rgb


@pytest.mark.parametrize("priority", ["interactive", "fair"])
def test_a_request_goes_ahead_of_an_inbox_backlog(api, priority):
    model = Gated()
    server = api(segmenter=model, batch={"size": 2, "max_wait_ms": 0}, pipeline={"max_in_flight": 50},
                 http={"priority": priority})
    inbox = server.daemon.cfg.paths.inbox
    backlog = 12
    for n in range(backlog):
        save(solid((10 + n, 100, 100)), inbox / f"{n:02d}.png")
    model.wait_call()  # the first batch holds the model; the rest of the backlog piles up behind it
    pipeline, http = server.daemon.daemon._pipeline, server.daemon.daemon._http

    def backlog_waiting():
        staged = pipeline._handoff._item
        return len(pipeline.batches) + len(model.batches[0]) + (len(staged[0]) if staged else 0) == backlog

    server.daemon.wait_until(backlog_waiting, what="the backlog decoded and waiting for the model")
    thread, box = post_in_background(server, content=encoded(solid((250, 1, 1))))
    server.daemon.wait_until(lambda: any(job.queued_at for job in list(http._jobs.values())),
                             what="the request decoded and waiting for the model")
    model.release()
    thread.join(30)
    assert box["response"].status_code == 200
    server.daemon.wait_count(["file_done"], backlog)
    calls = [[colour[0] for colour in batch] for batch in model.batches]
    (at,) = [i for i, batch in enumerate(calls) if 250 in batch]
    request_ms = server.daemon.wait_for("http_request")["ms"]
    print(f"priority={priority}: the request ran in model call {at + 1} of {len(calls)}, answered in {request_ms} ms")
    if priority == "interactive":
        # Behind the running call and the one staged beside it, ahead of every other file,
        # in one call with a file.
        assert at <= 2, calls
        assert len(calls[at]) == 2, calls
    else:
        assert at >= len(calls) - 2, calls


# --------------------------------------------------------------------------- starting and stopping


def test_healthz_and_requests_are_503_until_ready(inprocess, monkeypatch):
    loaded = threading.Event()
    original = inprocess_module._TestDaemon._load_model

    def slow_load(self):
        assert loaded.wait(30), "the test never let the model load"
        return original(self)

    monkeypatch.setattr(inprocess_module._TestDaemon, "_load_model", slow_load)
    daemon = inprocess.start(wait_ready=False, http={"port": 0})
    try:
        port = daemon.wait_for("http_listening")["port"]
        with httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=30, trust_env=False) as client:
            health = client.get("/healthz")
            assert (health.status_code, health.json()) == (503, {"status": "starting"})
            early = client.post("/v1/remove", content=encoded())
            assert (early.status_code, early.headers["retry-after"]) == (503, "5")
            assert error_of(early) == "rmbgd is starting"
            loaded.set()
            daemon.wait_for("ready")
            assert client.get("/healthz").status_code == 200
            assert client.post("/v1/remove", content=encoded()).status_code == 200
    finally:
        loaded.set()


def test_a_port_in_use_is_a_startup_failure(inprocess):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        daemon = inprocess.start(wait_ready=False, http={"port": port})
        daemon.thread.join(30)
    assert daemon.error is not None
    assert str(daemon.error).startswith(f"http.port: cannot listen on 127.0.0.1 port {port}: ")
    assert daemon.events("ready") == []


def test_a_stop_finishes_admitted_requests_and_refuses_new_ones(api):
    model = Gated()
    server = api(segmenter=model, batch={"size": 1})
    thread, box = post_in_background(server, content=encoded())
    model.wait_call()
    server.daemon.daemon._on_signal(signal.SIGTERM, None)  # as the signal handler does
    server.daemon.wait_for("stopping")
    health = server.client.get("/healthz")
    assert (health.status_code, health.json()) == (503, {"status": "stopping"})
    refused = server.client.post("/v1/remove", content=encoded())
    assert refused.status_code == 503 and error_of(refused) == "rmbgd is stopping"
    model.release()
    thread.join(30)
    assert box["response"].status_code == 200
    server.daemon.wait_for("stopped")
    assert server.daemon.stop() == 0
    with pytest.raises(httpx.ConnectError):
        server.client.get("/healthz")
    assert server.daemon.crashes() == []



def _ipv6_loopback() -> bool:
    try:
        with socket.socket(socket.AF_INET6) as probe:
            probe.bind(("::1", 0))
        return True
    except OSError:
        return False


@pytest.mark.skipif(not _ipv6_loopback(), reason="no IPv6 loopback on this machine")
def test_the_api_listens_on_ipv6_loopback(inprocess):
    daemon = inprocess.start(http={"port": 0, "address": "::1"})
    listening = daemon.wait_for("http_listening")
    assert listening["url"] == f"http://[::1]:{listening['port']}"
    response = httpx.post(f"{listening['url']}/v1/remove", content=encoded(), trust_env=False, timeout=30)
    assert (response.status_code, response.headers["content-type"]) == (200, "image/png")
