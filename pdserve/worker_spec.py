"""WorkerSpec: everything a prefill or decode worker needs to start, as plain JSON.

The launcher hands it to each Ray actor as a JSON string (plain data, no pickled
objects), so the same spec also works from a Helm values file or a shell."""
from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field

from pdserve.config import CacheConfig, EngineConfig, SchedulerConfig


@dataclass(frozen=True)
class DistSpec:
    """The KV process group for the nccl transport (gloo on CPU)."""
    backend: str = "gloo"
    init_method: str = ""            # tcp://host:port of rank 0
    world_size: int = 0
    rank: int = -1
    prefill_ranks: tuple[int, ...] = ()   # the ranks a decode worker receives KV from


@dataclass(frozen=True)
class WorkerSpec:
    worker_id: str
    role: str                        # prefill | decode | both
    model: str
    model_name: str = "pdserve"
    dtype: str = "auto"
    device: str = "auto"
    block_size: int = 16
    num_blocks: int | None = None
    kv_cache_gb: float = 1.0
    enable_prefix_caching: bool = True
    max_num_seqs: int = 128
    max_num_batched_tokens: int = 2048
    max_model_len: int | None = None
    seed: int = 0
    transport: str = "grpc"          # grpc | nccl | ipc | local
    host: str = ""                   # internal listeners bind here ("" = this node's IP)
    secret: str = ""                 # shared secret for internal KV channels
    lease_s: float = 30.0            # decode reservation lease
    transfer_timeout_s: float = 30.0
    router_gone_s: float = 10.0      # D: a router silent this long (no poll; a live one
                                     # polls every second) is gone, and its attempts end
    dist: DistSpec = field(default_factory=DistSpec)
    metrics_port: int = -1           # the worker's own /metrics: -1 off, 0 any free port
    faults: str = ""                 # a kv_transfer.faults.FaultPlan as JSON (tests, drills)

    def __post_init__(self) -> None:
        if self.role not in ("prefill", "decode", "both"):
            raise ValueError(f"role must be prefill, decode or both, got {self.role!r}")
        if self.transport not in ("grpc", "nccl", "ipc", "local"):
            raise ValueError(f"unknown transport {self.transport!r}")
        if self.lease_s <= 0 or self.transfer_timeout_s <= 0 or self.router_gone_s <= 0:
            raise ValueError("lease_s, transfer_timeout_s and router_gone_s must be > 0")

    def engine_config(self) -> EngineConfig:
        return EngineConfig(
            model=self.model, dtype=self.dtype, device=self.device, seed=self.seed,
            role=self.role,  # type: ignore[arg-type]
            cache=CacheConfig(block_size=self.block_size, num_blocks=self.num_blocks,
                              memory_gb=self.kv_cache_gb,
                              enable_prefix_caching=self.enable_prefix_caching),
            scheduler=SchedulerConfig(max_num_seqs=self.max_num_seqs,
                                      max_num_batched_tokens=self.max_num_batched_tokens,
                                      max_model_len=self.max_model_len))

    def to_json(self) -> str:
        return json.dumps(asdict(self))

    @staticmethod
    def from_json(text: str) -> "WorkerSpec":
        d = json.loads(text)
        dist = dict(d.get("dist", {}))
        dist["prefill_ranks"] = tuple(dist.get("prefill_ranks", ()))
        d["dist"] = DistSpec(**dist)
        return WorkerSpec(**d)
