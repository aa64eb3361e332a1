"""Loopback throughput of the grpc KV transport (a micro-check, not a test).

D runs in a child process (its own GIL, as in production) with a KVReceiver over a
bf16 cache; P, in this process, pushes one layer of many blocks per attempt through
GrpcTransport and waits for the KVPushAck. Reported: payload bytes / (open -> ack) for
each chunk size, so it includes P's encode + crc, the socket, and D's crc + scatter.

Baseline, same run and same two processes: a bare gRPC client stream of prebuilt
bytes messages of the chunk size to a handler that drops them (what Python gRPC moves
on this machine with no KV work at all); the ratio column is pdserve / bare.

    python benchmarks/kv_grpc_bandwidth.py [--mib 128] [--repeats 3] [--chunks 1,2,4]
"""
from __future__ import annotations

import argparse
import multiprocessing as mp
import statistics
import sys
import time
from multiprocessing.connection import Connection

from concurrent import futures

import grpc
import torch

# one layer-block = 2 * 16 * 8 * 128 * 2 bytes = 64 KiB (a Llama-3-8B-like layer)
NUM_LAYERS, BLOCK_SIZE, KV_HEADS, HEAD_DIM = 1, 16, 8, 128
SECRET = "bench"


def _serve(conn: Connection, num_blocks: int) -> None:
    """D: receiver + listener, and the bare-stream baseline server; answers ("reserve",)
    with a reservation until ("stop",)."""
    from kv_transfer.grpc_transport import channel_options, serve_kv
    from kv_transfer.layout import KVLayout
    from kv_transfer.receiver import KVReceiver
    from kv_transfer.reservations import ReservationTable
    from pdserve.v1 import kv_pb2

    layout = KVLayout(NUM_LAYERS, BLOCK_SIZE, KV_HEADS, HEAD_DIM, torch.bfloat16)
    kv = torch.zeros(layout.payload_shape(NUM_LAYERS, num_blocks), dtype=torch.bfloat16)
    caches = [(kv[l, 0], kv[l, 1]) for l in range(NUM_LAYERS)]
    table = ReservationTable()
    receiver = KVReceiver(caches, layout, layout.compat_hash("bench"), table,
                          lambda e, r: kv_pb2.CompleteAck(ok=True, code=kv_pb2.KV_STATUS_OK),
                          lambda e, c, m: None)
    server, port = serve_kv(receiver, "127.0.0.1", 0, SECRET)
    conn.send(port)
    raw = grpc.server(futures.ThreadPoolExecutor(4), options=channel_options())
    raw.add_generic_rpc_handlers((grpc.method_handlers_generic_handler("bench.Raw", {
        "Push": grpc.stream_unary_rpc_method_handler(_drain)}),))
    conn.send(raw.add_insecure_port("127.0.0.1:0"))
    raw.start()
    while True:
        msg = conn.recv()
        if msg[0] == "stop":
            break
        for rid in [e.reservation_id for e in table.expired(float("inf"))]:
            table.pop(rid)  # the previous attempt's entry: keep the table small
        entry = table.create("bench", 1, range(num_blocks), num_blocks * BLOCK_SIZE, 600.0)
        conn.send((entry.reservation_id, receiver.compat_hash))
    server.stop(0).wait()  # let gRPC threads end before the process exits
    raw.stop(0).wait()


def _drain(request_iterator, context) -> bytes:
    n = 0
    for message in request_iterator:
        n += len(message)
    return str(n).encode()


def _raw_rate(port: int, nbytes: int, chunk: int, repeats: int) -> list[float]:
    """GB/s of a bare bytes stream: nbytes in messages of `chunk` bytes."""
    from kv_transfer.grpc_transport import channel_options
    msg = bytes(chunk)
    count = nbytes // chunk
    rates = []
    with grpc.insecure_channel(f"127.0.0.1:{port}", options=channel_options()) as channel:
        push = channel.stream_unary("/bench.Raw/Push")
        for i in range(repeats + 1):                   # the first run warms the channel
            start = time.perf_counter()
            got = int(push(iter([msg] * count), timeout=120))
            elapsed = time.perf_counter() - start
            if got != count * chunk:
                raise RuntimeError(f"raw stream delivered {got} of {count * chunk} bytes")
            if i:
                rates.append(got / elapsed / 1e9)
    return rates


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--mib", type=int, default=128, help="payload per attempt")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--chunks", default="1,2,4", help="chunk sizes in MiB")
    args = parser.parse_args()

    from kv_transfer.grpc_transport import GrpcTransport
    from pdserve.v1 import worker_pb2

    block_bytes = 2 * BLOCK_SIZE * KV_HEADS * HEAD_DIM * 2
    num_blocks = (args.mib << 20) // block_bytes
    ctx = mp.get_context("spawn")
    parent, child = ctx.Pipe()
    proc = ctx.Process(target=_serve, args=(child, num_blocks), daemon=True)
    proc.start()
    port = parent.recv()
    raw_port = parent.recv()
    kv = torch.randn(NUM_LAYERS, 2, num_blocks, BLOCK_SIZE, KV_HEADS, HEAD_DIM).to(torch.bfloat16)
    nbytes = kv.numel() * kv.element_size()
    out = sys.stdout
    out.write(f"grpc KV push over 127.0.0.1, {nbytes / 2**20:.0f} MiB per attempt, "
              f"D in a separate process, torch {torch.__version__}\n")
    try:
        for mib in (int(x) for x in args.chunks.split(",")):
            transport = GrpcTransport(secret=SECRET, max_chunk_bytes=mib << 20)
            rates = []
            for i in range(args.repeats + 1):          # the first run warms the channel
                parent.send(("reserve",))
                rid, compat = parent.recv()
                reservation = worker_pb2.Reservation(
                    reservation_id=rid, endpoint=f"127.0.0.1:{port}", block_ids=range(num_blocks),
                    compat_hash=compat, attempt_id=1, block_size=BLOCK_SIZE)
                start = time.perf_counter()
                handle = transport.open(reservation, "bench", 1)
                handle.send(0, NUM_LAYERS, kv)
                summary = handle.finish(120)
                elapsed = time.perf_counter() - start
                if i:
                    rates.append(summary.num_bytes / elapsed / 1e9)
            transport.close()
            raw = _raw_rate(raw_port, nbytes, mib << 20, args.repeats)
            out.write(f"chunk {mib} MiB: pdserve {statistics.mean(rates):.2f} GB/s mean "
                      f"({max(rates):.2f} best of {args.repeats}) | bare gRPC bytes stream "
                      f"{statistics.mean(raw):.2f} GB/s mean ({max(raw):.2f} best) | ratio "
                      f"{statistics.mean(rates) / statistics.mean(raw):.2f}\n")
    finally:
        parent.send(("stop",))
        proc.join(10)


if __name__ == "__main__":
    main()
