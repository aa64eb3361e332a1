"""Fused q/k/v and gate/up projections: same logits as the separate GEMMs, same HF names.

Tiny random models (every weight and bias non-trivial) run one mixed step (a ragged
prefill beside decode rows) and one pure-decode step before and after
CausalLM.fuse_projections(); the logits must agree to fp32 rounding.
"""
from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from pdserve.config import ModelConfig
from pdserve.kernels import reference
from pdserve.kernels.metadata import AttentionMetadata
from pdserve.model.llama import CausalLM, allocate_kv_caches
from pdserve.model.loader import SINGLE_FILE, load_model

BLOCK = 4


class RefOps:
    write_kv = staticmethod(reference.write_kv)
    paged_attention = staticmethod(reference.paged_attention)


BASE = {"vocab_size": 96, "hidden_size": 32, "intermediate_size": 48, "num_hidden_layers": 2,
        "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 8,
        "max_position_embeddings": 64, "rms_norm_eps": 1e-6, "rope_theta": 10000.0,
        "tie_word_embeddings": False}
FAMILIES = {
    "llama": {**BASE, "architectures": ["LlamaForCausalLM"]},
    "llama-bias": {**BASE, "architectures": ["LlamaForCausalLM"], "attention_bias": True},
    "qwen2": {**BASE, "architectures": ["Qwen2ForCausalLM"], "tie_word_embeddings": True},
    "qwen3": {**BASE, "architectures": ["Qwen3ForCausalLM"]},
}


def random_model(cfg: dict, seed: int = 0) -> CausalLM:
    torch.manual_seed(seed)
    model = CausalLM(ModelConfig.from_dict(cfg), RefOps()).eval().requires_grad_(False)
    for name, p in model.named_parameters():
        if "norm" in name:
            p.copy_(1.0 + 0.1 * torch.randn_like(p))
        else:
            p.normal_(0.0, 0.2)
    return model


def run_steps(model: CausalLM, layout: str = "token") -> list[torch.Tensor]:
    """A mixed step (prefill of 7 and 5 tokens beside nothing cached) then a pure-decode
    step of both sequences, on a fresh cache; returns the logits of every token."""
    kv = allocate_kv_caches(model.config, 8, BLOCK, torch.float32, "cpu", layout)
    tables = [[5, 2], [7, 0, 3]]
    g = torch.Generator().manual_seed(3)
    out = []
    for lens, start in (([7, 5], [0, 0]), ([1, 1], [7, 5])):
        ids = torch.randint(0, model.config.vocab_size, (sum(lens),), generator=g)
        pos, slots = [], []
        for t, n, s in zip(tables, lens, start):
            pos += range(s, s + n)
            slots += [t[p // BLOCK] * BLOCK + p % BLOCK for p in range(s, s + n)]
        seq_lens = [s + n for s, n in zip(start, lens)]
        meta = AttentionMetadata(
            slot_mapping=torch.tensor(slots), seq_lens=torch.tensor(seq_lens, dtype=torch.int32),
            query_start_loc=torch.tensor([0, lens[0], sum(lens)], dtype=torch.int32),
            block_tables=torch.tensor([tables[0] + [0], tables[1]], dtype=torch.int32),
            max_query_len=max(lens), max_seq_len=max(seq_lens), query_lens_cpu=lens,
            seq_lens_cpu=seq_lens)
        with torch.no_grad():
            out.append(model.compute_logits(model(ids, torch.tensor(pos), kv, meta)))
    return out


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_fused_logits_equal_unfused(family: str) -> None:
    model = random_model(FAMILIES[family])
    unfused = run_steps(model)
    model.fuse_projections()
    attn, mlp = model.model.layers[0].self_attn, model.model.layers[0].mlp
    assert attn.qkv_weight is not None and mlp.gate_up_weight is not None
    assert (attn.qkv_bias is not None) == model.config.attention_bias
    fused = run_steps(model)
    for a, b in zip(unfused, fused):
        torch.testing.assert_close(b, a, atol=1e-5, rtol=1e-5)


def test_fused_weights_are_the_hf_parameters() -> None:
    """After fusing, state_dict() has HF's names only, each a row view of the fused tensor
    (no second copy), and loading a state dict writes through to the fused weights."""
    model = random_model(FAMILIES["qwen2"])
    names = set(model.state_dict())
    before = {k: v.clone() for k, v in model.state_dict().items()}
    model.fuse_projections()
    model.fuse_projections()  # idempotent
    assert set(model.state_dict()) == names
    attn, mlp = model.model.layers[1].self_attn, model.model.layers[1].mlp
    base = attn.qkv_weight.untyped_storage().data_ptr()
    for lin in (attn.q_proj, attn.k_proj, attn.v_proj):
        assert lin.weight.untyped_storage().data_ptr() == base
        assert lin.bias.untyped_storage().data_ptr() == attn.qkv_bias.untyped_storage().data_ptr()
    for lin in (mlp.gate_proj, mlp.up_proj):
        assert lin.weight.untyped_storage().data_ptr() == mlp.gate_up_weight.untyped_storage().data_ptr()
    for k, v in model.state_dict().items():
        torch.testing.assert_close(v, before[k], atol=0, rtol=0)
    assert not any(p.requires_grad for p in model.parameters())

    new_k = torch.randn_like(attn.k_proj.weight)
    state = model.state_dict()
    state["model.layers.1.self_attn.k_proj.weight"] = new_k
    model.load_state_dict(state)
    q = attn.q_size
    torch.testing.assert_close(attn.qkv_weight[q:q + attn.kv_size], new_k, atol=0, rtol=0)


@pytest.mark.parametrize("family", ["llama", "qwen2"])
def test_loader_fuses_after_loading(tmp_path: Path, family: str) -> None:
    import json
    cfg = FAMILIES[family]
    model = random_model(cfg, seed=1)
    want = run_steps(model)
    state = {k: v.contiguous() for k, v in model.state_dict().items()}
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    save_file(state, str(tmp_path / SINGLE_FILE))
    loaded = load_model(tmp_path, torch.float32, torch.device("cpu"), RefOps())
    assert all(layer.self_attn.qkv_weight is not None and layer.mlp.gate_up_weight is not None
               for layer in loaded.model.layers)
    for a, b in zip(want, run_steps(loaded)):
        torch.testing.assert_close(b, a, atol=1e-5, rtol=1e-5)


@pytest.fixture
def transposed_plan(monkeypatch):
    """The W @ x^T and 2-column GEMM paths, whatever this machine's calibration chose."""
    from pdserve.model import llama
    monkeypatch.setattr(llama, "_plan", llama.TRANSPOSED_PLAN)


@pytest.mark.parametrize("rows", [1, 2, 37, 128, 129])
@pytest.mark.parametrize("bias", [False, True])
def test_cpu_small_batch_linear_equals_f_linear(rows: int, bias: bool, transposed_plan) -> None:
    from pdserve.model.llama import linear
    g = torch.Generator().manual_seed(rows)
    x = torch.randn(rows, 48, generator=g)
    w = torch.randn(80, 48, generator=g)
    b = torch.randn(80, generator=g) if bias else None
    got = linear(x, w, b)
    assert got.shape == (rows, 80) and got.is_contiguous()
    torch.testing.assert_close(got, torch.nn.functional.linear(x, w, b), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("out_rows", [80, 2048, 4100])
@pytest.mark.parametrize("bias", [False, True])
def test_cpu_single_row_linear_equals_f_linear(out_rows: int, bias: bool, transposed_plan) -> None:
    """One row against a tall weight goes through a 2-column GEMM (CPU_GEMV_AS_GEMM_MIN_ROWS)."""
    from pdserve.model.llama import linear
    g = torch.Generator().manual_seed(out_rows)
    x = torch.randn(1, 48, generator=g)
    w = torch.randn(out_rows, 48, generator=g)
    b = torch.randn(out_rows, generator=g) if bias else None
    got = linear(x, w, b)
    assert got.shape == (1, out_rows) and got.is_contiguous()
    torch.testing.assert_close(got, torch.nn.functional.linear(x, w, b), atol=1e-5, rtol=1e-5)


def test_cpu_gemm_calibration_picks_a_plan_once_per_process(monkeypatch, tmp_path) -> None:
    """calibrate_cpu_gemms times the orientations on the given weights; the process keeps
    the first plan (two engines never differ in rounding); PDSERVE_CPU_GEMM's choices."""
    from pdserve.model import llama
    g = torch.Generator().manual_seed(0)
    weights = [torch.randn(n, 64, generator=g) for n in (96, 2048)]
    plan = llama.calibrate_cpu_gemms(weights)
    assert plan.gemv_as_gemm_min_rows in (0, llama.CPU_GEMV_AS_GEMM_MIN_ROWS)
    assert plan.small_batch_max in (1, 16, 64, llama.CPU_SMALL_BATCH_MAX)
    # margin 0: no orientation can beat F.linear by 100%, so the plan is plain BLAS
    assert llama.calibrate_cpu_gemms(weights, margin=0.0) == llama.BLAS_PLAN
    model = random_model(FAMILIES["llama"], seed=2)
    # auto: the first process to measure keeps the plan in PDSERVE_CACHE_DIR, and every
    # later process (or engine) reads that file instead of measuring again.
    monkeypatch.setenv("PDSERVE_CACHE_DIR", str(tmp_path))
    monkeypatch.setattr(llama, "_plan", None)
    kept = llama.CpuGemmPlan(llama.CPU_GEMV_AS_GEMM_MIN_ROWS, 16)
    path = llama._plan_file([w for w, _ in model.layer_gemms()] + [model.lm_head_weight()])
    # A plan measured on fp32 weights is not a bf16 model's: bf16 BLAS ranks the
    # orientations differently (LM head at 8 rows: 2.5 ms as F.linear, 4.3 ms as W @ x^T).
    assert llama._plan_file([w.bfloat16() for w in weights]) != llama._plan_file(weights)
    path.parent.mkdir(parents=True)
    path.write_text('{"gemv_as_gemm_min_rows": 2048, "small_batch_max": 16}')
    assert llama.ensure_cpu_gemm_plan(model, "auto") == kept
    monkeypatch.setattr(llama, "_plan", None)
    path.unlink()
    measured = llama.ensure_cpu_gemm_plan(model, "auto")
    assert llama._read_plan(path) == measured            # written for the next process
    monkeypatch.setattr(llama, "_plan", None)
    with pytest.raises(ValueError, match="CPU GEMM choice"):
        llama.ensure_cpu_gemm_plan(model, "fastest")
    assert llama.ensure_cpu_gemm_plan(model, "blas") == llama.BLAS_PLAN
    assert llama.ensure_cpu_gemm_plan(model, "transposed") == llama.BLAS_PLAN   # kept
    monkeypatch.setattr(llama, "_plan", None)
    assert llama.ensure_cpu_gemm_plan(model, "transposed") == llama.TRANSPOSED_PLAN
    x = torch.randn(5, model.config.hidden_size)
    torch.testing.assert_close(model.compute_logits(x), torch.nn.functional.linear(
        x, model.lm_head_weight()), atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("rows,hidden", [(1, 576), (7, 96), (3, 4096)])
def test_rms_norm_fast_path_is_bit_identical(rows: int, hidden: int) -> None:
    """fp32 on CPU, RMSNorm runs torch's rms_norm: the same result, bit for bit, as the
    Hugging Face-order ops it replaces (the parity with HF generate depends on it)."""
    from pdserve.model.llama import RMSNorm
    gen = torch.Generator().manual_seed(rows)
    norm = RMSNorm(hidden, 1e-5)
    with torch.no_grad():
        norm.weight.copy_(1 + 0.1 * torch.randn(hidden, generator=gen))
    x = torch.randn(rows, hidden, generator=gen) * 3
    with torch.no_grad():
        want = norm.weight * (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + norm.eps))
        assert torch.equal(norm(x), want)
