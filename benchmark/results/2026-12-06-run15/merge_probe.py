"""Run 15's second probe: would merging two zigzag ring steps of the same kind into one block pay?
FA4 fwd+bwd, 32 heads of 128, bf16, non-causal: two blocks of a ring step's shape (as two calls) against
one block of the merged shape, for doc 0's chunks (4096) and doc 12's (1541) of the mixed batch at P = 8;
plus the copy a merged A-type step would need (gathering 2c K/V rows by index, and scattering dK/dV back).
All variants timed in turn for 8 rounds of 10 iterations (medians), so the machine's drift hits all alike.
Usage (GPU, FA4 installed): python merge_probe.py OUT.jsonl"""
import json, statistics, sys
import torch
from lightning_sp.core.kernels import select_kernel

dev, dt, H, D = torch.device("cuda"), torch.bfloat16, 32, 128
out = open(sys.argv[1], "w")
kern = select_kernel("fa4", torch.empty(1, 1, H, D, device=dev, dtype=dt), torch.empty(1, 1, H, D, device=dev, dtype=dt),
                     False, (None, None))


def block_step(blocks):
    """fwd+bwd of each (nq, nk) block as its own call"""
    made = []
    for nq, nk in blocks:
        q = torch.randn(nq, H, D, device=dev, dtype=dt)
        k, v = (torch.randn(nk, H, D, device=dev, dtype=dt) for _ in range(2))
        cq = torch.tensor([0, nq], device=dev, dtype=torch.int32)
        ck = torch.tensor([0, nk], device=dev, dtype=torch.int32)
        kw = dict(causal=False, max_seqlen=(nq, nk))
        o, _ = kern.forward_varlen(q, k, v, cq, ck, **kw)
        made.append((q, k, v, cq, ck, kw, torch.randn_like(o)))

    def step():
        for q, k, v, cq, ck, kw, do in made:
            o, l = kern.forward_varlen(q, k, v, cq, ck, **kw)
            kern.backward_varlen(do, q, k, v, o, l, cq, ck, **kw)
    return step


def gather_step(rows, total):
    """index_select of ``rows`` K and V rows out of a (total, 2, H, D) buffer and index_add of as many dK/dV rows back (float32)"""
    buf = torch.randn(total, 2, H, D, device=dev, dtype=dt)
    sums = torch.zeros(total, 2, H, D, device=dev, dtype=torch.float32)
    idx = torch.cat([torch.arange(0, rows // 2), torch.arange(total // 2, total // 2 + rows // 2)]).to(dev)
    grad = torch.randn(rows, 2, H, D, device=dev, dtype=dt)

    def step():
        buf.index_select(0, idx)
        sums.index_add_(0, idx, grad.float())
    return step


c0, c12 = 4096, 1541
variants = {
    "A0 two 8192x4096": block_step([(2 * c0, c0)] * 2), "A0 merged 8192x8192": block_step([(2 * c0, 2 * c0)]),
    "B0 two 4096x8192": block_step([(c0, 2 * c0)] * 2), "B0 merged 4096x16384": block_step([(c0, 4 * c0)]),
    "A12 two 3082x1541": block_step([(2 * c12, c12)] * 2), "A12 merged 3082x3082": block_step([(2 * c12, 2 * c12)]),
    "B12 two 1541x3082": block_step([(c12, 2 * c12)] * 2), "B12 merged 1541x6164": block_step([(c12, 4 * c12)]),
    "gather 8192 of 16384 K/V rows + dK/dV back": gather_step(2 * c0, 4 * c0),
}


def timed(fn, iters=10):
    ts = []
    for _ in range(iters):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record(); fn(); b.record(); torch.cuda.synchronize(); ts.append(a.elapsed_time(b))
    return ts


for fn in variants.values():
    timed(fn, 3)
times = {name: [] for name in variants}
for _ in range(8):
    for name, fn in variants.items():
        times[name] += timed(fn)
for name, ts in times.items():
    rec = dict(name=name, ms=statistics.median(ts), spread=[min(ts), max(ts)])
    print(rec, flush=True)
    out.write(json.dumps(rec) + "\n")
