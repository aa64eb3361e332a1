"""The public gRPC server: pdserve.v1.Generation (a thin servicer over Frontend +
Router, route_guide style), grpc.health.v1 and server reflection.

Status codes (proto/pdserve/v1/generation.proto):
    BadRequest                      -> INVALID_ARGUMENT (unknown model: NOT_FOUND)
    Overloaded                      -> RESOURCE_EXHAUSTED, trailing metadata retry-after
    RequestFailed invalid           -> INVALID_ARGUMENT
                  exhausted         -> RESOURCE_EXHAUSTED (retry-after)
                  unavailable       -> UNAVAILABLE
                  deadline          -> DEADLINE_EXCEEDED
                  internal          -> INTERNAL
    client cancel                   -> CANCELLED (the router generator is closed, which
                                       aborts the request on both workers)
    missing / wrong API key         -> UNAUTHENTICATED (health and reflection exempt)

Generate writes with `context.write` from one coroutine instead of being an async
generator: a cancellation then always lands in our frame, so the `finally` that
closes the router's generator runs at once, not when the garbage collector finds it.
"""
from __future__ import annotations

import asyncio
import logging
import math
import time
from typing import Any

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from pdserve.outputs import logprobs_to_proto
from pdserve.protocol import finish_reason_to_proto, stop_reason_to_proto
from pdserve.v1 import generation_pb2 as pb
from pdserve.v1 import generation_pb2_grpc as pb_grpc
from router.core import Delta, GenerateInput, RequestFailed
from router.frontend import BadRequest, Frontend, SlowReader, write_bounded
from router.ledger import Overloaded

logger = logging.getLogger(__name__)

SERVICE_NAME = pb.DESCRIPTOR.services_by_name["Generation"].full_name
_FAILED = {"invalid": grpc.StatusCode.INVALID_ARGUMENT,
           "exhausted": grpc.StatusCode.RESOURCE_EXHAUSTED,
           "unavailable": grpc.StatusCode.UNAVAILABLE,
           "deadline": grpc.StatusCode.DEADLINE_EXCEEDED,
           "internal": grpc.StatusCode.INTERNAL}
_HEALTH_REFRESH_S = 1.0


class GenerationServicer(pb_grpc.GenerationServicer):
    def __init__(self, frontend: Frontend) -> None:
        self.fe = frontend

    async def Generate(self, request: pb.GenerateRequest,
                       context: grpc.aio.ServicerContext) -> None:
        await self._authorize(context)
        try:
            inp = self._prepare(request, context)
        except BadRequest as e:
            logger.info("rejected Generate: %s", e.message)
            await context.abort(_bad_request_code(e), e.message)
            return
        gen = self.fe.router.generate(inp)
        failure: tuple[grpc.StatusCode, str, float | None] | None = None
        try:
            async for d in gen:
                # Bounded: HTTP/2 flow control holds a write while the client reads nothing,
                # and a stalled reader must not keep its request running.
                await write_bounded(context.write(_response(d)), self.fe.write_timeout_s)
        except SlowReader as e:
            logger.warning("dropped a streaming client: %s", e)
            failure = (grpc.StatusCode.DEADLINE_EXCEEDED, str(e), None)
        except Overloaded as e:
            failure = (grpc.StatusCode.RESOURCE_EXHAUSTED, str(e), e.retry_after_s)
        except RequestFailed as e:
            code = _FAILED.get(e.kind, grpc.StatusCode.INTERNAL)
            failure = (code, str(e) or e.kind,
                       1.0 if code == grpc.StatusCode.RESOURCE_EXHAUSTED else None)
        except asyncio.CancelledError:
            logger.info("Generate cancelled by the client")
            raise
        except Exception as e:  # noqa: BLE001 - the client gets INTERNAL, never a hang
            if context.cancelled() or context.done():
                return
            logger.error("Generate failed", exc_info=e)
            failure = (grpc.StatusCode.INTERNAL, "internal error", None)
        finally:
            await gen.aclose()
        if failure is not None:
            code, message, retry_after = failure
            if retry_after is not None:
                context.set_trailing_metadata(
                    (("retry-after", str(max(1, math.ceil(retry_after)))),))
            await context.abort(code, message)

    async def Tokenize(self, request: pb.TokenizeRequest,
                       context: grpc.aio.ServicerContext) -> pb.TokenizeResponse:
        await self._authorize(context)
        try:
            self.fe.check_model(request.model)
            which = request.WhichOneof("input")
            if which is None:
                raise BadRequest("one of text or messages is required", "input")
            ids = self.fe.tokenize(
                text=request.text if which == "text" else None,
                messages=_messages(request.messages) if which == "messages" else None,
                add_special_tokens=(request.add_special_tokens
                                    if request.HasField("add_special_tokens") else None),
                add_generation_prompt=(request.add_generation_prompt
                                       if request.HasField("add_generation_prompt") else True))
        except BadRequest as e:
            await context.abort(_bad_request_code(e), e.message)
        return pb.TokenizeResponse(token_ids=ids, count=len(ids),
                                   max_model_len=self.fe.max_model_len)

    async def ListModels(self, request: pb.ListModelsRequest,
                         context: grpc.aio.ServicerContext) -> pb.ListModelsResponse:
        await self._authorize(context)
        return pb.ListModelsResponse(models=[pb.ModelCard(
            id=self.fe.model_name, owned_by="pdserve", max_model_len=self.fe.max_model_len,
            created=self.fe.created)])

    # -- helpers --------------------------------------------------------------------------
    async def _authorize(self, context: grpc.aio.ServicerContext) -> None:
        if self.fe.api_key is None:
            return
        md = {k: v for k, v in (context.invocation_metadata() or ())}
        value = md.get("authorization")
        if isinstance(value, bytes):
            value = value.decode("utf-8", "replace")
        if not self.fe.check_api_key(value):
            await context.abort(grpc.StatusCode.UNAUTHENTICATED,
                                "missing or invalid API key (metadata authorization: "
                                "Bearer <key>)")

    def _prepare(self, request: pb.GenerateRequest,
                 context: grpc.aio.ServicerContext) -> GenerateInput:
        self.fe.check_model(request.model)
        which = request.WhichOneof("input")
        if which is None:
            raise BadRequest("one of prompt, token_ids or messages is required", "input")
        # The call's gRPC deadline becomes the router's: work stops on every worker when
        # it passes, not just the client's wait.
        remaining = context.time_remaining()
        deadline = time.time() + remaining if remaining is not None else None
        return self.fe.prepare(
            prompt=request.prompt if which == "prompt" else None,
            token_ids=list(request.token_ids.ids) if which == "token_ids" else None,
            messages=_messages(request.messages) if which == "messages" else None,
            sampling=request.sampling if request.HasField("sampling") else None,
            client_label=request.client_label, deadline=deadline)


def _messages(msg: pb.ChatMessages) -> list[dict[str, str]]:
    return [{"role": m.role, "content": m.content} for m in msg.messages]


def _bad_request_code(e: BadRequest) -> grpc.StatusCode:
    return grpc.StatusCode.NOT_FOUND if e.status == 404 else grpc.StatusCode.INVALID_ARGUMENT


def _response(d: Delta) -> pb.GenerateResponse:
    msg = pb.GenerateResponse(request_id=d.request_id, token_ids=d.token_ids, text=d.text,
                              logprobs=logprobs_to_proto(d.logprobs))
    if d.finish_reason is not None:
        msg.finish_reason = finish_reason_to_proto(d.finish_reason)
        stop_text, stop_id = stop_reason_to_proto(d.stop_reason)
        msg.stop_reason = stop_text
        if stop_id is not None:
            msg.stop_token_id = stop_id
        if d.usage is not None:
            msg.usage.CopyFrom(pb.Usage(prompt_tokens=d.usage.prompt_tokens,
                                        completion_tokens=d.usage.completion_tokens,
                                        cached_tokens=d.usage.cached_tokens))
    return msg


class _HealthServicer(health.aio.HealthServicer):
    """SERVING while the router has a healthy decode worker. Check reads it fresh;
    Watch streams get a refresher task that lives only while someone watches."""

    def __init__(self, frontend: Frontend) -> None:
        super().__init__()
        self.fe = frontend
        self._refresher: asyncio.Task | None = None

    async def refresh(self) -> None:
        status = (health_pb2.HealthCheckResponse.SERVING if self.fe.healthy()
                  else health_pb2.HealthCheckResponse.NOT_SERVING)
        for service in ("", SERVICE_NAME):
            if self._server_status.get(service) != status:
                await self.set(service, status)

    async def Check(self, request: Any, context: Any) -> Any:
        await self.refresh()
        return await super().Check(request, context)

    async def Watch(self, request: Any, context: Any) -> None:
        await self.refresh()
        if self._refresher is None or self._refresher.done():
            self._refresher = asyncio.ensure_future(self._refresh_while_watched())
        await super().Watch(request, context)

    async def _refresh_while_watched(self) -> None:
        await asyncio.sleep(_HEALTH_REFRESH_S)
        while self._watcher_count_by_service:
            await self.refresh()
            await asyncio.sleep(_HEALTH_REFRESH_S)


def build_grpc_server(frontend: Frontend, host: str, port: int,
                      tls: tuple[bytes, bytes] | None = None) -> tuple[grpc.aio.Server, int]:
    """A grpc.aio server (not started) and the port it bound (port 0: a free one).

    tls: (private_key_pem, certificate_chain_pem), the order grpc.ssl_server_credentials
    takes; None: plaintext."""
    options = [
        # Fail loudly when the port is taken instead of silently sharing it with another
        # process (gRPC's default on Linux is SO_REUSEPORT).
        ("grpc.so_reuseport", 0),
        # The same request-size ceiling as the HTTP API's body limit.
        ("grpc.max_receive_message_length", max(frontend.max_body_bytes, 64 * 1024)),
    ]
    server = grpc.aio.server(options=options)
    pb_grpc.add_GenerationServicer_to_server(GenerationServicer(frontend), server)
    health_pb2_grpc.add_HealthServicer_to_server(_HealthServicer(frontend), server)
    reflection.enable_server_reflection(
        (SERVICE_NAME, health.SERVICE_NAME, reflection.SERVICE_NAME), server)
    address = f"{host}:{port}"
    if tls is not None:
        creds = grpc.ssl_server_credentials([(tls[0], tls[1])])
        bound = server.add_secure_port(address, creds)
    else:
        bound = server.add_insecure_port(address)
    if not bound:
        raise RuntimeError(f"cannot bind the gRPC server to {address}")
    logger.info("gRPC server bound to %s:%d (%s)", host, bound, "TLS" if tls else "plaintext")
    return server, bound
