"""Ring attention: K/V blocks travel around the ring group while each rank attends its queries to
them; partial outputs are merged through their log-sum-exp. The loop knows nothing of layouts
beyond the per-step schedule that :func:`lightning_sp.layout.block_schedule` hands it."""
from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property

import torch

from ..comm import RingExchange
from ..kernels import lse_dtype, select_kernel
from ..layout import block_schedule
from ..mesh import SPMesh
from .merge import OutputAccumulator, PartialSum, covers_all, take


@dataclass(frozen=True)
class RingSpec:
    """Everything about one ring attention call except its tensors."""

    mesh: SPMesh
    layout: str
    causal: bool
    softmax_scale: float
    window: tuple  # (left, right) in global positions, None unbounded
    backend: str
    cu_seqlens: tuple[int, ...] | None = None  # the ring rank's share of each document (varlen)

    @property
    def seq_dim(self) -> int:
        return 0 if self.cu_seqlens is not None else 1


@dataclass(frozen=True)
class BlockCall:
    """One kernel call: query rows q_sel against key rows k_sel (slices, or index tensors for varlen)."""

    q_sel: object
    k_sel: object
    causal: bool
    window: tuple
    cu_q: torch.Tensor | None = None
    cu_k: torch.Tensor | None = None


class StepPlan:
    """The block calls of every ring step for this rank, built once per forward and kept for backward."""

    def __init__(self, spec: RingSpec, n_local: int, device):
        self.spec, self.n_local, self.device = spec, n_local, device

    @cached_property
    def steps(self) -> list[list[BlockCall]]:
        mesh = self.spec.mesh
        return [self._calls(mesh.ring_rank, (mesh.ring_rank - step) % mesh.ring_size)
                for step in range(mesh.ring_size)]

    @cached_property
    def merges_once(self) -> bool:
        """Dense: every query row of this rank gets at most two blocks over the whole ring (see
        OutputAccumulator)."""
        if self.spec.cu_seqlens is not None:
            return False
        return _max_depth([call.q_sel for calls in self.steps for call in calls], self.n_local) <= 2

    @cached_property
    def _first_hop_single(self) -> bool:
        """Dense: at backward step 0 (the forward's last step) the calls of every ring rank give each
        key row at most one term."""
        if self.spec.cu_seqlens is not None:
            return False
        R = self.spec.mesh.ring_size
        return all(_max_depth([call.k_sel for call in self._calls(r, (r + 1) % R)], self.n_local) <= 1
                   for r in range(R))

    def grad_send_dtype(self, step: int, dtype: torch.dtype) -> torch.dtype:
        """The dtype in which backward step ``step`` sends its dK/dV partial sums: float32, so that the
        owner rounds the whole sum once, except at the first hop where every rank's sum is a single
        term per row, already exact in the kernel dtype. Every ring rank decides alike, since the
        receive buffers are made like the tensors sent."""
        return dtype if step == 0 and self._first_hop_single else lse_dtype(dtype)

    def _calls(self, q_rank: int, kv_rank: int) -> list[BlockCall]:
        s = self.spec
        R = s.mesh.ring_size
        if s.cu_seqlens is None:
            pairs = block_schedule(s.layout, q_rank, kv_rank, R, self.n_local, s.causal, s.window)
            return [BlockCall(_slice(p.q_start, p.q_stop, self.n_local), _slice(p.k_start, p.k_stop, self.n_local),
                              p.causal, p.window) for p in pairs]
        # varlen: each document gets its own schedule; calls of the same mask kind are batched, but a
        # query row appears at most once per call (its partial results are merged one at a time)
        groups: dict[tuple, list] = {}
        bounds = s.cu_seqlens
        for start, stop in zip(bounds[:-1], bounds[1:]):
            seen: dict[tuple, int] = {}
            for p in block_schedule(s.layout, q_rank, kv_rank, R, stop - start, s.causal, s.window):
                kind = (p.causal, p.window)
                seen[kind] = seen.get(kind, -1) + 1
                groups.setdefault((*kind, seen[kind]), []).append(
                    (start + p.q_start, start + p.q_stop, start + p.k_start, start + p.k_stop))
        return [self._varlen_call(causal, window, ranges) for (causal, window, _), ranges in groups.items()]

    def _varlen_call(self, causal, window, ranges) -> BlockCall:
        def selection(spans):
            lengths = [b - a for a, b in spans]
            cu = torch.tensor([0, *lengths], device=self.device).cumsum(0).to(torch.int32)
            if spans == _doc_spans(self.spec.cu_seqlens):
                return slice(None), cu
            index = torch.cat([torch.arange(a, b) for a, b in spans]).to(self.device)
            return index, cu

        q_sel, cu_q = selection([(a, b) for a, b, _, _ in ranges])
        k_sel, cu_k = selection([(c, d) for _, _, c, d in ranges])
        return BlockCall(q_sel, k_sel, causal, window, cu_q, cu_k)


def _slice(start: int, stop: int, n: int) -> slice:
    return slice(None) if (start, stop) == (0, n) else slice(start, stop)


def _max_depth(sels, n: int) -> int:
    """How many of the slices (of rows 0..n-1) cover the row that most of them cover."""
    spans = [sel.indices(n)[:2] for sel in sels]
    return max((sum(a <= row < b for a, b in spans) for row, _ in spans), default=0)


def _doc_spans(cu):
    return [(a, b) for a, b in zip(cu[:-1], cu[1:]) if b > a]


def _kernel_forward(spec: RingSpec, call: BlockCall, q, k, v):
    d = spec.seq_dim
    qb, kb, vb = take(q, call.q_sel, d), take(k, call.k_sel, d), take(v, call.k_sel, d)
    kernel = select_kernel(spec.backend, qb, kb, call.causal, call.window)
    kw = dict(causal=call.causal, softmax_scale=spec.softmax_scale, window=call.window)
    if call.cu_q is None:
        out, lse = kernel.forward(qb, kb, vb, **kw)
    else:
        out, lse = kernel.forward_varlen(qb, kb, vb, call.cu_q, call.cu_k, **kw)
    return out, lse.transpose(-1, -2)  # lse in row layout: (b, s, h) or (t, h)


def _kernel_backward(spec: RingSpec, call: BlockCall, dout, q, k, v, out, lse_k, into=(None, None, None)):
    d = spec.seq_dim
    qb, kb, vb = take(q, call.q_sel, d), take(k, call.k_sel, d), take(v, call.k_sel, d)
    args = (take(dout, call.q_sel, d), qb, kb, vb, take(out, call.q_sel, d),
            take(lse_k, call.q_sel, lse_k.dim() - 1).contiguous())
    kernel = select_kernel(spec.backend, qb, kb, call.causal, call.window)
    kw = dict(causal=call.causal, softmax_scale=spec.softmax_scale, window=call.window)
    if call.cu_q is None:
        return kernel.backward(*args, **kw, into=into)
    return kernel.backward_varlen(*args, call.cu_q, call.cu_k, **kw)


def kv_views(message: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """k and v of a K/V block as the ring passes it: [k, v], or [packed] where packed holds k and v
    as its last two entries along dim -3 (a qkvpacked or kvpacked input)."""
    k, v = message if len(message) == 2 else message[0].unbind(-3)[-2:]
    return k, v


def ring_forward(spec: RingSpec, q, k, v, kv_packed: torch.Tensor | None = None):
    """(out in q's dtype, lse in row layout, the plan, the K/V message of the last step) of exact
    attention over the whole ring. The backward starts from that last block (see ring_backward).
    ``kv_packed``: a contiguous tensor holding k and v (see kv_views), sent whole around the ring:
    a strided k and v would be copied before every send."""
    plan = StepPlan(spec, q.shape[spec.seq_dim], q.device)
    ring = RingExchange(spec.mesh) if spec.mesh.ring_size > 1 else None
    acc = OutputAccumulator(q, spec.seq_dim, merges_once=plan.merges_once)
    message = [kv_packed] if kv_packed is not None else [k, v]
    for step, calls in enumerate(plan.steps):
        pending = ring.start(message) if step + 1 < len(plan.steps) else None
        kv = kv_views(message)
        for call in calls:
            acc.add(call.q_sel, *_kernel_forward(spec, call, q, *kv))
        if pending is not None:
            message = pending.wait()
    return acc.out.to(q.dtype), acc.lse, plan, message


def ring_backward(spec: RingSpec, plan: StepPlan, dout, q, k, v, out, lse, last_message, into=None):
    """dq, dk, dv. The steps run in the forward's reverse order, from ``last_message`` (the K/V block
    the forward ended with) to this rank's own block: K/V blocks travel the ring backwards with their
    dK/dV sums, so every block's sum reaches its owner while the owner computes its own block's
    share, and nothing is left to send after the last kernel. ``into``: (dq, dk, dv) tensors to
    write the results to (slices of a packed gradient); the kernels write there directly where
    they can: dq from the first call covering every query row, dk and dv from the own block's."""
    d = spec.seq_dim
    lse_k = lse.transpose(-1, -2).contiguous()  # kernel layout: (b, h, s) or (h, t)
    ring = RingExchange(spec.mesh, reverse=True) if spec.mesh.ring_size > 1 else None
    dq = PartialSum(q.shape, q.dtype, q.device, d)
    free = list(into) if into is not None else [None, None, None]  # destinations no kernel writes yet
    steps = plan.steps[::-1]
    message, dkv_pending, last = last_message, None, len(steps) - 1
    for step, calls in enumerate(steps):
        # the next block comes from the next rank, except the last one: our own K/V
        kv_pending = ring.start(message) if step < last - 1 else None
        kv = kv_views(message) if message is not None else (k, v)
        grads = []
        for call in calls:
            # each destination is written by one call, where its sum ends (see PartialSum.result):
            # dq's by the first call over every query row, dk's and dv's by the own block's
            dest = [None, None, None]
            if covers_all(call.q_sel):
                dest[0], free[0] = free[0], None
            if step == last and covers_all(call.k_sel):
                dest[1:], free[1:] = free[1:], [None, None]
            grads.append((call, _kernel_backward(spec, call, dout, q, *kv, out, lse_k, tuple(dest))))
        # what the next rank summed for this same K/V block (it arrived while we computed)
        dk_prev, dv_prev = dkv_pending.wait() if dkv_pending is not None else (None, None)
        dk = PartialSum(k.shape, k.dtype, k.device, d, start=dk_prev)
        dv = PartialSum(v.shape, v.dtype, v.device, d, start=dv_prev)
        for call, (gq, gk, gv) in grads:
            dq.add(call.q_sel, gq)
            dk.add(call.k_sel, gk)
            dv.add(call.k_sel, gv)
        if step < last:  # the owner rounds the sum, once (see StepPlan.grad_send_dtype)
            dtype = plan.grad_send_dtype(step, k.dtype)
            dkv_pending = ring.start([dk.result(dtype), dv.result(dtype)])
        message = kv_pending.wait() if kv_pending is not None else None
    final = into if into is not None else (None, None, None)
    return dq.result(q.dtype, final[0]), dk.result(k.dtype, final[1]), dv.result(v.dtype, final[2])
