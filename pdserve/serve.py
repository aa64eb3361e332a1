"""`pdserve serve`: start (or join) a Ray cluster, place the workers, run the router's
gRPC and HTTP front ends in this process, and shut everything down on Ctrl-C/SIGTERM.

With `--transport local` the workers run inside this process instead of as Ray actors
(one machine, no Ray; the KV hand-off is a direct copy)."""
from __future__ import annotations

import argparse
import asyncio
import logging
import os
import signal
import sys
from typing import Any

from pdserve.llm import resolve_model_dir
from pdserve.worker_spec import WorkerSpec
from router.core import RouterConfig

logger = logging.getLogger(__name__)


def pick_transport(requested: str, device: str) -> str:
    if requested != "auto":
        return requested
    import torch
    on_gpu = device.startswith("cuda") or (device == "auto" and torch.cuda.is_available())
    if not on_gpu:
        return "grpc"
    return "nccl" if torch.cuda.device_count() > 1 else "ipc"


def base_spec(args: argparse.Namespace, model_dir: str, transport: str) -> WorkerSpec:
    return WorkerSpec(
        worker_id="base", role="both", model=model_dir,
        model_name=args.served_model_name or os.path.basename(os.path.normpath(model_dir)),
        dtype=args.dtype, device=args.device, block_size=args.block_size,
        num_blocks=args.num_blocks, kv_cache_gb=args.kv_cache_gb,
        max_num_seqs=args.max_num_seqs, max_num_batched_tokens=args.max_num_batched_tokens,
        max_model_len=args.max_model_len, transport=transport,
        secret=os.environ.get("PDSERVE_INTERNAL_SECRET", ""),
        metrics_port=getattr(args, "worker_metrics_port", -1),
        dist=_dist_default(transport, args.device))


def _dist_default(transport: str, device: str):
    from pdserve.worker_spec import DistSpec
    if transport != "nccl":
        return DistSpec()
    import torch
    backend = "nccl" if torch.cuda.is_available() and device != "cpu" else "gloo"
    return DistSpec(backend=backend)


def router_config(args: argparse.Namespace, spec: WorkerSpec, max_model_len: int) -> RouterConfig:
    return RouterConfig(model_name=spec.model_name, mode=args.mode,
                        prefill_policy=args.prefill_policy, decode_policy=args.decode_policy,
                        disagg_threshold=args.disagg_threshold, max_inflight=args.max_queue, transport=spec.transport,
                        block_size=spec.block_size, max_model_len=max_model_len)


def run_serve(args: argparse.Namespace) -> int:
    try:
        return asyncio.run(serve_main(args))
    except KeyboardInterrupt:
        return 0


async def serve_main(args: argparse.Namespace, ready: asyncio.Event | None = None) -> int:
    from pdserve.cluster import deploy_in_process, deploy_ray
    from pdserve.tokenizer import Tokenizer

    model_dir = resolve_model_dir(args.model)
    transport = pick_transport(args.transport, args.device)
    spec = base_spec(args, model_dir, transport)
    if args.mode == "disaggregated" and args.prefill < 1:
        raise SystemExit("--prefill must be >= 1 in disaggregated mode (or use --mode colocated)")
    if args.decode < 1:
        raise SystemExit("--decode must be >= 1")
    cfg = router_config(args, spec, spec.max_model_len or 1 << 30)
    if transport == "local":
        dep = await deploy_in_process(spec, args.prefill, args.decode, cfg)
    else:
        import ray
        from pdserve.cluster import init_ray
        if not ray.is_initialized():
            init_ray(address=args.ray_address, namespace="pdserve",
                     include_dashboard=False, log_to_driver=True,
                     **({} if args.ray_address else {"num_cpus": max(4, os.cpu_count() or 2)}))
        gpus = args.gpus_per_worker
        if gpus is None:
            import torch
            gpus = 0.0 if not torch.cuda.is_available() or args.device == "cpu" else (
                0.5 if transport == "ipc" else 1.0)
        dep = await deploy_ray(spec, args.prefill, args.decode, cfg,
                               cpus_per_worker=args.cpus_per_worker, gpus_per_worker=gpus,
                               role_resources={"prefill": args.prefill_ray_resource,
                                               "decode": args.decode_ray_resource})
    max_len = min(w.info.max_model_len for w in dep.router.decode.values())
    tokenizer = Tokenizer(model_dir)
    servers = await start_frontends(dep.router, tokenizer, spec.model_name, max_len, args)
    sys.stdout.write(
        f"pdserve ready: model {spec.model_name} | {args.prefill if args.mode == 'disaggregated' else 0} "
        f"prefill + {args.decode} decode workers | transport {transport}\n"
        f"  gRPC   {args.host}:{servers['grpc_port']}  (pdserve.v1.Generation)\n"
        f"  HTTP   http://{args.host}:{servers['http_port']}/v1  (OpenAI API)\n"
        + "".join(f"  worker {k} metrics http://{w.info.metrics_endpoint}/metrics\n"
                  for k, w in {**dep.router.prefill, **dep.router.decode}.items()
                  if w.info is not None and w.info.metrics_endpoint))
    sys.stdout.flush()
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        try:
            loop.add_signal_handler(sig, stop.set)
        except (NotImplementedError, RuntimeError):  # not the main thread
            pass
    if ready is not None:
        ready.set()
    await stop.wait()
    left = await dep.router.drain(args.drain_timeout)
    logger.info("shutting down (%d requests still in flight after the drain)", left)
    await stop_frontends(servers)
    await dep.stop()
    if transport != "local":
        import ray
        for actor in [*dep.prefill.values(), *dep.decode.values()]:
            ray.kill(actor, no_restart=True)
        ray.shutdown()
    return 0


async def start_frontends(router: Any, tokenizer: Any, model_name: str, max_model_len: int,
                          args: argparse.Namespace) -> dict[str, Any]:
    import uvicorn

    from pdserve.metrics import make_registry
    from router.frontend import Frontend
    from router.grpc_server import build_grpc_server
    from router.http_server import build_http_app

    api_key = args.api_key or os.environ.get("PDSERVE_API_KEY") or None
    fe = Frontend(router=router, tokenizer=tokenizer, model_name=model_name,
                  max_model_len=max_model_len, api_key=api_key,
                  metrics_registry=make_registry(router),
                  write_timeout_s=getattr(args, "write_timeout", 30.0))
    tls = None
    if getattr(args, "tls_cert", None):
        if not args.tls_key:
            raise SystemExit("--tls-cert needs --tls-key")
        with open(args.tls_key, "rb") as k, open(args.tls_cert, "rb") as c:
            tls = (k.read(), c.read())
    grpc_server, grpc_port = build_grpc_server(fe, args.host, args.grpc_port, tls=tls)
    await grpc_server.start()
    ssl = dict(ssl_certfile=args.tls_cert, ssl_keyfile=args.tls_key) if tls else {}
    config = uvicorn.Config(build_http_app(fe), host=args.host, port=args.http_port,
                            log_level="warning", lifespan="off", **ssl)
    http = uvicorn.Server(config)
    http_task = asyncio.create_task(http.serve())
    while not http.started:
        if http_task.done():
            http_task.result()
            raise RuntimeError("HTTP server failed to start")
        await asyncio.sleep(0.05)
    port = http.servers[0].sockets[0].getsockname()[1] if http.servers else args.http_port
    return {"grpc": grpc_server, "grpc_port": grpc_port, "http": http, "http_task": http_task,
            "http_port": port, "frontend": fe}


async def stop_frontends(servers: dict[str, Any]) -> None:
    servers["http"].should_exit = True
    await servers["grpc"].stop(grace=2)
    try:
        await asyncio.wait_for(servers["http_task"], 5)
    except asyncio.TimeoutError:
        pass
