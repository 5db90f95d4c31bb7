"""Run 14's probe: FA4 fwd+bwd rate (attended pairs per ms) of single blocks of the shapes the
placed ring's steps make, and of every call of the mixed batch's plan at P = 8 (ranks 0 and 5).
Usage (GPU, FA4 installed): python block_rates.py OUT.jsonl"""
import json, statistics, sys, os
import torch
sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", ".."))  # benchmark/
import benchmark_documents as bd
from lightning_sp.core.kernels import select_kernel

dev, dt, H, D = torch.device(os.environ.get("DEV", "cuda")), torch.bfloat16, int(os.environ.get("H", 32)), 128
BACKEND = os.environ.get("BACKEND", "fa4")
out = open(sys.argv[1], "w")


def timed(fn, iters=10):
    if dev.type == "cpu":  # a dry run of the script
        import time
        t0 = time.perf_counter(); fn(); return (time.perf_counter() - t0) * 1e3
    for _ in range(3):
        fn()
    torch.cuda.synchronize()
    ts = []
    for _ in range(iters):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record(); fn(); b.record(); torch.cuda.synchronize(); ts.append(a.elapsed_time(b))
    return statistics.median(ts)


def block(nq, nk, causal, segments=1):
    q = torch.randn(nq * segments, H, D, device=dev, dtype=dt)
    k, v = (torch.randn(nk * segments, H, D, device=dev, dtype=dt) for _ in range(2))
    cq = torch.arange(segments + 1, device=dev, dtype=torch.int32) * nq
    ck = torch.arange(segments + 1, device=dev, dtype=torch.int32) * nk
    kern = select_kernel(BACKEND, q[None], k[None], causal, (None, None))
    kw = dict(causal=causal, max_seqlen=(nq, nk))
    o, l = kern.forward_varlen(q, k, v, cq, ck, **kw)
    do = torch.randn_like(o)

    def fb():
        o, l = kern.forward_varlen(q, k, v, cq, ck, **kw)
        kern.backward_varlen(do, q, k, v, o, l, cq, ck, **kw)

    def f():
        kern.forward_varlen(q, k, v, cq, ck, **kw)
    pairs = segments * (nq * (nq + 1) // 2 if causal and nq == nk else nq * nk)
    t, tf = timed(fb), timed(f)
    rec = dict(kind="block", nq=nq, nk=nk, causal=causal, segments=segments, ms=t, fwd_ms=tf,
               mpairs_per_ms=pairs / t / 1e6, fwd_mpairs_per_ms=pairs / tf / 1e6)
    print(rec, flush=True)
    out.write(json.dumps(rec) + "\n")


for nq, nk, c, s in [] if BACKEND != "fa4" else [(65536, 65536, True, 1), (16384, 16384, True, 1), (8192, 8192, True, 1), (8192, 8192, True, 2),
                     (4096, 4096, True, 1), (4096, 8192, False, 1), (8192, 4096, False, 1), (8192, 8192, False, 1),
                     (4096, 16384, False, 1), (16384, 4096, False, 1), (8192, 16384, False, 1),
                     (16384, 8192, False, 1), (4681, 9362, False, 1), (9362, 4681, False, 1), (2048, 2048, True, 8)]:
    block(nq, nk, c, s)

# every call of the mixed batch's plan at P = 8, ranks 0 and 5, timed alone
class A: pass
args = A(); args.seed = 0; args.head_dim = D; args.nheads = H; args.backend = BACKEND
lengths, window = bd.distribution("mixed")
placement = bd.place_documents(bd.cu_seqlens(lengths), 8, 1, window=window)
from lightning_sp.core.attention.placed import placed_spec
from lightning_sp.core.attention.placed_plan import PlacedPlan
from lightning_sp.core.attention.ring import RingSpec
from lightning_sp.core.mesh import rank_coordinates
for rank in (0, 5):
    mesh = rank_coordinates(8, 1, rank)
    q, k, v = bd.make_inputs(args, H, placement.tokens_per_rank, dev, dt, rank)
    spec = RingSpec(mesh, "zigzag", True, D ** -0.5, (None, None), BACKEND)
    plan = PlacedPlan(placed_spec(spec, placement), placement, q, k)
    like = torch.stack([k, v], dim=1)
    total = 0.0
    for s, calls in enumerate(plan.steps):
        ks, vs = (k, v) if s == 0 else torch.randn(plan.shape(s, like), device=dev, dtype=dt).unbind(1)
        for call in calls:
            o, l = plan.forward(call, q, ks, vs)
            outb = torch.zeros_like(q); lse = torch.zeros(q.shape[:-1], device=dev, dtype=torch.float32)
            outb[call.q_sel] = o; lse[call.q_sel] = l
            lse_k, dout = lse.transpose(0, 1).contiguous(), torch.randn_like(q)
            def fb():
                plan.forward(call, q, ks, vs)
                plan.backward(call, dout, q, ks, vs, outb, lse_k)
            t = timed(fb)
            total += t
            segs = (call.cu_q.diff().tolist(), call.cu_k.diff().tolist())
            rec = dict(kind="plan_call", rank=rank, step=s, causal=call.causal, window=call.window, q_k_lengths=segs, ms=t)
            print(rec, flush=True)
            out.write(json.dumps(rec) + "\n")
    print("rank", rank, "sum of calls", total, flush=True)
