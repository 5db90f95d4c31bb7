"""Ring attention: K/V blocks travel around the ring group while each rank attends its queries to
them; partial outputs are merged through their log-sum-exp. The loop knows nothing of layouts
beyond the per-step schedule that :func:`lightning_sp.layout.block_schedule` hands it."""
from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property
from itertools import accumulate

import torch

from ..comm import RingExchange
from ..kernels import check_auto_fallback, lse_dtype, select_kernel
from ..layout import BlockPair, block_schedule, square_causal
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
    max_seqlen: tuple[int, int] | None = None  # the longest (query, key) document: known here, not read back

    @property
    def varlen(self) -> dict:
        """The varlen kernel arguments of the call."""
        return dict(max_seqlen=self.max_seqlen)


class StepPlan:
    """The block kernel and the block calls of every ring step for this rank: made once per attention
    call (from the first head group's q and k) and kept for every head group and the backward.

    The kernel is chosen once, for every block of the schedule; blocks are then cut to fit it (see
    ``layout.square_causal``)."""

    def __init__(self, spec: RingSpec, q: torch.Tensor, k: torch.Tensor):
        self.spec, self.n_local, self.device = spec, q.shape[spec.seq_dim], q.device
        mesh = spec.mesh
        schedule = [self._pairs(mesh.ring_rank, (mesh.ring_rank - step) % mesh.ring_size)
                    for step in range(mesh.ring_size)]
        masks = {(p.causal, p.window) for step in schedule for _, pairs in step for p in pairs}
        # q and k have equal lengths here: a causal block of unequal lengths is cut to fit the kernel
        self.kernel = select_kernel(spec.backend, q, k, masks=masks)
        check_auto_fallback(spec.backend, self.kernel, q.device,
                            [(p.q_stop - p.q_start, p.k_stop - p.k_start, p.causal, p.window)
                             for step in schedule for _, pairs in step for p in pairs])
        self.steps = [self._calls(step) for step in schedule]

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
        key row at most one term (cutting blocks to fit a kernel splits no key row)."""
        if self.spec.cu_seqlens is not None:
            return False
        R = self.spec.mesh.ring_size
        return all(_max_depth([slice(p.k_start, p.k_stop) for _, pairs in self._pairs(r, (r + 1) % R)
                               for p in pairs], self.n_local) <= 1 for r in range(R))

    def grad_send_dtype(self, step: int, dtype: torch.dtype) -> torch.dtype:
        """The dtype in which backward step ``step`` sends its dK/dV partial sums: float32, so that the
        owner rounds the whole sum once, except at the first hop where every rank's sum is a single
        term per row, already exact in the kernel dtype. Every ring rank decides alike, since the
        receive buffers are made like the tensors sent."""
        return dtype if step == 0 and self._first_hop_single else lse_dtype(dtype)

    def _pairs(self, q_rank: int, kv_rank: int) -> list[tuple[int, list[BlockPair]]]:
        """(start, block pairs) of every document (dense: the sequence) for one step."""
        s = self.spec
        bounds = s.cu_seqlens if s.cu_seqlens is not None else (0, self.n_local)
        return [(start, block_schedule(s.layout, q_rank, kv_rank, s.mesh.ring_size, stop - start, s.causal,
                                       s.window)) for start, stop in zip(bounds[:-1], bounds[1:])]

    def _calls(self, step: list[tuple[int, list[BlockPair]]]) -> list[BlockCall]:
        fit = (lambda pairs: pairs) if self.kernel.supports_unequal_causal else square_causal
        if self.spec.cu_seqlens is None:
            n = self.n_local
            return [BlockCall(_slice(p.q_start, p.q_stop, n), _slice(p.k_start, p.k_stop, n), p.causal, p.window)
                    for _, pairs in step for p in fit(pairs)]
        # varlen: calls of the same mask kind are batched over documents, but a query row appears at
        # most once per call (its partial results are merged one at a time)
        groups: dict[tuple, list] = {}
        for start, pairs in step:
            seen: dict[tuple, int] = {}
            for p in fit(pairs):
                kind = (p.causal, p.window)
                seen[kind] = seen.get(kind, -1) + 1
                groups.setdefault((*kind, seen[kind]), []).append(
                    (start + p.q_start, start + p.q_stop, start + p.k_start, start + p.k_stop))
        return [self._varlen_call(causal, window, ranges) for (causal, window, _), ranges in groups.items()]

    def _varlen_call(self, causal, window, ranges) -> BlockCall:
        return varlen_call(ranges, self.n_local, self.n_local, causal, window, self.device)

    def forward(self, call: BlockCall, q, k, v):
        """(out, lse in row layout: (b, s, h) or (t, h)) of one block call."""
        d = self.spec.seq_dim
        qb, kb, vb = take(q, call.q_sel, d), take(k, call.k_sel, d), take(v, call.k_sel, d)
        kw = dict(causal=call.causal, softmax_scale=self.spec.softmax_scale, window=call.window)
        if call.cu_q is None:
            out, lse = self.kernel.forward(qb, kb, vb, **kw)
        else:
            out, lse = self.kernel.forward_varlen(qb, kb, vb, call.cu_q, call.cu_k, **kw, **call.varlen)
        return out, lse.transpose(-1, -2)

    def backward(self, call: BlockCall, dout, q, k, v, out, lse_k, into=(None, None, None)):
        """(dq, dk, dv) of one block call's rows; ``lse_k`` in the kernel layout (b, h, s) or (h, t)."""
        d = self.spec.seq_dim
        args = (take(dout, call.q_sel, d), take(q, call.q_sel, d), take(k, call.k_sel, d), take(v, call.k_sel, d),
                take(out, call.q_sel, d), take(lse_k, call.q_sel, lse_k.dim() - 1).contiguous())
        kw = dict(causal=call.causal, softmax_scale=self.spec.softmax_scale, window=call.window)
        if call.cu_q is None:
            return self.kernel.backward(*args, **kw, into=into)
        return self.kernel.backward_varlen(*args, call.cu_q, call.cu_k, **kw, **call.varlen)


def varlen_call(ranges, n_q: int, n_k: int, causal: bool, window, device) -> BlockCall:
    """One varlen call over ``ranges`` [(q_start, q_stop, k_start, k_stop)], a document each, of
    ``n_q`` query and ``n_k`` key rows: each side's rows a slice where its spans lie back to back
    (the whole slice for all rows), else an index (a copy); cu tensors and longest documents known
    on the host."""
    def rows(spans, n):
        cu = to_device(list(accumulate((b - a for a, b in spans), initial=0)), torch.int32, device)
        if back_to_back(spans):
            start, stop = spans[0][0], spans[-1][1]
            return (slice(None) if (start, stop) == (0, n) else slice(start, stop)), cu
        return to_device(span_rows(spans), torch.int64, device), cu

    q_spans, k_spans = [(a, b) for a, b, _, _ in ranges], [(c, d) for _, _, c, d in ranges]
    (q_sel, cu_q), (k_sel, cu_k) = rows(q_spans, n_q), rows(k_spans, n_k)
    longest = (max(b - a for a, b in q_spans), max(b - a for a, b in k_spans))
    return BlockCall(q_sel, k_sel, causal, window, cu_q, cu_k, longest)


def back_to_back(spans) -> bool:
    """Whether the spans [(start, stop)] follow one another with no gap, in order."""
    return all(b == c for (_, b), (c, _) in zip(spans[:-1], spans[1:]))


def to_device(values, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """Host-known ints (a list or a CPU tensor) on ``device`` without waiting for the device: a copy
    from pageable memory first waits for the stream's queued work, one from pinned memory does not."""
    host = torch.as_tensor(values, dtype=dtype)
    if torch.device(device).type != "cuda":
        return host.to(device)
    return host.pin_memory().to(device, non_blocking=True)


def span_rows(spans) -> torch.Tensor:
    """The rows of ``spans`` [(start, stop)], in order, as one CPU index."""
    return torch.cat([torch.arange(a, b) for a, b in spans])


def _slice(start: int, stop: int, n: int) -> slice:
    return slice(None) if (start, stop) == (0, n) else slice(start, stop)


def _max_depth(sels, n: int) -> int:
    """How many of the slices (of rows 0..n-1) cover the row that most of them cover."""
    spans = [sel.indices(n)[:2] for sel in sels]
    return max((sum(a <= row < b for a, b in spans) for row, _ in spans), default=0)


def kv_views(message: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """k and v of a K/V block as the ring passes it: [k, v], or [packed] where packed holds k and v
    as its last two entries along dim -3 (a qkvpacked or kvpacked input)."""
    k, v = message if len(message) == 2 else message[0].unbind(-3)[-2:]
    return k, v


def ring_forward(spec: RingSpec, q, k, v, kv_packed: torch.Tensor | None = None, plan: StepPlan | None = None):
    """(out in q's dtype, lse in row layout, the plan, the K/V message of the last step) of exact
    attention over the whole ring. The backward starts from that last block (see ring_backward).
    ``kv_packed``: a contiguous tensor holding k and v (see kv_views), sent whole around the ring:
    a strided k and v would be copied before every send. ``plan``: the call's plan, made by the
    first head group (None: made here)."""
    plan = plan or StepPlan(spec, q, k)
    ring = RingExchange(spec.mesh) if spec.mesh.ring_size > 1 else None
    acc = OutputAccumulator(q, spec.seq_dim, merges_once=plan.merges_once)
    message = [kv_packed] if kv_packed is not None else [k, v]
    for step, calls in enumerate(plan.steps):
        pending = ring.start(message) if step + 1 < len(plan.steps) else None
        kv = kv_views(message)
        for call in calls:
            acc.add(call.q_sel, *plan.forward(call, q, *kv))
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
            grads.append((call, plan.backward(call, dout, q, *kv, out, lse_k, tuple(dest))))
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
