"""Decode CUDA graphs (pdserve/engine/cuda_graph.py): replay == eager on a tiny random model.

The bucket and config logic runs anywhere; the graph tests need CUDA with compiled Triton.
Replays change batch size (padding inside a bucket), block tables (width and ids) and
context lengths every step, with contexts long enough for several KV splits.

Tolerances: fp32 1e-4 (tl.dot pinned to ieee, no tf32; eager and graph differ only in
GEMM row count and split count); bf16 atol/rtol 5e-2 on logits of magnitude ~1-5.
"""
from __future__ import annotations

import os

import pytest
import torch

from pdserve.engine.cuda_graph import CudaGraphConfig, CudaGraphRunner, batch_buckets

needs_cuda = pytest.mark.skipif(
    not torch.cuda.is_available() or os.environ.get("TRITON_INTERPRET") == "1",
    reason="needs CUDA with compiled Triton (TRITON_INTERPRET unset)")
TOL = {torch.float32: dict(atol=1e-4, rtol=1e-4), torch.bfloat16: dict(atol=5e-2, rtol=5e-2)}
PAGE, NUM_BLOCKS, MAX_CTX, MAX_BS = 8, 600, 512, 8


def test_batch_buckets() -> None:
    assert batch_buckets(1) == [1]
    assert batch_buckets(8) == [1, 2, 4, 8]
    assert batch_buckets(100) == [1, 2, 4, 8, 16, 32, 64, 100]
    assert batch_buckets(256)[-2:] == [128, 256]


def test_config_rejects_bad_sizes() -> None:
    with pytest.raises(ValueError, match="max_batch_size"):
        CudaGraphConfig(max_batch_size=0)
    with pytest.raises(ValueError, match="max_context_len"):
        CudaGraphConfig(max_context_len=0)


def test_runner_needs_a_cuda_cache() -> None:
    with pytest.raises(ValueError, match="CUDA"):
        CudaGraphRunner(torch.nn.Identity(), [(torch.zeros(2, 4, 1, 8),) * 2], 4, CudaGraphConfig())


def _tiny_model(dtype: torch.dtype):
    from pdserve.config import ModelConfig
    from pdserve.kernels import get_attention_ops
    from pdserve.model.llama import CausalLM
    cfg = ModelConfig.from_dict({
        "architectures": ["Qwen2ForCausalLM"], "vocab_size": 512, "hidden_size": 128,
        "intermediate_size": 256, "num_hidden_layers": 2, "num_attention_heads": 8,
        "num_key_value_heads": 2, "head_dim": 32, "max_position_embeddings": 1024,
        "rms_norm_eps": 1e-6, "rope_theta": 10000.0, "tie_word_embeddings": False})
    torch.manual_seed(0)
    with torch.device("cuda"):
        model = CausalLM(cfg, get_attention_ops("triton")).eval().requires_grad_(False)
    model = model.to(dtype)
    model.model.rotary_emb.reset_cache()  # .to(dtype) cast the fp32 rope table
    for name, p in model.named_parameters():
        if "norm" in name:
            p.copy_(1.0 + 0.1 * torch.randn_like(p))
        else:
            p.normal_(0.0, 0.08)
    model.fuse_projections()
    return model


def _decode_meta(lens: list[int], gen: torch.Generator):
    """A pure-decode step: n rows with context lens, each on its own random blocks."""
    from pdserve.kernels.metadata import AttentionMetadata
    need = [-(-n // PAGE) for n in lens]
    ids = torch.randperm(NUM_BLOCKS, generator=gen)[:sum(need)].tolist()
    width = max(need) + int(torch.randint(0, 3, (1,), generator=gen))  # padded like the runner
    tables, slots, used = [], [], 0
    for n, k in zip(lens, need):
        t = ids[used:used + k]
        used += k
        tables.append(t + [0] * (width - k))
        slots.append(t[(n - 1) // PAGE] * PAGE + (n - 1) % PAGE)
    dev = "cuda"
    meta = AttentionMetadata(
        slot_mapping=torch.tensor(slots, device=dev),
        query_start_loc=torch.arange(len(lens) + 1, dtype=torch.int32, device=dev),
        seq_lens=torch.tensor(lens, dtype=torch.int32, device=dev),
        block_tables=torch.tensor(tables, dtype=torch.int32, device=dev),
        max_query_len=1, max_seq_len=max(lens), query_lens_cpu=[1] * len(lens),
        seq_lens_cpu=lens)
    positions = torch.tensor([n - 1 for n in lens], device=dev)
    return meta, positions


@pytest.mark.gpu
@needs_cuda
@pytest.mark.parametrize("dtype,layout", [(torch.float32, "token"), (torch.float32, "head"),
                                          (torch.bfloat16, "head")])
def test_replay_matches_eager(dtype: torch.dtype, layout: str) -> None:
    """Graph replays give the eager logits, on token-major and head-major (the CUDA
    engine's) KV blocks."""
    from pdserve.model.llama import allocate_kv_caches
    model = _tiny_model(dtype)
    cfg = model.config
    kv_graph = allocate_kv_caches(cfg, NUM_BLOCKS, PAGE, dtype, "cuda", layout)
    kv_eager = allocate_kv_caches(cfg, NUM_BLOCKS, PAGE, dtype, "cuda", layout)
    for (kg, vg), (ke, ve) in zip(kv_graph, kv_eager):  # the same "prompt" KV in both
        kg.normal_()
        vg.normal_()
        ke.copy_(kg)
        ve.copy_(vg)
    graphs = CudaGraphRunner(model, kv_graph, PAGE,
                             CudaGraphConfig(max_batch_size=MAX_BS, max_context_len=MAX_CTX))
    graphs.capture()
    assert sorted(graphs.graphs) == [1, 2, 4, 8]
    assert all(torch.equal(a[0], b[0]) for a, b in zip(kv_graph, kv_eager)), \
        "capture must not write the KV cache"

    gen = torch.Generator().manual_seed(1)
    with torch.inference_mode():
        for n in [3, 8, 1, 5, 2, 8, 7, 4]:
            lens = torch.randint(1, MAX_CTX + 1, (n,), generator=gen).tolist()
            lens[0] = MAX_CTX if n > 4 else lens[0]  # the longest context the graph serves
            meta, positions = _decode_meta(lens, gen)
            ids = torch.randint(0, cfg.vocab_size, (n,), generator=gen).cuda()
            assert graphs.can_run(meta, n)
            got = graphs.replay(ids, positions, meta).clone()
            want = model.compute_logits(model(ids, positions, kv_eager, meta))
            assert got.shape == (n, cfg.vocab_size) and torch.isfinite(got).all()
            torch.testing.assert_close(got, want, **TOL[dtype])
            if dtype == torch.float32:
                assert torch.equal(got.argmax(-1), want.argmax(-1))
    assert graphs.num_replays == 8
    # Padding rows wrote nothing: both caches hold the same values everywhere.
    for (kg, vg), (ke, ve) in zip(kv_graph, kv_eager):
        torch.testing.assert_close(kg, ke, **TOL[dtype])
        torch.testing.assert_close(vg, ve, **TOL[dtype])


@pytest.mark.gpu
@needs_cuda
def test_can_run_rejects_what_was_not_captured() -> None:
    from pdserve.model.llama import allocate_kv_caches
    model = _tiny_model(torch.float32)
    kv = allocate_kv_caches(model.config, NUM_BLOCKS, PAGE, torch.float32, "cuda")
    graphs = CudaGraphRunner(model, kv, PAGE, CudaGraphConfig(max_batch_size=4, max_context_len=64))
    gen = torch.Generator().manual_seed(2)
    meta, _ = _decode_meta([5, 9], gen)
    assert not graphs.can_run(meta, 2), "nothing captured yet"
    graphs.capture()
    assert graphs.can_run(meta, 2)
    assert not graphs.can_run(meta, 3), "a row with more than one token"
    assert not graphs.can_run(_decode_meta([5] * 5, gen)[0], 5), "more rows than the largest bucket"
    assert not graphs.can_run(_decode_meta([65], gen)[0], 1), "context longer than captured"


def _step(runner, seqs, chunks: list[tuple[int, int]]) -> list[int]:
    """Run one step of (sequence index, new tokens) chunks; returns the sampled ids."""
    from pdserve.engine.scheduler import ScheduledSeq, SchedulerOutput
    out = SchedulerOutput([ScheduledSeq(seqs[i], n) for i, n in chunks], [])
    sampled = runner.execute(out)
    for i, n in chunks:
        seqs[i].num_computed_tokens += n
    for seq, res in sampled:
        seq.tokens.append(res.token_id)
    return [res.token_id for _, res in sampled]


@pytest.mark.gpu
@needs_cuda
@pytest.mark.parametrize("graph_layout", ["token", "head"])
def test_model_runner_replays_decode_steps_only(graph_layout: str) -> None:
    """ModelRunner with graphs vs without, greedy fp32: same tokens; prefill and mixed
    steps run eagerly, pure-decode steps replay. The eager runner keeps token-major
    blocks; the graph runner's are token- or head-major (the CUDA engine's)."""
    from pdserve.engine.runner import ModelRunner
    from pdserve.engine.sequence import Sequence
    from pdserve.model.llama import allocate_kv_caches
    from pdserve.sampling.params import SamplingParams
    from pdserve.sampling.sampler import Sampler

    model = _tiny_model(torch.float32)
    gen = torch.Generator().manual_seed(3)
    prompts = [torch.randint(0, 512, (n,), generator=gen).tolist() for n in (5, 40, 17, 3, 90)]
    tables = {f"s{i}": list(range(i * 20, i * 20 + 20)) for i in range(len(prompts))}
    params = SamplingParams(temperature=0.0, max_tokens=64)

    def make(graph: bool):
        kv = allocate_kv_caches(model.config, 100, PAGE, torch.float32, "cuda",
                                graph_layout if graph else "token")
        runner = ModelRunner(model, kv, PAGE, torch.device("cuda"), Sampler([], seed=0),
                             tables.__getitem__,
                             CudaGraphConfig(enabled=graph, max_batch_size=4, max_context_len=160))
        seqs = [Sequence(f"s{i}", p, params) for i, p in enumerate(prompts)]
        return runner, seqs

    plan = ([[(0, 5), (1, 40), (2, 10)]]                  # prefill (2 is chunked)
            + [[(0, 1), (1, 1), (2, 7)]]                   # mixed: eager
            + [[(0, 1), (1, 1), (2, 1)]] * 3               # decode: bucket 4, padded
            + [[(0, 1), (3, 3)], [(0, 1), (3, 1), (1, 1), (2, 1)]]
            + [[(4, 90)], [(0, 1), (1, 1), (2, 1), (3, 1), (4, 1)]]  # 5 rows > 4: eager
            + [[(2, 1)]] * 2)
    eager, eager_seqs = make(False)
    graph, graph_seqs = make(True)
    assert eager.graphs is None and graph.graphs is not None
    for chunks in plan:
        assert _step(graph, graph_seqs, chunks) == _step(eager, eager_seqs, chunks), chunks
    assert graph.graphs.num_replays == 3 + 1 + 2


@pytest.mark.gpu
@needs_cuda
@pytest.mark.parametrize("whole_prompt_hook", [False, True])
def test_model_runner_replays_one_prompt_prefill_steps(whole_prompt_hook: bool) -> None:
    """Prefill graphs (pdserve/engine/prefill_graph.py): a step of one sequence whose
    chunk fits the largest bucket replays a graph, a prefix in the cache included (a
    chunk after the first); steps of several sequences stay eager. Greedy fp32 tokens
    equal the eager runner's, and so does the KV the replays wrote. A whole-prompt hook
    (a prefill worker on a transport that is not layer-wise) runs once after the step."""
    from pdserve.engine.runner import ModelRunner
    from pdserve.engine.sequence import Sequence
    from pdserve.model.llama import allocate_kv_caches
    from pdserve.sampling.params import SamplingParams
    from pdserve.sampling.sampler import Sampler

    model = _tiny_model(torch.float32)
    gen = torch.Generator().manual_seed(4)
    prompts = [torch.randint(0, 512, (n,), generator=gen).tolist() for n in (5, 64, 70, 150, 30)]
    tables = {f"s{i}": list(range(i * 30, i * 30 + 30)) for i in range(len(prompts))}
    params = SamplingParams(temperature=0.0, max_tokens=64)
    hooked: list[tuple[int, list[str]]] = []

    def make(prefill_graphs: bool):
        kv = allocate_kv_caches(model.config, 160, PAGE, torch.float32, "cuda")
        runner = ModelRunner(model, kv, PAGE, torch.device("cuda"), Sampler([], seed=0),
                             tables.__getitem__,
                             CudaGraphConfig(max_batch_size=4, max_context_len=240,
                                             prefill_max_tokens=128 if prefill_graphs else 0))
        seqs = [Sequence(f"s{i}", p, params) for i, p in enumerate(prompts)]
        return runner, seqs, kv

    plan = ([[(0, 5)], [(1, 64)], [(2, 70)]]          # one prompt: 64, 64 and 128 buckets
            + [[(3, 100)], [(3, 50)]]                 # chunked: the second over a prefix
            + [[(0, 1), (1, 1), (2, 1), (3, 1)]]      # decode graph
            + [[(4, 20), (0, 1)], [(4, 10)]]          # mixed (eager), then a prefix chunk
            + [[(0, 1), (2, 1), (3, 1), (4, 1)]] * 2)
    eager, eager_seqs, kv_eager = make(False)
    graph, graph_seqs, kv_graph = make(True)
    assert eager.prefill_graphs is None and sorted(graph.prefill_graphs.graphs) == [64, 128]
    if whole_prompt_hook:
        graph.set_layer_hook(lambda layer, seqs: hooked.append((layer, [s.seq_id for s in seqs])),
                             every_layer=False)
        eager.set_layer_hook(lambda layer, seqs: None, every_layer=False)
    for chunks in plan:
        # s1's prefill step exports it (a prefill worker's request ends there)
        export = whole_prompt_hook and chunks == [(1, 64)]
        graph_seqs[1].prefill_only = eager_seqs[1].prefill_only = export
        assert _step(graph, graph_seqs, chunks) == _step(eager, eager_seqs, chunks), chunks
    graph_seqs[1].prefill_only = eager_seqs[1].prefill_only = False
    assert graph.prefill_graphs.num_replays == 6
    for (kg, vg), (ke, ve) in zip(kv_graph, kv_eager):
        torch.testing.assert_close(kg, ke, **TOL[torch.float32])
        torch.testing.assert_close(vg, ve, **TOL[torch.float32])
    if whole_prompt_hook:
        assert hooked == [(model.config.num_hidden_layers - 1, ["s1"])]
