"""Typed, frozen configs: one per component, validated once in ``__post_init__``."""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch

Role = Literal["prefill", "decode", "both"]

# Memory orders of a KV block (see pdserve.model.llama.allocate_kv_caches).
KV_LAYOUTS = ("token", "head")

# Hugging Face `architectures` entries we run, and the family each maps to.
SUPPORTED_ARCHITECTURES = {
    "LlamaForCausalLM": "llama",
    "MistralForCausalLM": "llama",
    "Qwen2ForCausalLM": "qwen2",
    "Qwen3ForCausalLM": "qwen3",
}


@dataclass(frozen=True)
class RopeScaling:
    """`rope_scaling` / `rope_parameters` of config.json. Only `default` and `llama3` change
    the frequencies; `linear` divides positions (kept for older Llama 2 fine-tunes)."""
    rope_type: str = "default"
    factor: float = 1.0
    low_freq_factor: float = 1.0
    high_freq_factor: float = 4.0
    original_max_position_embeddings: int = 8192

    def __post_init__(self) -> None:
        if self.rope_type not in ("default", "llama3", "linear"):
            raise ValueError(f"unsupported rope scaling type {self.rope_type!r} "
                             "(supported: default, llama3, linear)")


@dataclass(frozen=True)
class ModelConfig:
    """What the model code needs from config.json, whatever the family."""
    architecture: str
    family: str                      # llama | qwen2 | qwen3
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    rms_norm_eps: float
    rope_theta: float
    rope_scaling: RopeScaling
    max_position_embeddings: int
    tie_word_embeddings: bool
    attention_bias: bool             # q/k/v projection bias (Qwen2)
    qk_norm: bool                    # per-head RMSNorm on q and k (Qwen3)
    bos_token_id: int | None
    eos_token_ids: tuple[int, ...]
    # Mistral v0.1-style local attention window; None = full attention. pdserve's kernels
    # attend to the whole context, so this only matters past `sliding_window` tokens.
    sliding_window: int | None = None

    def __post_init__(self) -> None:
        if self.num_attention_heads % self.num_key_value_heads:
            raise ValueError(f"num_attention_heads={self.num_attention_heads} is not a multiple "
                             f"of num_key_value_heads={self.num_key_value_heads}")

    @property
    def num_queries_per_kv(self) -> int:
        return self.num_attention_heads // self.num_key_value_heads

    @staticmethod
    def from_dict(cfg: dict[str, Any], source: str = "config.json") -> "ModelConfig":
        archs = cfg.get("architectures") or []
        arch = next((a for a in archs if a in SUPPORTED_ARCHITECTURES), None)
        if arch is None:
            raise ValueError(f"{source}: unsupported architecture {archs or cfg.get('model_type')!r}; "
                             f"pdserve runs {sorted(SUPPORTED_ARCHITECTURES)}")
        family = SUPPORTED_ARCHITECTURES[arch]
        try:
            heads = int(cfg["num_attention_heads"])
            hidden = int(cfg["hidden_size"])
            rope_src = cfg.get("rope_scaling") or {}
            params = cfg.get("rope_parameters") or {}
            theta = cfg.get("rope_theta", params.get("rope_theta", 10000.0))
            if not rope_src and params.get("rope_type", "default") != "default":
                rope_src = params
            rope = RopeScaling(
                rope_type=str(rope_src.get("rope_type", rope_src.get("type", "default"))),
                factor=float(rope_src.get("factor", 1.0)),
                low_freq_factor=float(rope_src.get("low_freq_factor", 1.0)),
                high_freq_factor=float(rope_src.get("high_freq_factor", 4.0)),
                original_max_position_embeddings=int(
                    rope_src.get("original_max_position_embeddings", 8192)),
            )
            eos = cfg.get("eos_token_id")
            eos_ids = tuple(eos) if isinstance(eos, list) else ((eos,) if eos is not None else ())
            return ModelConfig(
                architecture=arch,
                family=family,
                vocab_size=int(cfg["vocab_size"]),
                hidden_size=hidden,
                intermediate_size=int(cfg["intermediate_size"]),
                num_hidden_layers=int(cfg["num_hidden_layers"]),
                num_attention_heads=heads,
                num_key_value_heads=int(cfg.get("num_key_value_heads", heads)),
                head_dim=int(cfg.get("head_dim") or hidden // heads),
                rms_norm_eps=float(cfg.get("rms_norm_eps", 1e-6)),
                rope_theta=float(theta),
                rope_scaling=rope,
                max_position_embeddings=int(cfg.get("max_position_embeddings", 4096)),
                tie_word_embeddings=bool(cfg.get("tie_word_embeddings", False)),
                attention_bias=bool(cfg.get("attention_bias", family == "qwen2")),
                qk_norm=family == "qwen3",
                bos_token_id=cfg.get("bos_token_id"),
                eos_token_ids=tuple(int(e) for e in eos_ids),
                sliding_window=_sliding_window(cfg),
            )
        except KeyError as e:
            raise ValueError(f"{source}: missing required field {e.args[0]!r}") from e

    @staticmethod
    def from_dir(model_dir: str | Path) -> "ModelConfig":
        path = Path(model_dir) / "config.json"
        if not path.is_file():
            raise FileNotFoundError(f"{path}: no config.json in model directory {model_dir}")
        with open(path) as f:
            return ModelConfig.from_dict(json.load(f), source=str(path))


def _sliding_window(cfg: dict[str, Any]) -> int | None:
    # Qwen2/3 configs carry a window even when `use_sliding_window` is false.
    window = cfg.get("sliding_window")
    if window is None or not cfg.get("use_sliding_window", True):
        return None
    return int(window)


@dataclass(frozen=True)
class CacheConfig:
    """Paged KV cache. `num_blocks` wins over `memory_gb` when both are given."""
    block_size: int = 16
    num_blocks: int | None = None
    memory_gb: float = 1.0
    enable_prefix_caching: bool = True
    # Memory order of each block: "token" ([block_size, Hkv, D]), "head" ([Hkv,
    # block_size, D], the GPU kernels' faster read) or "auto" (head on the Triton path,
    # token otherwise). See pdserve.model.llama.allocate_kv_caches.
    kv_layout: str = "auto"

    def __post_init__(self) -> None:
        if self.kv_layout not in ("auto", *KV_LAYOUTS):
            raise ValueError(f"kv_layout must be auto, token or head, got {self.kv_layout!r}")
        if self.block_size <= 0 or self.block_size & (self.block_size - 1):
            raise ValueError(f"block_size must be a power of two, got {self.block_size}")
        if self.num_blocks is not None and self.num_blocks < 2:
            raise ValueError(f"num_blocks must be >= 2, got {self.num_blocks}")
        if self.memory_gb <= 0:
            raise ValueError(f"memory_gb must be > 0, got {self.memory_gb}")

    def blocks_for_budget(self, bytes_per_block: int) -> int:
        if self.num_blocks is not None:
            return self.num_blocks
        return max(2, int(self.memory_gb * (1 << 30)) // bytes_per_block)


@dataclass(frozen=True)
class SchedulerConfig:
    """Continuous batching knobs (see pdserve/engine/scheduler.py for the algorithm)."""
    max_num_seqs: int = 128                 # running sequences at once
    max_num_batched_tokens: int = 2048      # token budget per step (decode + prefill chunks)
    max_model_len: int | None = None        # defaults to the model's max_position_embeddings

    def __post_init__(self) -> None:
        if self.max_num_seqs < 1:
            raise ValueError("max_num_seqs must be >= 1")
        if self.max_num_batched_tokens < 1:
            raise ValueError("max_num_batched_tokens must be >= 1")


def resolve_dtype(dtype: str | torch.dtype, device: torch.device) -> torch.dtype:
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    table = {"float32": torch.float32, "fp32": torch.float32, "float16": torch.float16,
             "fp16": torch.float16, "half": torch.float16, "bfloat16": torch.bfloat16,
             "bf16": torch.bfloat16}
    if dtype not in table:
        raise ValueError(f"unknown dtype {dtype!r}; use auto, float32, float16 or bfloat16")
    return table[dtype]


@dataclass(frozen=True)
class EngineConfig:
    model: str                              # Hugging Face directory
    dtype: str = "auto"
    device: str = "auto"                    # auto: cuda if available else cpu
    role: Role = "both"
    cache: CacheConfig = field(default_factory=CacheConfig)
    scheduler: SchedulerConfig = field(default_factory=SchedulerConfig)
    seed: int = 0
    # Detokenize a step's tokens while the next step runs on the device (LLMEngine.step);
    # None: on for CUDA, off for CPU (a CPU forward pass leaves no time to overlap).
    overlap_detokenize: bool | None = None
    # Schedule and launch each step before reading the previous step's tokens
    # (LLMEngine.step). Off by default: on the H100 workload of benchmarks/RESULTS.md the
    # device is the bottleneck once detokenization overlaps, and it measured no gain.
    # Never in the prefill role; an engine with it refuses reserve() (KV that another
    # process writes is not ordered after the step in flight), so it is for LLM's
    # offline use, not for serving workers.
    look_ahead: bool = False

    def __post_init__(self) -> None:
        if self.role not in ("prefill", "decode", "both"):
            raise ValueError(f"role must be prefill, decode or both, got {self.role!r}")

    def torch_device(self) -> torch.device:
        if self.device == "auto":
            return torch.device("cuda" if torch.cuda.is_available() else "cpu")
        return torch.device(self.device)
