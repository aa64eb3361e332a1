"""Disaggregated 1P+1D vs colocated on the CPU box, same run, same requests.

For each mode: start `pdserve serve` (Ray, grpc transport), run `pdserve bench` (gRPC
backend) over a sweep of request rates, scrape the router's /metrics for the KV
transfer time, stop the server. Then print TTFT / TPOT / throughput side by side and
the P/D hand-off overhead on TTFT beyond the transfer itself:

    overhead = (TTFT_disagg - transfer_time - TTFT_colocated) / TTFT_colocated

and the gRPC transport's loopback bandwidth (benchmarks/kv_grpc_bandwidth.py).

    python benchmarks/pd_cpu.py [--rates 0.5,1,2] [--num-prompts 40] [--out benchmarks/out]
    # the hand-off alone: a rate the prefill worker keeps up with, equal prefill compute
    python benchmarks/pd_cpu.py --rates 0.1 --num-prompts 12 --input-len 64:256 \
        --output-len 8:16 --colocated-cpus 1
"""
from __future__ import annotations

import argparse
import json
import os
import re
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start(mode: str, colocated_cpus: int = 2) -> tuple[subprocess.Popen, int, int, str]:
    """By default both modes get the same 2 CPUs: one actor with 2 in colocated mode, a
    prefill and a decode actor with 1 each when disaggregated (Ray sizes each actor's
    torch threads from its CPUs). --colocated-cpus 1 gives the colocated worker the
    prefill worker's compute instead, which isolates the hand-off in the TTFT comparison."""
    gp, hp = free_port(), free_port()
    cpus = str(colocated_cpus) if mode == "colocated" else "1"
    log = tempfile.NamedTemporaryFile("w+", suffix=f"-{mode}.log", delete=False)
    cmd = [sys.executable, "-m", "pdserve.cli", "serve", "--mode", mode, "--transport", "grpc",
           "--dtype", "float32", "--device", "cpu", "--num-blocks", "1024",
           "--grpc-port", str(gp), "--http-port", str(hp), "--max-queue", "256",
           "--cpus-per-worker", cpus]
    proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, cwd=ROOT,
                            env=dict(os.environ, PDSERVE_NO_PROGRESS="1"), start_new_session=True)
    end = time.monotonic() + 300
    while time.monotonic() < end:
        if "  HTTP" in Path(log.name).read_text():
            return proc, gp, hp, log.name
        if proc.poll() is not None:
            break
        time.sleep(0.5)
    proc.kill()
    raise RuntimeError(Path(log.name).read_text()[-3000:])


def stop(proc: subprocess.Popen) -> None:
    proc.send_signal(signal.SIGINT)
    try:
        proc.wait(60)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)


def metric_sum(text: str, name: str) -> float:
    return sum(float(v) for v in re.findall(rf"^{re.escape(name)}(?:\{{[^}}]*\}})?\s+([0-9.e+-]+)$",
                                            text, re.M))


def run_mode(mode: str, args: argparse.Namespace, out: Path) -> dict:
    import httpx
    proc, gp, hp, log = start(mode, args.colocated_cpus)
    try:
        # Warm-up (not measured): first steps of fresh workers are slow.
        subprocess.run([sys.executable, "-m", "pdserve.cli", "bench", "--backend", "grpc",
                        "--target", f"127.0.0.1:{gp}", "--num-prompts", "8", "--input-len",
                        args.input_len, "--output-len", "8", "--no-progress", "--seed", "99"],
                       check=True, cwd=ROOT, capture_output=True)
        # One bench run per rate, each with its own prompts (seed), so no rate is served
        # from the prefix cache that an earlier rate filled.
        runs = []
        for i, rate in enumerate(args.rates.split(",")):
            res = out / f"pd_cpu_{mode}_{rate}.json"
            subprocess.run([sys.executable, "-m", "pdserve.cli", "bench", "--backend", "grpc",
                            "--target", f"127.0.0.1:{gp}", "--num-prompts", str(args.num_prompts),
                            "--request-rate", rate, "--input-len", args.input_len,
                            "--output-len", args.output_len, "--seed", str(i + 1),
                            "--no-progress", "--result-json", str(res),
                            "--plot", str(out / f"pd_cpu_{mode}_{rate}.png")],
                           check=True, cwd=ROOT)
            runs.extend(json.loads(res.read_text())["runs"])
        data = {"runs": runs}
        m = httpx.get(f"http://127.0.0.1:{hp}/metrics", timeout=10).text
        data["kv_transfer_seconds_sum"] = metric_sum(m, "pdserve:kv_transfer_seconds_sum")
        data["kv_transfer_seconds_count"] = metric_sum(m, "pdserve:kv_transfer_seconds_count")
        data["kv_transfer_bytes"] = metric_sum(m, "pdserve:kv_transfer_bytes_total")
        return data
    finally:
        stop(proc)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rates", default="0.5,1,2")
    ap.add_argument("--num-prompts", type=int, default=40)
    ap.add_argument("--input-len", default="64:512")
    ap.add_argument("--output-len", default="16:64")
    ap.add_argument("--colocated-cpus", type=int, default=2,
                    help="CPUs of the colocated worker (1: the prefill worker's, for the hand-off)")
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "out"))
    args = ap.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    load0 = os.getloadavg()[0]
    dis = run_mode("disaggregated", args, out)
    col = run_mode("colocated", args, out)
    n = max(1.0, dis["kv_transfer_seconds_count"])
    transfer_ms = 1000 * dis["kv_transfer_seconds_sum"] / n
    rows = []
    print(f"\ncolocated worker: {args.colocated_cpus} CPU(s); prefill and decode workers: 1 each")
    print(f"KV transfer (P's first token -> D's ack): mean {transfer_ms:.1f} ms over {n:.0f} "
          f"requests, {dis['kv_transfer_bytes'] / n / 1e6:.2f} MB each")
    print(f"{'rate':>6} | {'TTFT p50 ms (D / C)':>22} | {'TPOT p50 ms (D / C)':>22} | "
          f"{'out tok/s (D / C)':>20} | {'handoff overhead':>16}")
    for d, c in zip(dis["runs"], col["runs"]):
        over = (d["p50_ttft_ms"] - transfer_ms - c["p50_ttft_ms"]) / c["p50_ttft_ms"]
        rows.append(dict(rate=d["request_rate"], ttft_p50_disagg=d["p50_ttft_ms"],
                         ttft_p50_coloc=c["p50_ttft_ms"], tpot_p50_disagg=d["p50_tpot_ms"],
                         tpot_p50_coloc=c["p50_tpot_ms"], tput_disagg=d["output_throughput"],
                         tput_coloc=c["output_throughput"], handoff_overhead=over,
                         failed=d["failed"] + c["failed"]))
        print(f"{d['request_rate']:>6g} | {d['p50_ttft_ms']:>10.1f} / {c['p50_ttft_ms']:<9.1f} | "
              f"{d['p50_tpot_ms']:>10.1f} / {c['p50_tpot_ms']:<9.1f} | "
              f"{d['output_throughput']:>9.1f} / {c['output_throughput']:<8.1f} | {100 * over:>15.1f}%")
    bw = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "kv_grpc_bandwidth.py")],
                        capture_output=True, text=True, cwd=ROOT)
    print(bw.stdout[-1500:])
    (out / "pd_cpu.json").write_text(json.dumps(dict(rows=rows, transfer_ms=transfer_ms,
                                                     load_start=load0, load_end=os.getloadavg()[0],
                                                     grpc_bandwidth=bw.stdout), indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
