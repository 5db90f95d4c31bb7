"""Packed documents: our attention on the work-placed layout and on today's per-document zigzag,
against the one-GPU varlen time / P and torch's context_parallel (FlexAttention, a document mask).

    torchrun --nproc_per_node 8 benchmark/benchmark_documents.py --out benchmark/results/documents.jsonl
    python benchmark/benchmark_documents.py --compute_side --world 2 4 8 --out benchmark/results/documents.jsonl
    python benchmark/benchmark_documents.py --summarize benchmark/results/documents.jsonl   # table and figures

The batches (``--distribution``, sizes for ``--seq_len`` S tokens; S = 131072 gives the issue's):
``one`` one document of S tokens; ``16x8k`` 16 documents of S/16; ``128x1k`` 128 of S/128;
``mixed`` one document of S/2, then lognormal lengths until S tokens, the last one truncated:
``z = torch.randn(64, generator=torch.Generator().manual_seed(0), dtype=torch.float64)``,
``round((S/64) * exp(z))`` clipped to [1, S/8], taken in order (median S/64, sigma 1);
``window`` one document of S tokens with a left window of S/32 (4096 at S = 131072).

Under torchrun (P ranks, the ring over all of them), per batch: ``single_gpu``, the whole batch as one
varlen call on every GPU at once (an iteration counts as the fastest GPU's); ``ours`` with
``layout=placed`` (:func:`lightning_sp.core.placement.place_documents`) and ``layout=zigzag``
(every document over every rank), each as ``path=compute_only``: every rank runs the block calls of
the plan the placed ring makes for it (:func:`plan_step`) with no communication, and as
``path=ring``: the placed ring itself (``packed_long_context_attention(placement=...)``), and
today's varlen ring for the zigzag; ``torch_cp``: FlexAttention with the document mask under torch's context
parallelism, or the reason it cannot run. ``--compute_side`` (one process, one GPU): every rank's
block calls of the placed ring's plan (:func:`plan_step`; the per-document zigzag as a placement
that splits every document over every rank), the ranks and the one-GPU varlen call timed in turn
for ``--rounds`` rounds (each one's median over all of them), for P GPUs in ``--world`` as Ulysses U
x ring P / U for U in ``--ulysses`` (default 1: a ring of P; under U > 1 every GPU runs its ring
rank's calls on nheads / U heads); compute-side efficiency = (one-GPU varlen time of the same rounds
/ P) / (slowest rank's kernel time), for both layouts.
"""
from __future__ import annotations

import argparse
import math
import os
import statistics
import sys
from dataclasses import dataclass

import torch
import torch.distributed as dist

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(1, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # lightning_sp, uninstalled
import common  # noqa: E402

from lightning_sp.core.kernels import backends, check_auto_fallback, select_kernel  # noqa: E402
from lightning_sp.core.placement import document_pairs, place_documents, spread_documents  # noqa: E402

DISTRIBUTIONS = ("one", "16x8k", "128x1k", "mixed", "window")
LAYOUTS = {"placed": place_documents, "zigzag": spread_documents}


def distribution(name: str, total: int = 131072) -> tuple[list[int], int | None]:
    """(document lengths, left window or None) of a named batch of ``total`` tokens (module docstring)."""
    if name in ("one", "window"):
        return [total], (max(total // 32, 1) if name == "window" else None)
    if name in ("16x8k", "128x1k"):
        count = 16 if name == "16x8k" else 128
        return [max(total // count, 1)] * min(count, total), None
    if name != "mixed":
        raise ValueError(f"unknown distribution {name!r}; choose one of {', '.join(DISTRIBUTIONS)}")
    z = torch.randn(64, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    draws = (total / 64 * z.exp()).round().clamp(1, max(total // 8, 1)).long().tolist()
    lengths = [total // 2]
    for n in draws:
        if sum(lengths) >= total:
            break
        lengths.append(min(n, total - sum(lengths)))
    if sum(lengths) != total:
        raise ValueError(f"64 draws are not enough for {total} tokens")
    return lengths, None


def cu_seqlens(lengths) -> torch.Tensor:
    return torch.tensor([0, *lengths]).cumsum(0)


# ---------------------------------------------------------------------------------------------
# Kernel calls: the one-GPU baseline, and a ring rank's plan


@dataclass
class Call:
    """One varlen kernel call (the one-GPU baseline): rows ``index`` of q, k and v, documents ``cu``."""

    index: torch.Tensor
    cu: torch.Tensor
    window: tuple


def whole_batch_call(lengths, window) -> Call:
    """The one-GPU baseline: the whole packed batch as one causal varlen call."""
    return Call(torch.arange(sum(lengths)), cu_seqlens(lengths).to(torch.int32), (window, None))


def plan_step(placement, rank: int, args, kv: int, device, dtype, fwd_only: bool, heads: int | None = None):
    """``rank``'s share of the ring over ``placement`` without the ring: the block calls of every step
    of the plan the placed ring itself makes (:class:`~lightning_sp.core.attention.placed_plan.PlacedPlan`),
    run on its own q, k, v and on random K/V buffers standing for what each step receives (in the
    step's own (tokens, 2, heads, dim) layout), forward and backward. No communication, no merging.
    ``heads``: query heads on this GPU (default ``args.nheads``; under Ulysses U, nheads / U)."""
    from lightning_sp.core.attention.placed import placed_spec
    from lightning_sp.core.attention.placed_plan import PlacedPlan
    from lightning_sp.core.attention.ring import RingSpec
    from lightning_sp.core.mesh import rank_coordinates

    mesh = rank_coordinates(placement.ring_size, 1, rank)
    q, k, v = make_inputs(args, kv, placement.tokens_per_rank, device, dtype, args.seed + rank, heads)
    spec = RingSpec(mesh, "zigzag", True, args.head_dim ** -0.5, (placement.window, None), args.backend)
    plan = PlacedPlan(placed_spec(spec, placement), placement, q, k)
    like = torch.stack([k, v], dim=1)
    kvs = [(k, v)] + [torch.randn(plan.shape(s, like), device=device, dtype=dtype).unbind(1)
                      for s in range(1, len(plan.steps))]
    calls = [(call, kv_s) for calls, kv_s in zip(plan.steps, kvs) for call in calls]
    out, lse = torch.zeros_like(q), torch.zeros(q.shape[:-1], device=device, dtype=torch.float32)
    with torch.no_grad():  # each row's out and lse from a call that covers it: what the backward reads
        for call, (ks, vs) in calls:
            o, l = plan.forward(call, q, ks, vs)
            out[call.q_sel], lse[call.q_sel] = o, l
    lse_k, dout = lse.transpose(0, 1).contiguous(), torch.randn_like(q)

    def step():
        with torch.no_grad():
            for call, (ks, vs) in calls:
                plan.forward(call, q, ks, vs)
                if not fwd_only:
                    plan.backward(call, dout, q, ks, vs, out, lse_k)
    return step, [plan.kernel.name]


def make_inputs(args, kv, rows, device, dtype, seed, heads=None):
    g = torch.Generator(device=device).manual_seed(seed)
    q = torch.randn(rows, heads or args.nheads, args.head_dim, generator=g, device=device, dtype=dtype)
    k, v = (torch.randn(rows, kv, args.head_dim, generator=g, device=device, dtype=dtype) for _ in range(2))
    return q, k, v


def calls_step(calls, q, k, v, backend, fwd_only):
    """One iteration of ``calls`` (forward, and backward with the forward's out and lse) on rows of q, k, v."""
    prepared = []
    for c in calls:
        qb, kb, vb = (t.index_select(0, c.index.to(q.device)) for t in (q, k, v))
        longest = int((c.cu[1:] - c.cu[:-1]).max())  # given to the kernel, as the ring does
        cu = c.cu.to(q.device)
        kernel = select_kernel(backend, qb[None], kb[None], True, c.window)
        check_auto_fallback(backend, kernel, q.device, [(qb.shape[0], kb.shape[0], True, c.window)])
        kw = dict(causal=True, window=c.window, max_seqlen=(longest, longest))
        out, lse = kernel.forward_varlen(qb, kb, vb, cu, cu, **kw)
        prepared.append((kernel, qb, kb, vb, cu, kw, out, lse, torch.randn_like(out)))

    def step():
        for kernel, qb, kb, vb, cu, kw, out, lse, dout in prepared:
            if fwd_only:
                with torch.no_grad():
                    kernel.forward_varlen(qb, kb, vb, cu, cu, **kw)
            else:
                o, l = kernel.forward_varlen(qb, kb, vb, cu, cu, **kw)
                kernel.backward_varlen(dout, qb, kb, vb, o, l, cu, cu, **kw)
    return step, sorted({p[0].name for p in prepared})


def placement_fields(p) -> dict:
    """What a record says about a placement: predicted balance, padding, sub-rings, K/V traffic."""
    spans = [d for d in p.documents if d.spans]
    return dict(balance=p.balance, padding=p.padding, tokens_per_rank=p.tokens_per_rank, documents=len(p.documents),
                spanning_documents=len(spans), largest_subring=p.ring_steps,
                kv_tokens_sent_per_rank=max(sum(s) for s in p.step_tokens),
                kv_tokens_sent_per_rank_max_step=max(max(s) for s in p.step_tokens))


def document_flops(args, lengths, window, fwd_only) -> float:
    fwd = 4.0 * args.batch_size * args.nheads * args.head_dim * sum(document_pairs(n, window) for n in lengths)
    return fwd if fwd_only else 3.5 * fwd


# ---------------------------------------------------------------------------------------------
# One process: the compute side of every rank, one after another


def compute_side(args, device, dtype) -> list[dict]:
    records = []
    for kv, total, fwd_only in common.shape_configs(args):
        for name in args.distribution:
            lengths, window = distribution(name, total)
            fields = dict(kv_heads=kv, seq_len=total, fwd_only=fwd_only, distribution=name, window=window,
                          backend=args.backend, ulysses=1, ring=1)
            base = common.base_record("single_gpu", args, device, 1, layout=None, kernel=None, config=name, **fields)
            base_step = None
            try:
                q, k, v = make_inputs(args, kv, total, device, dtype, args.seed)
                base_step, base["kernel"] = calls_step([whole_batch_call(lengths, window)], q, k, v, args.backend, fwd_only)
                base.update(common.time_iterations(base_step, args.warmup, args.iters, device))
                (base["time_ms"],), _ = round_robin_times([base_step], args, device)  # as every rank is timed
                base.update(common.throughput_fields(base, document_flops(args, lengths, window, fwd_only), 1))
            except Exception as exc:
                base["error"], base_step = common.error_text(exc), None
            common.report(base, args.out)
            records.append(base)
            for P in args.world:
                for U in args.ulysses:
                    for layout in args.layout:
                        records.append(compute_side_config(args, lengths, window, P, U, layout, base_step, fields,
                                                           device, dtype))
                        common.report(records[-1], args.out)
            common.release_memory(device)
    return records


def compute_side_config(args, lengths, window, P, U, layout, base_step, fields, device, dtype) -> dict:
    """Every ring rank's calls of ``layout``'s plan over P GPUs as Ulysses U x ring P / U (each GPU of
    a ring rank runs that rank's calls on nheads / U heads, so one per ring rank is timed), in the
    same rounds as the one-GPU call ``base_step`` (None where it failed): the GPU's clocks drift over
    minutes, and a baseline timed before the ranks charged that drift to them."""
    R = P // U if U > 0 and P % U == 0 else None
    record = common.base_record("compute_side", args, device, P, layout=layout, kernel=None,
                                config=f"{fields['distribution']} P={P}{f' ulysses {U}' if U > 1 else ''} {layout}",
                                **dict(fields, ulysses=U, ring=R))
    try:
        kv = fields["kv_heads"]
        if R is None or args.nheads % U or kv % U:
            raise ValueError(f"--ulysses {U} must divide P={P}, the query heads ({args.nheads}) and the KV heads "
                             f"({kv}); choose a degree that divides all three")
        placement = LAYOUTS[layout](cu_seqlens(lengths), R, U, window=window)
        record.update(placement_fields(placement))
        steps, kernels = [], set()
        for r in range(R):
            step, names = plan_step(placement, r, args, kv // U, device, dtype, fields["fwd_only"], args.nheads // U)
            steps.append(step)
            kernels.update(names)
        timed, enqueue = round_robin_times(steps + ([base_step] if base_step else []), args, device)
        rank_ms, rank_enqueue_ms = timed[:R], enqueue[:R]
        record.update(kernel=",".join(sorted(kernels)), rank_ms=rank_ms, rank_enqueue_ms=rank_enqueue_ms,
                      rounds=args.rounds, time_ms=max(rank_ms))
        record.update(common.throughput_fields(record, document_flops(args, lengths, window, fields["fwd_only"]), P))
        if base_step:
            single = timed[R]
            record.update(single_ms=single, perfect_ms=single / P, efficiency=single / P / max(rank_ms))
    except Exception as exc:
        record["error"] = common.error_text(exc)
    finally:
        common.release_memory(device)
    return record


def round_robin_times(steps, args, device) -> tuple[list[float], list[float]]:
    """Each rank's median time (and host time to issue it) over ``args.rounds`` rounds, every round
    timing ``args.iters`` iterations of each rank in turn: the GPU's state (clocks, caches) changes
    over a configuration, and timing each rank once, one after another, charged it to the first."""
    times: list[list[float]] = [[] for _ in steps]
    enqueue: list[list[float]] = [[] for _ in steps]
    for round_ in range(args.rounds):
        for r, step in enumerate(steps):
            timed = common.time_iterations(step, args.warmup if round_ == 0 else 1, args.iters, device)
            times[r] += timed.get("times_ms", [timed["time_ms"]])
            enqueue[r].append(timed.get("enqueue_ms") or 0.0)
    return [statistics.median(t) for t in times], [statistics.median(e) for e in enqueue]


# ---------------------------------------------------------------------------------------------
# torchrun: every rank at once


def ours_compute_only(args, placement, rank, kv, device, dtype, fwd_only):
    """This rank's kernel calls of the ring's plan, the K/V it would receive already in place (random):
    no communication happens."""
    return plan_step(placement, rank, args, kv, device, dtype, fwd_only)


def ours_ring(args, lengths, window, layout, placement, rank, kv, device, dtype, fwd_only):
    """The ring itself over the batch as ``layout`` lays it out: the placed ring for ``placed`` (only
    spanning documents' K/V travel), today's varlen ring for ``zigzag``."""
    from lightning_sp.core.attention import functional
    from lightning_sp.core.attention.hybrid import packed_long_context_attention
    from lightning_sp.core.layout import shard_documents

    mesh = functional.ring_mesh()
    ws = (-1 if window is None else window, 0)
    q, k, v = make_inputs(args, kv, sum(lengths), device, dtype, args.seed)
    if layout == "placed":
        q, k, v = (placement.shard(t, rank).requires_grad_(not fwd_only) for t in (q, k, v))

        def attend():
            return packed_long_context_attention((q, k, v), mesh, "zigzag", causal=True, window_size=ws,
                                                 backend=args.backend, placement=placement)
    else:
        shard = shard_documents(cu_seqlens(lengths), mesh, "zigzag")
        q, k, v = (shard.shard(t).requires_grad_(not fwd_only) for t in (q, k, v))
        cu = shard.cu_seqlens.to(device)

        def attend():
            return functional.zigzag_ring_flash_attn_varlen_func(q, k, v, cu, shard.max_seqlen, causal=True,
                                                                 window_size=ws)
    dout = torch.randn_like(q)

    def step():
        with torch.set_grad_enabled(not fwd_only):
            out = attend()
            if not fwd_only:
                torch.autograd.grad(out, (q, k, v), dout)
    return step, [args.backend]


def torch_cp_step(args, lengths, window, kv, device, dtype, fwd_only):
    """FlexAttention with the document (and window) mask under torch's context parallelism (K/V
    all-gathered, documents split head-and-tail per document, so lengths are padded to 2 x world, and
    a padding document makes the total a multiple of 128 x world, as CP's block mask needs)."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor.experimental._context_parallel import _attention as cp
    from torch.distributed.tensor.experimental._context_parallel._load_balancer import \
        _PerDocumentHeadTailLoadBalancer
    from torch.distributed.tensor.parallel import parallelize_module
    from torch.nn.attention.flex_attention import flex_attention

    world = dist.get_world_size()
    padded = [-(-n // (2 * world)) * (2 * world) for n in lengths]
    padded += [(-sum(padded)) % (128 * world)] if sum(padded) % (128 * world) else []  # CP's block-mask rule
    S = sum(padded)
    doc = torch.repeat_interleave(torch.arange(len(padded), device=device), torch.tensor(padded, device=device))

    def mask_mod(b, h, q_idx, kv_idx):
        ok = (doc[q_idx] == doc[kv_idx]) & (q_idx >= kv_idx)
        return ok if window is None else ok & (q_idx - kv_idx <= window)

    mesh = init_device_mesh(device.type, (world,), mesh_dim_names=("cp",))
    balancer = _PerDocumentHeadTailLoadBalancer([padded], world, device)
    block_mask = cp._create_cp_block_mask(mask_mod, args.batch_size, args.nheads, S, S, mesh, balancer)
    compiled = torch.compile(flex_attention)

    class Attention(torch.nn.Module):
        def forward(self, query, key, value, block_mask=None):
            return compiled(query, key, value, block_mask=block_mask, enable_gqa=kv != args.nheads)

    attn = parallelize_module(Attention(), mesh, cp._ContextParallel(2, cp._ContextParallel.AttentionType.FLEX))
    g = torch.Generator(device=device).manual_seed(args.seed)
    b, h, d = args.batch_size, args.nheads, args.head_dim
    q = torch.randn(b, h, S, d, generator=g, device=device, dtype=dtype)
    k, v = (torch.randn(b, kv, S, d, generator=g, device=device, dtype=dtype) for _ in range(2))
    q, k, v = (t.requires_grad_(not fwd_only) for t in cp._context_parallel_shard(mesh, [q, k, v], [2, 2, 2], balancer))
    dout = torch.randn_like(q)

    def step():
        with torch.set_grad_enabled(not fwd_only):
            out = attn(q, k, v, block_mask=block_mask)
            if not fwd_only:
                torch.autograd.grad(out, (q, k, v), dout)
    return step, ["flex"]


def distributed(args, device, dtype, rank, world):
    for kv, total, fwd_only in common.shape_configs(args):
        for name in args.distribution:
            lengths, window = distribution(name, total)
            fields = dict(kv_heads=kv, seq_len=total, fwd_only=fwd_only, distribution=name, window=window,
                          backend=args.backend, ulysses=1)
            runs = [("single_gpu", None, None, None, lambda: calls_step(
                        [whole_batch_call(lengths, window)], *make_inputs(args, kv, total, device, dtype, args.seed),
                        args.backend, fwd_only))]
            for layout in args.layout:
                placement = LAYOUTS[layout](cu_seqlens(lengths), world, 1, window=window)
                runs.append(("ours", layout, "compute_only", placement, lambda p=placement: ours_compute_only(
                    args, p, rank, kv, device, dtype, fwd_only)))
                runs.append(("ours", layout, "ring", placement, lambda layout=layout, p=placement: ours_ring(
                    args, lengths, window, layout, p, rank, kv, device, dtype, fwd_only)))
            runs.append(("torch_cp", "flex", None, None, lambda: torch_cp_step(args, lengths, window, kv, device, dtype,
                                                                               fwd_only)))
            for what, layout, path, placement, make in runs:
                single = what == "single_gpu"
                record = common.base_record(what, args, device, 1 if single else world, layout=layout, path=path,
                                            kernel=None, config=f"{name} {layout or ''} {path or ''}".strip(),
                                            ring=1 if single else world, **fields)
                if placement is not None:
                    record.update(placement_fields(placement))
                try:
                    step, kernels = make()
                    record["kernel"] = ",".join(kernels)
                    record.update(common.time_iterations(step, args.warmup, args.iters, device, fastest_rank=single))
                    flops = document_flops(args, lengths, window, fwd_only)
                    record.update(common.throughput_fields(record, flops, 1 if single else world))
                except Exception as exc:  # recorded; the same on every rank, so the sweep goes on in step
                    record["error"] = common.error_text(exc)
                finally:
                    step = None  # noqa: F841
                    common.release_memory(device)
                common.report(record, args.out, rank)


# ---------------------------------------------------------------------------------------------
# Summary and figures


def _share(r, singles) -> float | None:
    """A distributed record's share of perfect scaling: (one-GPU time / world) / its time."""
    base = singles.get(_shape(r) + (r["distribution"],))
    return base["time_ms"] / r["world"] / r["time_ms"] if base else None


def _gpus(r) -> str:
    """P, and the Ulysses x ring split where Ulysses takes part."""
    u = r.get("ulysses") or 1
    return f"P={r['world']}" + (f" (U{u} x R{r.get('ring')})" if u > 1 else "")


def _shape(r) -> tuple:
    return (r.get("card"), r.get("nheads"), r.get("kv_heads"), r.get("head_dim"), r.get("seq_len"), r.get("fwd_only"))


def _organize(records):
    """(latest successful records by configuration, failures)."""
    latest: dict[tuple, dict] = {}
    for r in records:
        latest[_shape(r) + (r.get("name"), r.get("distribution"), r.get("world"), r.get("ulysses"), r.get("layout"),
                            r.get("path"))] = r
    ok = [r for r in latest.values() if not r.get("error")]
    return ok, [r for r in latest.values() if r.get("error")]


def summary(records) -> str:
    ok, failures = _organize(records)
    singles = {_shape(r) + (r["distribution"],): r for r in ok if r["name"] == "single_gpu"}
    lines = []
    for shape in sorted({_shape(r) for r in ok}, key=str):
        card, h, kv, d, S, fwd = shape
        lines.append(f"== h{h}/kv{kv} d{d} S={S} {'fwd' if fwd else 'fwd+bwd'} on {card}")
        rows = [r for r in ok if _shape(r) == shape]
        for r in sorted((r for r in rows if r["name"] == "compute_side"),
                        key=lambda r: (r["distribution"], r["world"], r.get("ulysses") or 1, r["layout"])):
            lines.append(f"   compute-side {r['distribution']:8s} {_gpus(r):<5s} {r['layout']:7s} slowest rank "
                         f"{r['time_ms']:9.3f} ms, perfect {r.get('perfect_ms', math.nan):9.3f} ms: "
                         f"{100 * r.get('efficiency', math.nan):5.1f}%  (balance {r['balance']:.3f}, "
                         f"{r['spanning_documents']}/{r['documents']} documents span ranks, "
                         f"K/V sent per rank {r['kv_tokens_sent_per_rank']} tokens)")
        for r in sorted((r for r in rows if r["name"] != "compute_side"),
                        key=lambda r: (r["distribution"], r["name"] != "single_gpu", r["name"], str(r.get("layout")),
                                       str(r.get("path")))):
            share = None if r["name"] == "single_gpu" else _share(r, singles)
            label = "one GPU, whole batch" if r["name"] == "single_gpu" else \
                f"{r['name']} {r.get('layout')} {r.get('path') or ''}".rstrip()
            lines.append(f"   {r['distribution']:8s} {label:32s} {r['time_ms']:9.3f} ms"
                         + ("" if share is None else f"  {100 * share:5.1f}% of perfect on {r['world']}"))
    if failures:
        lines.append(f"== {len(failures)} failed or skipped configuration(s)")
        lines += [f"   {r['name']} {r.get('config', '')}: {r['error'].splitlines()[0][:200]}" for r in failures]
    return "\n".join(lines)


def plot(records, out_dir: str) -> list[str]:
    """Per shape: compute-side efficiency (bars per distribution, one per P and layout) and, for the
    torchrun records, each configuration's share of perfect scaling."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ok, _ = _organize(records)
    singles = {_shape(r) + (r["distribution"],): r for r in ok if r["name"] == "single_gpu"}
    os.makedirs(out_dir, exist_ok=True)
    paths = []
    for shape in sorted({_shape(r) for r in ok}, key=str):
        rows = [r for r in ok if _shape(r) == shape]
        kinds = {"compute_side": [(r, f"{_gpus(r)} {r['layout']}", r.get("efficiency")) for r in rows
                                  if r["name"] == "compute_side"],
                 "distributed": [(r, f"{r['name']} {r.get('layout')} {r.get('path') or ''}".rstrip(), _share(r, singles))
                                 for r in rows if r["name"] in ("ours", "torch_cp")]}
        for kind, bars in kinds.items():
            bars = [(r, s, v) for r, s, v in bars if v is not None]
            if not bars:
                continue
            dists = [d for d in DISTRIBUTIONS if any(r["distribution"] == d for r, _, _ in bars)]
            series = list(dict.fromkeys(s for _, s, _ in bars))
            width = 0.8 / len(series)
            fig, ax = plt.subplots(figsize=(7 + 0.4 * len(series), 4.5))
            for i, name in enumerate(series):
                xs = [dists.index(r["distribution"]) + (i - (len(series) - 1) / 2) * width for r, s, _ in bars if s == name]
                ys = [100 * v for _, s, v in bars if s == name]
                ax.bar_label(ax.bar(xs, ys, width, label=name, color=f"C{i % 10}"), fmt="%.0f", fontsize=7)
            ax.axhline(100, color="black", linewidth=1, linestyle="--", label="perfect scaling")
            ax.set_xticks(range(len(dists)), dists)
            ax.set_ylabel("% of one-GPU time / P" + (" (slowest rank's kernels)" if kind == "compute_side" else ""))
            card, h, kv, d, S, fwd = shape
            ax.set_title(f"packed documents, {kind.replace('_', '-')}: h{h}/kv{kv} d{d} S={S} "
                         f"{'fwd' if fwd else 'fwd+bwd'} on {card}", fontsize=9)
            ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0))
            fig.tight_layout()
            path = os.path.join(out_dir, f"documents_{kind}_h{h}_kv{kv}_d{d}_s{S}_{'fwd' if fwd else 'fwdbwd'}_"
                                         f"{str(card).replace(' ', '_')}.png")
            fig.savefig(path, dpi=120)
            plt.close(fig)
            paths.append(path)
    return paths


# ---------------------------------------------------------------------------------------------


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    common.add_shape_args(p)
    p.set_defaults(seq_len=[131072])
    p.add_argument("--distribution", nargs="+", default=list(DISTRIBUTIONS), choices=DISTRIBUTIONS)
    p.add_argument("--layout", nargs="+", default=list(LAYOUTS), choices=list(LAYOUTS),
                   help="placed: by work (place_documents); zigzag: every document over every rank")
    p.add_argument("--backend", default="auto", choices=backends(), help="block kernel of every call")
    p.add_argument("--compute_side", action="store_true",
                   help="one process: every rank's kernel calls one rank after another, for each P in --world")
    p.add_argument("--world", type=int, nargs="+", default=[2, 4, 8], help="GPU counts P of --compute_side")
    p.add_argument("--ulysses", type=int, nargs="+", default=[1],
                   help="--compute_side: Ulysses degrees U; each P runs as ulysses U x ring P / U (every GPU of a "
                        "ring rank runs that rank's calls on nheads / U heads)")
    p.add_argument("--rounds", type=int, default=3,
                   help="--compute_side: rounds of timing every rank in turn (each rank's median over all of them)")
    p.add_argument("--summarize", nargs="+", default=None, metavar="JSONL",
                   help="print the summary of these records and draw the figures (no benchmark run)")
    p.add_argument("--out_dir", default=None, help="where --summarize puts the figures (default: plots/ beside)")
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.summarize:
        records = common.load_records(args.summarize)
        first = args.summarize[0]
        out_dir = args.out_dir or os.path.join(first if os.path.isdir(first) else os.path.dirname(first) or ".", "plots")
        try:
            print(f"{len(plot(records, out_dir))} figure(s) in {out_dir}")
        except ImportError as exc:
            print(f"no figures ({exc}); pip install matplotlib")
        print(summary(records))
        return 0
    if args.compute_side:
        device = common.local_device()
        args = common.finish_args(args, device)
        compute_side(args, device, common.DTYPES[args.dtype])
        return 0
    device, rank, world = common.setup_distributed()
    args = common.finish_args(args, device)
    distributed(args, device, common.DTYPES[args.dtype], rank, world)
    common.teardown_distributed()
    return 0  # failed configurations are in the records


if __name__ == "__main__":
    sys.exit(main())
