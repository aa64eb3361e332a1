"""The KV payload layout shared by every transport, and block gather/scatter.

A worker's paged cache is one (k_cache, v_cache) pair per layer, each
[num_blocks, block_size, Hkv, D]. A transfer payload packs the KV of a layer range for
a list of blocks into one contiguous tensor:

    payload: [num_layers, 2, num_blocks, block_size, Hkv, D]
              |           |  `-- in block-id order of the chunk (D's order)
              |           `-- 0 = K, 1 = V
              `-- layer_end - layer_start

P gathers with its own block ids and D scatters with its own: the tensor between them
carries no ids, the header does.
"""
from __future__ import annotations

import hashlib
import logging
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from kv_transfer.base import KV_PAYLOAD_LAYOUT, TransferError
from pdserve.host_copy import to_device
from pdserve.v1 import kv_pb2

logger = logging.getLogger(__name__)

# Bumped whenever the chunk header, the payload layout or the checksum rules change:
# it is inside compat_hash, so mismatched P and D refuse each other up front
# (INCOMPATIBLE) instead of writing misread KV.
WIRE_VERSION = 1

_DTYPE_TO_PROTO: dict[torch.dtype, int] = {
    torch.float32: kv_pb2.KV_DTYPE_FLOAT32,
    torch.float16: kv_pb2.KV_DTYPE_FLOAT16,
    torch.bfloat16: kv_pb2.KV_DTYPE_BFLOAT16,
}
_PROTO_TO_DTYPE: dict[int, torch.dtype] = {v: k for k, v in _DTYPE_TO_PROTO.items()}


def dtype_to_proto(dtype: torch.dtype) -> int:
    """torch dtype -> kv_pb2.KVDtype; ValueError for a dtype the wire does not carry."""
    try:
        return _DTYPE_TO_PROTO[dtype]
    except KeyError:
        raise ValueError(f"KV dtype {dtype} has no wire encoding "
                         f"(supported: {sorted(str(d) for d in _DTYPE_TO_PROTO)})") from None


def dtype_from_proto(code: int) -> torch.dtype:
    """kv_pb2.KVDtype -> torch dtype; an unknown or UNSPECIFIED code is a malformed
    header, hence TransferError(INVALID)."""
    try:
        return _PROTO_TO_DTYPE[code]
    except KeyError:
        raise TransferError(f"unknown KV dtype code {code}", kv_pb2.KV_STATUS_INVALID) from None


@dataclass(frozen=True)
class KVLayout:
    """Geometry of one worker's paged KV cache (identical on P and D of a pair)."""
    num_layers: int
    block_size: int
    num_kv_heads: int
    head_dim: int
    dtype: torch.dtype

    def __post_init__(self) -> None:
        for name in ("num_layers", "block_size", "num_kv_heads", "head_dim"):
            if getattr(self, name) < 1:
                raise ValueError(f"KVLayout.{name} must be >= 1, got {getattr(self, name)}")
        dtype_to_proto(self.dtype)  # raises for an unsupported dtype

    @classmethod
    def from_caches(cls, kv_caches: Sequence[tuple[Tensor, Tensor]]) -> KVLayout:
        """Read the layout off allocated caches (each [num_blocks, bs, Hkv, D])."""
        if not kv_caches:
            raise ValueError("no KV caches")
        k = kv_caches[0][0]
        if k.dim() != 4:
            raise ValueError(f"a KV cache must be [num_blocks, block_size, Hkv, D], got {tuple(k.shape)}")
        _, bs, h, d = k.shape
        return cls(len(kv_caches), int(bs), int(h), int(d), k.dtype)

    @property
    def itemsize(self) -> int:
        return torch.empty((), dtype=self.dtype).element_size()

    @property
    def wire_dtype(self) -> int:
        return dtype_to_proto(self.dtype)

    def layer_block_bytes(self) -> int:
        """Bytes of one block of one layer, K and V together (the unit chunks split on)."""
        return 2 * self.block_size * self.num_kv_heads * self.head_dim * self.itemsize

    def payload_shape(self, num_layers: int, num_blocks: int) -> tuple[int, ...]:
        return (num_layers, 2, num_blocks, self.block_size, self.num_kv_heads, self.head_dim)

    def payload_bytes(self, num_layers: int, num_blocks: int) -> int:
        return num_layers * num_blocks * self.layer_block_bytes()

    def compat_hash(self, model_id: str) -> int:
        """Deterministic 64-bit hash of everything that must match between P and D for a
        payload to mean the same thing on both sides. blake2b (not hash()) so that it is
        stable across processes and Python versions."""
        text = "|".join([
            f"wire={WIRE_VERSION}", f"model={model_id}", f"dtype={dtype_to_proto(self.dtype)}",
            f"block_size={self.block_size}", f"layers={self.num_layers}",
            f"kv_heads={self.num_kv_heads}", f"head_dim={self.head_dim}",
            f"layout={KV_PAYLOAD_LAYOUT}",
        ])
        digest = hashlib.blake2b(text.encode(), digest_size=8).digest()
        return int.from_bytes(digest, "little")


def block_index(block_ids: Sequence[int] | Tensor, device: torch.device) -> Tensor:
    """Block ids as an int64 index on `device`. Never a blocking host->device copy: a
    blocking copy synchronizes the stream, and the prefill role gathers every layer's
    KV from inside the forward pass, where a sync per layer would make the host wait
    for the GPU once per layer of every prompt (and, with two processes on one GPU, hand the GPU to
    the other process each time). pdserve.host_copy.to_device copies through pinned
    memory, asynchronously."""
    return to_device(block_ids if isinstance(block_ids, Tensor) else list(block_ids),
                     torch.long, device)


def single_buffer(kv_caches: Sequence[tuple[Tensor, Tensor]]) -> Tensor | None:
    """The [L, 2, N, bs, Hkv, D] buffer every (k, v) is a view of, or None. With a
    head-major cache (allocate_kv_caches(layout="head")) it is a strided view of the
    [L, 2, N, Hkv, bs, D] allocation, so indexing it by block reads the same values."""
    root = kv_caches[0][0]._base
    if root is None or root.dim() != 6 or tuple(root.shape[:2]) != (len(kv_caches), 2):
        return None
    for base in (root, root.transpose(3, 4)):
        if all(t.data_ptr() == base[layer, i].data_ptr() and t.shape == base[layer, i].shape
               and t.stride() == base[layer, i].stride()
               for layer, kv in enumerate(kv_caches) for i, t in enumerate(kv)):
            return base
    return None


def _check_range(kv_caches: Sequence[tuple[Tensor, Tensor]], layer_start: int, layer_end: int) -> None:
    if not 0 <= layer_start < layer_end <= len(kv_caches):
        raise ValueError(f"bad layer range [{layer_start}, {layer_end}) for {len(kv_caches)} layers")


def gather_blocks(kv_caches: Sequence[tuple[Tensor, Tensor]], layer_start: int, layer_end: int,
                  block_ids: Sequence[int] | Tensor, base: Tensor | None = None) -> Tensor:
    """Copy the KV of layers [layer_start, layer_end) for `block_ids` (in that order) into
    a new contiguous payload [layers, 2, blocks, bs, Hkv, D] on the caches' device.
    `base`: the caches' single buffer (single_buffer(kv_caches)), if the caller has it."""
    _check_range(kv_caches, layer_start, layer_end)
    k0 = kv_caches[0][0]
    idx = block_index(block_ids, k0.device)
    if base is not None:   # one gather over the layer range, not two per layer
        return base[layer_start:layer_end].index_select(2, idx)
    out = torch.empty((layer_end - layer_start, 2, idx.numel(), *k0.shape[1:]),
                      dtype=k0.dtype, device=k0.device)
    for i, layer in enumerate(range(layer_start, layer_end)):
        k_cache, v_cache = kv_caches[layer]
        # out[i, j] is a contiguous slab, so index_select writes it in place (no temp)
        torch.index_select(k_cache, 0, idx, out=out[i, 0])
        torch.index_select(v_cache, 0, idx, out=out[i, 1])
    return out


def _runs(block_ids: Sequence[int]) -> list[tuple[int, int, int]]:
    """(position, first id, length) of maximal runs of consecutive ids: [4, 5, 6, 9] ->
    [(0, 4, 3), (3, 9, 1)]."""
    runs: list[tuple[int, int, int]] = []
    for pos, b in enumerate(block_ids):
        if runs and runs[-1][1] + runs[-1][2] == b:
            runs[-1] = (runs[-1][0], runs[-1][1], runs[-1][2] + 1)
        else:
            runs.append((pos, b, 1))
    return runs


def scatter_blocks(kv_caches: Sequence[tuple[Tensor, Tensor]], layer_start: int, layer_end: int,
                   block_ids: Sequence[int] | Tensor, payload: Tensor) -> None:
    """Write `payload` [layers, 2, blocks, bs, Hkv, D] into the caches' `block_ids`.
    The caller guarantees block_ids are unique (index_copy_ with repeats is
    nondeterministic) and owned by this transfer."""
    _check_range(kv_caches, layer_start, layer_end)
    k0 = kv_caches[0][0]
    n = block_ids.numel() if isinstance(block_ids, Tensor) else len(block_ids)
    expected = (layer_end - layer_start, 2, n, *k0.shape[1:])
    if tuple(payload.shape) != expected or payload.dtype != k0.dtype:
        raise ValueError(f"payload {tuple(payload.shape)} {payload.dtype} does not match "
                         f"{expected} {k0.dtype}")
    if k0.device.type == "cpu":
        # CPU index_copy_ runs element by element (~0.3 GB/s for bf16 here); slice copies
        # of runs of consecutive blocks are memcpy-speed, and runs are the common case
        # (a fresh pool hands out ascending ids).
        ids = block_ids.tolist() if isinstance(block_ids, Tensor) else [int(b) for b in block_ids]
        runs = _runs(ids)
        for i, layer in enumerate(range(layer_start, layer_end)):
            for kv, cache in enumerate(kv_caches[layer]):
                for pos, first, length in runs:
                    cache[first:first + length].copy_(payload[i, kv, pos:pos + length])
        return
    idx = block_index(block_ids, k0.device)
    payload = payload.to(k0.device)  # one host->device copy per chunk, not one per layer
    for i, layer in enumerate(range(layer_start, layer_end)):
        k_cache, v_cache = kv_caches[layer]
        k_cache.index_copy_(0, idx, payload[i, 0])  # one kernel per layer and K/V
        v_cache.index_copy_(0, idx, payload[i, 1])
