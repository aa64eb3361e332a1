"""Temporary timing check (deleted after use)."""
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


dt, hkv, d, pg = torch.bfloat16, 8, 128, 16
for hq in (32, 8):
    for bs, ctx in [(1, 4096), (8, 4096), (32, 4096), (64, 8192)]:
        nb = bs * ctx // pg
        kc = torch.randn(nb, pg, hkv, d, device="cuda", dtype=dt); vc = torch.randn_like(kc)
        bt = torch.randperm(nb, device="cuda").int().view(bs, -1)
        sl = torch.full((bs,), ctx, device="cuda", dtype=torch.int32)
        q = torch.randn(bs, hq, d, device="cuda", dtype=dt)
        by = 2 * kc.numel() * 2
        ns = ta.choose_num_splits(bs, hkv, ctx, q.device)
        x = gtime(lambda: ta.decode_attention(q, kc, vc, sl, bt, .088, num_splits=ns))
        K = kc.view(bs, ctx, hkv, d).transpose(1, 2).contiguous(); V = vc.view(bs, ctx, hkv, d).transpose(1, 2).contiguous()
        y = gtime(lambda: F.scaled_dot_product_attention(q.view(bs, hq, 1, d), K, V, enable_gqa=True))
        print(f"decode Hq={hq} Hkv={hkv} bs={bs} ctx={ctx} splits={ns}: {x*1e6:.1f}us {by/x/1e12:.2f} TB/s"
              f" | sdpa on contiguous K/V {by/y/1e12:.2f} TB/s")
