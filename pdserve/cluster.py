"""Placing workers: as Ray actors on a cluster, or in this process (tests, embedding).

Ray actors are created with max_restarts=-1 (Ray restarts a dead worker; the router
re-attaches through start()) and max_task_retries=0: the router owns retries, Ray never
re-runs a generate-path call by itself. Actors live in the `pdserve` namespace under
stable names, so an operator can find them (`ray list actors`)."""
from __future__ import annotations

import logging
import os
import secrets
import socket
from dataclasses import dataclass, replace
from typing import Any

from decode_worker.worker import DecodeWorker
from pdserve.worker_spec import DistSpec, WorkerSpec
from prefill_worker.worker import PrefillWorker
from router.clients import DecodeClient, PrefillClient
from router.core import Router, RouterConfig

logger = logging.getLogger(__name__)

NAMESPACE = "pdserve"


@dataclass
class Deployment:
    router: Router
    prefill: dict[str, Any]        # worker id -> actor handle or in-process worker
    decode: dict[str, Any]
    specs: dict[str, WorkerSpec]
    in_process: bool

    async def stop(self) -> None:
        await self.router.stop()
        if self.in_process:
            for w in [*self.prefill.values(), *self.decode.values()]:
                await w.stop()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def make_specs(base: WorkerSpec, n_prefill: int, n_decode: int, mode: str) -> list[WorkerSpec]:
    """One spec per worker. Decode workers can always take whole requests (role both);
    in colocated mode there are no prefill workers."""
    if mode == "colocated":
        n_prefill = 0
    specs = [replace(base, worker_id=f"prefill-{i}", role="prefill") for i in range(n_prefill)]
    specs += [replace(base, worker_id=f"decode-{i}", role="both") for i in range(n_decode)]
    if base.transport == "nccl":
        # Every worker joins one KV process group; rank order = spec order.
        init = base.dist.init_method or f"tcp://{base.host or '127.0.0.1'}:{_free_port()}"
        p_ranks = tuple(r for r, s in enumerate(specs) if s.role == "prefill")
        specs = [replace(s, dist=DistSpec(base.dist.backend, init, len(specs), r, p_ranks))
                 for r, s in enumerate(specs)]
    if not base.secret:
        secret = secrets.token_hex(16)
        specs = [replace(s, secret=secret) for s in specs]
    return specs


async def deploy_in_process(base: WorkerSpec, n_prefill: int, n_decode: int,
                            router_config: RouterConfig,
                            faults: dict[str, str] | None = None) -> Deployment:
    """All workers in this process (each with its own engine thread). Supports the
    local and grpc transports. `faults` maps a worker id to a FaultPlan JSON."""
    specs = make_specs(base, n_prefill, n_decode, router_config.mode)
    specs = [replace(s, faults=(faults or {}).get(s.worker_id, s.faults)) for s in specs]
    prefill = {s.worker_id: PrefillWorker(s.to_json()) for s in specs if s.role == "prefill"}
    decode = {s.worker_id: DecodeWorker(s.to_json()) for s in specs if s.role != "prefill"}
    for d in decode.values():
        await d.start()
    receivers = {d.kv_endpoint: d.kv_receiver for d in decode.values()}
    for p in prefill.values():
        await p.start(local_receivers=receivers if base.transport == "local" else None)
    router = Router(router_config,
                    {k: PrefillClient(w, is_ray=False) for k, w in prefill.items()},
                    {k: DecodeClient(w, is_ray=False) for k, w in decode.items()})
    await router.start()
    return Deployment(router, prefill, decode, {s.worker_id: s for s in specs}, True)


# Ray settings for the process that hosts the router (and, when it starts the cluster, for
# every Ray process, which inherit the environment). When a call's connection to an actor
# breaks, Ray waits up to timeout_ms_task_wait_for_death_info (default 1 s) for the GCS to
# confirm the death before failing the call. The router learns that a decode worker died
# only from its failed poll, and RELIABILITY.md promises those requests an error within
# 2 s. Measured on the 2-core box: a pending call to a killed actor failed after 1.4-1.5 s
# (2.0 s under test load) with the default, 0.4-0.55 s with 200 ms.
RAY_ENV_DEFAULTS = {"RAY_timeout_ms_task_wait_for_death_info": "200"}


def init_ray(**kwargs: Any) -> Any:
    """ray.init with pdserve's defaults for RAY_* settings the caller has not set."""
    import ray
    for key, value in RAY_ENV_DEFAULTS.items():
        os.environ.setdefault(key, value)
    return ray.init(**kwargs)


async def deploy_ray(base: WorkerSpec, n_prefill: int, n_decode: int,
                     router_config: RouterConfig, cpus_per_worker: float = 0.5,
                     gpus_per_worker: float = 0.0,
                     role_resources: dict[str, str] | None = None) -> Deployment:
    """Workers as named Ray actors (ray.init must have run). An ipc/nccl pair is kept on
    one host by a STRICT_PACK placement group."""
    import ray
    from ray.util.placement_group import placement_group
    from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

    if base.transport == "local":
        raise ValueError("the local transport needs all workers in one process; "
                         "use grpc, nccl or ipc with Ray")
    specs = make_specs(base, n_prefill, n_decode, router_config.mode)
    strategy = None
    if base.transport in ("ipc", "nccl"):
        bundle = {"CPU": cpus_per_worker}
        if gpus_per_worker:
            bundle["GPU"] = gpus_per_worker
        pg = placement_group([bundle] * len(specs), strategy="STRICT_PACK")
        await pg.ready()
        strategy = pg
    actors: dict[str, Any] = {}
    for i, s in enumerate(specs):
        cls = PrefillWorker if s.role == "prefill" else DecodeWorker
        opts: dict[str, Any] = dict(name=s.worker_id, namespace=NAMESPACE,
                                    max_restarts=-1, max_task_retries=0,
                                    num_cpus=cpus_per_worker, num_gpus=gpus_per_worker,
                                    max_concurrency=1000, get_if_exists=False)
        res_name = (role_resources or {}).get("prefill" if s.role == "prefill" else "decode")
        if res_name:
            # One unit of a custom resource that only that role's node group advertises.
            opts["resources"] = {res_name: 1}
        if strategy is not None:
            opts["scheduling_strategy"] = PlacementGroupSchedulingStrategy(
                placement_group=strategy, placement_group_bundle_index=i)
        actors[s.worker_id] = ray.remote(cls).options(**opts).remote(s.to_json())
    prefill = {k: a for k, a in actors.items() if specs_by(specs, k).role == "prefill"}
    decode = {k: a for k, a in actors.items() if specs_by(specs, k).role != "prefill"}
    router = Router(router_config,
                    {k: PrefillClient(a, is_ray=True) for k, a in prefill.items()},
                    {k: DecodeClient(a, is_ray=True) for k, a in decode.items()})
    await router.start()
    return Deployment(router, prefill, decode, {s.worker_id: s for s in specs}, False)


def specs_by(specs: list[WorkerSpec], worker_id: str) -> WorkerSpec:
    return next(s for s in specs if s.worker_id == worker_id)
