"""Rotary position embedding, Hugging Face "rotate_half" convention (as HF Llama / Qwen).

A head vector x of size D is split into halves (x1, x2) = (x[:D/2], x[D/2:]); frequency i
rotates the pair (x1[i], x2[i]) by angle ``pos * inv_freq[i]``:

    out = x * cos + rotate_half(x) * sin,   rotate_half(x) = cat(-x2, x1)

with cos/sin duplicated over both halves. (The original Meta checkpoints interleave pairs;
HF checkpoints permute q_proj/k_proj rows so that this half-split form is exact.)

cos/sin are precomputed in float32 for every position up to max_position_embeddings and
gathered by the step's flat positions; like HF they are cast to the activation dtype only
when applied, so bf16 results round the same float32 values HF does.
"""
from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from pdserve.config import RopeScaling


def rope_inv_freq(head_dim: int, theta: float, scaling: RopeScaling) -> Tensor:
    """Inverse frequencies [head_dim // 2] float32, after rope scaling."""
    if head_dim % 2:
        raise ValueError(f"rotary embedding needs an even head_dim, got {head_dim}")
    # Same expression as HF so the float32 bits match (the int64 -> float arange matters).
    exponent = torch.arange(0, head_dim, 2, dtype=torch.int64).to(torch.float32) / head_dim
    inv_freq = 1.0 / (theta ** exponent)
    if scaling.rope_type == "linear":
        # Dividing the frequencies equals dividing the positions by `factor`.
        return inv_freq / scaling.factor
    if scaling.rope_type == "llama3":
        return _llama3_inv_freq(inv_freq, scaling)
    return inv_freq


def _llama3_inv_freq(inv_freq: Tensor, s: RopeScaling) -> Tensor:
    """Llama 3.1 scaling: long wavelengths are slowed down by `factor`, short ones kept, and
    the band in between interpolated smoothly, so local order survives a longer context."""
    low_freq_wavelen = s.original_max_position_embeddings / s.low_freq_factor
    high_freq_wavelen = s.original_max_position_embeddings / s.high_freq_factor
    wavelen = 2 * math.pi / inv_freq
    scaled = torch.where(wavelen > low_freq_wavelen, inv_freq / s.factor, inv_freq)
    smooth = ((s.original_max_position_embeddings / wavelen - s.low_freq_factor)
              / (s.high_freq_factor - s.low_freq_factor))
    smoothed = (1 - smooth) * scaled / s.factor + smooth * scaled
    is_medium = ~(wavelen < high_freq_wavelen) * ~(wavelen > low_freq_wavelen)
    return torch.where(is_medium, smoothed, scaled)


def rotate_half(x: Tensor) -> Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


class RotaryEmbedding(nn.Module):
    """Holds the cos/sin table; `apply_rotary` rotates q and k with the gathered rows."""

    def __init__(self, head_dim: int, max_position: int, theta: float, scaling: RopeScaling):
        super().__init__()
        self.head_dim = head_dim
        self.max_position = max_position
        self.theta = theta
        self.scaling = scaling
        # Non-persistent: derived from the config, never read from a checkpoint.
        self.register_buffer("cos_sin_cache", self._compute_cache(), persistent=False)

    def _compute_cache(self) -> Tensor:
        inv_freq = rope_inv_freq(self.head_dim, self.theta, self.scaling)    # [D/2]
        pos = torch.arange(self.max_position, dtype=torch.int64).to(torch.float32)
        freqs = pos[:, None] * inv_freq[None, :]                              # [P, D/2]
        emb = torch.cat((freqs, freqs), dim=-1)                               # [P, D]
        return torch.stack((emb.cos(), emb.sin()))                           # [2, P, D] fp32

    @torch.no_grad()
    def reset_cache(self) -> None:
        """Recompute the cache in float32 on its current device. The loader calls this after
        materializing a model built on the meta device (to_empty leaves it uninitialized)."""
        device = self.cos_sin_cache.device
        self.cos_sin_cache = self._compute_cache().to(device)

    def forward(self, positions: Tensor, dtype: torch.dtype) -> tuple[Tensor, Tensor]:
        """cos, sin for flat positions [T], each [T, 1, D] in `dtype` (broadcast over heads).
        Gathered once per step and shared by every layer."""
        cos = self.cos_sin_cache[0, positions].to(dtype)[:, None, :]
        sin = self.cos_sin_cache[1, positions].to(dtype)[:, None, :]
        return cos, sin


def rotate(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    # x: [T, H, D]; cos, sin: [T, 1, D]
    return x * cos + rotate_half(x) * sin


def apply_rotary(q: Tensor, k: Tensor, cos: Tensor, sin: Tensor) -> tuple[Tensor, Tensor]:
    # q: [T, Hq, D]; k: [T, Hkv, D]; cos, sin: [T, 1, D]
    return rotate(q, cos, sin), rotate(k, cos, sin)
