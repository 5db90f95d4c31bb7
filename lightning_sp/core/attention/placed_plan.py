"""The plan of attention over a document placement (:mod:`lightning_sp.core.attention.placed`): the
block calls of every ring step for one ring rank, and the messages that move spanning documents'
K/V blocks (and their dK/dV sums) along their sub-rings.

A step's blocks live in one buffer of (tokens, 2, heads, dim) (K and V of a token side by side, so
any run of tokens is one contiguous slice), in the step's *layout*: an offset per document. Step 0's
layout is the local one (this rank's spanning pieces come first in its buffer); at a later step s
the documents of more than s members are ordered by the member they come from (then by document),
so the forward receives each peer's blocks in place, in one slice, and the backward sends each
peer's blocks from one. The other direction takes a copy only where a peer's blocks are not
back to back (a rank holding pieces of several documents whose sub-rings run differently).
"""
from __future__ import annotations

import contextlib
from itertools import accumulate

import torch
import torch.distributed as dist

from ..kernels import check_auto_fallback, select_kernel
from ..layout import BlockPair, square_causal
from ..placement import DocumentPlacement
from .ring import BlockCall, RingSpec, StepPlan, back_to_back, varlen_call

_byte_counters: list[list] = []  # active count_sent_bytes() records


@contextlib.contextmanager
def count_sent_bytes():
    """Record every tensor this process sends through the placed exchange, as ``(phase, step, peer
    ring rank, bytes)``: phase ``"forward"`` (K/V, sent toward step ``step``), ``"backward_kv"`` (the
    backward's K/V, sent at step ``step`` toward step - 1) or ``"backward"`` (dK/dV sums, likewise)."""
    record: list = []
    _byte_counters.append(record)
    try:
        yield record
    finally:
        _byte_counters.remove(record)


def _exchange(mesh, sends, recvs, phase: str, step: int):
    """Send ``sends`` [(peer, tensor)] and receive into ``recvs`` [(peer, contiguous tensor)], peers given
    as ring ranks, all in one batch (NCCL runs a batch's P2P ops as one group); returns a function that
    waits for them."""
    ops = []
    for peer, tensor in sends:
        for record in _byte_counters:
            record.append((phase, step, peer, tensor.numel() * tensor.element_size()))
        ops.append(dist.P2POp(dist.isend, tensor, mesh.ring_ranks[peer], mesh.ring_group))
    ops += [dist.P2POp(dist.irecv, t, mesh.ring_ranks[peer], mesh.ring_group) for peer, t in recvs]
    requests = dist.batch_isend_irecv(ops) if ops else []

    def wait():
        for request in requests:
            request.wait()
        sends.clear()  # the sent tensors may be freed now
    return wait


def _gathered_rows(ranges) -> int:
    """Query and key rows a call over ``ranges`` [(q_start, q_stop, k_start, k_stop)], in this order,
    takes by an index (a copy) rather than as one slice. The calls list their blocks in query order
    or in key order, whichever copies less: in key order a step's received blocks are one slice."""
    def copied(spans):
        return 0 if back_to_back(spans) else sum(b - a for a, b in spans)
    return copied([(a, b) for a, b, _, _ in ranges]) + copied([(c, d) for _, _, c, d in ranges])


class PlacedPlan(StepPlan):
    """The kernel and the block calls of every ring step of a placement for this ring rank, the
    layout of every step's blocks, and where they come from and go to. Made once per attention call."""

    def __init__(self, spec: RingSpec, placement: DocumentPlacement, q: torch.Tensor, k: torch.Tensor):
        self.spec, self.n_local, self.device = spec, q.shape[0], q.device
        r, P = spec.mesh.ring_rank, placement
        docs = P.documents
        spanning = [(d, j, at) for (d, j), at in zip(P.pieces[r], P.piece_starts[r]) if docs[d].spans]
        self.length = {d: docs[d].piece_length for d, _, _ in spanning}
        self.members = {d: len(docs[d].ranks) for d, _, _ in spanning}
        self.peer = {d: (docs[d].ranks[(j + 1) % len(docs[d].ranks)], docs[d].ranks[(j - 1) % len(docs[d].ranks)])
                     for d, j, _ in spanning}  # (next, previous) member of each document's sub-ring
        self.layouts = [{d: at for d, _, at in spanning}]
        for s in range(1, P.ring_steps):
            moving = sorted((d for d in self.length if self.members[d] > s), key=lambda d: (self.peer[d][1], d))
            self.layouts.append(dict(zip(moving, accumulate((self.length[d] for d in moving), initial=0))))
        self.rows = [sum(self.length[d] for d in layout) for layout in self.layouts]
        schedule = []
        for s, step in enumerate(P.step_blocks(r, window=spec.window[0])):
            pairs = []
            for b in step:
                shift = 0
                if s > 0:  # keys in the source's buffer -> keys in this step's layout
                    source_piece = P.pieces[b.source].index((b.document, docs[b.document].ranks.index(b.source)))
                    shift = self.layouts[s][b.document] - P.piece_starts[b.source][source_piece]
                pairs.append(BlockPair(b.q_start, b.q_stop, b.k_start + shift, b.k_stop + shift, b.causal, b.window))
            schedule.append(pairs)
        masks = {(p.causal, p.window) for step in schedule for p in step} or {(True, (None, None))}
        self.kernel = select_kernel(spec.backend, q, k, masks=masks)
        check_auto_fallback(spec.backend, self.kernel, q.device,
                            [(p.q_stop - p.q_start, p.k_stop - p.k_start, p.causal, p.window)
                             for step in schedule for p in step])
        fit = (lambda pairs: pairs) if self.kernel.supports_unequal_causal else square_causal
        self.steps = [self._grouped(fit(pairs), q.shape[0] if s == 0 else self.rows[s])
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
            ranges = min((sorted(ranges), sorted(ranges, key=lambda r: (r[2], r[0]))), key=_gathered_rows)
            calls.append(varlen_call(ranges, self.n_local, n_keys, causal, window, self.device))
        return calls

    # --- the messages ---------------------------------------------------------------------
    def shape(self, s: int, like: torch.Tensor) -> tuple:
        """The shape of step ``s``'s buffer of blocks (or of their sums) like ``like``."""
        return (self.rows[s], *like.shape[1:])

    def last_blocks(self, s: int) -> list[tuple[slice, slice]]:
        """(rows in step s's layout, rows in step 0's) of the blocks held at step ``s`` that are their
        document's last (a document of s + 1 members): the forward keeps them, the backward starts there."""
        return [(self._rows(s, d), self._rows(0, d)) for d in self.layouts[s] if self.members[d] == s + 1]

    def pass_blocks(self, buffer: torch.Tensor, s: int, into: torch.Tensor, *, reverse=False, phase="forward"):
        """Start moving the blocks of the documents of more than ``s`` members: from ``buffer`` (step
        s - 1's layout) to their next members, received from the previous ones into ``into`` (step s's
        layout); ``reverse``: from ``buffer`` in step s's layout to the previous members, received from
        the next ones into ``into`` in step s - 1's. Returns a function that waits and gives ``into``."""
        src, dst, to, source = (s, s - 1, 1, 0) if reverse else (s - 1, s, 0, 1)
        moving = list(self.layouts[s])
        sends = []
        for peer, ds in self._by_peer(moving, to):
            span = self._span(src, ds)
            sends.append((peer, buffer[span] if span else torch.cat([buffer[self._rows(src, d)] for d in ds])))
        recvs, scattered = [], []
        for peer, ds in self._by_peer(moving, source):
            span = self._span(dst, ds)
            target = into[span] if span else into.new_empty((sum(self.length[d] for d in ds), *into.shape[1:]))
            recvs.append((peer, target))
            if not span:
                scattered.append((ds, target))
        wait = _exchange(self.spec.mesh, sends, recvs, phase, s)

        def received():
            wait()
            for ds, got in scattered:
                for d, part in zip(ds, got.split([self.length[d] for d in ds])):
                    into[self._rows(dst, d)].copy_(part)
            return into
        return received

    def _rows(self, s: int, d: int) -> slice:
        at = self.layouts[s][d]
        return slice(at, at + self.length[d])

    def _by_peer(self, docs, which: int) -> list[tuple[int, list[int]]]:
        """(peer, its documents in document order: the order of the message between two ranks)."""
        out: dict[int, list[int]] = {}
        for d in sorted(docs):
            out.setdefault(self.peer[d][which], []).append(d)
        return list(out.items())

    def _span(self, s: int, docs) -> slice | None:
        """The rows of ``docs`` in step s's layout where they lie there back to back in that order."""
        rows = [self._rows(s, d) for d in docs]
        if back_to_back([(r.start, r.stop) for r in rows]):
            return slice(rows[0].start, rows[-1].stop)
        return None
