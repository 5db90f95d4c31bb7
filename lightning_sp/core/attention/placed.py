"""Attention over packed documents placed by work (:mod:`lightning_sp.core.placement`): the ring
moves only the K/V (and dK/dV) of documents that span ranks, each along its own sub-ring.

At ring step s >= 1, every spanning document of a sub-ring of k > s ranks passes the block its
member held at step s - 1 (its own piece at s = 1) to the next member and receives one from the
previous member. What a rank receives at a step is its *message*: the received blocks
concatenated in the order of its pieces (document order), one (2, tokens, heads, dim) tensor of
K and V. Messages go to arbitrary peers of the ring group (one tensor per peer and direction),
so a batch in which no document spans ranks exchanges nothing. The forward keeps its messages for
the backward, which runs the steps in reverse and sends each block's dK/dV partial sum back to
the member it came from, so every sum reaches its owner.
"""
from __future__ import annotations

import contextlib
from dataclasses import replace

import torch
import torch.distributed as dist

from ..errors import SPConfigError
from ..kernels import check_auto_fallback, lse_dtype, select_kernel
from ..layout import BlockPair, square_causal
from ..placement import DocumentPlacement
from .merge import OutputAccumulator, PartialSum
from .ring import BlockCall, RingSpec, StepPlan

_byte_counters: list[list] = []  # active count_sent_bytes() records


@contextlib.contextmanager
def count_sent_bytes():
    """Record every tensor this process sends through the placed exchange, as
    ``(phase, step, peer ring rank, bytes)`` with phase ``"forward"`` (K/V) or ``"backward"`` (dK/dV)."""
    record: list = []
    _byte_counters.append(record)
    try:
        yield record
    finally:
        _byte_counters.remove(record)


def _exchange(mesh, sends, recvs, phase: str, step: int):
    """Send ``sends`` [(peer, tensor)] and receive ``recvs`` [(peer, shape, dtype)] with peers given as
    ring ranks; returns a function that waits and gives the received tensors, in ``recvs`` order."""
    received = [torch.empty(shape, dtype=dtype, device=device) for _, shape, dtype, device in recvs]
    ops = []
    for peer, tensor in sends:
        for record in _byte_counters:
            record.append((phase, step, peer, tensor.numel() * tensor.element_size()))
        ops.append(dist.P2POp(dist.isend, tensor.contiguous(), mesh.ring_ranks[peer], mesh.ring_group))
    ops += [dist.P2POp(dist.irecv, t, mesh.ring_ranks[peer], mesh.ring_group) for (peer, *_), t in zip(recvs, received)]
    requests = dist.batch_isend_irecv(ops) if ops else []

    def wait():
        for request in requests:
            request.wait()
        return received
    return wait


class PlacedPlan(StepPlan):
    """The kernel and the block calls of every ring step of a placement for this ring rank, plus
    where every step's message comes from and goes to. Made once per attention call."""

    def __init__(self, spec: RingSpec, placement: DocumentPlacement, q: torch.Tensor, k: torch.Tensor):
        self.spec, self.n_local, self.device, self.placement = spec, q.shape[0], q.device, placement
        r, P = spec.mesh.ring_rank, placement
        docs = P.documents
        mine = [(d, j, at) for (d, j), at in zip(P.pieces[r], P.piece_starts[r])]
        # held[s]: {document: offset} of the blocks held at step s (step 0: own pieces in the local buffer)
        self.held = [{d: at for d, j, at in mine if docs[d].spans}]
        self.sizes = [None]
        for s in range(1, P.ring_steps):
            offsets, at = {}, 0
            for d, _, _ in mine:
                if len(docs[d].ranks) > s:
                    offsets[d], at = at, at + docs[d].piece_length
            self.held.append(offsets)
            self.sizes.append(at)
        self.peer = {d: (docs[d].ranks[(j + 1) % len(docs[d].ranks)], docs[d].ranks[(j - 1) % len(docs[d].ranks)])
                     for d, j, _ in mine}  # (next, previous) member of each document's sub-ring
        blocks = P.step_blocks(r, window=spec.window[0])
        schedule = []
        for s, step in enumerate(blocks):
            pairs = []
            for b in step:
                shift = 0
                if s > 0:  # keys in the source's buffer -> keys in this step's message
                    doc = docs[b.document]
                    src = doc.ranks.index(b.source)
                    shift = self.held[s][b.document] - P.piece_starts[b.source][P.pieces[b.source].index((b.document, src))]
                pairs.append(BlockPair(b.q_start, b.q_stop, b.k_start + shift, b.k_stop + shift, b.causal, b.window))
            schedule.append(pairs)
        masks = {(p.causal, p.window) for step in schedule for p in step} or {(True, (None, None))}
        self.kernel = select_kernel(spec.backend, q, k, masks=masks)
        check_auto_fallback(spec.backend, self.kernel, q.device,
                            [(p.q_stop - p.q_start, p.k_stop - p.k_start, p.causal, p.window)
                             for step in schedule for p in step])
        fit = (lambda pairs: pairs) if self.kernel.supports_unequal_causal else square_causal
        self.steps = [self._grouped(fit(pairs), q.shape[0] if s == 0 else self.sizes[s])
                      for s, pairs in enumerate(schedule)]

    def _grouped(self, pairs, n_keys) -> list[BlockCall]:
        """Calls batched by mask kind, a query row at most once per call (as ring.py's varlen calls)."""
        groups: dict[tuple, list] = {}
        for p in pairs:
            kind = (p.causal, p.window)
            n = 0
            while any(a < p.q_stop and p.q_start < b for a, b, _, _ in groups.get((*kind, n), [])):
                n += 1
            groups.setdefault((*kind, n), []).append((p.q_start, p.q_stop, p.k_start, p.k_stop))
        calls = []
        for (causal, window, _), ranges in groups.items():
            q_sel, cu_q = self._selection([(a, b) for a, b, _, _ in ranges], self.n_local)
            k_sel, cu_k = self._selection([(c, d) for _, _, c, d in ranges], n_keys)
            calls.append(BlockCall(q_sel, k_sel, causal, window, cu_q, cu_k))
        return calls

    def _selection(self, spans, n):
        """A slice where the spans are contiguous (the whole slice only for all n rows), else an index."""
        lengths = [b - a for a, b in spans]
        cu = torch.tensor([0, *lengths], device=self.device).cumsum(0).to(torch.int32)
        if all(b == c for (_, b), (c, _) in zip(spans[:-1], spans[1:])):
            start, stop = spans[0][0], spans[-1][1]
            return (slice(None) if (start, stop) == (0, n) else slice(start, stop)), cu
        return torch.cat([torch.arange(a, b) for a, b in spans]).to(self.device), cu

    # --- the messages ---------------------------------------------------------------------
    def _block(self, held: torch.Tensor, s: int, d: int) -> torch.Tensor:
        at = self.held[s][d]
        return held[:, at:at + self.placement.documents[d].piece_length]

    def _peers(self, docs, which: int) -> dict[int, list[int]]:
        out: dict[int, list[int]] = {}
        for d in docs:
            out.setdefault(self.peer[d][which], []).append(d)
        return out

    def _shape(self, held, docs):
        return (held.shape[0], sum(self.placement.documents[d].piece_length for d in docs), *held.shape[2:])

    def pass_forward(self, held: torch.Tensor, s: int, phase="forward", reverse=False):
        """Start step ``s``'s exchange from ``held`` (the (2, ., h, d) blocks of step s - 1); returns a
        function giving the (2, sizes[s], h, d) message. ``reverse``: the backward's dK/dV of step s's
        blocks (``held``) back to the members they came from, giving step s - 1's blocks' sums."""
        moving = list(self.held[s])  # the documents of step s's message, in order
        out_step, in_step = (s, s - 1) if reverse else (s - 1, s)
        send_to, recv_from = (1, 0) if reverse else (0, 1)
        sends = [(peer, torch.cat([self._block(held, out_step, d) for d in ds], dim=1))
                 for peer, ds in self._peers(moving, send_to).items()]
        recv_groups = list(self._peers(moving, recv_from).items())
        recvs = [(peer, self._shape(held, ds), held.dtype, held.device) for peer, ds in recv_groups]
        wait = _exchange(self.spec.mesh, sends, recvs, phase, s)
        n = self.n_local if in_step == 0 else self.sizes[in_step]

        def message():
            parts = {}
            for (_, ds), got in zip(recv_groups, wait()):
                for d, part in zip(ds, got.split([self.placement.documents[d].piece_length for d in ds], dim=1)):
                    parts[d] = part
            if reverse:  # sums for step s - 1's blocks: (offset, part) per document
                return [(self.held[in_step][d], parts[d]) for d in moving]
            return torch.cat([parts[d] for d in moving], dim=1) if moving else held.new_empty((held.shape[0], n, *held.shape[2:]))
        return message


def placed_forward(spec: RingSpec, plan: PlacedPlan, q, k, v):
    """(out, lse in row layout (t, h), the messages of steps 1..) of attention over the placement."""
    acc = OutputAccumulator(q, 0)
    held = torch.stack([k, v]) if len(plan.steps) > 1 else None
    messages, pending = [], None
    for s, calls in enumerate(plan.steps):
        if s > 0:
            held = pending()
            messages.append(held)
        pending = plan.pass_forward(held, s + 1) if s + 1 < len(plan.steps) else None
        kv = (k, v) if s == 0 else held.unbind(0)
        for call in calls:
            acc.add(call.q_sel, *plan.forward(call, q, *kv))
    if acc.out is None:  # no query row attends anything (all filler)
        acc.out = torch.zeros_like(q)
        acc.lse = torch.full(q.shape[:-1], float("-inf"), dtype=lse_dtype(q.dtype), device=q.device)
    return acc.out.to(q.dtype), acc.lse, messages


def placed_backward(spec: RingSpec, plan: PlacedPlan, dout, q, k, v, out, lse, messages):
    """dq, dk, dv: the steps in reverse; each step's dK/dV sums go back to the previous member."""
    lse_k = lse.transpose(-1, -2).contiguous()
    dq = PartialSum(q.shape, q.dtype, q.device, 0)
    incoming = None
    acc = lse_dtype(k.dtype)
    for s in reversed(range(len(plan.steps))):
        kv = (k, v) if s == 0 else messages[s - 1].unbind(0)
        shape = kv[0].shape
        dk, dv = PartialSum(shape, k.dtype, k.device, 0), PartialSum(shape, v.dtype, v.device, 0)
        for call in plan.steps[s]:
            gq, gk, gv = plan.backward(call, dout, q, *kv, out, lse_k)
            dq.add(call.q_sel, gq)
            dk.add(call.k_sel, gk)
            dv.add(call.k_sel, gv)
        if incoming is not None:
            for at, part in incoming():
                n = part.shape[1]
                dk.add(slice(at, at + n), part[0])
                dv.add(slice(at, at + n), part[1])
        if s > 0:
            sums = torch.stack([dk.result(acc), dv.result(acc)])
            incoming = plan.pass_forward(sums, s, phase="backward", reverse=True)
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
                            "sub-rings; use transport 'auto' or 'nccl'")


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
        scatter, gather = HeadScatter([q, k, v], spec.mesh, groups), HeadGather(spec.mesh, groups)
        saved, plan, lses, counts = [], None, [], []
        for g in range(groups):
            qg, kg, vg = (x[0] for x in scatter[g])
            plan = plan or PlacedPlan(spec, placement, qg, kg)  # one plan for every head group
            out, lse, messages = placed_forward(spec, plan, qg, kg, vg)
            gather.send(g, [out.unsqueeze(0)])
            saved += [qg, kg, vg, out, lse, *messages]
            counts.append(5 + len(messages))
            lses.append(lse)
        ctx.save_for_backward(*saved)
        ctx.spec, ctx.groups, ctx.plan, ctx.counts = spec, groups, plan, counts
        lse = torch.cat(lses, dim=-1) if groups > 1 else lses[0]
        ctx.mark_non_differentiable(lse)
        return gather.result()[0], lse

    @staticmethod
    def backward(ctx, dout, _dlse):
        from .ulysses import HeadGather, HeadScatter
        spec = ctx.spec
        scatter, gather = HeadScatter([dout.contiguous()], spec.mesh, ctx.groups), HeadGather(spec.mesh, ctx.groups)
        saved, at = ctx.saved_tensors, 0
        for g, count in enumerate(ctx.counts):
            q, k, v, out, lse, *messages = saved[at:at + count]
            at += count
            grads = placed_backward(spec, ctx.plan, scatter[g][0][0], q, k, v, out, lse, messages)
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
