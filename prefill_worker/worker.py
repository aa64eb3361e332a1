"""PrefillWorker: batched, chunked prefill with a prefix cache; pushes each request's KV
into the decode worker's reserved blocks while later layers still compute.

One request (one attempt):

    prefill(task) ─ open a send handle to D (task.reservation), or, with
                    reservation_follows, a DeferredSendHandle that keeps the KV until
                    attach_reservation() brings the reservation (the router asks D for
                    it while this worker computes)
                  ─ engine.add_request(prefill_only)           ┐ engine thread
                      step: layer l writes K/V → hook gathers   │ (batched with
                      the request's blocks of layer l → send()  │  other prompts)
                      first token sampled, P's blocks freed     ┘
                  ─ handle.finish()  (all chunks acknowledged by D)
                  ─ transport.complete(CompletionRecord)  → D starts decoding
                  ─ PrefillReply to the router

Any failure (transfer error, timeout, cancel, deadline) ends the attempt with a
PrefillReply code; the router decides whether to retry on another prefill worker.
"""
from __future__ import annotations

import asyncio
import logging
import os
import time
from typing import AsyncIterator, Awaitable, Callable

import google_crc32c  # noqa: F401 - imported for its side effect of failing early if absent

from pdserve.engine.async_engine import AsyncEngine
from pdserve.engine.llm_engine import LLMEngine, RequestOutput
from pdserve.engine.sequence import Sequence
from pdserve.outputs import logprobs_to_proto
from pdserve.profiling import ProfiledWorker
from pdserve.protocol import sampling_params_from_proto
from pdserve.v1 import generation_pb2, kv_pb2, worker_pb2
from pdserve.worker_spec import WorkerSpec
from kv_transfer.base import KVSendHandle, SendSummary, TRANSPORTS, TransferError
from kv_transfer.deferred import DeferredSendHandle
from kv_transfer.ipc import CACHE_ID_PARAM
from kv_transfer.layout import KVLayout, block_index, gather_blocks, single_buffer
from torch import Tensor

logger = logging.getLogger(__name__)

PREFILL_WAIT_MAX_S = 600.0    # backstop for a request without a deadline
EARLY_ATTACH_MAX = 1024       # reservations that arrived before their task (bounded)


class PrefillWorker(ProfiledWorker):
    def __init__(self, spec_json: str) -> None:
        self.spec = WorkerSpec.from_json(spec_json)
        self.engine = LLMEngine(self.spec.engine_config())
        mc = self.engine.model_config
        self.layout = KVLayout(mc.num_hidden_layers, self.engine.block_size,
                               mc.num_key_value_heads, mc.head_dim, self.engine.dtype)
        self.compat_hash = self.layout.compat_hash(self.spec.model_name)
        self.aengine: AsyncEngine | None = None
        self.loop: asyncio.AbstractEventLoop | None = None
        self.transport = None
        self._ipc = None                                # the IpcTransport, ipc only
        # (decode worker id, cache id) -> the fetch of that export, shared by concurrent requests
        self._ipc_attach: dict[tuple[str, str], asyncio.Future] = {}
        # key -> (send handle, number of prompt blocks); read by the engine thread's hook
        self.exports: dict[str, tuple[KVSendHandle, int]] = {}
        # key -> a reservation whose AttachReservation overtook its PrefillTask
        self._early_res: dict[str, worker_pb2.Reservation] = {}
        self._export_index: dict[str, Tensor] = {}   # engine thread only: see _on_layer
        self._kv_base = single_buffer(self.engine.kv_caches)   # one gather per send
        self._layerwise = True   # set with the export hook, from the transport, in _start
        self.first: dict[str, asyncio.Future] = {}
        self.draining = False
        # Attempts the router aborted before their task started here (the abort and the
        # task are separate calls, and may arrive in either order): such a task is
        # refused instead of computed. Bounded FIFO of keys, as on the decode worker.
        self.ended: dict[str, None] = {}
        self.fault_plan = None
        self._starting: asyncio.Future | None = None     # start()'s one run (see start)
        # Phase gates (tests and fault drills): awaited as gate(phase, request_key) at
        # "admitted", "first_token" (KV pushed or in flight), "kv_sent" (all chunks
        # acknowledged, before the completion record) and "completed". A test places a
        # kill, cancel or check at an exact phase instead of relying on timing.
        self.gate: Callable[[str, str], Awaitable[None]] | None = None

    async def start(self, local_receivers: dict | None = None) -> bytes:
        """Idempotent: the router calls it again after a restart to re-attach. A call made
        while the first one is still starting (with nccl, start joins the process group)
        waits for it: the worker never reports itself started before it is."""
        if self._starting is None:
            self._starting = asyncio.ensure_future(self._start(local_receivers))
        await asyncio.shield(self._starting)
        return self._info.SerializeToString()

    async def _start(self, local_receivers: dict | None) -> None:
        self.loop = asyncio.get_running_loop()
        self.aengine = AsyncEngine(self.engine, on_fatal=self._fatal, sink=self._sink)
        self.aengine.start()
        if self.spec.transport == "nccl":
            from kv_transfer import dist
            d = self.spec.dist
            # Blocks until every worker joined: off the event loop.
            await asyncio.to_thread(dist.init_kv_group, d.backend, d.init_method,
                                    d.world_size, d.rank)
        self.transport = self._make_transport(local_receivers)
        self.set_layerwise(getattr(self.transport, "layerwise", True))
        self.fault_plan = None
        if self.spec.faults:
            from kv_transfer.faults import FaultPlan, FaultyTransport
            self.fault_plan = FaultPlan.from_json(self.spec.faults)
            if self.fault_plan.kind in ("reset", "delay", "stall", "drop"):
                self.transport = FaultyTransport(self.transport, self.fault_plan)
        metrics_endpoint = ""
        if self.spec.metrics_port >= 0:
            from decode_worker.worker import node_ip
            from pdserve.worker_metrics import serve_worker_metrics
            metrics_endpoint = serve_worker_metrics(
                self.spec.worker_id, "prefill", self.spec.model_name, self.engine,
                self.spec.host or node_ip(), self.spec.metrics_port,
                lambda: {"kv_exports_open": float(len(self.exports))})
        self._info = worker_pb2.WorkerInfo(
            worker_id=self.spec.worker_id, role=worker_pb2.ROLE_PREFILL,
            compat_hash=self.compat_hash, block_size=self.engine.block_size,
            num_blocks=self.engine.num_blocks, max_model_len=self.engine.max_model_len,
            model_name=self.spec.model_name, dist_rank=max(self.spec.dist.rank, 0),
            pid=os.getpid(), metrics_endpoint=metrics_endpoint)

    def set_layerwise(self, layerwise: bool) -> None:
        """Whether the transport takes the KV layer by layer during the forward pass, or
        the whole prompt's after it (which lets the step replay a prefill CUDA graph)."""
        self._layerwise = layerwise
        self.engine.runner.set_layer_hook(self._on_layer, every_layer=layerwise)

    def _make_transport(self, local_receivers: dict | None):
        name = self.spec.transport
        if name == "local":
            from kv_transfer.local import LocalTransport
            t = LocalTransport()
            for endpoint, receiver in (local_receivers or {}).items():
                t.bind(endpoint, receiver)
            return t
        if name == "grpc":
            from kv_transfer.grpc_transport import GrpcTransport
            return GrpcTransport(secret=self.spec.secret or None)
        if name == "nccl":
            from kv_transfer import dist
            from kv_transfer.grpc_transport import GrpcTransport
            return dist.DistTransport(control=GrpcTransport(secret=self.spec.secret or None),
                                      device=self.engine.device)
        if name == "ipc":
            from kv_transfer.ipc import IpcTransport
            from kv_transfer.grpc_transport import GrpcTransport
            self._ipc = IpcTransport(control=GrpcTransport(secret=self.spec.secret or None))
            return self._ipc
        raise ValueError(f"unknown transport {name!r}; known: {sorted(TRANSPORTS)}")

    def _fatal(self, e: BaseException) -> None:
        logger.critical("prefill worker %s: engine loop died (%s); exiting", self.spec.worker_id, e)
        if self.loop is not None:
            self.loop.call_later(0.5, os._exit, 1)

    async def drain(self) -> None:
        self.draining = True

    async def stop(self) -> None:
        if self.aengine is not None:
            await self.aengine.stop()
        if self.transport is not None:
            self.transport.close()

    # -- engine thread --------------------------------------------------------------------
    def _on_layer(self, layer: int, seqs: list[Sequence]) -> None:
        if layer == 0:   # a new forward pass: last pass's indexes are stale
            self._export_index = {}
        # Layer-wise transports get each layer as it is written; the others (ipc) every
        # layer at once, after the forward pass (runner.set_layer_hook(every_layer=False)).
        first = layer if self._layerwise else 0
        for seq in seqs:
            exp = self.exports.get(seq.seq_id)
            if exp is None:
                continue
            handle, nblocks = exp
            # The prompt's block ids, on the device once per forward pass (layer 0 comes
            # first), not once per layer.
            idx = self._export_index.get(seq.seq_id)
            if idx is None:
                idx = block_index(self.engine.kv.block_table(seq.seq_id)[:nblocks], self.engine.device)
                self._export_index[seq.seq_id] = idx
            try:
                handle.send(first, layer + 1, gather_blocks(self.engine.kv_caches, first, layer + 1,
                                                           idx, self._kv_base))
            except TransferError as e:
                # The attempt failed (D rejected a chunk, or it was aborted): finish()
                # reports it; the engine keeps going for everyone else.
                logger.debug("send for %s failed at layer %d: %s", seq.seq_id, layer, e)

    def _sink(self, out: RequestOutput) -> None:
        fut = self.first.get(out.request_id)
        if fut is not None and not fut.done():
            fut.set_result(out)

    # -- router API -----------------------------------------------------------------------
    async def prefill(self, data: bytes) -> bytes:
        """One attempt's prefill and KV hand-off; the PrefillReply once D acknowledged
        the completion record (or the attempt failed)."""
        return await self._prefill(worker_pb2.PrefillTask.FromString(data), None)

    async def prefill_stream(self, data: bytes) -> AsyncIterator[bytes]:
        """prefill() as a stream (what the router calls): first a PrefillReply holding
        only first_token, as soon as P sampled it and before the KV hand-off (unless that
        token ends the request), then the reply prefill() returns."""
        early: asyncio.Queue = asyncio.Queue()
        run = asyncio.ensure_future(self._prefill(worker_pb2.PrefillTask.FromString(data),
                                                  early.put_nowait))
        run.add_done_callback(lambda _: early.put_nowait(None))
        try:
            while (item := await early.get()) is not None:
                yield item
            yield run.result()
        finally:
            if not run.done():
                run.cancel()

    async def _prefill(self, task: worker_pb2.PrefillTask,
                       on_first: Callable[[bytes], None] | None) -> bytes:
        if self.draining:
            return _reply(worker_pb2.WORKER_ERROR_DRAINING, "worker is draining")
        key = f"{task.request_id}/{task.attempt_id}"
        res = task.reservation
        prompt, resume = list(task.prompt_token_ids), list(task.resume_token_ids)
        t0 = time.monotonic()
        try:
            params = sampling_params_from_proto(task.sampling, 16)
        except ValueError as e:
            return _reply(worker_pb2.WORKER_ERROR_INVALID, str(e))
        nblocks = -(-(len(prompt) + len(resume)) // self.engine.block_size)
        assert self.aengine is not None and self.transport is not None
        handle: KVSendHandle
        if task.reservation_follows:
            handle = DeferredSendHandle()
        else:
            bad = self._unusable(res, nblocks)
            if bad is not None:
                return _reply(*bad)
            try:
                if self._ipc is not None:
                    await self._attach_ipc(res)
                handle = self.transport.open(res, task.request_id, task.attempt_id)
            except TransferError as e:
                return _reply(worker_pb2.WORKER_ERROR_TRANSFER, f"cannot reach decode worker: {e}")
        if key in self.ended:
            handle.abort()
            return _reply(worker_pb2.WORKER_ERROR_CANCELLED, "attempt was aborted")
        fut: asyncio.Future = asyncio.get_running_loop().create_future()
        self.first[key] = fut
        self.exports[key] = (handle, nblocks)
        early = self._early_res.pop(key, None)
        if early is not None:
            asyncio.ensure_future(self._bind(key, early))
        try:
            try:
                self.aengine.add_request(key, prompt, params, prefill_only=True,
                                         output_token_ids=resume)
            except ValueError as e:
                handle.abort()
                return _reply(worker_pb2.WORKER_ERROR_INVALID, str(e))
            await self._gate("admitted", key)
            # Queueing + compute may take long under load; only the request's own
            # deadline bounds it here (the router bounds the whole call separately and
            # aborts it if this worker is stuck).
            timeout = self._remaining(task, PREFILL_WAIT_MAX_S)
            try:
                async with asyncio.timeout(timeout):      # never swallows a cancel (3.11)
                    out: RequestOutput = await asyncio.shield(fut)
            except TimeoutError:
                self.aengine.abort(key)
                handle.abort()
                if task.deadline_unix_ms and time.time() * 1000 >= task.deadline_unix_ms:
                    return _reply(worker_pb2.WORKER_ERROR_DEADLINE, "deadline exceeded in prefill")
                return _reply(worker_pb2.WORKER_ERROR_INTERNAL, "prefill did not finish in time")
            if out.finish_reason in ("abort", "error") or not out.new_token_ids:
                handle.abort()
                code = (worker_pb2.WORKER_ERROR_CANCELLED if out.finish_reason == "abort"
                        else worker_pb2.WORKER_ERROR_INTERNAL)
                return _reply(code, out.error or f"prefill ended: {out.finish_reason}")
            t1 = time.monotonic()
            if on_first is not None:
                first = self._first_token(prompt, resume, params, out)
                if first is not None:
                    on_first(worker_pb2.PrefillReply(first_token=first).SerializeToString())
            await self._gate("first_token", key)
            tmo = self._remaining(task, self.spec.transfer_timeout_s)
            try:
                if self.gate is None:
                    # One thread hop for the rest of the hand-off (it is on TTFT's path).
                    record, ack = await asyncio.to_thread(self._hand_off, handle, task, out, tmo)
                else:   # tests and drills: a gate between the last chunk and Complete
                    summary = await asyncio.to_thread(handle.finish, tmo)
                    await self._gate("kv_sent", key)
                    res = _reservation(handle, task)
                    record = self._record(task, res, out, summary)
                    ack = await asyncio.to_thread(self.transport.complete, res, record, tmo)
            except TransferError as e:
                return _reply(worker_pb2.WORKER_ERROR_TRANSFER, f"KV transfer failed: {e}")
            if not ack.ok:
                return _reply(worker_pb2.WORKER_ERROR_TRANSFER,
                              f"decode worker refused the KV: {kv_pb2.KVStatus.Name(ack.code)} "
                              f"{ack.error}")
            await self._gate("completed", key)
            return worker_pb2.PrefillReply(
                code=worker_pb2.WORKER_ERROR_NONE, record=record, prefill_seconds=t1 - t0,
                transfer_seconds=time.monotonic() - t1).SerializeToString()
        finally:
            self.first.pop(key, None)
            self.exports.pop(key, None)
            self._early_res.pop(key, None)

    def _first_token(self, prompt: list[int], resume: list[int], params, out: RequestOutput
                     ) -> worker_pb2.FirstToken | None:
        """The first token as D will emit it on activation: the same detokenizer and stop
        rules over the same prompt (engine.text_stream), so the text is identical. None
        when the token ends the request: D reports that, with the finish reason."""
        token = out.new_token_ids[0]
        if len(prompt) + len(resume) + 1 >= self.engine.max_model_len:
            return None
        try:
            step = self.engine.text_stream(prompt, params, resume).step(token)
        except ValueError:
            return None
        if step.finish_reason is not None:
            return None
        first = worker_pb2.FirstToken(token_id=token, text=step.delta)
        if out.new_logprobs:
            first.logprob.CopyFrom(logprobs_to_proto(out.new_logprobs[:1])[0])
        return first

    def _unusable(self, res: worker_pb2.Reservation, nblocks: int) -> tuple[int, str] | None:
        """Why this worker cannot push a prompt of `nblocks` blocks into `res`, or None."""
        if res.compat_hash != self.compat_hash:
            return (worker_pb2.WORKER_ERROR_TRANSFER,
                    "decode worker's KV layout is incompatible with this prefill worker")
        if len(res.block_ids) != nblocks:
            return (worker_pb2.WORKER_ERROR_INVALID,
                    f"reservation has {len(res.block_ids)} blocks, prompt needs {nblocks}")
        return None

    async def attach_reservation(self, data: bytes) -> None:
        """The reservation of a task sent with reservation_follows. The KV kept so far
        goes to D now; the rest goes as the forward pass produces it. A reservation
        this worker cannot use fails the attempt (its prefill() reply says why)."""
        msg = worker_pb2.AttachReservation.FromString(data)
        key = f"{msg.request_id}/{msg.attempt_id}"
        if key not in self.exports:
            # Sent after the task, but calls to an actor may start out of order.
            self._early_res[key] = msg.reservation
            while len(self._early_res) > EARLY_ATTACH_MAX:
                self._early_res.pop(next(iter(self._early_res)))
            return
        await self._bind(key, msg.reservation)

    async def _bind(self, key: str, res: worker_pb2.Reservation) -> None:
        exp = self.exports.get(key)
        if exp is None or not isinstance(exp[0], DeferredSendHandle) or exp[0].bound:
            return
        handle, nblocks = exp
        bad = self._unusable(res, nblocks)
        if bad is not None:
            handle.fail(TransferError(bad[1], kv_pb2.KV_STATUS_INCOMPATIBLE))
            return
        request_id, attempt = key.rsplit("/", 1)
        assert self.transport is not None
        try:
            if self._ipc is not None:
                await self._attach_ipc(res)
            real = self.transport.open(res, request_id, int(attempt))
        except TransferError as e:
            handle.fail(TransferError(f"cannot reach decode worker: {e}", e.code))
            return
        if self.exports.get(key) is not exp:     # the attempt ended while we opened it
            real.abort()
            return
        handle.bind(real, res)

    def _record(self, task: worker_pb2.PrefillTask, res: worker_pb2.Reservation,
                out: RequestOutput, summary: SendSummary) -> worker_pb2.CompletionRecord:
        record = worker_pb2.CompletionRecord(
            request_id=task.request_id, attempt_id=task.attempt_id,
            reservation_id=res.reservation_id, first_token_id=out.new_token_ids[0],
            num_prompt_tokens=len(task.prompt_token_ids) + len(task.resume_token_ids),
            num_cached_tokens=out.num_cached_tokens,
            kv_checksum=summary.checksum, num_chunks=summary.num_chunks,
            kv_bytes=summary.num_bytes, prefill_worker_id=self.spec.worker_id)
        if out.new_logprobs:
            lp = out.new_logprobs[0]
            record.first_token_logprob = lp.logprob
            record.first_top_logprobs.extend(
                generation_pb2.TopLogprob(token_id=t, logprob=v) for t, v in lp.top)
        return record

    def _hand_off(self, handle: KVSendHandle, task: worker_pb2.PrefillTask, out: RequestOutput,
                  timeout: float) -> tuple[worker_pb2.CompletionRecord, kv_pb2.CompleteAck]:
        """On a worker thread: wait for the last chunk, then send the completion record."""
        summary = handle.finish(timeout)
        res = _reservation(handle, task)
        record = self._record(task, res, out, summary)
        return record, self.transport.complete(res, record, timeout)

    async def _attach_ipc(self, res: worker_pb2.Reservation) -> None:
        """ipc: open the decode worker's KV cache that the reservation names, unless it is
        open already. D is the named Ray actor `res.decode_worker_id` in pdserve.cluster's
        namespace; its cache_handles() exports the cache as CUDA IPC handles with the
        cache's id. A restarted D (same name, new process, new cache) names a new id: the
        old handles are then replaced, never written to (should D have restarted again
        since, transport.open() refuses the reservation). One fetch per (D, cache id),
        shared by concurrent requests; a failed fetch is retried by the next reservation."""
        assert self._ipc is not None
        wid, want = res.decode_worker_id, res.transport_params.get(CACHE_ID_PARAM, "")
        if self._ipc.cache_id(wid) == want:
            return
        key = (wid, want)
        fut = self._ipc_attach.get(key)
        if fut is None:
            fut = asyncio.ensure_future(self._fetch_ipc(wid))
            self._ipc_attach[key] = fut
        try:
            await asyncio.shield(fut)
        except Exception as e:
            raise TransferError(f"no KV cache handles from {wid}: {e}",
                                kv_pb2.KV_STATUS_UNKNOWN_RESERVATION) from e
        finally:
            if self._ipc_attach.get(key) is fut and fut.done():
                del self._ipc_attach[key]

    async def _fetch_ipc(self, decode_worker_id: str) -> None:
        import ray

        from pdserve.cluster import NAMESPACE  # here: pdserve.cluster imports this module
        assert self._ipc is not None
        actor = ray.get_actor(decode_worker_id, namespace=NAMESPACE)
        self._ipc.attach(decode_worker_id, await actor.cache_handles.remote())

    async def _gate(self, phase: str, key: str) -> None:
        if self.gate is not None:
            await self.gate(phase, key)

    async def abort(self, request_id: str, attempt_id: int) -> None:
        key = f"{request_id}/{attempt_id}"
        self.ended[key] = None
        if len(self.ended) > 10_000:
            self.ended.pop(next(iter(self.ended)))
        exp = self.exports.get(key)
        if exp is not None:
            exp[0].abort()
        if self.aengine is not None:
            self.aengine.abort(key)

    async def load(self) -> bytes:
        st = self.engine.stats()
        return worker_pb2.WorkerLoad(
            worker_id=self.spec.worker_id, role=worker_pb2.ROLE_PREFILL,
            num_running=int(st["num_running"]), num_waiting=int(st["num_waiting"]),
            kv_blocks_total=int(st["kv_blocks_total"]),
            kv_blocks_free=int(st["kv_blocks_free"] + st["kv_blocks_cached"]),
            kv_usage=float(st["kv_cache_usage"]), draining=self.draining,
            timestamp_unix_ms=int(time.time() * 1000)).SerializeToString()

    async def stats(self) -> dict:
        st = dict(self.engine.stats())
        st["exports"] = len(self.exports)
        if self.fault_plan is not None:
            st["faults_injected"] = dict(self.fault_plan.injected)
        return st

    @staticmethod
    def _remaining(task: worker_pb2.PrefillTask, default: float) -> float:
        if task.deadline_unix_ms:
            return max(0.01, min(default, task.deadline_unix_ms / 1000 - time.time()))
        return default


def _reservation(handle: KVSendHandle, task: worker_pb2.PrefillTask) -> worker_pb2.Reservation:
    """The reservation an attempt's KV went to: the task's, or the one attached later
    (set once a DeferredSendHandle's finish() succeeded)."""
    if isinstance(handle, DeferredSendHandle):
        assert handle.reservation is not None
        return handle.reservation
    return task.reservation


def _reply(code: int, message: str) -> bytes:
    return worker_pb2.PrefillReply(code=code, error=message).SerializeToString()
