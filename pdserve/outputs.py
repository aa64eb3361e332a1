"""Engine outputs <-> worker protos (DecodeOutput), shared by workers and the router."""
from __future__ import annotations

import asyncio

from pdserve.engine.llm_engine import RequestOutput, TokenLogprob
from pdserve.protocol import finish_reason_to_proto
from pdserve.v1 import generation_pb2, worker_pb2


def logprobs_to_proto(lps: list[TokenLogprob] | None) -> list[generation_pb2.TokenLogprob]:
    return [generation_pb2.TokenLogprob(
        token_id=lp.token_id, logprob=lp.logprob,
        top_logprobs=[generation_pb2.TopLogprob(token_id=t, logprob=v) for t, v in lp.top])
        for lp in (lps or [])]


def logprobs_from_proto(msgs) -> list[TokenLogprob]:
    return [TokenLogprob(m.token_id, m.logprob, [(t.token_id, t.logprob) for t in m.top_logprobs])
            for m in msgs]


def to_decode_output(out: RequestOutput, request_id: str, attempt_id: int,
                     first_token_index: int) -> worker_pb2.DecodeOutput:
    msg = worker_pb2.DecodeOutput(
        request_id=request_id, attempt_id=attempt_id, token_ids=out.new_token_ids,
        text=out.new_text, logprobs=logprobs_to_proto(out.new_logprobs),
        first_token_index=first_token_index)
    if out.finished:
        msg.finish_reason = finish_reason_to_proto(out.finish_reason or "error")
        if isinstance(out.stop_reason, str):
            msg.stop_reason = out.stop_reason
        elif isinstance(out.stop_reason, int):
            msg.stop_token_id = out.stop_reason
        if out.error:
            msg.error = out.error
        msg.usage.CopyFrom(generation_pb2.Usage(
            prompt_tokens=out.num_prompt_tokens, completion_tokens=out.num_output_tokens,
            cached_tokens=out.num_cached_tokens))
    return msg


class Outbox:
    """Outputs waiting for one router's next poll(): batched, so a decode step costs
    one Ray call per router, not one per token."""

    def __init__(self) -> None:
        self.items: list[worker_pb2.DecodeOutput] = []
        self.event = asyncio.Event()

    def put(self, msg: worker_pb2.DecodeOutput) -> None:
        self.items.append(msg)
        self.event.set()

    async def take(self, timeout: float) -> list[worker_pb2.DecodeOutput]:
        if not self.items:
            # asyncio.timeout, not wait_for: on Python 3.11 wait_for can swallow a
            # cancellation that races with the event being set, and a poller that
            # cannot be cancelled keeps its router from stopping.
            try:
                async with asyncio.timeout(timeout):
                    await self.event.wait()
            except TimeoutError:
                pass
        items, self.items = self.items, []
        self.event.clear()
        return items
