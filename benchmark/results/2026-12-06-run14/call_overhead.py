"""Run 14's second probe: where a placed-plan call of the mixed batch (P = 8, rank 0) loses against
the same block as a bare FA4 call. Variants timed in turn for several rounds (medians), fwd+bwd:
bare (contiguous q, k, v), strided_kv (k, v views of a (tokens, 2, h, d) buffer, as the ring's
step buffers), sliced_q (q, dout, out rows 4096..8192 of 8192-row tensors), plan_step6 / plan_step1
(the plan's own calls through PlacedPlan.forward/backward), doc0_only_step1 (step 1's call without
doc 12's segment). Usage (GPU, FA4): python call_overhead.py OUT.jsonl"""
import json, os, statistics, sys
import torch
sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", ".."))
import benchmark_documents as bd
from lightning_sp.core.kernels import select_kernel
from lightning_sp.core.attention.placed import placed_spec
from lightning_sp.core.attention.placed_plan import PlacedPlan
from lightning_sp.core.attention.ring import RingSpec, BlockCall
from lightning_sp.core.mesh import rank_coordinates

dev, dt, H, D = torch.device("cuda"), torch.bfloat16, 32, 128
kern = select_kernel("fa4", torch.empty(1, 1, H, D, device=dev, dtype=dt), torch.empty(1, 1, H, D, device=dev, dtype=dt),
                     False, (None, None))
scale = D ** -0.5


def bare(q, k, v, nq, nk, segs_q=None, segs_k=None):
    segs_q, segs_k = segs_q or [nq], segs_k or [nk]
    cq = torch.tensor([0, *segs_q], dtype=torch.int32).cumsum(0).to(torch.int32).to(dev)
    ck = torch.tensor([0, *segs_k], dtype=torch.int32).cumsum(0).to(torch.int32).to(dev)
    kw = dict(causal=False, softmax_scale=scale, max_seqlen=(max(segs_q), max(segs_k)))
    o, l = kern.forward_varlen(q, k, v, cq, ck, **kw)
    do = torch.randn_like(o)

    def fb():
        o, l = kern.forward_varlen(q, k, v, cq, ck, **kw)
        kern.backward_varlen(do, q, k, v, o, l, cq, ck, **kw)
    return fb


def rnd(*shape):
    return torch.randn(*shape, device=dev, dtype=dt)


variants = {}
variants["bare"] = bare(rnd(4096, H, D), rnd(8192, H, D), rnd(8192, H, D), 4096, 8192)
kv = rnd(8192, 2, H, D)
variants["strided_kv"] = bare(rnd(4096, H, D), kv[:, 0], kv[:, 1], 4096, 8192)
qbig = rnd(8192, H, D)
variants["sliced_q"] = bare(qbig[4096:], rnd(8192, H, D), rnd(8192, H, D), 4096, 8192)
variants["two_segments"] = bare(rnd(4096 + 1284, H, D), rnd(8192 + 2568, H, D), rnd(8192 + 2568, H, D), 4096, 8192,
                                [4096, 1284], [8192, 2568])
variants["doc12_alone"] = bare(rnd(1284, H, D), rnd(2568, H, D), rnd(2568, H, D), 1284, 2568)

args = type("A", (), dict(seed=0, head_dim=D, nheads=H, backend="fa4"))()
lengths, _ = bd.distribution("mixed")
placement = bd.place_documents(bd.cu_seqlens(lengths), 8, 1, window=None)
q, k, v = bd.make_inputs(args, H, placement.tokens_per_rank, dev, dt, 0)
plan = PlacedPlan(placed_spec(RingSpec(rank_coordinates(8, 1, 0), "zigzag", True, scale, (None, None), "fa4"), placement),
                  placement, q, k)
like = torch.stack([k, v], dim=1)
dout = torch.randn_like(q)


def plan_call(call, s):
    ks, vs = (k, v) if s == 0 else torch.randn(plan.shape(s, like), device=dev, dtype=dt).unbind(1)
    o, l = plan.forward(call, q, ks, vs)
    out = torch.zeros_like(q); lse = torch.zeros(q.shape[:-1], device=dev, dtype=torch.float32)
    out[call.q_sel], lse[call.q_sel] = o, l
    lse_k = lse.transpose(0, 1).contiguous()

    def fb():
        plan.forward(call, q, ks, vs)
        plan.backward(call, dout, q, ks, vs, out, lse_k)
    return fb


variants["plan_step0"] = plan_call(plan.steps[0][0], 0)
variants["plan_step1"] = plan_call(plan.steps[1][0], 1)
c1 = plan.steps[1][0]
print("step1 call", c1.q_sel if isinstance(c1.q_sel, slice) else ("index", c1.q_sel.shape), c1.k_sel, c1.cu_q.tolist(), c1.cu_k.tolist())
variants["plan_step6"] = plan_call(plan.steps[6][0], 6)
c6 = plan.steps[6][0]
print("step6 call", c6.q_sel, c6.k_sel, c6.cu_q.tolist(), c6.cu_k.tolist())
variants["doc0_only_step1"] = plan_call(BlockCall(slice(4096, 8192), slice(0, 8192), False, (None, None),
                                                  torch.tensor([0, 4096], dtype=torch.int32, device=dev),
                                                  torch.tensor([0, 8192], dtype=torch.int32, device=dev), (4096, 8192)), 1)

times = {n: [] for n in variants}
for fn in variants.values():
    for _ in range(3):
        fn()
torch.cuda.synchronize()
for rnd_ in range(5):
    for n, fn in variants.items():
        ev = [(torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)) for _ in range(10)]
        for a, b in ev:
            a.record(); fn(); b.record()
        torch.cuda.synchronize()
        times[n] += [a.elapsed_time(b) for a, b in ev]
with open(sys.argv[1], "w") as f:
    for n, ts in times.items():
        rec = dict(variant=n, median_ms=statistics.median(ts), min_ms=min(ts), max_ms=max(ts))
        print(rec, flush=True)
        f.write(json.dumps(rec) + "\n")
