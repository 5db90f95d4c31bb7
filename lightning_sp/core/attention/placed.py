"""Attention over packed documents placed by work (:mod:`lightning_sp.core.placement`): the ring
moves only the K/V (and dK/dV) of documents that span ranks, each along its own sub-ring.

At ring step s >= 1, every spanning document of a sub-ring of k > s ranks passes the block its
member held at step s - 1 (its own piece at s = 1) to the next member and receives one from the
previous member (:class:`~lightning_sp.core.attention.placed_plan.PlacedPlan` lays the blocks out
and moves them). Messages go to arbitrary peers of the ring group, so a batch in which no document
spans ranks exchanges nothing. As the dense ring (``ring_backward``), the backward runs the steps in
reverse and keeps O(1) blocks: the forward keeps, per spanning document, only the block of its last
step; every earlier one comes back from the next member, which held it one step later, together
with the dK/dV sum of that block, so every sum reaches its owner.
"""
from __future__ import annotations

from dataclasses import replace

import torch
import torch.distributed as dist

from ..errors import SPConfigError
from ..kernels import lse_dtype
from ..placement import DocumentPlacement
from .merge import OutputAccumulator, PartialSum
from .placed_plan import PlacedPlan, count_sent_bytes  # noqa: F401  (count_sent_bytes: importable from here)
from .ring import RingSpec


_ring_groups_ready: set = set()  # ring groups that ran a collective over all their ranks (see below)


def _ready_for_partial_batches(mesh, device: torch.device) -> None:
    """With NCCL, a batch of P2P ops (``batch_isend_irecv``) that is a group's first collective must
    involve every rank of the group; later ones may leave ranks out (torch's documentation). The placed
    exchange leaves out ranks with nothing to send, so the first placed call on a ring group (a call
    every ring rank makes) first runs a one-element all-reduce over it. CPU tensors go through gloo,
    which has no such rule."""
    group = mesh.ring_group
    if group is None or device.type != "cuda" or group in _ring_groups_ready:
        return
    dist.all_reduce(torch.zeros(1, device=device), group=group)
    _ring_groups_ready.add(group)


def placed_forward(plan: PlacedPlan, q, k, v):
    """(out, lse in row layout (t, h), kept): ``kept`` holds, in step 0's layout, the K/V block this
    rank held at each spanning document's last step: all the backward needs of the messages."""
    acc = OutputAccumulator(q, 0)
    held = torch.stack([k[:plan.rows[0]], v[:plan.rows[0]]], dim=1)  # the own spanning pieces, sent at step 1
    kept, pending = torch.empty_like(held), None
    for s, calls in enumerate(plan.steps):
        if s > 0:
            held = pending()
            for here, there in plan.last_blocks(s):  # copied: a view would keep the whole message
                kept[there].copy_(held[here])
        if s + 1 < len(plan.steps):
            pending = plan.pass_blocks(held, s + 1, held.new_empty(plan.shape(s + 1, held)))
        kv = (k, v) if s == 0 else held.unbind(1)
        for call in calls:
            acc.add(call.q_sel, *plan.forward(call, q, *kv))
    if acc.out is None:  # no query row attends anything (all filler)
        acc.out = torch.zeros_like(q)
        acc.lse = torch.full(q.shape[:-1], float("-inf"), dtype=lse_dtype(q.dtype), device=q.device)
    return acc.out.to(q.dtype), acc.lse, kept


def placed_backward(plan: PlacedPlan, dout, q, k, v, out, lse, kept):
    """dq, dk, dv: the steps in reverse. At step s a member j holds, per document of k > s members, the
    block of member j - s: kept by the forward where s = k - 1, else received from member j + 1 (which
    held it at step s + 1) with that block's dK/dV sum, to which it adds its share before passing both
    on. The sums travel in float32 (float64 stays float64), rounded once by their owner."""
    lse_k = lse.transpose(-1, -2).contiguous()
    dq = PartialSum(q.shape, q.dtype, q.device, 0)
    acc = lse_dtype(k.dtype)
    kv_pending = dkv_pending = None
    for s in reversed(range(len(plan.steps))):
        kv = (k, v)
        if s > 0:
            held = kv_pending() if kv_pending is not None else kept.new_empty(plan.shape(s, kept))
            for here, there in plan.last_blocks(s):
                held[here].copy_(kept[there])
            if s > 1:  # step 0 attends this rank's own k, v
                kv_pending = plan.pass_blocks(held, s, held.new_empty(plan.shape(s - 1, held)), reverse=True,
                                              phase="backward_kv")
            kv = held.unbind(1)
        grads = [(call, plan.backward(call, dout, q, *kv, out, lse_k)) for call in plan.steps[s]]
        # the next members' sums for these same blocks (they arrived while this step computed)
        sums = dkv_pending() if dkv_pending is not None else kept.new_zeros(plan.shape(s, kept), dtype=acc)
        if s == 0:
            break
        for call, (gq, gk, gv) in grads:
            dq.add(call.q_sel, gq)
            for i, g in enumerate((gk, gv)):
                if isinstance(call.k_sel, slice):
                    sums[call.k_sel, i].add_(g)
                else:
                    sums[:, i].index_add_(0, call.k_sel, g.to(acc))
        dkv_pending = plan.pass_blocks(sums, s, sums.new_zeros(plan.shape(s - 1, sums)), reverse=True,
                                       phase="backward")
    dk, dv = PartialSum(k.shape, k.dtype, k.device, 0), PartialSum(v.shape, v.dtype, v.device, 0)
    for call, (gq, gk, gv) in grads:
        dq.add(call.q_sel, gq)
        dk.add(call.k_sel, gk)
        dv.add(call.k_sel, gv)
    if plan.rows[0]:  # the spanning pieces' sums, added last: the owner rounds the float32 sum once
        dk.add(slice(0, plan.rows[0]), sums[:, 0])
        dv.add(slice(0, plan.rows[0]), sums[:, 1])
    return dq.result(q.dtype), dk.result(k.dtype), dv.result(v.dtype)


def check_placement(placement: DocumentPlacement, mesh, local_tokens: int, causal: bool, window) -> None:
    """An SPConfigError naming the fix where the call does not match the placement or the mesh."""
    if (placement.ring_size, placement.ulysses_size) != (mesh.ring_size, mesh.ulysses_size):
        raise SPConfigError(f"the placement is for ring {placement.ring_size} x ulysses {placement.ulysses_size}, "
                            f"the mesh is ring {mesh.ring_size} x ulysses {mesh.ulysses_size}; place the documents "
                            f"with place_documents(cu_seqlens, mesh.ring_size, mesh.ulysses_size)")
    if local_tokens * mesh.ulysses_size != placement.tokens_per_rank:
        raise SPConfigError(f"this rank holds {local_tokens} tokens x ulysses {mesh.ulysses_size}, the placement "
                            f"{placement.tokens_per_rank} per ring rank; shard with placement.shard(x, ring_rank, "
                            f"ulysses_rank)")
    if not causal or window[1] not in (None, 0) or (window[0] is not None and window[0] < 0):
        raise SPConfigError(f"attention over a placement is causal, with any left window; got causal={causal}, "
                            f"window {window}; call with causal=True and window_size=(left, 0) (left -1: unbounded)")
    if mesh.config.transport == "copy_engine" and any(doc.spans for doc in placement.documents):
        raise SPConfigError("transport 'copy_engine' cannot send to the arbitrary peers of a placement's "
                            "sub-rings; use transport 'auto' or 'nccl', or lay the documents out over every ring "
                            "rank (document_placement='spread', layout.shard_documents)")


def placed_spec(spec: RingSpec, placement: DocumentPlacement) -> RingSpec:
    """``spec`` for this ring rank's pieces (the packed, seq_dim 0 form), with the call's left window
    (the placement serves any; its own ``window`` is the one its balance was counted for)."""
    cu = tuple(int(x) for x in placement.cu_seqlens[spec.mesh.ring_rank])
    return replace(spec, layout="zigzag", window=(spec.window[0], None), cu_seqlens=cu)


class _PlacedAttention(torch.autograd.Function):
    """Ulysses around the placed ring, head group by head group: (1, t, H, d) in and out, as the
    packed path of :class:`~lightning_sp.core.attention.hybrid._HybridAttention`."""

    @staticmethod
    def forward(ctx, spec: RingSpec, placement: DocumentPlacement, groups: int, q, k, v):
        from .ulysses import HeadGather, HeadScatter
        _ready_for_partial_batches(spec.mesh, q.device)
        scatter, gather = HeadScatter([q, k, v], spec.mesh, groups), HeadGather(spec.mesh, groups)
        saved, plan, lses = [], None, []
        for g in range(groups):
            qg, kg, vg = (x[0] for x in scatter[g])
            plan = plan or PlacedPlan(spec, placement, qg, kg)  # one plan for every head group
            out, lse, kept = placed_forward(plan, qg, kg, vg)
            gather.send(g, [out.unsqueeze(0)])
            saved += [qg, kg, vg, out, lse, kept]
            lses.append(lse)
        ctx.save_for_backward(*saved)
        ctx.spec, ctx.groups, ctx.plan = spec, groups, plan
        lse = torch.cat(lses, dim=-1) if groups > 1 else lses[0]
        ctx.mark_non_differentiable(lse)
        return gather.result()[0], lse

    @staticmethod
    def backward(ctx, dout, _dlse):
        from .ulysses import HeadGather, HeadScatter
        spec = ctx.spec
        scatter, gather = HeadScatter([dout.contiguous()], spec.mesh, ctx.groups), HeadGather(spec.mesh, ctx.groups)
        saved = ctx.saved_tensors
        for g in range(ctx.groups):
            grads = placed_backward(ctx.plan, scatter[g][0][0], *saved[6 * g:6 * g + 6])
            gather.send(g, [x.unsqueeze(0) for x in grads])
        return (None, None, None, *gather.result())


def placed_long_context_attention(inputs, mesh, placement: DocumentPlacement, *, causal, softmax_scale, window,
                                  backend, head_groups, return_lse):
    """``packed_long_context_attention`` with a ``placement``: this rank's tokens of it
    ((t, H, d) each, see ``DocumentPlacement.shard``) given as (q, k, v), (q, kv) or (qkv,);
    ``window`` normalized ((left, right), None unbounded)."""
    from ..kernels import check_backend
    from .hybrid import unpack
    from .ulysses import check_heads, choose_head_groups, replicated_kv_heads
    q, k, v = unpack(inputs)
    if q.dim() != 3 or k.shape != v.shape or k.shape[:-2] != q.shape[:-2] or k.shape[-1] != q.shape[-1]:
        raise SPConfigError(f"with a placement q, k, v must be (tokens, heads, head_dim) of equal tokens; got "
                            f"{tuple(q.shape)}, {tuple(k.shape)}, {tuple(v.shape)}")
    check_placement(placement, mesh, q.shape[0], causal, window)
    k, v = k.to(q.dtype), v.to(q.dtype)
    U = mesh.ulysses_size
    check_heads(q.shape[-2], k.shape[-2], U)
    groups = choose_head_groups(q.shape[-2], k.shape[-2], U, head_groups)
    rep = replicated_kv_heads(k.shape[-2], U) // k.shape[-2]
    if rep > 1:  # every Ulysses rank needs whole KV heads; autograd sums the replicas' gradients
        k, v = k.repeat_interleave(rep, dim=-2), v.repeat_interleave(rep, dim=-2)
    scale = q.shape[-1] ** -0.5 if softmax_scale is None else float(softmax_scale)
    spec = placed_spec(RingSpec(mesh, "zigzag", True, scale, window, check_backend(backend)), placement)
    out, lse = _PlacedAttention.apply(spec, placement, groups, q[None], k[None], v[None])
    return (out[0], lse) if return_lse else out[0]
