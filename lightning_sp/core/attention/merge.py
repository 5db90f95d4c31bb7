"""Summing block results: outputs merged through their log-sum-exp, gradients added. Every sum of
several blocks is computed in float32 (float64 stays float64) and rounded once, at the end. While
a row holds a single block it stays in the kernel's own dtype, and where a row gets at most two
blocks the second is added (or merged) onto the first in place, on its rows only: the float32
math and the one rounding are the same, without a float32 copy of the whole tensor."""
from __future__ import annotations

import functools

import torch

from ..kernels import lse_dtype


def take(x: torch.Tensor, sel, dim: int) -> torch.Tensor:
    """Rows ``sel`` (a slice or an index tensor) of x along ``dim``."""
    if isinstance(sel, slice):
        return x[(slice(None),) * dim + (sel,)]
    return x.index_select(dim, sel)


def covers_all(sel) -> bool:
    """Whether ``sel`` selects every row (the whole-slice)."""
    return isinstance(sel, slice) and sel == slice(None)


class PartialSum:
    """A running sum of per-block gradients over rows of a tensor of ``shape``, in kernel dtype ``dtype``.

    While every row has at most one term the value stays in the kernel dtype. At most one term over
    a slice of rows is kept pending and added by ``result`` in place in the kernel dtype: half-precision
    ``add_`` computes in float32 and rounds once, so that equals the float32 sum rounded. A first
    term over some rows only waits that way too, for a whole second term to be added onto (the ring's
    backward on the rank whose first block covers half its queries); with no whole term it is copied
    into zeros, exactly. A third term, or an index-tensor selection, moves the sum to float32 as a
    whole, rounded once by ``result``.

    A ``start`` in the kernel dtype counts as one term per row (the ring's first-hop dK/dV message).
    The sum is written into the first whole term it is given (or ``start``): pass tensors it may
    own, such as kernel outputs and received ring buffers.
    """

    def __init__(self, shape, dtype, device, seq_dim: int, start: torch.Tensor | None = None):
        self.shape, self.dtype, self.device, self.seq_dim = shape, dtype, device, seq_dim
        self.acc_dtype = lse_dtype(dtype)
        self.value = start  # None, at most one term per row (kernel dtype), or the float32 sum
        self.pending = None  # (sel, part): a term over a slice of rows, added when the result is taken

    def add(self, sel, part: torch.Tensor) -> None:
        if self.value is None and isinstance(sel, slice):
            if covers_all(sel):  # a whole term: the sum lives in it (a pending term stays pending)
                self.value = part
                return
            if self.pending is None:  # a first term over some rows: no zeros unless no whole term comes
                self.pending = (sel, part)
                return
        self._materialize()
        if (self.value is not None and self.value.dtype != self.acc_dtype and self.pending is None
                and isinstance(sel, slice)):  # a second term
            self.pending = (sel, part)
            return
        self._widen()
        if isinstance(sel, slice):
            take(self.value, sel, self.seq_dim).add_(part)
        else:
            self.value.index_add_(self.seq_dim, sel, part.to(self.acc_dtype))

    def _materialize(self) -> None:
        """A pending term with no whole term to add onto: copied into zeros (exact)."""
        if self.value is None and self.pending is not None:
            sel, part = self.pending
            self.pending = None
            self.value = torch.zeros(self.shape, dtype=self.dtype, device=self.device)
            take(self.value, sel, self.seq_dim).copy_(part)

    def _widen(self) -> None:
        """Move to the float32 sum, the pending term included."""
        if self.value is None:
            self.value = torch.zeros(self.shape, dtype=self.acc_dtype, device=self.device)
        elif self.value.dtype != self.acc_dtype:
            self.value = self.value.to(self.acc_dtype)
        self._add_pending()

    def _add_pending(self) -> None:
        if self.pending is not None:
            sel, part = self.pending
            self.pending = None
            take(self.value, sel, self.seq_dim).add_(part)

    def result(self, dtype, out: torch.Tensor | None = None) -> torch.Tensor:
        """The sum in ``dtype``; with ``out`` (of that dtype), written into ``out`` and returned. Where a
        whole term already lives in ``out`` (a kernel wrote it there) the rest is added onto it: no copy."""
        self._materialize()
        if self.value is None:
            return torch.zeros(self.shape, dtype=dtype, device=self.device) if out is None else out.zero_()
        if self.pending is not None and dtype != self.value.dtype:
            self._widen()
        if out is not None and self.pending is not None and self.pending[1] is out and covers_all(self.pending[0]):
            self.pending, self.value = None, out.add_(self.value)  # the same two-term sum, rounded once
        self._add_pending()  # in the kernel dtype: the two-term sum, rounded once
        value = self.value.to(dtype)
        return value if out is None or value is out else out.copy_(value)


class OutputAccumulator:
    """The running (out, lse) of the attention rows of q; lse is kept in q's row layout, q.shape[:-1].

    ``merges_once``: every row gets at most two blocks, all selected by slices. Then a narrow out
    (bfloat16, float16) is never widened as a whole: each row is merged at most once, in float32 on
    the rows the block touches, and written back rounded once into the out of the first block.
    """

    def __init__(self, q: torch.Tensor, seq_dim: int, merges_once: bool = False):
        self.shape, self.device, self.seq_dim = q.shape, q.device, seq_dim
        self.dtype = lse_dtype(q.dtype)
        self.out_dtype = q.dtype if merges_once else self.dtype  # of out once something is merged
        self.out = self.lse = None

    def add(self, sel, out: torch.Tensor, lse: torch.Tensor) -> None:
        """Merge a block result for rows ``sel``: out like q's rows, lse like q.shape[:-1]."""
        lse = lse.to(self.dtype)
        if self.out is None and covers_all(sel):  # the first block covering every row: nothing to merge with
            self.out, self.lse = out, lse
            return
        if self.out is None:
            self.out = torch.zeros(self.shape, dtype=self.out_dtype, device=self.device)
            self.lse = torch.full(self.shape[:-1], float("-inf"), dtype=self.dtype, device=self.device)
        elif self.out.dtype != self.out_dtype:
            self.out = self.out.to(self.out_dtype)
        d = self.seq_dim
        acc_lse = take(self.lse, sel, d)
        if isinstance(sel, slice):  # a view: merged in place (narrow out: in float32, rounded once)
            merge_(take(self.out, sel, d), acc_lse, out, lse)
        else:
            acc_out = take(self.out, sel, d)
            merge_(acc_out, acc_lse, out, lse)
            self.out.index_copy_(d, sel, acc_out)
            self.lse.index_copy_(d, sel, acc_lse)


def merge_(out_a, lse_a, out_b, lse_b) -> None:
    """In place: (out_a, lse_a) becomes the softmax-weighted combination of two partial attentions
    over disjoint keys (lse -inf = no key seen), computed in lse_a's dtype (float32, or float64)
    and rounded once into out_a. CUDA tensors take one fused Triton kernel where Triton is installed."""
    fused = _fused_merge() if out_a.is_cuda else None
    if fused is not None and fused.supports(out_a, lse_a, out_b, lse_b):
        fused.merge_(out_a, lse_a, out_b, lse_b)
    elif out_a.dtype != lse_a.dtype:  # a narrow out: merge a float32 copy of the rows
        acc = out_a.to(lse_a.dtype)
        _merge_torch_(acc, lse_a, out_b, lse_b)
        out_a.copy_(acc)
    else:
        _merge_torch_(out_a, lse_a, out_b, lse_b)


@functools.cache
def _fused_merge():
    """The Triton merge (``fused_merge``), or None where Triton is not installed."""
    try:
        from . import fused_merge
    except ImportError:
        return None
    return fused_merge


def _merge_torch_(out_a, lse_a, out_b, lse_b) -> None:
    m = torch.maximum(lse_a, lse_b)
    m.masked_fill_(m == float("-inf"), 0.0)
    wa, wb = (lse_a - m).exp_(), (lse_b - m).exp_()
    total = wa + wb
    lse_a.copy_(total.log().add_(m))
    inv = total.clamp_min_(torch.finfo(total.dtype).tiny).reciprocal_()
    out_a.mul_(wa.mul_(inv).unsqueeze(-1)).addcmul_(out_b, wb.mul_(inv).unsqueeze(-1))
