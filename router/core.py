"""Router: owns every request from admission to its one terminal outcome.

How a request flows (disaggregated; see DESIGN "Request lifecycle"):

    admit (ledger; Overloaded → 429 / RESOURCE_EXHAUSTED before any stream starts)
    for attempt in 1..1+max_retries (+1, the last resort: colocated on a D):
        D = decode policy (kv_free)          → D.reserve(prompt, sampling) → Reservation
        P = prefill policy (prefix_aware...) → P.prefill(task with Reservation)
              (overlap_reserve, when some D has room: both calls at once, and the
              Reservation follows the task in P.attach_reservation; P keeps its KV
              until then, so the reserve round trip is off the time to first token)
              P computes, streams KV into D's blocks, sends the completion record;
              D starts decoding; its outputs reach us through D.poll() (one call per
              poll for all our requests on D), tagged with the attempt id
        failure before any token reached the client → abort both sides, try another P;
              after max_retries of those, one last attempt prefills on a decode
              worker itself (colocated_last_resort: no second P, no transfer to fail)
        failure after a token → the request ends with an error (a token that only
              P sampled does not count: the next attempt resumes after it)
    stream D's outputs until the terminal one; deadline and client cancellation abort
    the current attempt on both workers.

Colocated mode, prompts under --disagg-threshold tokens, and the case of no healthy
prefill worker use D.submit() instead: the whole request on one decode worker.
"""
from __future__ import annotations

import asyncio
import logging
import secrets
import time
from dataclasses import dataclass, field
from typing import AsyncIterator, Callable

from pdserve.engine.llm_engine import TokenLogprob
from pdserve.llm import Usage
from pdserve.outputs import logprobs_from_proto
from pdserve.protocol import finish_reason_from_proto, sampling_params_to_proto
from pdserve.sampling.params import SamplingParams
from pdserve.v1 import worker_pb2
from router.clients import DecodeClient, PrefillClient, WorkerDied
from router.ledger import Ledger, Overloaded, Record
from router.policies import WorkerView, make_decode_policy, make_prefill_policy

logger = logging.getLogger(__name__)

RETRIABLE = {worker_pb2.WORKER_ERROR_TRANSFER, worker_pb2.WORKER_ERROR_INTERNAL,
             worker_pb2.WORKER_ERROR_DRAINING, worker_pb2.WORKER_ERROR_NO_CAPACITY}


@dataclass(frozen=True)
class RouterConfig:
    model_name: str = "pdserve"
    mode: str = "disaggregated"          # disaggregated | colocated
    prefill_policy: str = "prefix_aware"
    decode_policy: str = "kv_free"
    disagg_threshold: int = 0            # prompts shorter than this skip the transfer
    max_inflight: int = 64               # admission limit
    max_retries: int = 1                 # re-prefills on another P, only before any token
    colocated_last_resort: bool = True   # then one attempt colocated on a D (see above)
    lease_ms: int = 30_000
    reserve_wait_s: float = 5.0          # how long to wait for KV blocks on some D
    overlap_reserve: bool = True         # P starts computing while D reserves (see above)
    prefill_timeout_s: float = 600.0     # backstop for one prefill call; a stalled or dead
                                         # P is detected sooner by its failing health checks
    load_interval_s: float = 0.25
    reattach_timeout_s: float = 30.0     # a restarted worker's start(); one that cannot
                                         # finish (an nccl worker cannot rejoin its process
                                         # group) stays out of rotation and is tried again
    block_size: int = 16
    max_model_len: int = 8192
    transport: str = "grpc"              # for metrics/logs; the workers hold the real one

    def __post_init__(self) -> None:
        if self.mode not in ("disaggregated", "colocated"):
            raise ValueError(f"mode must be disaggregated or colocated, got {self.mode!r}")
        if self.max_inflight < 1:
            raise ValueError("max_inflight must be >= 1")


@dataclass
class GenerateInput:
    prompt_token_ids: list[int]
    params: SamplingParams
    client_label: str = ""
    deadline: float | None = None        # unix seconds


@dataclass
class Delta:
    request_id: str
    token_ids: list[int]
    text: str
    logprobs: list[TokenLogprob] | None = None
    finish_reason: str | None = None
    stop_reason: str | int | None = None
    usage: Usage | None = None


class RequestFailed(RuntimeError):
    """The request ended with an error. kind: invalid | unavailable | deadline |
    exhausted | internal (front ends map it to a status code)."""

    def __init__(self, kind: str, message: str) -> None:
        super().__init__(message)
        self.kind = kind


@dataclass
class _Worker:
    view: WorkerView
    client: PrefillClient | DecodeClient
    info: worker_pb2.WorkerInfo | None = None
    reattach: asyncio.Task | None = None     # a restarted prefill worker's start() in flight


@dataclass
class _State:
    rec: Record
    attempt: int = 0
    decode_id: str = ""
    prefill_id: str = ""
    queue: asyncio.Queue = field(default_factory=asyncio.Queue)
    tokens_sent: int = 0
    delivered: list[int] = field(default_factory=list)   # the token ids sent to the client
    # Leading tokens of the completion that prefill workers sampled (no decode step made
    # them): a failure before any later token reached the client resumes after them.
    p_tokens: int = 0
    early: tuple[int, str] | None = None     # (index, text) of a token P sent before D had it
    leg: asyncio.Task | None = None          # the attempt's prefill leg (disaggregated)
    last_token_at: float = 0.0
    cached_tokens: int | None = None
    finished: bool = False
    prefilling: bool = False             # the P call is pending: renew D's lease


class _DecodeLost(Exception):
    pass


class Router:
    def __init__(self, config: RouterConfig, prefill: dict[str, PrefillClient],
                 decode: dict[str, DecodeClient]) -> None:
        if not decode:
            raise ValueError("at least one decode worker is required")
        self.config = config
        self.router_id = "router-" + secrets.token_hex(4)
        self.prefill = {k: _Worker(WorkerView(k), c) for k, c in prefill.items()}
        self.decode = {k: _Worker(WorkerView(k), c) for k, c in decode.items()}
        self.prefill_policy = make_prefill_policy(config.prefill_policy, config.block_size)
        self.decode_policy = make_decode_policy(config.decode_policy)
        self.ledger = Ledger(config.max_inflight)
        self.states: dict[str, _State] = {}
        self._attempts = 0
        self._tasks: list[asyncio.Task] = []
        self._stopping = False
        self.metrics = None                      # RouterMetrics, attached by make_registry
        self.draining = False                    # SIGTERM: admit nothing new
        self.transport_name = config.transport
        self.events: dict[str, int] = {"retries": 0, "decode_lost": 0, "transfer_failures": 0,
                                       "colocated": 0, "disaggregated": 0, "last_resort": 0}

    # -- lifecycle ------------------------------------------------------------------------
    async def start(self) -> None:
        # Concurrently: with the nccl transport every worker joins one process group in
        # start(), and that rendezvous only completes when all of them are in it.
        workers = [*self.prefill.values(), *self.decode.values()]
        infos = await asyncio.gather(*[w.client.start() for w in workers])
        for w, info in zip(workers, infos):
            w.info = worker_pb2.WorkerInfo.FromString(info)
        for wid in self.decode:
            self._tasks.append(asyncio.create_task(self._poller(wid)))
        self._tasks.append(asyncio.create_task(self._load_loop()))
        self._tasks.append(asyncio.create_task(self._lease_loop()))
        await self._refresh_loads()

    async def drain(self, grace_s: float) -> int:
        """Stop admitting; wait up to grace_s for the requests in flight to finish.
        Returns how many were still running."""
        self.draining = True
        end = time.monotonic() + grace_s
        while self.ledger.inflight and time.monotonic() < end:
            await asyncio.sleep(0.05)
        return self.ledger.inflight

    async def stop(self) -> None:
        self._stopping = True
        tasks = list(self._tasks)
        for t in tasks:
            t.cancel()
        if tasks:
            # Bounded: a background call stuck in a worker must not hang the shutdown.
            _, pending = await asyncio.wait(tasks, timeout=5)
            for t in pending:
                logger.warning("router task %r did not stop within 5 s", t)

    # -- the request path -----------------------------------------------------------------
    async def generate(self, inp: GenerateInput) -> AsyncIterator[Delta]:
        if self.draining:
            raise RequestFailed("unavailable", "server is shutting down")
        rec = self.ledger.admit(len(inp.prompt_token_ids), inp.client_label)
        state = _State(rec)
        self.states[rec.request_id] = state
        outcome, reason = "error", "internal error"
        try:
            async for delta in self._run(state, inp):
                yield delta
            outcome, reason = "completed", ""
        except RequestFailed as e:
            outcome, reason = "error", f"{e.kind}: {e}"
            if self.metrics is not None:
                self.metrics.labels(self.metrics.failures, kind=e.kind).inc()
            raise
        except (asyncio.CancelledError, GeneratorExit):
            outcome, reason = "cancelled", "client cancelled"
            raise
        finally:
            if not state.finished:
                self._abort_attempt(state)
            self.ledger.finish(rec, outcome, reason)
            self.states.pop(rec.request_id, None)

    async def _run(self, state: _State, inp: GenerateInput) -> AsyncIterator[Delta]:
        tried_p: set[str] = set()
        tried_d: set[str] = set()
        max_attempts = 1 + self.config.max_retries + int(self.config.colocated_last_resort)
        resort_at = max_attempts if self.config.colocated_last_resort else None
        for attempt in range(1, max_attempts + 1):
            self._attempts += 1
            state.attempt = self._attempts          # globally unique per router
            state.queue = asyncio.Queue()
            state.rec.attempts = attempt
            try:
                await self._dispatch(state, inp, tried_p, tried_d, attempt == resort_at)
                async for delta in self._stream(state, inp):
                    yield delta
                # Done. P's reply may still be on its way (D can finish a short request
                # first): let the leg take it, for the transfer metrics.
                self._detach_leg(state)
                return
            except _Retry as r:
                self._abort_attempt(state)
                # Tokens that only prefill workers sampled can be re-made anywhere: the
                # next attempt resumes after them. A token from a decode step cannot.
                if state.tokens_sent > state.p_tokens or attempt == max_attempts:
                    raise RequestFailed(r.kind, str(r)) from None
                self.events["retries"] += 1
                next_last = attempt + 1 == resort_at
                self.events["last_resort"] += int(next_last)
                logger.info("%s: attempt %d failed (%s); retrying%s%s", state.rec.request_id,
                            attempt, r, f" after token {state.tokens_sent}"
                            if state.tokens_sent else "", " colocated" if next_last else "")
            finally:
                leg, state.leg = state.leg, None
                if leg is not None and not leg.done():
                    leg.cancel()

    def _detach_leg(self, state: _State) -> None:
        leg, state.leg = state.leg, None
        if leg is not None and not leg.done():
            self._tasks.append(leg)
            leg.add_done_callback(self._forget)

    async def _dispatch(self, state: _State, inp: GenerateInput, tried_p: set[str],
                        tried_d: set[str], last_resort: bool = False) -> None:
        """Start this attempt: colocated, submit to a decode worker; disaggregated, start
        the prefill leg (its outcome reaches _stream through state.queue). The last
        resort is colocated: it depends on one worker, and on no transfer."""
        rid = state.rec.request_id
        sampling = sampling_params_to_proto(inp.params)
        deadline_ms = int(inp.deadline * 1000) if inp.deadline else 0
        prefill = [w for k, w in self.prefill.items() if w.view.healthy and k not in tried_p]
        colocated = (self.config.mode == "colocated" or not prefill or last_resort
                     or len(inp.prompt_token_ids) < self.config.disagg_threshold)
        # The reservation follows the task when some decode worker seems to have room;
        # otherwise reserve first (waiting for blocks), so P never holds KV for long.
        overlap = (not colocated and self.config.overlap_reserve
                   and self._decode_has_room(state, inp, tried_d))
        resume = list(state.delivered)
        # The token after `resume` is sampled by P on the disaggregated path.
        state.p_tokens = len(resume) + (0 if colocated else 1)
        d = None
        if not overlap:
            d = await self._reserve_or_submit(state, inp, sampling, deadline_ms, colocated,
                                              tried_d)
        state.rec.dispatched_at = time.monotonic()
        state.rec.prefill_done_at = None   # this attempt's legs only
        m = self.metrics
        if m is not None:
            m.labels(m.queue_time).observe(time.monotonic() - state.rec.accepted_at)
            m.labels(m.routing, path="colocated" if colocated else "disaggregated",
                     policy="kv_free" if colocated else self.config.prefill_policy).inc()
        if colocated:
            self.events["colocated"] += 1
            return
        self.events["disaggregated"] += 1
        p = self.prefill_policy.pick([w.view for w in prefill], inp.prompt_token_ids)
        pw = self.prefill[p.worker_id]
        state.prefill_id = p.worker_id
        state.rec.workers.append(p.worker_id)
        task = worker_pb2.PrefillTask(request_id=rid, attempt_id=state.attempt,
                                      prompt_token_ids=inp.prompt_token_ids, sampling=sampling,
                                      deadline_unix_ms=deadline_ms, resume_token_ids=resume)
        if overlap:
            task.reservation_follows = True
        else:
            task.reservation.CopyFrom(d)
        state.leg = asyncio.ensure_future(self._prefill_leg(
            state, inp, pw, task, sampling, tried_p, tried_d))

    async def _prefill_leg(self, state: _State, inp: GenerateInput, pw: _Worker,
                           task: worker_pb2.PrefillTask, sampling, tried_p: set[str],
                           tried_d: set[str]) -> None:
        """This attempt's prefill call (and, with reservation_follows, D's reserve beside
        it). Runs beside _stream: P's early first token and any failure of the attempt
        go into the attempt's queue."""
        queue, pid = state.queue, pw.view.worker_id
        first_index = len(task.resume_token_ids)

        def on_first(ft: worker_pb2.FirstToken) -> None:
            out = worker_pb2.DecodeOutput(
                request_id=task.request_id, attempt_id=task.attempt_id, token_ids=[ft.token_id],
                text=ft.text, first_token_index=first_index)
            if ft.HasField("logprob"):
                out.logprobs.append(ft.logprob)
            queue.put_nowait(_Early(out))

        data = task.SerializeToString()
        if task.reservation_follows:
            call = self._prefill_overlapped(state, inp, sampling, task.deadline_unix_ms,
                                            tried_d, pw, data, on_first)
        else:
            call = self._watch_prefill(pw, data, on_first)
        pw.view.inflight += 1
        state.prefilling = True
        try:
            reply = worker_pb2.PrefillReply.FromString(await call)
        except (_Retry, RequestFailed) as e:          # D's reserve failed
            queue.put_nowait(_LegFailed(e))
            return
        except _Stalled as e:
            tried_p.add(pid)
            self.events["transfer_failures"] += 1
            queue.put_nowait(_LegFailed(_Retry("unavailable", str(e))))
            return
        except WorkerDied as e:
            pw.view.healthy = False
            tried_p.add(pid)
            self.events["transfer_failures"] += 1
            queue.put_nowait(_LegFailed(_Retry("unavailable", f"prefill worker {pid} died: {e}")))
            return
        except Exception as e:  # noqa: BLE001 - any other failure of the call: the attempt's
            logger.warning("%s: prefill call to %s failed: %r", task.request_id, pid, e)
            tried_p.add(pid)
            queue.put_nowait(_LegFailed(_Retry("internal", f"prefill call failed: {e}")))
            return
        finally:
            pw.view.inflight -= 1
            state.prefilling = False
        state.rec.prefill_done_at = time.monotonic()
        state.rec.prefill_seconds = reply.prefill_seconds
        state.rec.transfer_seconds = reply.transfer_seconds
        m = self.metrics
        if m is not None:
            if reply.code == worker_pb2.WORKER_ERROR_NONE:
                m.labels(m.kv_bytes, transport=self.transport_name).inc(reply.record.kv_bytes)
                m.labels(m.kv_seconds, transport=self.transport_name).observe(reply.transfer_seconds)
            else:
                m.labels(m.kv_failures,
                         reason=worker_pb2.WorkerErrorCode.Name(reply.code)).inc()
        if reply.code != worker_pb2.WORKER_ERROR_NONE:
            tried_p.add(pid)
            if reply.code == worker_pb2.WORKER_ERROR_INVALID:
                queue.put_nowait(_LegFailed(RequestFailed("invalid", reply.error)))
            elif reply.code == worker_pb2.WORKER_ERROR_DEADLINE:
                queue.put_nowait(_LegFailed(RequestFailed("deadline", reply.error)))
            else:
                self.events["transfer_failures"] += 1
                queue.put_nowait(_LegFailed(_Retry("unavailable", reply.error or "prefill failed")))
            return
        state.cached_tokens = reply.record.num_cached_tokens

    def _decode_has_room(self, state: _State, inp: GenerateInput, tried_d: set[str]) -> bool:
        need = -(-(len(inp.prompt_token_ids) + len(state.delivered)) // self.config.block_size)
        return any(_accepting(w) and k not in tried_d and w.view.kv_blocks_free >= need
                   for k, w in self.decode.items())

    async def _prefill_overlapped(self, state: _State, inp: GenerateInput, sampling,
                                  deadline_ms: int, tried_d: set[str], pw: _Worker,
                                  data: bytes, on_first: Callable[[worker_pb2.FirstToken], None]
                                  ) -> bytes:
        """The prefill call (a task with reservation_follows) and D's reserve at once;
        the reservation goes to P as soon as D grants it. A failed reserve raises as in
        the serial path; the caller's abort of the attempt then stops P too."""
        call = asyncio.ensure_future(self._watch_prefill(pw, data, on_first))
        attach: asyncio.Future | None = None
        try:
            res = await self._reserve_or_submit(state, inp, sampling, deadline_ms, False, tried_d)
            if not call.done():      # else P already answered (an error): its reply says why
                msg = worker_pb2.AttachReservation(request_id=state.rec.request_id,
                                                   attempt_id=state.attempt, reservation=res)
                # Not awaited here: a stalled P would hang it. The prefill call is watched
                # (health checks), and a P that never got the reservation fails its
                # hand-off when its wait for it times out.
                attach = asyncio.ensure_future(pw.client.attach_reservation(msg.SerializeToString()))
                attach.add_done_callback(_consume)
            return await call
        finally:
            for t in (call, attach):
                if t is not None and not t.done():
                    t.cancel()

    async def _watch_prefill(self, pw: _Worker, data: bytes,
                             on_first: Callable[[worker_pb2.FirstToken], None]) -> bytes:
        """The prefill call, abandoned if its worker stops answering health checks (a
        stalled or dead P), however long a busy but healthy P takes (up to a backstop).
        P's early first token goes to on_first; returns the PrefillReply."""
        async def consume() -> bytes:
            async for msg in pw.client.prefill_stream(data):
                reply = worker_pb2.PrefillReply.FromString(msg)
                if not reply.HasField("first_token"):
                    return msg
                on_first(reply.first_token)
            raise RuntimeError("the prefill stream ended without a reply")

        task = asyncio.ensure_future(consume())
        start = time.monotonic()
        try:
            while True:
                done, _ = await asyncio.wait({task}, timeout=0.25)
                if done:
                    return task.result()
                if not pw.view.healthy:
                    raise _Stalled(f"prefill worker {pw.view.worker_id} stopped answering")
                if time.monotonic() - start > self.config.prefill_timeout_s:
                    raise _Stalled(f"prefill worker {pw.view.worker_id} did not answer in "
                                   f"{self.config.prefill_timeout_s:.0f}s")
        finally:
            if not task.done():
                task.cancel()

    async def _reserve_or_submit(self, state: _State, inp: GenerateInput, sampling,
                                 deadline_ms: int, colocated: bool, tried_d: set[str]):
        rid = state.rec.request_id
        give_up = time.monotonic() + self.config.reserve_wait_s
        while True:
            decode = [w for k, w in self.decode.items() if _accepting(w) and k not in tried_d]
            if not decode:
                decode = [w for w in self.decode.values() if _accepting(w)]
            if not decode:      # every healthy one drains: ask anyway, the answer says so
                decode = [w for w in self.decode.values() if w.view.healthy]
            if not decode:
                raise _Retry("unavailable", "no healthy decode worker")
            v = self.decode_policy.pick([w.view for w in decode], inp.prompt_token_ids)
            dw = self.decode[v.worker_id]
            state.decode_id = v.worker_id
            # Count this request against the worker before awaiting it, so requests
            # dispatched together spread out instead of all picking the same worker.
            resume = list(state.delivered)
            need = -(-(len(inp.prompt_token_ids) + len(resume)) // self.config.block_size)
            dw.view.inflight += 1
            dw.view.kv_blocks_free -= need
            ok = False
            try:
                if colocated:
                    req = worker_pb2.SubmitRequest(
                        request_id=rid, attempt_id=state.attempt,
                        prompt_token_ids=inp.prompt_token_ids, sampling=sampling,
                        router_id=self.router_id, deadline_unix_ms=deadline_ms,
                        resume_token_ids=resume)
                    rep = worker_pb2.SubmitReply.FromString(
                        await dw.client.submit(req.SerializeToString()))
                    code, err, result = rep.code, rep.error, None
                else:
                    req = worker_pb2.ReserveRequest(
                        request_id=rid, attempt_id=state.attempt,
                        num_prompt_tokens=len(inp.prompt_token_ids) + len(resume),
                        prompt_token_ids=inp.prompt_token_ids, lease_ms=self.config.lease_ms,
                        sampling=sampling, router_id=self.router_id,
                        deadline_unix_ms=deadline_ms, resume_token_ids=resume)
                    rep2 = worker_pb2.ReserveReply.FromString(
                        await dw.client.reserve(req.SerializeToString()))
                    code, err, result = rep2.code, rep2.error, rep2.reservation
                ok = code == worker_pb2.WORKER_ERROR_NONE
            except WorkerDied as e:
                dw.view.healthy = False
                tried_d.add(v.worker_id)
                logger.warning("decode worker %s died: %s", v.worker_id, e)
                continue
            finally:
                if not ok:
                    dw.view.inflight -= 1
                    dw.view.kv_blocks_free += need
            if ok:
                state.rec.workers.append(v.worker_id)
                return result
            if code == worker_pb2.WORKER_ERROR_INVALID:
                raise RequestFailed("invalid", err)
            if code == worker_pb2.WORKER_ERROR_DRAINING:
                dw.view.draining = True          # before the next load refresh says so
            # No capacity / draining: try again shortly (another D may free blocks).
            if time.monotonic() > give_up:
                raise RequestFailed("exhausted", f"no decode capacity: {err}")
            await asyncio.sleep(0.05)
            await self._refresh_loads()

    async def _stream(self, state: _State, inp: GenerateInput) -> AsyncIterator[Delta]:
        rid = state.rec.request_id
        d_running = False        # D sent an output of this attempt: the hand-off is done
        while True:
            try:
                item = await self._with_deadline(state.queue.get(), inp)
            except RequestFailed:
                raise
            if isinstance(item, _LegFailed):
                if d_running and isinstance(item.error, _Retry):
                    # P died or stalled after D had the KV (its reply was still on the
                    # way): nothing of this attempt is lost, D goes on decoding.
                    logger.info("%s: prefill leg failed after the hand-off (%s); ignored",
                                rid, item.error)
                    continue
                raise item.error
            # _run decides: a retry, or (a decode step's token already sent) an error
            if isinstance(item, _DecodeLost):
                self.events["decode_lost"] += 1
                raise _Retry("unavailable", str(item))
            early = isinstance(item, _Early)
            out: worker_pb2.DecodeOutput = item.out if early else item
            d_running = d_running or not early
            new_ids = list(out.token_ids)
            text = out.text
            # Drop anything already delivered (a duplicate or replayed output).
            skip = max(0, state.tokens_sent - out.first_token_index)
            if early:
                if skip:       # D's output of this token came first: it said it all
                    continue
                state.early = (out.first_token_index, text)
            elif skip and state.early is not None and out.first_token_index == state.early[0]:
                # D's activation output repeats the token P sent early, and its text
                # (the same detokenizer and stop rules) starts with what was sent then.
                text = text[len(state.early[1]):]
            new_ids = new_ids[skip:]
            lps = logprobs_from_proto(out.logprobs)[skip:] if out.logprobs else None
            finish = finish_reason_from_proto(out.finish_reason)
            if finish == "error":
                raise _Retry("internal", out.error or "decode failed")
            if finish == "abort":
                raise RequestFailed("deadline" if inp.deadline and time.time() >= inp.deadline
                                    else "internal", out.error or "request aborted by worker")
            if not new_ids and not text and finish is None:
                continue       # nothing new (the repeat of a token sent early)
            state.tokens_sent += len(new_ids)
            state.delivered.extend(new_ids)
            now = time.monotonic()
            m = self.metrics
            if new_ids:
                if state.rec.first_token_at is None:
                    state.rec.first_token_at = now
                    if m is not None:
                        m.labels(m.ttft).observe(now - state.rec.accepted_at)
                elif m is not None:
                    gap = (now - state.last_token_at) / len(new_ids)
                    for _ in new_ids:
                        m.labels(m.itl).observe(gap)
                state.last_token_at = now
            usage = None
            if finish is not None:
                state.finished = True
                cached = (state.cached_tokens if state.cached_tokens is not None
                          else out.usage.cached_tokens)
                usage = Usage(out.usage.prompt_tokens, out.usage.completion_tokens, cached)
                self._release_inflight(state)
                if m is not None:
                    m.labels(m.e2e).observe(now - state.rec.accepted_at)
                    m.labels(m.success, finished_reason=finish).inc()
                    m.labels(m.prompt_tokens).inc(usage.prompt_tokens)
                    m.labels(m.generation_tokens).inc(usage.completion_tokens)
                    m.labels(m.prefix_queries).inc(usage.prompt_tokens)
                    m.labels(m.prefix_hits).inc(usage.cached_tokens)
            stop_reason: str | int | None = out.stop_reason or None
            if out.HasField("stop_token_id"):
                stop_reason = out.stop_token_id
            yield Delta(rid, new_ids, text, lps, finish, stop_reason, usage)
            if finish is not None:
                return

    async def _with_deadline(self, aw, inp: GenerateInput):
        if inp.deadline is None:
            return await aw
        left = inp.deadline - time.time()
        try:
            async with asyncio.timeout(max(0.0, left)):   # never swallows a cancel (3.11)
                return await aw
        except TimeoutError:
            raise RequestFailed("deadline", "deadline exceeded") from None

    def _abort_attempt(self, state: _State) -> None:
        """Fire-and-forget aborts on both workers of the current attempt."""
        rid, attempt = state.rec.request_id, state.attempt
        for table, wid in ((self.decode, state.decode_id), (self.prefill, state.prefill_id)):
            w = table.get(wid)
            if w is not None and attempt:
                t = asyncio.ensure_future(_quiet(w.client.abort(rid, attempt)))
                self._tasks.append(t)
                t.add_done_callback(self._forget)
        self._release_inflight(state)
        state.decode_id = state.prefill_id = ""

    def _forget(self, t: asyncio.Task) -> None:
        try:
            self._tasks.remove(t)
        except ValueError:
            pass

    def _release_inflight(self, state: _State) -> None:
        w = self.decode.get(state.decode_id)
        if w is not None and w.view.inflight > 0:
            w.view.inflight -= 1

    # -- background -----------------------------------------------------------------------
    async def _poller(self, wid: str) -> None:
        """Long-polls one decode worker for this router's outputs; detects its death."""
        w = self.decode[wid]
        while not self._stopping:
            try:
                batch = worker_pb2.DecodeOutputBatch.FromString(
                    await w.client.poll(self.router_id, 1.0))
            except asyncio.CancelledError:
                raise
            except Exception as e:  # noqa: BLE001 - any failure means: worker lost
                await self._decode_lost(wid, e)
                continue
            for out in batch.outputs:
                st = self.states.get(out.request_id)
                if st is not None and st.attempt == out.attempt_id and st.decode_id == wid:
                    st.queue.put_nowait(out)

    async def _decode_lost(self, wid: str, err: BaseException) -> None:
        w = self.decode[wid]
        w.view.healthy = False
        logger.warning("decode worker %s lost: %s", wid, err)
        for st in list(self.states.values()):
            if st.decode_id == wid and not st.finished:
                st.queue.put_nowait(_DecodeLost(f"decode worker {wid} lost"))
        # Wait for Ray to restart it, then re-attach (start() is idempotent).
        while not self._stopping:
            await asyncio.sleep(0.5)
            if await self._reattach(w):
                w.view.healthy = True
                logger.info("decode worker %s is back", wid)
                return

    async def _reattach(self, w: _Worker) -> bool:
        """start() on a worker that came back (idempotent there), bounded by
        reattach_timeout_s. False: it is not started (yet); the caller tries again later."""
        try:
            w.info = worker_pb2.WorkerInfo.FromString(
                await asyncio.wait_for(w.client.start(), self.config.reattach_timeout_s))
            return True
        except asyncio.CancelledError:
            raise
        except Exception as e:  # noqa: BLE001 - any failure means: not back yet
            logger.warning("worker %s did not re-attach: %s", w.view.worker_id,
                           str(e) or type(e).__name__)
            return False

    async def _lease_loop(self) -> None:
        """Heartbeat (every lease/6) for the reservations of attempts still in prefill."""
        lease_s = self.config.lease_ms / 1000
        while not self._stopping:
            await asyncio.sleep(lease_s / 6)
            by_decode: dict[str, list[str]] = {}
            for st in self.states.values():
                if st.prefilling and st.decode_id:
                    by_decode.setdefault(st.decode_id, []).append(
                        f"{st.rec.request_id}/{st.attempt}")
            for wid, keys in by_decode.items():
                w = self.decode.get(wid)
                if w is not None and w.view.healthy:
                    t = asyncio.ensure_future(_quiet(w.client.renew(keys, lease_s)))
                    self._tasks.append(t)
                    t.add_done_callback(self._forget)

    async def _load_loop(self) -> None:
        while not self._stopping:
            await asyncio.sleep(self.config.load_interval_s)
            await self._refresh_loads()

    async def _refresh_loads(self) -> None:
        async def one(w: _Worker, is_prefill: bool) -> None:
            try:
                ld = worker_pb2.WorkerLoad.FromString(await asyncio.wait_for(w.client.load(), 2.0))
            except Exception:  # noqa: BLE001
                if is_prefill:
                    w.view.healthy = False
                return
            if is_prefill and not w.view.healthy:
                # A restarted prefill worker: re-run its start() before sending work. In
                # its own task: one worker slow to start must not hold up every
                # worker's loads (this refresh runs every load_interval_s).
                if w.reattach is None:
                    w.reattach = asyncio.ensure_future(self._reattach(w))
                    self._tasks.append(w.reattach)
                    w.reattach.add_done_callback(self._forget)
                if not w.reattach.done():
                    return
                if w.reattach.cancelled():      # the router is stopping
                    w.reattach = None
                    return
                attached, w.reattach = w.reattach.result(), None
                if not attached:
                    return
            w.view.num_running, w.view.num_waiting = ld.num_running, ld.num_waiting
            w.view.kv_blocks_free, w.view.kv_blocks_total = ld.kv_blocks_free, ld.kv_blocks_total
            w.view.draining = ld.draining
            if is_prefill:
                w.view.healthy = not ld.draining
        await asyncio.gather(*[one(w, True) for w in self.prefill.values()],
                             *[one(w, False) for w in self.decode.values() if w.view.healthy])


class _Stalled(Exception):
    pass


@dataclass
class _Early:
    """P's first token, sent before its KV reached D (a DecodeOutput as D would send it)."""
    out: worker_pb2.DecodeOutput


@dataclass
class _LegFailed:
    """The prefill leg ended the attempt: a _Retry, or a RequestFailed."""
    error: Exception


class _Retry(Exception):
    def __init__(self, kind: str, message: str) -> None:
        super().__init__(message)
        self.kind = kind


def _accepting(w: _Worker) -> bool:
    """May get new work: alive, and not draining (its requests in flight still finish)."""
    return w.view.healthy and not w.view.draining


def _consume(t: asyncio.Future) -> None:
    """Done callback of a call nobody awaits: its failure is seen elsewhere."""
    if not t.cancelled() and t.exception() is not None:
        logger.debug("background call failed: %r", t.exception())


async def _quiet(aw) -> None:
    try:
        await aw
    except Exception:  # noqa: BLE001 - best effort: the worker may be gone
        pass


__all__ = ["Router", "RouterConfig", "GenerateInput", "Delta", "RequestFailed", "Overloaded"]
