"""The HTTP API's routes (FastAPI), over a `Backend` that feeds the daemon's batch queue.

The routes only translate HTTP: read and bound the body, check the token, parse the request,
fetch URL inputs (rmbgd.api.urls) in a worker thread, hand images to the backend and turn its
answers and errors into responses; every error is a JSON body with `error`. What an image goes
through (decode, the shared batches, render, publish) is the backend's. A client that goes away
before its answer is ready has its job cancelled (the backend drops it if the model has not
taken it yet).
"""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from concurrent.futures import Future
from dataclasses import dataclass
from typing import Any, AsyncIterator, Awaitable, Callable, List, Mapping, Optional, Protocol

import anyio
from fastapi import Depends, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from rmbgd.api import urls
from rmbgd.api.auth import Token, authorized

# Most URLs one batch request may name: each is a job in the daemon, so this bounds what one
# request can put in flight behind the in-flight limit.
MAX_BATCH_URLS = 1000
# URLs of one batch downloaded and in the pipeline at once: bounds the memory a batch holds
# (each download up to max_body_mb) and lets other requests in between.
BATCH_PARALLEL = 16
READY, STARTING, STOPPING = "ready", "starting", "stopping"


@dataclass(frozen=True)
class Result:
    body: bytes
    media_type: str


class ApiError(Exception):
    """An answer other than success: `status`, the readable `message`, `retry_after` seconds."""

    def __init__(self, status: int, message: str, retry_after: Optional[int] = None) -> None:
        super().__init__(message)
        self.status, self.message, self.retry_after = status, message, retry_after


class Backend(Protocol):
    def state(self) -> str:
        """READY, STARTING or STOPPING."""

    def options(self, params: Mapping[str, str]) -> Any:
        """Per-request output options from query parameters; ApiError(400) naming the bad one."""

    def remove(self, data: bytes, options: Any) -> "Future[Result]":
        """Admit one image (or raise ApiError 503); the future gives its result or an ApiError."""

    def publish(self, data: bytes, options: Any, batch_id: str, index: int, url: str) -> "Future[str]":
        """Admit one image whose result is published under the outbox; the future gives its
        path relative to the outbox."""


@dataclass(frozen=True)
class ApiSettings:
    max_body_bytes: int
    token: Optional[Token] = None
    allow_private_urls: bool = False
    fetch_timeout_seconds: float = 30.0
    # (status, seconds) of each request once answered: the daemon's metrics and counts.
    on_request: Optional[Callable[[int, float], None]] = None


def create_app(backend: Backend, settings: ApiSettings, log: Any) -> FastAPI:
    app = FastAPI(title="rmbgd", summary="Background removal: the same batches as the inbox")
    app.add_middleware(_BodyLimit, limit=settings.max_body_bytes)
    app.add_middleware(_AccessLog, log=log, on_request=settings.on_request)
    limits = urls.FetchLimits(
        max_bytes=settings.max_body_bytes,
        timeout_seconds=settings.fetch_timeout_seconds,
        allow_private=settings.allow_private_urls,
    )

    def admit(request: Request) -> None:
        """What every /v1 request passes first: the token, then the daemon's state."""
        if settings.token is not None and not authorized(request.headers.get("authorization"), settings.token):
            raise ApiError(401, "a valid `Authorization: Bearer <token>` header is required")
        state = backend.state()
        if state != READY:
            raise ApiError(503, f"rmbgd is {state}", retry_after=5 if state == STARTING else None)

    @app.exception_handler(_BodyTooLarge)
    async def too_large(_request: Request, _exc: _BodyTooLarge) -> JSONResponse:
        return _error(413, f"the body is over http.max_body_mb ({settings.max_body_bytes} bytes)")

    @app.exception_handler(ApiError)
    async def api_error(_request: Request, exc: ApiError) -> JSONResponse:
        return _error(exc.status, exc.message, exc.retry_after)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(_request: Request, exc: StarletteHTTPException) -> JSONResponse:
        return _error(exc.status_code, str(exc.detail))

    @app.exception_handler(RequestValidationError)
    async def validation_error(_request: Request, exc: RequestValidationError) -> JSONResponse:
        return _error(400, "; ".join(_location(error) for error in exc.errors()))

    @app.get("/healthz", summary="200 once ready, 503 before that and while stopping")
    async def healthz() -> JSONResponse:
        state = backend.state()
        return JSONResponse({"status": state}, status_code=200 if state == READY else 503)

    @app.post("/v1/remove", dependencies=[Depends(admit)],
              summary="One image in (body, multipart `file` or JSON `url`), its cut-out out")
    async def remove(request: Request) -> Response:
        options = backend.options(dict(request.query_params))
        data = await _image_from(request, limits)
        # In a worker thread: admission may wait a moment for room in the pipeline.
        future = await anyio.to_thread.run_sync(backend.remove, data, options)
        result = await _wait_or_cancel(request, future)
        return Response(result.body, media_type=result.media_type)

    @app.post("/v1/batch", dependencies=[Depends(admit)],
              summary="JSON {\"urls\": [...]}: each result published in the outbox, NDJSON progress")
    async def batch(request: Request) -> StreamingResponse:
        options = backend.options(dict(request.query_params))
        listed = _json_field(await _read_json(request), "urls", list)
        if not listed or len(listed) > MAX_BATCH_URLS or not all(isinstance(u, str) for u in listed):
            raise ApiError(400, f"urls: a list of 1 to {MAX_BATCH_URLS} URL strings")
        batch_id = uuid.uuid4().hex[:12]
        return StreamingResponse(
            _batch_lines(backend, options, listed, batch_id, limits), media_type="application/x-ndjson"
        )

    return app


class _BodyTooLarge(Exception):
    pass


class _BodyLimit:
    """ASGI middleware counting a request's body as it streams in: over the limit (declared
    or not) it stops reading and the request gets 413, also while multipart parses it."""

    def __init__(self, app: Any, limit: int) -> None:
        self.app, self.limit = app, limit

    async def __call__(self, scope: dict, receive: Callable[[], Awaitable[dict]], send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        for name, value in scope.get("headers", ()):
            if name == b"content-length" and value.isdigit() and int(value) > self.limit:
                await _send_error(send, 413, f"the body is over http.max_body_mb ({self.limit} bytes)")
                return
        seen = 0

        async def counted() -> dict:
            nonlocal seen
            message = await receive()
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > self.limit:
                    raise _BodyTooLarge()
            return message

        await self.app(scope, counted, send)


class _AccessLog:
    """ASGI middleware logging one `http_request` event per request, with what was sent."""

    def __init__(self, app: Any, log: Any, on_request: Optional[Callable[[int, float], None]] = None) -> None:
        self.app, self.log, self.on_request = app, log, on_request

    async def __call__(self, scope: dict, receive: Any, send: Callable[[dict], Awaitable[None]]) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = time.monotonic()
        status, sent = 500, 0

        async def counting(message: dict) -> None:
            nonlocal status, sent
            if message["type"] == "http.response.start":
                status = message["status"]
            elif message["type"] == "http.response.body":
                sent += len(message.get("body", b""))
            await send(message)

        try:
            await self.app(scope, receive, counting)
        finally:
            client = scope.get("client")
            seconds = time.monotonic() - started
            # A load balancer's health probes would drown the log: answered ones at debug.
            quiet = scope.get("path") == "/healthz" and status == 200
            (self.log.debug if quiet else self.log.info)(
                "http_request",
                method=scope.get("method"),
                path=scope.get("path"),
                status=status,
                bytes=sent,
                ms=round(seconds * 1000.0, 1),
                client=client[0] if client else None,
            )
            if self.on_request is not None:
                self.on_request(status, seconds)


async def _send_error(send: Callable[[dict], Awaitable[None]], status: int, message: str) -> None:
    body = json.dumps({"error": message}).encode()
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]})
    await send({"type": "http.response.body", "body": body})


async def _image_from(request: Request, limits: urls.FetchLimits) -> bytes:
    content_type = request.headers.get("content-type", "").split(";", 1)[0].strip().lower()
    if content_type == "application/json":
        url = _json_field(await _read_json(request), "url", str)
        return await _fetch(url, limits)
    if content_type == "multipart/form-data":
        form = await request.form()
        upload = form.get("file")
        if upload is None or isinstance(upload, str):
            raise ApiError(400, "file: a multipart field named `file` holding the image is required")
        return await upload.read()
    data = await request.body()
    if not data:
        raise ApiError(400, "the request has no image: send it as the body, a multipart `file`, or JSON {\"url\": ...}")
    return data


async def _read_json(request: Request) -> Any:
    try:
        return json.loads(await request.body())
    except (ValueError, UnicodeDecodeError) as exc:
        raise ApiError(400, f"the body is not valid JSON: {exc}") from None


def _json_field(document: Any, name: str, kind: type) -> Any:
    if not isinstance(document, dict) or not isinstance(document.get(name), kind):
        raise ApiError(400, f"{name}: required, a {'string' if kind is str else 'list'}")
    return document[name]


async def _fetch(url: str, limits: urls.FetchLimits) -> bytes:
    try:
        return await anyio.to_thread.run_sync(lambda: urls.fetch(url, limits))
    except urls.UrlError as exc:
        raise ApiError(exc.status, f"url: {exc}") from None


async def _wait_or_cancel(request: Request, future: "Future[Result]") -> Result:
    waiting = asyncio.wrap_future(future)
    while True:
        done, _ = await asyncio.wait({waiting}, timeout=0.25)
        if done:
            return waiting.result()
        if await request.is_disconnected():
            # Dropped by the backend unless the model already has it; nobody reads the answer.
            future.cancel()
            raise ApiError(499, "the client went away")


async def _batch_lines(backend: Backend, options: Any, listed: List[str], batch_id: str,
                       limits: urls.FetchLimits) -> AsyncIterator[bytes]:
    gate = asyncio.Semaphore(BATCH_PARALLEL)

    async def one(index: int, url: str) -> dict:
        async with gate:
            return await fetch_and_publish(index, url)

    async def fetch_and_publish(index: int, url: str) -> dict:
        line = {"index": index, "url": url}
        try:
            data = await _fetch(url, limits)
            admitted = await anyio.to_thread.run_sync(backend.publish, data, options, batch_id, index, url)
            output = await asyncio.wrap_future(admitted)
            return {**line, "status": "done", "output": output}
        except ApiError as exc:
            return {**line, "status": "failed", "error": exc.message}

    processed = failed = 0
    for finished in asyncio.as_completed([one(index, url) for index, url in enumerate(listed)]):
        line = await finished
        processed, failed = (processed + 1, failed) if line["status"] == "done" else (processed, failed + 1)
        yield (json.dumps(line) + "\n").encode()
    yield (json.dumps({"event": "summary", "batch": batch_id, "processed": processed, "failed": failed}) + "\n").encode()


def _error(status: int, message: str, retry_after: Optional[int] = None) -> JSONResponse:
    headers = {"Retry-After": str(retry_after)} if retry_after is not None else None
    return JSONResponse({"error": message}, status_code=status, headers=headers)


def _location(error: Mapping[str, Any]) -> str:
    where = ".".join(str(part) for part in error.get("loc", ()) if part not in ("body", "query"))
    return f"{where}: {error.get('msg', 'invalid')}" if where else str(error.get("msg", "invalid"))
