"""Temporary tuning sweep (deleted after use)."""
import itertools
import torch
import torch.nn.functional as F
from pdserve.kernels import triton_attention as ta


def gtime(f, reps=20):
    f(); torch.cuda.synchronize()
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        for _ in range(reps):
            f()
    g.replay(); torch.cuda.synchronize()
    s, e = torch.cuda.Event(True), torch.cuda.Event(True)
    ts = []
    for _ in range(5):
        s.record(); g.replay(); e.record(); e.synchronize(); ts.append(s.elapsed_time(e) / reps)
    return sorted(ts)[2] * 1e-3


dt = torch.bfloat16
hq, hkv, d, pg = 32, 8, 128, 16
print("SMs", torch.cuda.get_device_properties(0).multi_processor_count)
for bs, ctx in [(1, 4096), (4, 4096), (8, 4096), (32, 4096), (64, 8192), (128, 2048)]:
    nb = bs * ctx // pg
    kc = torch.randn(nb, pg, hkv, d, device="cuda", dtype=dt); vc = torch.randn_like(kc)
    bt = torch.randperm(nb, device="cuda").int().view(bs, -1)
    sl = torch.full((bs,), ctx, device="cuda", dtype=torch.int32)
    q = torch.randn(bs, hq, d, device="cuda", dtype=dt)
    by = 2 * kc.numel() * 2
    K = kc.view(bs, ctx, hkv, d).transpose(1, 2).contiguous(); V = vc.view(bs, ctx, hkv, d).transpose(1, 2).contiguous()
    Q = q.view(bs, hq, 1, d)
    y = gtime(lambda: F.scaled_dot_product_attention(Q, K, V, enable_gqa=True))
    print(f"decode bs={bs} ctx={ctx} heuristic={ta.choose_num_splits(bs, hkv, ctx, q.device)} sdpa {y*1e6:.1f}us {by/y/1e12:.2f}TB/s")
    best = []
    for bn, nw in itertools.product([32, 64, 128], [2, 4, 8]):
        ta._decode_tiles = lambda use_dot, dtype, bn=bn, nw=nw: (bn, nw)
        row = []
        for ns in [1, 2, 4, 8, 16, 32]:
            x = gtime(lambda: ta.decode_attention(q, kc, vc, sl, bt, .088, num_splits=ns))
            row.append(f"{by/x/1e12:.2f}")
            best.append((by / x / 1e12, bn, nw, ns))
        print(f"  BN={bn} warps={nw} splits1..32 TB/s: {' '.join(row)}")
    print("  best", sorted(best)[-3:])

for bs, L, qfrac in [(8, 2048, 1), (2, 8192, 1), (16, 2048, 4)]:
    nb = bs * L // pg
    kc = torch.randn(nb, pg, hkv, d, device="cuda", dtype=dt); vc = torch.randn_like(kc)
    bt = torch.randperm(nb, device="cuda").int().view(bs, -1)
    sl = torch.full((bs,), L, device="cuda", dtype=torch.int32)
    ql = L // qfrac  # qfrac > 1: a chunk over a cached prefix
    qsl = torch.arange(bs + 1, device="cuda", dtype=torch.int32) * ql
    q = torch.randn(bs * ql, hq, d, device="cuda", dtype=dt)
    fl = 4 * bs * hq * d * (ql * (L - ql) + ql * ql / 2)
    Q = q.view(bs, ql, hq, d).transpose(1, 2)
    K = kc.view(bs, L, hkv, d).transpose(1, 2); V = vc.view(bs, L, hkv, d).transpose(1, 2)
    if qfrac == 1:
        y = gtime(lambda: F.scaled_dot_product_attention(Q, K, V, is_causal=True, enable_gqa=True), 5)
        print(f"prefill bs={bs} L={L} q={ql}: sdpa {fl/y/1e12:.0f} TFLOP/s")
    for cfg in [(128, 64, 8, 3), (128, 64, 4, 3), (128, 128, 8, 3), (128, 128, 8, 2), (64, 64, 4, 3),
                (64, 128, 4, 3), (128, 32, 4, 4), (128, 64, 8, 4), (256, 64, 8, 3)]:
        ta._prefill_tiles = lambda bg, dtype, dev, cfg=cfg: cfg
        try:
            x = gtime(lambda: ta.prefill_attention(q, kc, vc, qsl, sl, bt, .088, ql), 5)
            print(f"  cfg {cfg}: {fl/x/1e12:.0f} TFLOP/s")
        except Exception as e:  # out of resources etc.
            print(f"  cfg {cfg}: {type(e).__name__}")
