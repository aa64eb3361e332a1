"""Split count and tile choice of the decode kernel (pdserve/kernels/triton_attention.py).

These run on the CPU: the SM count is patched in, so no GPU is touched. What they pin is
the rule the H200 measurements chose (benchmarks/RESULTS.md, "Session 11"): one split of
128-position tiles once the (sequence, kv head) programs fill the SMs, split-KV over ~2
waves of 64-position tiles below that.
"""
from __future__ import annotations

import pytest
import torch

pytest.importorskip("triton")

from pdserve.kernels import triton_attention as ta  # noqa: E402

CUDA = torch.device("cuda", 0)


@pytest.fixture
def sms_132(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(ta, "_sm_count", lambda index: 132)


@pytest.mark.parametrize(("batch", "kv_heads", "ctx", "splits"), [
    (32, 8, 4096, 1),      # 256 programs >= 132 SMs: one split
    (128, 8, 32768, 1),
    (17, 8, 4096, 1),      # 136 >= 132
    (16, 8, 4096, 3),      # 128 < 132: cdiv(264, 128) = 3
    (8, 8, 4096, 5),       # cdiv(264, 64)
    (1, 8, 32768, 32),     # capped at _MAX_SPLITS
    (1, 8, 512, 4),        # capped by length: 512 / 128
    (1, 8, 100, 1),
])
def test_splits(sms_132: None, batch: int, kv_heads: int, ctx: int, splits: int) -> None:
    assert ta.choose_num_splits(batch, kv_heads, ctx, CUDA) == splits


def test_splits_on_cpu_keep_the_reduce_covered() -> None:
    assert ta.choose_num_splits(128, 8, 4096, torch.device("cpu")) == 2
    assert ta.choose_num_splits(128, 8, 100, torch.device("cpu")) == 1


@pytest.mark.parametrize(("dtype", "head_dim", "pairs", "splits", "tiles"), [
    (torch.bfloat16, 128, 256, 1, (128, 4, 2)),
    (torch.float16, 64, 1024, 1, (128, 4, 2)),
    (torch.bfloat16, 128, 131, 1, (64, 4, None)),    # under a wave of programs
    (torch.bfloat16, 128, 64, 5, (64, 4, None)),     # split-KV
    (torch.float32, 128, 256, 1, (64, 4, None)),     # fp32 tiles of 128 would not fit
    (torch.bfloat16, 256, 256, 1, (64, 4, None)),
])
def test_tiles(sms_132: None, dtype: torch.dtype, head_dim: int, pairs: int, splits: int,
               tiles: tuple) -> None:
    assert ta._decode_tiles(dtype, head_dim, pairs, splits, CUDA) == tiles


def test_tiles_on_cpu() -> None:
    assert ta._decode_tiles(torch.bfloat16, 128, 4096, 1, torch.device("cpu")) == (64, 4, None)
