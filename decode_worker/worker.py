"""DecodeWorker: reserves blocks, receives KV, decodes with continuous batching.

Also runs the colocated `both` role (submit(): the whole request here, no transfer).
Run it as a Ray actor (see pdserve/cluster.py) or in-process for tests; every method
the router calls takes and returns protobuf bytes.

Request keys: the engine knows a request as "<request_id>/<attempt_id>", so a retried
attempt never collides with the remains of the one it replaces, and outputs carry the
attempt id so the router drops those of attempts it already ended.

Thread model: the engine thread (AsyncEngine) owns the engine; the KV listener's gRPC
threads write payloads into RESERVED blocks (which the engine never touches until the
sequence is activated) and hand activation to the engine thread.
"""
from __future__ import annotations

import asyncio
import logging
import os
import secrets
import time

from pdserve.engine.async_engine import AsyncEngine
from pdserve.engine.llm_engine import LLMEngine, RequestOutput, TokenLogprob
from pdserve.outputs import Outbox, to_decode_output
from pdserve.profiling import ProfiledWorker
from pdserve.protocol import sampling_params_from_proto
from pdserve.v1 import kv_pb2, worker_pb2
from pdserve.worker_spec import WorkerSpec
from kv_transfer.ipc import CACHE_ID_PARAM
from kv_transfer.layout import KVLayout
from kv_transfer.receiver import KVReceiver
from kv_transfer.reservations import ReservationEntry, ReservationTable

logger = logging.getLogger(__name__)


ROLE_PB = {"prefill": worker_pb2.ROLE_PREFILL, "decode": worker_pb2.ROLE_DECODE,
           "both": worker_pb2.ROLE_BOTH}


def node_ip() -> str:
    try:
        import ray
        if ray.is_initialized():
            return ray.util.get_node_ip_address()
    except ImportError:  # pragma: no cover - ray is a dependency
        pass
    return "127.0.0.1"


class DecodeWorker(ProfiledWorker):
    def __init__(self, spec_json: str) -> None:
        self.spec = WorkerSpec.from_json(spec_json)
        self.engine = LLMEngine(self.spec.engine_config())
        self.aengine: AsyncEngine | None = None
        self.loop: asyncio.AbstractEventLoop | None = None
        self.outboxes: dict[str, Outbox] = {}
        self.routes: dict[str, tuple[str, str, int, int]] = {}  # key -> (router, rid, attempt, n_sent)
        self.deadlines: dict[str, float] = {}                   # key -> unix seconds
        self.res_ids: dict[str, str] = {}                       # key -> live reservation id
        # Attempts the router ended while their reserve() was still in flight: the
        # reservation must not be created after the abort (bounded FIFO of keys).
        self.ended: dict[str, None] = {}
        # This process's KV cache, for the ipc transport: a restarted worker (same name)
        # has a new cache, and P must not keep copying into the old one (kv_transfer/ipc.py)
        self.cache_id = secrets.token_hex(8)
        mc = self.engine.model_config
        self.layout = KVLayout(mc.num_hidden_layers, self.engine.block_size,
                               mc.num_key_value_heads, mc.head_dim, self.engine.dtype)
        self.compat_hash = self.layout.compat_hash(self.spec.model_name)
        self.table = ReservationTable()
        self.receiver = KVReceiver(self.engine.kv_caches, self.layout, self.compat_hash,
                                   self.table, self._on_complete, self._on_failed)
        # What transports deliver into: the receiver, or a fault injector in front of it.
        self.fault_plan = None
        self.kv_receiver = self.receiver
        if self.spec.faults:
            from kv_transfer.faults import FaultPlan, FaultyReceiver
            self.fault_plan = FaultPlan.from_json(self.spec.faults)
            if self.fault_plan.kind in ("corrupt", "duplicate", "late_complete"):
                self.kv_receiver = FaultyReceiver(self.receiver, self.fault_plan)
        self.kv_server = None
        self.kv_endpoint = ""
        self.metrics_endpoint = ""
        self.dist_listener = None
        self.draining = False
        self._tasks: list[asyncio.Task] = []
        self._starting: asyncio.Future | None = None     # start()'s one run (see start)
        # router id -> last poll (monotonic). A router that stops polling is gone: its
        # requests are orphans and are ended here (spec.router_gone_s after its last poll).
        self.last_poll: dict[str, float] = {}

    # -- lifecycle ------------------------------------------------------------------------
    async def start(self) -> bytes:
        """Idempotent: the router calls it again after a restart to re-attach. A call made
        while the first one is still starting (with nccl, start joins the process group)
        waits for it: the worker never reports itself started before it is."""
        if self._starting is None:
            self._starting = asyncio.ensure_future(self._start())
        await asyncio.shield(self._starting)
        return self.info().SerializeToString()

    async def _start(self) -> None:
        self.loop = asyncio.get_running_loop()
        self.aengine = AsyncEngine(self.engine, on_fatal=self._fatal, sink=self._sink)
        self.aengine.start()
        host = self.spec.host or node_ip()
        if self.spec.transport == "local":
            self.kv_endpoint = f"local:{self.spec.worker_id}"
        else:
            from kv_transfer.grpc_transport import serve_kv
            self.kv_server, port = serve_kv(self.kv_receiver, host, 0, self.spec.secret or None)
            self.kv_endpoint = f"{host}:{port}"
        if self.spec.transport == "nccl" and self.spec.dist.world_size > 0:
            from kv_transfer import dist
            # Blocks until every worker joined: off the event loop, so load() still answers.
            await asyncio.to_thread(dist.init_kv_group, self.spec.dist.backend,
                                    self.spec.dist.init_method, self.spec.dist.world_size,
                                    self.spec.dist.rank)
            peers = list(self.spec.dist.prefill_ranks)
            self.dist_listener = dist.DistKVListener(self.kv_receiver, peers, self.engine.device)
        self._tasks.append(asyncio.create_task(self._reaper()))
        if self.spec.metrics_port >= 0:
            from pdserve.worker_metrics import serve_worker_metrics
            self.metrics_endpoint = serve_worker_metrics(
                self.spec.worker_id, "decode", self.spec.model_name, self.engine, host,
                self.spec.metrics_port, lambda: {"kv_reservations_open": float(len(self.table))})

    def info(self) -> worker_pb2.WorkerInfo:
        return worker_pb2.WorkerInfo(
            worker_id=self.spec.worker_id, role=ROLE_PB[self.spec.role],
            kv_endpoint=self.kv_endpoint, compat_hash=self.compat_hash,
            block_size=self.engine.block_size, num_blocks=self.engine.num_blocks,
            max_model_len=self.engine.max_model_len, model_name=self.spec.model_name,
            node_ip=self.spec.host or node_ip(), dist_rank=max(self.spec.dist.rank, 0),
            pid=os.getpid(), metrics_endpoint=self.metrics_endpoint)

    def _fatal(self, e: BaseException) -> None:
        # The step loop died: end this process so Ray restarts the actor. Open requests
        # already got an error output (AsyncEngine does that before calling us).
        logger.critical("decode worker %s: engine loop died (%s); exiting", self.spec.worker_id, e)
        if self.loop is not None:
            self.loop.call_later(0.5, os._exit, 1)

    async def drain(self) -> None:
        self.draining = True

    async def stop(self) -> None:
        """Stop the loop, the reaper and the KV listener (in-process use and tests)."""
        for t in self._tasks:
            t.cancel()
        if self._tasks:
            await asyncio.wait(self._tasks, timeout=5)
        if self.aengine is not None:
            await self.aengine.stop()
        if self.kv_server is not None:
            self.kv_server.stop(0)

    # -- router API (bytes in, bytes out) -------------------------------------------------
    async def reserve(self, data: bytes) -> bytes:
        req = worker_pb2.ReserveRequest.FromString(data)
        if self.draining:
            return _reserve_error(worker_pb2.WORKER_ERROR_DRAINING, "worker is draining")
        key = f"{req.request_id}/{req.attempt_id}"
        try:
            params = sampling_params_from_proto(req.sampling, 16)
            prompt, resume = list(req.prompt_token_ids), list(req.resume_token_ids)
            assert self.aengine is not None
            blocks = await self.aengine.call(lambda e: e.reserve(key, prompt, params, resume))
        except ValueError as e:
            return _reserve_error(worker_pb2.WORKER_ERROR_INVALID, str(e))
        if blocks is None:
            return _reserve_error(worker_pb2.WORKER_ERROR_NO_CAPACITY, "no free KV blocks")
        if key in self.ended:
            # Aborted while we waited for the engine; the abort already freed the blocks.
            return _reserve_error(worker_pb2.WORKER_ERROR_CANCELLED, "attempt was aborted")
        lease_s = req.lease_ms / 1000 if req.lease_ms else self.spec.lease_s
        num_tokens = len(prompt) + len(resume)
        entry = self.table.create(request_id=req.request_id, attempt_id=req.attempt_id,
                                  block_ids=tuple(blocks), num_tokens=num_tokens,
                                  lease_s=lease_s)
        if self.spec.transport == "ipc":
            # P copies straight into the blocks; no chunk passes through the receiver
            self.receiver.expect_peer_writes(entry)
        self.res_ids[key] = entry.reservation_id
        self.routes[key] = (req.router_id, req.request_id, req.attempt_id, len(resume))
        if req.deadline_unix_ms:
            self.deadlines[key] = req.deadline_unix_ms / 1000
        self.outboxes.setdefault(req.router_id, Outbox())
        res = worker_pb2.Reservation(
            reservation_id=entry.reservation_id, decode_worker_id=self.spec.worker_id,
            endpoint=self.kv_endpoint, block_ids=blocks, num_tokens=num_tokens,
            lease_expiry_unix_ms=int((time.time() + lease_s) * 1000),
            compat_hash=self.compat_hash, attempt_id=req.attempt_id,
            transport=self.spec.transport, block_size=self.engine.block_size)
        if self.spec.dist.world_size > 0:
            res.transport_params["rank"] = str(self.spec.dist.rank)
        if self.spec.transport == "ipc":   # P copies only into the cache named here
            res.transport_params[CACHE_ID_PARAM] = self.cache_id
        return worker_pb2.ReserveReply(reservation=res,
                                       code=worker_pb2.WORKER_ERROR_NONE).SerializeToString()

    async def cache_handles(self) -> bytes:
        """ipc transport: this worker's KV cache as CUDA IPC handles (kv_transfer/ipc.py
        export format, JSON). A prefill worker fetches it once, by a Ray actor lookup of
        this worker's name, when it first sees one of our reservations."""
        from kv_transfer.ipc import export_cache_handles
        return export_cache_handles(self.engine.kv_caches, self.cache_id)

    async def submit(self, data: bytes) -> bytes:
        """Colocated path: prefill and decode here."""
        req = worker_pb2.SubmitRequest.FromString(data)
        if self.draining:
            return _submit_reply(worker_pb2.WORKER_ERROR_DRAINING, "worker is draining")
        key = f"{req.request_id}/{req.attempt_id}"
        try:
            params = sampling_params_from_proto(req.sampling, 16)
            assert self.aengine is not None
            resume = list(req.resume_token_ids)
            self.routes[key] = (req.router_id, req.request_id, req.attempt_id, len(resume))
            self.outboxes.setdefault(req.router_id, Outbox())
            if req.deadline_unix_ms:
                self.deadlines[key] = req.deadline_unix_ms / 1000
            self.aengine.add_request(key, list(req.prompt_token_ids), params,
                                     output_token_ids=resume)
        except ValueError as e:
            self.routes.pop(key, None)
            return _submit_reply(worker_pb2.WORKER_ERROR_INVALID, str(e))
        return _submit_reply(worker_pb2.WORKER_ERROR_NONE, "")

    async def abort(self, request_id: str, attempt_id: int) -> None:
        """End an attempt here (cancel, deadline, failed prefill): frees its blocks or
        reservation; late KV for it is then rejected by the receiver."""
        self._end(f"{request_id}/{attempt_id}", "aborted by router")

    def _end(self, key: str, why: str) -> None:
        """End an attempt: its reservation (blocks reserved for KV still to come) or its
        sequence in the engine, whichever it has now."""
        self.ended[key] = None
        if len(self.ended) > 10_000:
            self.ended.pop(next(iter(self.ended)))
        self.deadlines.pop(key, None)
        res_id = self.res_ids.pop(key, None)
        if res_id is not None:
            # Fail first: a chunk still in flight for this attempt is then rejected and
            # never lands in blocks that may be handed to someone else.
            self.table.fail(res_id, why, code=kv_pb2.KV_STATUS_STALE_ATTEMPT)
            self.table.pop(res_id, "aborted")
        if self.aengine is not None:
            self.aengine.abort(key)

    async def renew(self, keys: list[str], lease_s: float) -> int:
        """Heartbeat from the router for attempts whose prefill is still queued or
        computing ("<request_id>/<attempt_id>" keys): extend their leases. A lease that
        is not renewed (router gone, prefill stuck past the router's timeout) expires
        and frees its blocks."""
        n = 0
        for key in keys:
            res_id = self.res_ids.get(key)
            if res_id is not None and self.table.renew(res_id, lease_s):
                n += 1
        return n

    async def poll(self, router_id: str, timeout_s: float = 1.0) -> bytes:
        """Everything produced for this router's requests since its last poll (waits up
        to timeout_s for something to arrive)."""
        box = self.outboxes.setdefault(router_id, Outbox())
        self.last_poll[router_id] = time.monotonic()
        items = await box.take(timeout_s)
        self.last_poll[router_id] = time.monotonic()
        return worker_pb2.DecodeOutputBatch(outputs=items, decode_worker_id=self.spec.worker_id
                                            ).SerializeToString()

    async def load(self) -> bytes:
        st = self.engine.stats()
        return worker_pb2.WorkerLoad(
            worker_id=self.spec.worker_id, role=ROLE_PB[self.spec.role],
            num_running=int(st["num_running"]), num_waiting=int(st["num_waiting"]) + len(self.table),
            kv_blocks_total=int(st["kv_blocks_total"]),
            kv_blocks_free=int(st["kv_blocks_free"] + st["kv_blocks_cached"]),
            kv_usage=float(st["kv_cache_usage"]), draining=self.draining,
            timestamp_unix_ms=int(time.time() * 1000)).SerializeToString()

    async def stats(self) -> dict:
        """Plain numbers for tests and metrics: pool, queues, reservations."""
        st = dict(self.engine.stats())
        st["reservations"] = len(self.table)
        st["requests"] = len(self.routes)
        if self.fault_plan is not None:
            st["faults_injected"] = dict(self.fault_plan.injected)
        return st

    # -- engine outputs -------------------------------------------------------------------
    def _sink(self, out: RequestOutput) -> None:
        route = self.routes.get(out.request_id)
        if route is None:
            return
        router_id, rid, attempt, sent = route
        msg = to_decode_output(out, rid, attempt, sent)
        if out.finished:
            del self.routes[out.request_id]
            self.deadlines.pop(out.request_id, None)
        else:
            self.routes[out.request_id] = (router_id, rid, attempt, sent + len(out.new_token_ids))
        self.outboxes.setdefault(router_id, Outbox()).put(msg)

    # -- KV receiver callbacks (gRPC / listener threads) ----------------------------------
    def _on_complete(self, entry: ReservationEntry,
                     record: worker_pb2.CompletionRecord) -> kv_pb2.CompleteAck:
        key = f"{entry.request_id}/{entry.attempt_id}"
        first_lp = None
        if record.HasField("first_token_logprob"):
            first_lp = TokenLogprob(record.first_token_id, record.first_token_logprob,
                                    [(t.token_id, t.logprob) for t in record.first_top_logprobs])
        assert self.aengine is not None and self.loop is not None
        aengine = self.aengine

        def activate(e: LLMEngine) -> None:
            aengine.publish([e.activate(key, record.first_token_id, first_lp)])
            self.loop.call_soon_threadsafe(self._forget_reservation, key)
        try:
            # Straight to the engine thread (no hop through the event loop, which may be
            # waiting for the GIL): this ack is on every disaggregated request's TTFT path.
            aengine.call_from_thread(activate, timeout=10)
        except Exception as e:  # noqa: BLE001 - reported to P as the ack
            return kv_pb2.CompleteAck(ok=False, code=kv_pb2.KV_STATUS_UNKNOWN_RESERVATION,
                                      error=f"activation failed: {e}")
        return kv_pb2.CompleteAck(ok=True, code=kv_pb2.KV_STATUS_OK)

    def _forget_reservation(self, key: str) -> None:
        res_id = self.res_ids.pop(key, None)
        if res_id is not None:
            self.table.pop(res_id, "completed")

    def _on_failed(self, entry: ReservationEntry, code: int, message: str) -> None:
        key = f"{entry.request_id}/{entry.attempt_id}"
        logger.info("reservation %s for %s failed (%s): %s", entry.reservation_id, key,
                    kv_pb2.KVStatus.Name(code), message)
        if self.loop is not None:
            self.loop.call_soon_threadsafe(self._drop_reserved, key)

    def _drop_reserved(self, key: str) -> None:
        # Free the reserved blocks without telling the router anything: the attempt
        # failed, and the router hears it from the prefill side (or its own timeout).
        self.routes.pop(key, None)
        self.deadlines.pop(key, None)
        res_id = self.res_ids.pop(key, None)
        if res_id is not None:
            self.table.pop(res_id, "failed")
        if self.aengine is not None:
            self.aengine.abort(key)

    def _drop_orphans(self, now: float) -> None:
        gone = {r for r, t in self.last_poll.items() if now - t > self.spec.router_gone_s}
        if not gone:
            return
        for key, (router_id, *_rest) in list(self.routes.items()):
            if router_id in gone:
                logger.info("router %s stopped polling: ending orphaned request %s", router_id, key)
                self.routes.pop(key, None)      # nobody to tell
                self._end(key, f"router {router_id} is gone")
        for r in gone:
            self.last_poll.pop(r, None)
            self.outboxes.pop(r, None)

    async def _reaper(self) -> None:
        """Expire leases (reservations whose KV never completed) and deadlines, and end
        the attempts of routers that stopped polling."""
        period = max(0.05, min(self.spec.lease_s, self.spec.router_gone_s) / 6)
        while True:
            await asyncio.sleep(period)
            for entry in self.table.expired(time.monotonic()):
                if self.table.fail(entry.reservation_id, "lease expired") is not None:
                    self._drop_reserved(f"{entry.request_id}/{entry.attempt_id}")
            self._drop_orphans(time.monotonic())
            now = time.time()
            for key, deadline in list(self.deadlines.items()):
                if now > deadline and self.aengine is not None:
                    self.deadlines.pop(key, None)
                    self.aengine.abort(key)


def _reserve_error(code: int, message: str) -> bytes:
    return worker_pb2.ReserveReply(code=code, error=message).SerializeToString()


def _submit_reply(code: int, message: str) -> bytes:
    return worker_pb2.SubmitReply(code=code, error=message).SerializeToString()
