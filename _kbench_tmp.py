"""Temporary tuning sweep (deleted after use)."""
import itertools
import torch
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


hkv, d, pg = 8, 128, 16
for dt, hq in [(torch.bfloat16, 8), (torch.bfloat16, 16), (torch.float32, 32)]:
    for bs, ctx in [(1, 4096), (8, 4096), (64, 8192)]:
        nb = bs * ctx // pg
        kc = torch.randn(nb, pg, hkv, d, device="cuda", dtype=dt); vc = torch.randn_like(kc)
        bt = torch.randperm(nb, device="cuda").int().view(bs, -1)
        sl = torch.full((bs,), ctx, device="cuda", dtype=torch.int32)
        q = torch.randn(bs, hq, d, device="cuda", dtype=dt)
        by = 2 * kc.numel() * kc.element_size()
        ns = ta.choose_num_splits(bs, hkv, ctx, q.device)
        res = []
        for dot, bn, nw in itertools.product([False, True], [16, 32, 64, 128], [4, 8]):
            if not dot and bn * d * (hq // hkv) > 16384:
                continue
            ta._decode_tiles = lambda g, dtype, c=(dot, bn, nw): c
            x = gtime(lambda: ta.decode_attention(q, kc, vc, sl, bt, .088, num_splits=ns))
            res.append((round(by / x / 1e12, 2), dot, bn, nw))
        print(f"{dt} G={hq // hkv} bs={bs} ctx={ctx} splits={ns}: top {sorted(res)[::-1][:4]} worst {sorted(res)[0]}")
