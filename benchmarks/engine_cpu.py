"""pdserve engine vs Hugging Face transformers `generate` on CPU (issue 2), one run.

Both run in this process on the same model (the default SmolLM2-135M-Instruct unless
--model), in the same dtype (--dtype, fp32 unless told), torch threads = all cores, greedy, ignore_eos, prompts of random token
ids (seeded; the same requests for both). pdserve runs with prefix caching OFF: HF has
none, and a cached prompt would shorten pdserve's prefill in the 1-token/N-token
subtraction below.

1. single stream: decode tok/s = N / (t(1 + N tokens) - t(1 token)), the best of R
   runs each; t(1 token) is the time to first token (prefill), so it is excluded.
2. concurrent: pdserve gets all requests at once (continuous batching). HF gets its best
   static batching: requests sorted by prompt length, cut into batches of B, left
   padded, each batch generating max(its requests' lengths) tokens; only each request's
   own tokens count as output. Every B in --hf-batch-sizes is run; the best one is HF.
3. RSS over many short requests through pdserve (in waves), sampled after every 100.

    python benchmarks/engine_cpu.py            # full, ~15 min on 2 quiet cores
    python benchmarks/engine_cpu.py --quick    # smoke version, ~2 min

The last lines are the goal table; JSON goes to --out (benchmarks/out/ is git-ignored).
The load average at start and end is recorded: figures from a busy machine are not final.
"""
from __future__ import annotations

import argparse
import gc
import json
import logging
import os
import platform
import random
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

# `python benchmarks/engine_cpu.py` puts benchmarks/ first on sys.path, and there the
# editable install's path hook resolves `pdserve` to an empty namespace package; the repo
# root first makes it the real package whatever the install mode.
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import psutil  # noqa: E402
import torch  # noqa: E402

logger = logging.getLogger("engine_cpu")

TOKEN_RANGE = (1000, 20000)     # ordinary text tokens of the vocabulary, no specials
GOAL_SINGLE, GOAL_CONCURRENT, GOAL_RSS_GROWTH = 1.0, 3.0, 0.05


@dataclass(frozen=True)
class Plan:
    single_new_tokens: int            # decode tokens after the first, single stream
    single_prompt: int
    repeats: int                      # single stream: best of this many
    levels: tuple[int, ...]           # concurrent request counts; the goal uses the last
    prompt_len: tuple[int, int]
    output_len: tuple[int, int]
    hf_batch_sizes: tuple[int, ...]
    rss_requests: int
    rss_wave: int
    rss_prompt_len: tuple[int, int]
    rss_output_len: tuple[int, int]


FULL = Plan(128, 32, 2, (16, 64), (32, 512), (16, 128), (1, 4, 8, 16), 1000, 100, (16, 64), (4, 8))
QUICK = Plan(32, 32, 1, (4, 16), (32, 128), (8, 32), (1, 4, 8), 200, 50, (16, 32), (4, 8))


@dataclass(frozen=True)
class Req:
    ids: list[int]
    max_tokens: int


def make_requests(n: int, prompt_len: tuple[int, int], output_len: tuple[int, int],
                  seed: int) -> list[Req]:
    rng = random.Random(seed)
    return [Req([rng.randrange(*TOKEN_RANGE) for _ in range(rng.randint(*prompt_len))],
                rng.randint(*output_len)) for _ in range(n)]


# -- pdserve ---------------------------------------------------------------------------
def pd_generate(llm: Any, reqs: list[Req]) -> float:
    from pdserve import SamplingParams
    params = [SamplingParams(max_tokens=r.max_tokens, temperature=0.0, ignore_eos=True)
              for r in reqs]
    t = time.perf_counter()
    outs = llm.generate([r.ids for r in reqs], params)
    dt = time.perf_counter() - t
    got = [len(o.token_ids) for o in outs]
    if got != [r.max_tokens for r in reqs]:
        raise RuntimeError(f"pdserve produced {got} tokens, asked for {[r.max_tokens for r in reqs]}")
    return dt


# -- HF transformers -------------------------------------------------------------------
@torch.inference_mode()
def hf_generate(model: Any, batch: list[Req], max_new: int) -> float:
    """One left-padded batch, exactly max_new tokens for every row."""
    width = max(len(r.ids) for r in batch)
    ids = torch.tensor([[0] * (width - len(r.ids)) + r.ids for r in batch])
    mask = torch.tensor([[0] * (width - len(r.ids)) + [1] * len(r.ids) for r in batch])
    t = time.perf_counter()
    # min_new_tokens = max_new_tokens masks EOS: the ignore_eos of pdserve's requests
    y = model.generate(ids, attention_mask=mask, max_new_tokens=max_new, min_new_tokens=max_new,
                       do_sample=False, pad_token_id=0, use_cache=True)
    dt = time.perf_counter() - t
    if y.shape[1] - width != max_new:
        raise RuntimeError(f"HF produced {y.shape[1] - width} tokens, asked for {max_new}")
    return dt


def hf_batched(model: Any, reqs: list[Req], bs: int) -> dict[str, float]:
    order = sorted(reqs, key=lambda r: len(r.ids))   # similar lengths: less padding
    seconds, generated = 0.0, 0
    for i in range(0, len(order), bs):
        batch = order[i:i + bs]
        max_new = max(r.max_tokens for r in batch)
        seconds += hf_generate(model, batch, max_new)
        generated += max_new * len(batch)
    useful = sum(r.max_tokens for r in reqs)
    return {"batch_size": bs, "seconds": seconds, "useful_tokens": useful,
            "generated_tokens": generated, "output_tok_s": useful / seconds}


# -- the three measurements ----------------------------------------------------------------
def single_stream(llm: Any, model: Any, plan: Plan, seed: int) -> dict[str, Any]:
    (prompt,) = make_requests(1, (plan.single_prompt,) * 2, (1, 1), seed)
    n = plan.single_new_tokens
    runs: dict[str, dict[str, list[float]]] = {"pdserve": {"t1": [], "tn": []},
                                               "hf": {"t1": [], "tn": []}}
    for _ in range(plan.repeats):  # interleaved, so a burst of load hits both alike
        runs["pdserve"]["t1"].append(pd_generate(llm, [Req(prompt.ids, 1)]))
        runs["pdserve"]["tn"].append(pd_generate(llm, [Req(prompt.ids, 1 + n)]))
        runs["hf"]["t1"].append(hf_generate(model, [prompt], 1))
        runs["hf"]["tn"].append(hf_generate(model, [prompt], 1 + n))
    out: dict[str, Any] = {"prompt_tokens": len(prompt.ids), "decode_tokens": n}
    for name, r in runs.items():
        t1, tn = min(r["t1"]), min(r["tn"])
        out[name] = {"ttft_s": t1, "t_1_plus_n_s": tn, "decode_tok_s": n / max(tn - t1, 1e-9),
                     "raw": r}
    out["ratio"] = out["pdserve"]["decode_tok_s"] / out["hf"]["decode_tok_s"]
    logger.info("single stream: pdserve %.1f tok/s, HF %.1f tok/s (x%.2f)",
                out["pdserve"]["decode_tok_s"], out["hf"]["decode_tok_s"], out["ratio"])
    return out


def concurrent(llm: Any, model: Any, plan: Plan, n: int, seed: int,
               hf_sizes: tuple[int, ...]) -> dict[str, Any]:
    reqs = make_requests(n, plan.prompt_len, plan.output_len, seed + n)
    useful = sum(r.max_tokens for r in reqs)
    pd_s = pd_generate(llm, reqs)
    pd = {"seconds": pd_s, "output_tokens": useful, "output_tok_s": useful / pd_s}
    logger.info("%d concurrent: pdserve %.1f tok/s", n, pd["output_tok_s"])
    hf = []
    for bs in (b for b in hf_sizes if b <= n):
        hf.append(hf_batched(model, reqs, bs))
        logger.info("%d concurrent: HF batch %d %.1f tok/s", n, bs, hf[-1]["output_tok_s"])
    best = max(hf, key=lambda h: h["output_tok_s"])
    return {"requests": n, "prompt_tokens": sum(len(r.ids) for r in reqs),
            "output_tokens": useful, "pdserve": pd, "hf_by_batch": hf, "hf_best": best,
            "ratio": pd["output_tok_s"] / best["output_tok_s"]}


def rss_flat(llm: Any, plan: Plan, seed: int) -> dict[str, Any]:
    proc = psutil.Process()

    def rss_mib() -> float:
        gc.collect()  # count live memory, not garbage that the next collection frees
        return proc.memory_info().rss / 2**20

    samples = [(0, rss_mib())]
    done = 0
    t = time.perf_counter()
    while done < plan.rss_requests:
        wave = make_requests(min(plan.rss_wave, plan.rss_requests - done), plan.rss_prompt_len,
                             plan.rss_output_len, seed + 7919 + done)
        pd_generate(llm, wave)
        prev, done = done, done + len(wave)
        if done // 100 > prev // 100 or done == plan.rss_requests:
            samples.append((done, rss_mib()))
    # growth is judged from the first 100 requests on: the first ones warm allocator and
    # oneDNN caches once, a leak keeps growing after
    base, end = samples[1][1], samples[-1][1]
    out = {"requests": done, "seconds": time.perf_counter() - t, "samples_mib": samples,
           "start_mib": samples[0][1], "after_100_mib": base, "end_mib": end,
           "max_mib": max(s[1] for s in samples), "growth_mib": end - base,
           "growth_frac": (end - base) / base}
    logger.info("RSS: %.0f MiB at start, %.0f after 100, %.0f at %d (max %.0f)",
                out["start_mib"], base, end, done, out["max_mib"])
    return out


# -- report ------------------------------------------------------------------------------
def goal_table(res: dict[str, Any]) -> str:
    s, c, r = res["single_stream"], res["concurrent"][-1], res["rss"]
    rows = [("single-stream decode tok/s", f"{s['pdserve']['decode_tok_s']:.1f}",
             f"{s['hf']['decode_tok_s']:.1f}", f"x{s['ratio']:.2f}", f">= {GOAL_SINGLE:g}x",
             s["ratio"] >= GOAL_SINGLE),
            (f"{c['requests']} concurrent output tok/s", f"{c['pdserve']['output_tok_s']:.1f}",
             f"{c['hf_best']['output_tok_s']:.1f} (bs {c['hf_best']['batch_size']})",
             f"x{c['ratio']:.2f}", f">= {GOAL_CONCURRENT:g}x", c["ratio"] >= GOAL_CONCURRENT),
            (f"RSS over {r['requests']} requests (MiB)",
             f"{r['after_100_mib']:.0f} -> {r['end_mib']:.0f}", f"max {r['max_mib']:.0f}",
             f"{r['growth_frac']:+.1%}", f"flat (<= {GOAL_RSS_GROWTH:.0%})",
             r["growth_frac"] <= GOAL_RSS_GROWTH)]
    lines = [f"{'':<32}{'pdserve':>14}{'HF':>18}{'ratio':>9}{'goal':>16}{'met':>5}"]
    lines += [f"{a:<32}{b:>14}{c_:>18}{d:>9}{e:>16}{('yes' if ok else 'NO'):>5}"
              for a, b, c_, d, e, ok in rows]
    return "\n".join(lines)


def detail_table(res: dict[str, Any]) -> str:
    sizes = sorted({h["batch_size"] for c in res["concurrent"] for h in c["hf_by_batch"]})
    lines = [f"{'concurrent':>10}{'pdserve tok/s':>15}" + "".join(f"{f'HF bs {b}':>11}" for b in sizes)]
    for c in res["concurrent"]:
        by = {h["batch_size"]: f"{h['output_tok_s']:.1f}" for h in c["hf_by_batch"]}
        lines.append(f"{c['requests']:>10}{c['pdserve']['output_tok_s']:>15.1f}"
                     + "".join(f"{by.get(b, '-'):>11}" for b in sizes))
    return "\n".join(lines)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default=None, help="HF model directory (default: the embedded default)")
    p.add_argument("--quick", action="store_true", help="~2 minute smoke version")
    p.add_argument("--levels", default=None,
                   help="comma-separated concurrency levels (default: the plan's, 16,64)")
    p.add_argument("--hf-batch-sizes", default=None,
                   help="comma-separated HF batch sizes (default 1,4,8,16; add 32,64 if time allows)")
    p.add_argument("--kv-cache-gb", type=float, default=2.0, help="pdserve KV cache")
    p.add_argument("--threads", type=int, default=None,
                   help="torch threads (default: all cores; 1 is steadier on a CPU other jobs share)")
    p.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"),
                   help="weights and activations of both pdserve and HF")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default="benchmarks/out/engine_cpu.json")
    args = p.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    for name in ("pdserve", "transformers"):  # keep the progress lines readable
        logging.getLogger(name).setLevel(logging.WARNING)

    from transformers import AutoModelForCausalLM
    from pdserve import LLM
    from pdserve.default_model import prepare_default_model

    plan = QUICK if args.quick else FULL
    hf_sizes = (tuple(int(b) for b in args.hf_batch_sizes.split(","))
                if args.hf_batch_sizes else plan.hf_batch_sizes)
    cores = len(os.sched_getaffinity(0))
    threads = args.threads or cores
    torch.set_num_threads(threads)
    model_dir = str(args.model or prepare_default_model())
    load_start = os.getloadavg()
    t0 = time.perf_counter()
    llm = LLM(model_dir, dtype=args.dtype, device="cpu", kv_cache_memory_gb=args.kv_cache_gb,
              enable_prefix_caching=False, max_num_seqs=128, seed=args.seed)
    hf = AutoModelForCausalLM.from_pretrained(model_dir, dtype=getattr(torch, args.dtype)).eval()
    # warm-up: first-call costs (oneDNN primitives, allocator) are not steady state
    warm = make_requests(2, (16, 16), (4, 4), args.seed + 999)
    pd_generate(llm, warm)
    hf_generate(hf, warm, 4)

    res: dict[str, Any] = {
        "quick": args.quick, "plan": asdict(plan), "hf_batch_sizes": hf_sizes,
        "model": model_dir, "dtype": args.dtype, "torch": torch.__version__, "threads": threads,
        "cores": cores,
        "cpu": platform.processor() or platform.machine(), "loadavg_start": load_start}
    res["single_stream"] = single_stream(llm, hf, plan, args.seed)
    levels = tuple(int(n) for n in args.levels.split(",")) if args.levels else plan.levels
    res["concurrent"] = [concurrent(llm, hf, plan, n, args.seed, hf_sizes) for n in levels]
    res["rss"] = rss_flat(llm, plan, args.seed)
    res["loadavg_end"] = os.getloadavg()
    res["seconds"] = time.perf_counter() - t0

    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(res, indent=1))
    sys.stdout.write(
        f"\nengine_cpu{' --quick' if args.quick else ''}: {Path(model_dir).name}, {args.dtype}, "
        f"{threads} threads, torch {torch.__version__}, {res['seconds']:.0f} s, load average "
        f"{load_start[0]:.2f} -> {res['loadavg_end'][0]:.2f} (above {cores}: the CPU was shared)\n"
        f"{detail_table(res)}\n\n{goal_table(res)}\nJSON: {args.out}\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
