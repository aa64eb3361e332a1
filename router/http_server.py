"""OpenAI-compatible HTTP front end (FastAPI), a thin layer over Frontend + Router.

Routes: POST /v1/completions, POST /v1/chat/completions, GET /v1/models[/{id}],
GET /health (no key needed), GET /metrics.

How a generation request flows:

    body (413 past max_body_bytes) -> UTF-8 -> JSON -> strict pydantic model
      -> Frontend.prepare (every input check; BadRequest -> 400/404)
      -> router.generate(...)
    non-streaming: collect every Delta, answer one JSON object.
    streaming: wait for the first Delta *before* sending the headers, so that admission
      (429), a worker rejecting the input (400), no worker (503) and the deadline (504)
      still get a real status code; then SSE chunks. An error after that is sent as a
      `data: {"error": ...}` event and the stream ends without `data: [DONE]`.
    A client that goes away (at any point) closes the router's generator, which
    aborts the request on both workers.
"""
from __future__ import annotations

import asyncio
import json
import logging
import math
from typing import Any, AsyncIterator, Awaitable, Callable

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest
from starlette.datastructures import Headers
from starlette.exceptions import HTTPException as StarletteHTTPException

from router.core import Delta, GenerateInput, RequestFailed
from router.frontend import BadRequest, Frontend, SlowReader, write_bounded
from router.ledger import Overloaded
from router.openai_format import (ChatRequest, CompletionRequest, Renderer, chat_messages,
                                  describe_error, error_param, read_json, validate)

logger = logging.getLogger(__name__)

TIMEOUT_HEADER = "x-pdserve-timeout-s"
# Completions keep OpenAI's documented default of 16 tokens; chat fills the context.
COMPLETIONS_DEFAULT_MAX_TOKENS = 16
_ERROR_TYPES = {400: "invalid_request_error", 401: "authentication_error",
                404: "invalid_request_error", 405: "invalid_request_error",
                413: "invalid_request_error", 429: "rate_limit_error", 500: "internal_error",
                503: "service_unavailable_error", 504: "timeout_error"}
# RequestFailed.kind -> (HTTP status, error code)
_FAILED = {"invalid": (400, "invalid_request"), "exhausted": (429, "no_capacity"),
           "unavailable": (503, "unavailable"), "deadline": (504, "deadline_exceeded"),
           "internal": (500, "internal_error")}


class _ClientGone(Exception):
    """The client disconnected before the answer was ready."""


def build_http_app(frontend: Frontend) -> FastAPI:
    # No generated docs: the routes read the raw body themselves (size limit, UTF-8 and
    # JSON errors in our shape), so an OpenAPI schema would describe nothing useful.
    app = FastAPI(title="pdserve", docs_url=None, redoc_url=None, openapi_url=None)
    api = _Api(frontend)
    app.add_api_route("/v1/completions", api.completions, methods=["POST"])
    app.add_api_route("/v1/chat/completions", api.chat, methods=["POST"])
    app.add_api_route("/v1/models", api.models, methods=["GET"])
    app.add_api_route("/v1/models/{model_id:path}", api.model, methods=["GET"])
    app.add_api_route("/health", api.health, methods=["GET"])
    app.add_api_route("/metrics", api.metrics, methods=["GET"])
    app.add_exception_handler(RequestValidationError, _on_validation_error)
    app.add_exception_handler(StarletteHTTPException, _on_http_exception)
    app.add_exception_handler(Exception, _on_unexpected)
    app.add_middleware(_ApiKeyMiddleware, frontend=frontend)
    return app


class _Api:
    def __init__(self, fe: Frontend) -> None:
        self.fe = fe

    async def completions(self, request: Request) -> Response:
        return await self._generate(request, CompletionRequest)

    async def chat(self, request: Request) -> Response:
        return await self._generate(request, ChatRequest)

    async def models(self) -> JSONResponse:
        return JSONResponse({"object": "list", "data": [self._card()]})

    async def model(self, model_id: str) -> Response:
        try:
            self.fe.check_model(model_id or "?")
        except BadRequest as e:
            return error_response(e.status, e.message, e.param, e.code)
        return JSONResponse(self._card())

    async def health(self) -> Response:
        if self.fe.healthy():
            return JSONResponse({"status": "ok"})
        return error_response(503, "no healthy decode worker", code="unavailable")

    async def metrics(self) -> Response:
        registry = self.fe.metrics_registry or CollectorRegistry()
        return Response(generate_latest(registry), media_type=CONTENT_TYPE_LATEST)

    def _card(self) -> dict[str, Any]:
        return {"id": self.fe.model_name, "object": "model", "created": self.fe.created,
                "owned_by": "pdserve", "root": self.fe.model_name,
                "max_model_len": self.fe.max_model_len}

    # -- generation -----------------------------------------------------------------------
    async def _generate(self, request: Request,
                        model: type[CompletionRequest] | type[ChatRequest]) -> Response:
        try:
            body = await read_json(request, self.fe.max_body_bytes)
            req = validate(model, body)
            inp, render = self._prepare(req, request.headers)
        except BadRequest as e:
            logger.info("rejected request: %s (param %s)", e.message, e.param)
            return error_response(e.status, e.message, e.param, e.code)
        gen = self.fe.router.generate(inp)
        if not req.stream:
            try:
                return JSONResponse(await _until_disconnect(request, _collect(gen, render)))
            except _ClientGone:
                return Response(status_code=499)   # nobody reads it; nginx's convention
            except Exception as e:  # noqa: BLE001 - every failure becomes a JSON error
                return _failure_response(e)
        try:
            first = await _until_disconnect(request, _next(gen))
        except BaseException as e:
            await gen.aclose()
            if isinstance(e, _ClientGone):
                return Response(status_code=499)
            if isinstance(e, Exception):
                return _failure_response(e)
            raise
        return _SSEResponse(_sse(gen, first, render), on_close=gen.aclose,
                            write_timeout_s=self.fe.write_timeout_s)

    def _prepare(self, req: CompletionRequest | ChatRequest,
                 headers: Headers) -> tuple[GenerateInput, Renderer]:
        fe = self.fe
        fe.check_model(req.model)
        if req.n is not None and req.n != 1:
            raise BadRequest("n must be 1 (several choices per request are not supported; "
                             "send separate requests)", "n")
        deadline = None
        raw = headers.get(TIMEOUT_HEADER)
        if raw is not None:
            try:
                seconds = float(raw)
            except ValueError:
                raise BadRequest(f"{TIMEOUT_HEADER} must be a number of seconds",
                                 TIMEOUT_HEADER) from None
            deadline = fe.deadline_after(seconds, TIMEOUT_HEADER)
        include_usage = bool(req.stream and req.stream_options
                             and req.stream_options.include_usage)
        label = req.user or ""
        if isinstance(req, ChatRequest):
            req.check_supported()
            logprobs = (req.top_logprobs or 0) if req.logprobs else None
            max_tokens = (req.max_completion_tokens if req.max_completion_tokens is not None
                          else req.max_tokens)
            inp = fe.prepare(messages=chat_messages(req.messages),
                             sampling=req.sampling(max_tokens, logprobs),
                             client_label=label, deadline=deadline)
            return inp, Renderer(fe, True, logprobs, include_usage)
        req.check_supported()
        text, ids = req.single_prompt()
        try:
            inp = fe.prepare(prompt=text, token_ids=ids,
                             sampling=req.sampling(req.max_tokens, req.logprobs),
                             default_max_tokens=COMPLETIONS_DEFAULT_MAX_TOKENS,
                             client_label=label, deadline=deadline)
        except BadRequest as e:
            if e.param == "token_ids":
                e.param = "prompt"     # OpenAI calls a token-id prompt "prompt" too
            raise
        return inp, Renderer(fe, False, req.logprobs, include_usage)


async def _next(gen: AsyncIterator[Delta]) -> Delta | None:
    try:
        return await gen.__anext__()
    except StopAsyncIteration:
        return None


async def _collect(gen: Any, render: Renderer) -> dict[str, Any]:
    parts: list[str] = []
    lps: list = []
    last: Delta | None = None
    try:
        async for d in gen:
            render.set_id(d.request_id)
            parts.append(d.text)
            lps.extend(d.logprobs or [])
            last = d
            if d.finish_reason:
                break
    finally:
        await gen.aclose()
    if last is None or not last.finish_reason:
        raise RequestFailed("internal", "the request ended without a result")
    return render.full("".join(parts), lps, last)


async def _sse(gen: Any, first: Delta | None, render: Renderer) -> AsyncIterator[bytes]:
    try:
        d = first
        if d is not None:
            render.set_id(d.request_id)
            for obj in render.start_chunks():
                yield _event(obj)
        while d is not None:
            obj = render.chunk(d)
            if obj is not None:
                yield _event(obj)
            if d.finish_reason:
                if render.include_usage:
                    yield _event(render.usage_chunk(d.usage))
                yield b"data: [DONE]\n\n"
                return
            d = await _next(gen)
        raise RequestFailed("internal", "the request ended without a result")
    except Exception as e:  # noqa: BLE001 - headers are sent: report in-band, no [DONE]
        _, body, _ = failure_info(e)
        yield _event(body)
    finally:
        await gen.aclose()


def _event(obj: dict[str, Any]) -> bytes:
    return b"data: " + json.dumps(obj, ensure_ascii=False, separators=(",", ":")).encode() + b"\n\n"


class _SSEResponse(StreamingResponse):
    """A StreamingResponse that always watches for the client going away (whatever the
    server's ASGI spec version) and always closes both the body and the router's
    generator afterwards: an interrupted `async for` would otherwise leave them open
    until garbage collection, and the request running on the workers. A send that the
    client does not take within write_timeout_s (the server's flow control holds it while
    the socket buffers are full) ends the stream the same way: a stalled reader is gone."""

    def __init__(self, content: AsyncIterator[bytes],
                 on_close: Callable[[], Awaitable[None]], write_timeout_s: float) -> None:
        # no-cache / X-Accel-Buffering: proxies (nginx) must pass each event at once.
        super().__init__(content, media_type="text/event-stream",
                         headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
        self._on_close = on_close
        self._write_timeout_s = write_timeout_s

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        async def bounded_send(message: Any) -> None:
            await write_bounded(send(message), self._write_timeout_s)

        stream = asyncio.ensure_future(self.stream_response(bounded_send))
        watch = asyncio.ensure_future(self.listen_for_disconnect(receive))
        try:
            await asyncio.wait({stream, watch}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for t in (stream, watch):
                t.cancel()
            res = await asyncio.gather(stream, watch, return_exceptions=True)
            await self.body_iterator.aclose()  # type: ignore[attr-defined]
            await self._on_close()
            if isinstance(res[0], SlowReader):
                logger.warning("dropped a streaming client: %s", res[0])
            elif isinstance(res[0], Exception):
                logger.debug("stream ended early: %r", res[0])


async def _until_disconnect(request: Request, aw: Awaitable[Any]) -> Any:
    """Runs `aw`, cancelling it (which closes the router generator inside) if the
    client disconnects first. Plain handlers never notice a disconnect by themselves."""
    work = asyncio.ensure_future(aw)

    async def disconnected() -> None:
        while (await request.receive())["type"] != "http.disconnect":
            pass

    watch = asyncio.ensure_future(disconnected())
    try:
        await asyncio.wait({work, watch}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        watch.cancel()
        if not work.done():
            work.cancel()
    if not work.cancelled() and work.done():
        return work.result()
    try:
        await work
    except asyncio.CancelledError:
        pass
    raise _ClientGone()


# -- errors --------------------------------------------------------------------------------
def error_response(status: int, message: str, param: str | None = None,
                   code: str | None = None, headers: dict[str, str] | None = None) -> JSONResponse:
    return JSONResponse({"error": {"message": message, "type": _ERROR_TYPES.get(status, "error"),
                                   "param": param, "code": code}},
                        status_code=status, headers=headers)


def failure_info(e: Exception) -> tuple[int, dict[str, Any], dict[str, str]]:
    """Any exception from preparing or running a request -> (status, body, headers)."""
    headers: dict[str, str] = {}
    param = None
    if isinstance(e, BadRequest):
        status, code, msg, param = e.status, e.code, e.message, e.param
    elif isinstance(e, Overloaded):
        status, code, msg = 429, "server_overloaded", str(e)
        headers["Retry-After"] = str(max(1, math.ceil(e.retry_after_s)))
    elif isinstance(e, RequestFailed):
        status, code = _FAILED.get(e.kind, (500, "internal_error"))
        msg = str(e) or e.kind
        if status in (429, 503):
            headers["Retry-After"] = "1"
        if status == 500:
            logger.error("request failed: %s", msg)
    else:
        logger.error("unexpected error serving a request", exc_info=e)
        status, code, msg = 500, "internal_error", "internal server error"
    body = {"error": {"message": msg, "type": _ERROR_TYPES.get(status, "error"),
                      "param": param, "code": code}}
    return status, body, headers


def _failure_response(e: Exception) -> JSONResponse:
    status, body, headers = failure_info(e)
    return JSONResponse(body, status_code=status, headers=headers)


async def _on_validation_error(request: Request, exc: Exception) -> JSONResponse:
    errors = getattr(exc, "errors", lambda: [])()
    if errors:
        return error_response(400, describe_error(errors[0]), error_param(tuple(errors[0]["loc"])))
    return error_response(400, "invalid request")


async def _on_http_exception(request: Request, exc: Exception) -> JSONResponse:
    status = getattr(exc, "status_code", 500)
    detail = getattr(exc, "detail", None) or "error"
    return error_response(status, str(detail), code="not_found" if status == 404 else None,
                          headers=getattr(exc, "headers", None))


async def _on_unexpected(request: Request, exc: Exception) -> JSONResponse:
    return _failure_response(exc)


class _ApiKeyMiddleware:
    """Pure ASGI (BaseHTTPMiddleware would buffer and break streaming): every path but
    /health needs `Authorization: Bearer <key>` when a key is configured."""

    def __init__(self, app: Any, frontend: Frontend) -> None:
        self.app = app
        self.fe = frontend

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        if (scope["type"] != "http" or self.fe.api_key is None or scope["path"] == "/health"
                or self.fe.check_api_key(Headers(scope=scope).get("authorization"))):
            await self.app(scope, receive, send)
            return
        resp = error_response(401, "missing or invalid API key (send Authorization: "
                              "Bearer <key>)", code="invalid_api_key",
                              headers={"WWW-Authenticate": "Bearer"})
        await resp(scope, receive, send)
