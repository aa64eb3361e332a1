"""GPU performance suite (issue "GPU performance", deliverable 2): the ceilings, pdserve's
kernels and model steps, offline throughput, and one GPU serving both roles, measured
with their baselines in one run. The measurements live in gpu_suite_parts.py.

    a  ceilings: device copy bandwidth (read + write, 1 GiB) and bf16 matmul (8192^3)
    b  decode attention: pdserve's paged split-KV Triton kernel vs torch SDPA (enable_gqa,
       contiguous KV), bs {1,8,32,128} x ctx {512,4k,32k}, GQA 32/8, d 128, bf16; TB/s of
       K/V read and % of the copy bandwidth (small cases rotate over several input copies
       so the L2 cache is not measured; both sides timed as CUDA-graph replays)
    c  prefill attention: pdserve's varlen paged kernel vs SDPA (causal), 1k-8k tokens
    d  Llama-3-8B shape (random bf16 weights made on the GPU): one decode step through
       pdserve's ModelRunner (prepare + forward + sample) at bs {1,8,32,128}, context 1025,
       vs the weights+KV read roofline at the measured copy bandwidth; plus the same
       forward eager and as a CUDA graph captured here, and a 2k-token prefill
    e  offline throughput, Llama-3.2-1B shape (random weights, a made-up tokenizer): the
       same requests through pdserve LLM.generate and HF transformers generate (static
       batches, best batch size)
    f  one GPU, two roles: a prefill and a decode Ray actor (num_gpus 0.5 each, ipc KV
       transport) vs one colocated decode worker; TTFT and throughput at two request rates

    python benchmarks/gpu_suite.py                 # GPU, about 7 minutes on an H100
    python benchmarks/gpu_suite.py --smoke         # tiny shapes; runs on CPU (Triton interpreter)
    python benchmarks/gpu_suite.py --parts a,b,c   # a subset

Each part is guarded: a failure is recorded in the JSON and the next part runs. A global
time budget (--budget-s) gives each part a share; a part that runs out skips its last
cases and says so. The table and the goals are printed last; the JSON goes to
$OUT/gpu_suite.json when OUT is set, else to --out.
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import platform
import sys
import tempfile
import time
import traceback
from pathlib import Path
from typing import Any, Callable

# The repo root first on sys.path: `python benchmarks/gpu_suite.py` would otherwise find
# pdserve only through the install, and Ray actors import the repo's packages too.
ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(1, str(Path(__file__).resolve().parent))

import torch  # noqa: E402

logger = logging.getLogger("gpu_suite")

# part -> (name, seconds it may take at most, seconds it needs at least) on the GPU
PARTS: dict[str, tuple[str, float, float]] = {
    "a": ("ceilings", 20, 5), "b": ("decode_attention", 70, 20), "c": ("prefill_attention", 25, 8),
    "d": ("decode_step_8b", 70, 30), "e": ("offline_throughput", 100, 50),
    "f": ("one_gpu_two_roles", 130, 70)}


class Suite:
    """What every part reads: device, shapes, budget, and the ceilings once measured."""

    def __init__(self, dev: torch.device, smoke: bool, budget_s: float, workdir: Path) -> None:
        import gpu_suite_parts as parts
        self.dev = dev
        self.smoke = smoke
        self.shapes = parts.SMOKE if smoke else parts.GPU
        self.deadline = time.monotonic() + budget_s
        self.part_deadline = self.deadline
        self.workdir = workdir
        self.copy_bw: float | None = None        # bytes/s, read + write (part a)
        self.matmul_flops: float | None = None   # flop/s (part a)
        self.hf_model: Any = None                # parts e and f share one random model

    def left(self) -> float:
        return self.deadline - time.monotonic()

    def part_left(self) -> float:
        return self.part_deadline - time.monotonic()


def run_parts(s: Suite, selected: list[str],
              save: Callable[[dict[str, Any]], None]) -> dict[str, Any]:
    """Runs the selected parts in order; save(results) after each, so a run killed at
    its time limit still leaves what it measured."""
    import gpu_suite_parts as parts
    funcs: dict[str, Callable[[Suite], dict]] = {
        "a": parts.part_ceilings, "b": parts.part_decode_attention,
        "c": parts.part_prefill_attention, "d": parts.part_decode_step,
        "e": parts.part_offline, "f": parts.part_serve}
    results: dict[str, Any] = {}
    for i, key in enumerate(selected):
        name, cap, _ = PARTS[key]
        later = sum(PARTS[k][2] for k in selected[i + 1:])
        share = min(cap * (10 if s.smoke else 1), s.left() - later)
        if share < PARTS[key][2] * (0 if s.smoke else 0.5):
            results[name] = {"skipped": f"time budget ({s.left():.0f}s left, {later:.0f}s reserved)"}
            logger.warning("part %s skipped: time budget", key)
            continue
        s.part_deadline = time.monotonic() + share
        t = time.monotonic()
        logger.info("part %s (%s): up to %.0fs", key, name, share)
        try:
            results[name] = funcs[key](s)
        except Exception as e:  # noqa: BLE001 - one part's failure must not lose the rest
            logger.error("part %s failed: %s", key, e)
            results[name] = {"error": f"{type(e).__name__}: {e}"[:2000],
                             "traceback": traceback.format_exc()[-4000:]}
        results[name]["part_seconds"] = time.monotonic() - t
        logger.info("part %s done in %.1fs", key, results[name]["part_seconds"])
        parts.release(s.dev)
        save(results)
    return results


# -- report ---------------------------------------------------------------------------------
def _f(x: Any, fmt: str = ".2f") -> str:
    return "-" if x is None else format(x, fmt)


def _pct(part: float | None, whole: float | None) -> float | None:
    return None if not part or not whole else 100 * part / whole


def goals(r: dict[str, Any]) -> list[dict[str, Any]]:
    """The issue's goals, each from measured figures only."""
    out = []

    def add(goal: str, value: float | None, target: float, above: bool, unit: str, note: str = "") -> None:
        if value is None:
            out.append({"goal": goal, "status": "not measured", "note": note})
            return
        met = value >= target if above else value <= target
        gap = "" if met else (f"missed by {abs(value - target):.3g}{unit}")
        out.append({"goal": goal, "status": "met" if met else "missed", "value": value,
                    "target": target, "unit": unit, "gap": gap, "note": note})

    rows = [x for x in r.get("decode_attention", {}).get("rows", []) if "pdserve_us" in x]
    big = [x for x in rows if x["bs"] >= 32 and x["ctx"] >= 4096]
    add("decode attention >= 85% of copy bw, bs>=32 ctx>=4k (worst case)",
        min((x.get("pdserve_pct_copy_bw") for x in big), default=None), 85, True, "%")
    add("decode attention >= 1.0x SDPA, bs>=32 ctx>=4k (worst case)",
        min((x.get("speedup_vs_sdpa", 0.0) for x in big), default=None), 1.0, True, "x")
    one = [x for x in rows if x["bs"] == 1 and x["ctx"] == 32768]
    add("decode attention >= 60% of copy bw at bs=1 ctx=32k",
        one[0].get("pdserve_pct_copy_bw") if one else None, 60, True, "%")
    step = [x for x in r.get("decode_step_8b", {}).get("rows", []) if x.get("bs") == 1]
    add("8B decode step at bs=1 >= 85% of the weights-read roofline (runner step)",
        step[0].get("runner_pct_weights_roofline") if step else None, 85, True, "%")
    add("8B decode step at bs=1 >= 85% of the weights-read roofline (look-ahead step)",
        step[0].get("look_ahead_pct_weights_roofline") if step else None, 85, True, "%",
        "LLMEngine(look_ahead=True): the next step is launched before the host waits")
    pre = r.get("decode_step_8b", {}).get("prefill", {})
    add("8B prefill of 2k tokens >= 60% of the matmul rate", pre.get("pct_matmul"), 60, True, "%")
    add("offline throughput >= 20x HF generate (best batch size)",
        r.get("offline_throughput", {}).get("speedup_vs_hf"), 20, True, "x")
    f = r.get("one_gpu_two_roles", {})
    for rate, ratio in f.get("ttft_ratio_disagg_vs_colocated", {}).items():
        add(f"{f.get('disaggregated_transport')} disaggregation adds <= 5% to median TTFT vs "
            f"colocated at {rate} req/s", ratio, 1.05, False, "x")
    return out


def table(r: dict[str, Any], meta: dict[str, Any]) -> list[str]:
    lines = [f"== pdserve GPU suite: {meta['device']} | torch {meta['torch']} | triton "
             f"{meta['triton']} | {meta['started']} | smoke={meta['smoke']} =="]
    for name, res in r.items():
        if "error" in res or "skipped" in res:
            lines.append(f"{name}: {res.get('error') or res.get('skipped')}")
    a = r.get("ceilings", {})
    if "copy_tb_s" in a:
        lines.append(f"a ceilings: copy (read+write, {a['copy_bytes_rw'] / 2 / 2**30:.3g} GiB) "
                     f"{a['copy_tb_s']:.3f} TB/s | bf16 matmul {a['matmul_n']}^3 "
                     f"{a['matmul_tflop_s']:.0f} TFLOP/s")
    b = r.get("decode_attention", {})
    if b.get("rows"):
        lines.append(f"b decode attention ({b.get('shape')}), TB/s of KV read (% of copy bw); "
                     f"ragged check err {_f(b.get('ragged_rel_err_vs_reference'), '.1e')}")
        lines.append("   bs    ctx   pdserve          SDPA             xSDPA  splits  err ref/SDPA")
        for x in b["rows"]:
            if "pdserve_us" not in x:
                lines.append(f"  {x['bs']:>3} {x['ctx']:>6}   {x.get('skipped') or x.get('error')}")
                continue
            lines.append(f"  {x['bs']:>3} {x['ctx']:>6}   {x['pdserve_tb_s']:.3f} "
                         f"({_f(x.get('pdserve_pct_copy_bw'), '5.1f')}%)   {_f(x.get('sdpa_tb_s'), '.3f')} "
                         f"({_f(x.get('sdpa_pct_copy_bw'), '5.1f')}%)   {_f(x.get('speedup_vs_sdpa'), '5.2f')}"
                         f"  {x['num_splits']:>5}  {x['rel_err_vs_reference']:.1e}/"
                         f"{_f(x.get('rel_err_vs_sdpa'), '.1e')}")
    c = r.get("prefill_attention", {})
    if c.get("rows"):
        lines.append("c prefill attention, one causal sequence, TFLOP/s (2*T^2*Hq*D)")
        lines.append("   tokens  pdserve  SDPA   xSDPA  %matmul  err")
        for x in c["rows"]:
            if "pdserve_ms" not in x:
                lines.append(f"   {x['tokens']:>6}  {x.get('skipped')}")
                continue
            lines.append(f"   {x['tokens']:>6}  {x['pdserve_tflop_s']:7.1f}  {x['sdpa_tflop_s']:5.1f}  "
                         f"{x['speedup_vs_sdpa']:5.2f}  {_f(x.get('pdserve_pct_matmul'), '6.1f')}   "
                         f"{x['rel_err_vs_sdpa']:.1e}")
    d = r.get("decode_step_8b", {})
    if d.get("rows"):
        lines.append(f"d {d['model']}, decode step at context {d['context']}: ms (tok/s, % of "
                     f"weights+KV read roofline); runner CUDA graphs: {d['runner_graphs']}; logits "
                     f"err vs torch ops {_f(d.get('logits_rel_err_vs_torch_ops'), '.1e')}; runner "
                     f"tokens = eager argmax: {d.get('runner_tokens_match_eager')}")
        lines.append("   bs  runner step ms (tok/s, %roof) graph  look-ahead step ms (%roof)  "
                     "eager forward ms (%roof)  roofline ms  sampled step / look-ahead / sampling kernel ms")
        for x in d["rows"]:
            if "runner_step_ms" not in x:
                lines.append(f"  {x['bs']:>3}  {x.get('skipped')}")
                continue
            lines.append(f"  {x['bs']:>3}  {x['runner_step_ms']:7.2f} ({x['runner_tok_s']:6.0f}, "
                         f"{_f(x.get('runner_pct_roofline'), '5.1f')}%) {str(x['runner_used_graph']):>5}"
                         f"  {_f(x.get('look_ahead_step_ms'), '7.2f')} "
                         f"({_f(_pct(x.get('roofline_ms'), x.get('look_ahead_step_ms')), '5.1f')}%)     "
                         f"  {x['eager_forward_ms']:7.2f} ({_f(x.get('eager_forward_pct_roofline'), '5.1f')}%)"
                         f"          {_f(x.get('roofline_ms'))}"
                         f"  {_f(x.get('sampled_step_ms'), '7.2f')} / {_f(x.get('sampled_look_ahead_step_ms'), '7.2f')}"
                         f" / {_f(x.get('sampled_kernel_step_ms'), '7.2f')}")
        p = d.get("prefill")
        if p:
            lines.append(f"   prefill {p['tokens']} tokens: {p['ms']:.1f} ms, {p['tflop_s']:.0f} TFLOP/s "
                         f"= {_f(p.get('pct_matmul'), '.1f')}% of the matmul rate")
    e = r.get("offline_throughput", {})
    if "pdserve" in e:
        hf = " | ".join(f"bs {h['batch_size']}: {_f(h.get('output_tok_s'), '.0f')}" for h in e["hf"])
        lines.append(f"e offline, {e['requests']} requests, prompts {e['prompt_len']}, outputs "
                     f"{e['output_len']}: pdserve {e['pdserve']['output_tok_s']:.0f} output tok/s "
                     f"({e['pdserve']['seconds']:.1f}s) | HF {hf} | x HF best "
                     f"{_f(e.get('speedup_vs_hf'))}")
    f = r.get("one_gpu_two_roles", {})
    if f.get("modes"):
        lines.append(f"f one GPU two roles, {f['requests_per_rate']} requests per rate, prompts "
                     f"{f['prompt_len']}, outputs {f['output_len']}")
        lines.append("   mode           transport  rate  TTFT med/p90 ms    output tok/s  complete")
        for m in f["modes"]:
            if "error" in m:
                lines.append(f"   {m['mode']:<14} failed: {m['error'][:300]}")
            for x in m["rows"]:
                if "ttft_median_ms" not in x:
                    lines.append(f"   {m['mode']:<14} {m['transport']:<9} {x['rate']:>5}  {x.get('skipped')}")
                    continue
                lines.append(f"   {m['mode']:<14} {m['transport']:<9} {x['rate']:>5}  "
                             f"{x['ttft_median_ms']:7.1f}/{x['ttft_p90_ms']:7.1f}  "
                             f"{x['output_tok_s']:10.0f}  {x['complete']}")
                phases = x.get("ttft_phases_median_ms") or {}
                if phases:
                    lines.append("      TTFT legs, median ms: " + ", ".join(
                        f"{k} {v:.1f}" for k, v in phases.items()))
        for rate, ratio in f.get("ttft_ratio_disagg_vs_colocated", {}).items():
            lines.append(f"   TTFT disaggregated / colocated at {rate} req/s: {ratio:.3f}")
        if "ttft_ratio_idle" in f:
            lines.append(f"   TTFT disaggregated / colocated, one request at a time: {f['ttft_ratio_idle']:.3f}")
    lines.append("Goals:")
    for g in goals(r):
        v = "" if "value" not in g else f" {g['value']:.3g}{g['unit']} (target {g['target']:g}{g['unit']})"
        lines.append(f"  [{g['status']:^12}] {g['goal']}:{v} {g.get('gap', '')}")
    return lines


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--smoke", action="store_true", help="tiny shapes, for CPU")
    ap.add_argument("--parts", default="abcdef", help="which parts, e.g. 'a,b,c' (default all)")
    ap.add_argument("--budget-s", type=float, default=None,
                    help="time budget for all parts (default 400 on GPU, 1800 smoke)")
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "out" / "gpu_suite.json"))
    args = ap.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    cuda = torch.cuda.is_available()
    if not cuda:
        if not args.smoke:
            ap.error("no CUDA device: use --smoke")
        os.environ.setdefault("TRITON_INTERPRET", "1")   # before anything imports triton
    import triton
    dev = torch.device("cuda" if cuda else "cpu")
    selected = [p for p in args.parts.replace(",", "") if p in PARTS]
    budget = args.budget_s or (1800.0 if args.smoke else 400.0)
    meta = {"device": torch.cuda.get_device_name(0) if cuda else platform.processor() or "cpu",
            "torch": torch.__version__, "triton": triton.__version__,
            "started": time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime()),
            "command": " ".join(sys.argv), "smoke": args.smoke, "budget_s": budget,
            "parts": selected}
    out_dir = os.environ.get("OUT")
    path = Path(out_dir) / "gpu_suite.json" if out_dir else Path(args.out)
    path.parent.mkdir(parents=True, exist_ok=True)

    def save(results: dict[str, Any]) -> list[str]:
        lines = table(results, meta)
        doc = {"meta": meta, "results": results, "goals": goals(results), "table": lines}
        path.write_text(json.dumps(doc, indent=1, default=str))
        return lines

    with tempfile.TemporaryDirectory(prefix="gpu-suite-") as tmp:
        suite = Suite(dev, args.smoke, budget, Path(tmp))
        t = time.monotonic()
        results = run_parts(suite, selected, save)
        meta["seconds"] = time.monotonic() - t
        suite.hf_model = None
    lines = save(results)
    print("\n".join(lines), flush=True)
    print(f"JSON: {path}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
