"""Where the time of one decode step goes (Llama-3-8B shape, random bf16 weights, CUDA
graphs): host input preparation, graph replay (GPU time by CUDA events), logits gather +
sampling, and the whole ModelRunner.execute; against the weights+KV read roofline from a
copy bandwidth measured in the same run. Explains the gap to the roofline in
benchmarks/RESULTS.md.

    python benchmarks/decode_step_profile.py   (on a CUDA machine)
    python benchmarks/decode_step_profile.py --unfused-rotary   # A/B: two kernels there
    # part e's Llama-3.2-1B shape, its batch and context, kernels profiled at bs 128
    python benchmarks/decode_step_profile.py --shape 1b --ctx 1024 --profile-bs 128
"""
import argparse, json, logging, os, statistics, sys, time
import torch
ap = argparse.ArgumentParser()
ap.add_argument("--shape", choices=("8b", "1b"), default="8b")
ap.add_argument("--ctx", type=int, default=512)
ap.add_argument("--profile-bs", type=int, default=1)
ap.add_argument("--unfused-rotary", action="store_true",
                help="A/B: rotary and the KV write as two kernels (the layout before they were fused)")
args = ap.parse_args()
logging.basicConfig(level=logging.INFO, format="%(name)s: %(message)s")
from pdserve.config import ModelConfig
from pdserve.engine.cuda_graph import CudaGraphConfig
from pdserve.engine.runner import ModelRunner
from pdserve.engine.scheduler import ScheduledSeq, SchedulerOutput
from pdserve.engine.sequence import Sequence
from pdserve.kernels import get_attention_ops
from pdserve.kernels.triton_attention import choose_num_splits
from pdserve.model.llama import CausalLM, allocate_kv_caches
from pdserve.sampling.params import SamplingParams
from pdserve.sampling.sampler import Sampler

if args.unfused_rotary:
    from pdserve.kernels import triton_fused, triton_kv

    def _two_kernels(q, k, v, cos, sin, k_cache, v_cache, slot_mapping):
        q, k = triton_fused.rotary(q, k, cos, sin)
        triton_kv.write_kv(k, v, k_cache, v_cache, slot_mapping)
        return q
    triton_fused.rotary_write_kv = _two_kernels

dev = torch.device("cuda")
res = {"device": torch.cuda.get_device_name(0), "unfused_rotary": args.unfused_rotary}
# -- copy bandwidth (read + write), 1 GiB
x = torch.randn(1 << 29, dtype=torch.bfloat16, device=dev); y = torch.empty_like(x)
for _ in range(3): y.copy_(x)
ts = []
for _ in range(10):
    a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    a.record(); y.copy_(x); b.record(); b.synchronize(); ts.append(a.elapsed_time(b) / 1e3)
bw = 2 * x.numel() * 2 / statistics.median(ts)
res["copy_bw_TBps"] = bw / 1e12
del x, y; torch.cuda.empty_cache()

SHAPES = {
    "8b": {"hidden_size": 4096, "intermediate_size": 14336, "num_hidden_layers": 32,
           "num_attention_heads": 32, "num_key_value_heads": 8, "head_dim": 128,
           "tie_word_embeddings": False},
    "1b": {"hidden_size": 2048, "intermediate_size": 8192, "num_hidden_layers": 16,
           "num_attention_heads": 32, "num_key_value_heads": 8, "head_dim": 64,
           "tie_word_embeddings": True},
}
cfg = ModelConfig.from_dict({"architectures": ["LlamaForCausalLM"], "vocab_size": 128256,
    "max_position_embeddings": 8192, "rms_norm_eps": 1e-5, "rope_theta": 500000.0,
    **SHAPES[args.shape]})
res["shape"] = args.shape
t0 = time.perf_counter()
with torch.device("meta"):
    model = CausalLM(cfg, get_attention_ops("triton"))
model = model.to(torch.bfloat16).to_empty(device=dev).eval().requires_grad_(False)
model.model.rotary_emb.reset_cache()
torch.manual_seed(0)
with torch.no_grad():
    for name, p in model.named_parameters():
        if "norm" in name: p.fill_(1.0)
        else: p.normal_(0.0, 0.02)
model.fuse_projections()
torch.cuda.synchronize(); res["build_s"] = time.perf_counter() - t0
param_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
# An untied embedding table is not read by a decode step (a row gather); a tied one is
# the LM head, and counted once among the parameters.
embed_bytes = 0 if cfg.tie_word_embeddings else model.model.embed_tokens.weight.numel() * 2
res["param_GB"] = param_bytes / 1e9


CTX, PAGE = args.ctx, 16
BSS = [1, 8, 32, 128]
per_seq_blocks = CTX // PAGE
nblocks = max(BSS) * per_seq_blocks + 8
kv = allocate_kv_caches(cfg, nblocks, PAGE, torch.bfloat16, dev)
with torch.no_grad():
    for k, v in kv: k.normal_(); v.normal_()
tables = {f"s{i}": list(range(i * per_seq_blocks, (i + 1) * per_seq_blocks)) for i in range(max(BSS))}
sampler = Sampler([], seed=0)
runner = ModelRunner(model, kv, PAGE, dev, sampler, tables.__getitem__,
                     CudaGraphConfig(max_batch_size=max(BSS), max_context_len=max(2048, CTX)))
params = SamplingParams(temperature=0.0)
g = torch.Generator().manual_seed(0)
rows = []


def med(f, n=20):
    ts = []
    for _ in range(n):
        torch.cuda.synchronize(); t = time.perf_counter(); f(); torch.cuda.synchronize()
        ts.append(time.perf_counter() - t)
    return statistics.median(ts) * 1e3


for bs in BSS:
    seqs = []
    for i in range(bs):
        s = Sequence(f"s{i}", torch.randint(0, 128256, (CTX - 1,), generator=g).tolist(), params)
        s.tokens.append(int(torch.randint(0, 128256, (1,), generator=g)))
        s.num_computed_tokens = CTX - 1
        seqs.append(s)
    out = SchedulerOutput([ScheduledSeq(s, 1) for s in seqs], [])
    for _ in range(3): runner.execute(out)
    inp = runner.prepare(out)
    assert runner.graphs.can_run(inp.meta, inp.input_ids.shape[0])
    row = {"bs": bs}
    row["prepare_ms"] = med(lambda: runner.prepare(out))
    # GPU time of the replay alone (CUDA events), and wall time including the host side.
    evs = []
    for _ in range(20):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record(); runner.graphs.replay(inp.input_ids, inp.positions, inp.meta); b.record()
        b.synchronize(); evs.append(a.elapsed_time(b))
    row["replay_gpu_ms"] = statistics.median(evs)
    row["replay_wall_ms"] = med(lambda: runner.graphs.replay(inp.input_ids, inp.positions, inp.meta))
    logits = runner._logits(inp)
    from pdserve.sampling.sampler import SamplingRow
    srows = [SamplingRow(params=s.params, prompt_token_ids=s.prompt_token_ids,
                         output_token_ids=s.output_token_ids, generator=None) for s in seqs]
    row["sample_ms"] = med(lambda: sampler(logits, srows))
    row["execute_ms"] = med(lambda: runner.execute(out))
    kv_bytes = bs * CTX * cfg.num_hidden_layers * 2 * cfg.num_key_value_heads * cfg.head_dim * 2
    read = param_bytes - embed_bytes + kv_bytes
    row["roofline_ms"] = read / bw * 1e3
    row["replay_pct_roofline"] = 100 * row["roofline_ms"] / row["replay_gpu_ms"]
    row["execute_pct_roofline"] = 100 * row["roofline_ms"] / row["execute_ms"]
    rows.append(row)
    print(json.dumps(row), flush=True)
res["rows"] = rows
print(json.dumps(res, indent=1))
out = os.environ.get("OUT")
if out:
    open(os.path.join(out, "decode_step_profile.json"), "w").write(json.dumps(res, indent=1))

# Kernel-level profile of one step at --profile-bs (eager forward, the kernels the graph replays).
from torch.profiler import ProfilerActivity, profile  # noqa: E402

seqs = []
for i in range(args.profile_bs):
    s = Sequence(f"s{i}", torch.randint(0, 128256, (CTX - 1,), generator=g).tolist(), params)
    s.tokens.append(1)
    s.num_computed_tokens = CTX - 1
    seqs.append(s)
inp = runner.prepare(SchedulerOutput([ScheduledSeq(s, 1) for s in seqs], []))
with torch.no_grad():
    for _ in range(3):
        model(inp.input_ids, inp.positions, kv, inp.meta)
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(5):
            model(inp.input_ids, inp.positions, kv, inp.meta)
        torch.cuda.synchronize()
print(prof.key_averages().table(sort_by="cuda_time_total", row_limit=12))
