"""Run 15's probe (mixed batch, P = 8, the placement of place_documents at 6be0c52), FA4 fwd+bwd:
1. the ranks timed in turn in rank order and in reverse order (is a rank's time its position?);
2. the step calls of ranks 0, 3, 4 and 7 timed alone, and each call's document segments as separate
   bare calls (does a call that merges segments of unlike shapes cost more than its parts?);
3. bare blocks and two-segment varlen calls of the shapes those steps make: doc 0's 8192 x 4096
   (A: queries both chunks, keys one) and 4096 x 8192 (B), doc 12's 3082 x 1541 and 1541 x 3082.
0. three placements' ranks and the one-GPU call timed in the same rounds: this commit's; the same
   with every sub-ring but the largest in reverse member order (a rank that is a late member of the
   64K document's sub-ring, with many steps whose queries are both its chunks, becomes an early member
   of doc 12's); and the least-traffic placement of 9e3ca2e (run 14's).
Usage (GPU, FA4 installed): python probe.py OUT.jsonl [OLD_PLACEMENT]; OLD_PLACEMENT: a file holding
`git show 9e3ca2e:lightning_sp/core/placement.py` with ``from .`` made ``from lightning_sp.core.``
(the run's command passed it as placement_9e3ca2e.py)."""
import json, os, statistics, sys
import torch
sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", ".."))  # benchmark/
import benchmark_documents as bd
from lightning_sp.core.kernels import select_kernel

dev, dt, H, D = torch.device("cuda"), torch.bfloat16, 32, 128
out = open(sys.argv[1], "w")


def emit(rec):
    print(rec, flush=True)
    out.write(json.dumps(rec) + "\n")


def timed(fn, iters=10):
    for _ in range(3):
        fn()
    torch.cuda.synchronize()
    ts = []
    for _ in range(iters):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record(); fn(); b.record(); torch.cuda.synchronize(); ts.append(a.elapsed_time(b))
    return statistics.median(ts)


class Args: pass
args = Args(); args.seed = 0; args.head_dim = D; args.nheads = H; args.backend = "fa4"; args.warmup = 2; args.iters = 10
lengths, window = bd.distribution("mixed")
placement = bd.place_documents(bd.cu_seqlens(lengths), 8, 1, window=window)
steps = [bd.plan_step(placement, r, args, H, dev, dt, False)[0] for r in range(8)]

# 0. placements side by side
from lightning_sp.core import placement as pm
largest = max(len(d.ranks) for d in placement.documents)
reversed_members = pm._assemble([d.start for d in placement.documents], lengths,
                                [(d.ranks if len(d.ranks) in (1, largest) else d.ranks[::-1], d.padded_length)
                                 for d in placement.documents], 8, 1, window)
variants = {"head": placement, "reversed": reversed_members}
if len(sys.argv) > 2:
    import importlib.util
    spec = importlib.util.spec_from_file_location("old_placement", sys.argv[2])
    old = importlib.util.module_from_spec(spec); spec.loader.exec_module(old)
    variants["least_traffic_9e3ca2e"] = old.place_documents(bd.cu_seqlens(lengths), 8, 1, window=window)
q0, k0, v0 = bd.make_inputs(args, H, sum(lengths), dev, dt, 0)
base_step, _ = bd.calls_step([bd.whole_batch_call(lengths, window)], q0, k0, v0, "fa4", False)
all_steps, names = [base_step], ["single"]
for name, p in variants.items():
    all_steps += [bd.plan_step(p, r, args, H, dev, dt, False)[0] for r in range(8)]
    names += [f"{name} r{r}" for r in range(8)]
args.rounds = 5
ms, _ = bd.round_robin_times(all_steps, args, dev)
for i, (name, p) in enumerate(variants.items()):
    rank_ms = ms[1 + 8 * i: 9 + 8 * i]
    emit(dict(kind="variant", variant=name, single_ms=ms[0], rank_ms=rank_ms, efficiency=ms[0] / 8 / max(rank_ms),
              balance=p.balance, spanning=[(d.index, d.ranks) for d in p.documents if d.spans]))
del all_steps, base_step, q0, k0, v0
torch.cuda.empty_cache()

# 1. order of timing
for order in ("forward", "reverse", "forward", "reverse"):
    ranks = list(range(8)) if order == "forward" else list(range(7, -1, -1))
    args.rounds = 3
    ms, _ = bd.round_robin_times([steps[r] for r in ranks], args, dev)
    emit(dict(kind="order", order=order, rank_ms=[ms[ranks.index(r)] for r in range(8)]))
del steps
torch.cuda.empty_cache()


def segment_call(nqs, nks, causal=False):
    q = torch.randn(sum(nqs), H, D, device=dev, dtype=dt)
    k, v = (torch.randn(sum(nks), H, D, device=dev, dtype=dt) for _ in range(2))
    cq = torch.tensor([0, *torch.tensor(nqs).cumsum(0).tolist()], device=dev, dtype=torch.int32)
    ck = torch.tensor([0, *torch.tensor(nks).cumsum(0).tolist()], device=dev, dtype=torch.int32)
    kern = select_kernel("fa4", q[None], k[None], causal, (None, None))
    kw = dict(causal=causal, max_seqlen=(max(nqs), max(nks)))
    o, l = kern.forward_varlen(q, k, v, cq, ck, **kw)
    do = torch.randn_like(o)

    def fb():
        o, l = kern.forward_varlen(q, k, v, cq, ck, **kw)
        kern.backward_varlen(do, q, k, v, o, l, cq, ck, **kw)

    def f():
        kern.forward_varlen(q, k, v, cq, ck, **kw)
    return timed(fb), timed(f)


# 3. shapes
A0, B0, A12, B12 = (8192, 4096), (4096, 8192), (3082, 1541), (1541, 3082)
for name, segs in [("A0", [A0]), ("B0", [B0]), ("A12", [A12]), ("B12", [B12]), ("A0+A12", [A0, A12]),
                   ("B0+B12", [B0, B12]), ("A0+B12", [A0, B12]), ("B0+A12", [B0, A12]), ("A0+A12 again", [A0, A12]),
                   ("B0+B12 again", [B0, B12])]:
    fb, f = segment_call([s[0] for s in segs], [s[1] for s in segs])
    emit(dict(kind="shape", name=name, segments=segs, ms=fb, fwd_ms=f, mpairs_per_ms=sum(a * b for a, b in segs) / fb / 1e6))

# 2. the plan's calls, merged and as separate segments
from lightning_sp.core.attention.placed import placed_spec
from lightning_sp.core.attention.placed_plan import PlacedPlan
from lightning_sp.core.attention.ring import RingSpec
from lightning_sp.core.mesh import rank_coordinates
for rank in (0, 3, 4, 7):
    mesh = rank_coordinates(8, 1, rank)
    q, k, v = bd.make_inputs(args, H, placement.tokens_per_rank, dev, dt, rank)
    spec = RingSpec(mesh, "zigzag", True, D ** -0.5, (None, None), "fa4")
    plan = PlacedPlan(placed_spec(spec, placement), placement, q, k)
    like = torch.stack([k, v], dim=1)
    merged_total = parts_total = 0.0
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
            nq, nk = call.cu_q.diff().tolist(), call.cu_k.diff().tolist()
            parts = [segment_call([a], [b], call.causal)[0] for a, b in zip(nq, nk)] if len(nq) > 1 else [t]
            merged_total += t
            parts_total += sum(parts)
            emit(dict(kind="plan_call", rank=rank, step=s, causal=call.causal, q_k_lengths=[nq, nk], ms=t, parts_ms=parts))
    emit(dict(kind="rank_calls", rank=rank, merged_ms=merged_total, parts_ms=parts_total))
