"""Summing block results: outputs merged through their log-sum-exp, gradients added. Both stay in
the kernel's own dtype while a single block covers every row, and move to float32 (float64 stays
float64) at the first real merge, so a sum of several blocks is rounded once, at the end."""
from __future__ import annotations

import torch

from ..kernels import lse_dtype


def take(x: torch.Tensor, sel, dim: int) -> torch.Tensor:
    """Rows ``sel`` (a slice or an index tensor) of x along ``dim``."""
    if isinstance(sel, slice):
        return x[(slice(None),) * dim + (sel,)]
    return x.index_select(dim, sel)


def _whole(sel) -> bool:
    return isinstance(sel, slice) and sel == slice(None)


class PartialSum:
    """A running sum of per-block gradients over rows of a tensor of ``shape``."""

    def __init__(self, shape, dtype, device, seq_dim: int, start: torch.Tensor | None = None):
        self.shape, self.acc_dtype, self.device, self.seq_dim = shape, lse_dtype(dtype), device, seq_dim
        self.value = start  # a block result kept as it came, or the float32 sum

    def _widen(self):
        if self.value is None:
            self.value = torch.zeros(self.shape, dtype=self.acc_dtype, device=self.device)
        elif self.value.dtype != self.acc_dtype:
            self.value = self.value.to(self.acc_dtype)

    def add(self, sel, part: torch.Tensor) -> None:
        if self.value is None and _whole(sel):
            self.value = part
            return
        self._widen()
        if isinstance(sel, slice):
            take(self.value, sel, self.seq_dim).add_(part)
        else:
            self.value.index_add_(self.seq_dim, sel, part.to(self.acc_dtype))

    def result(self, dtype) -> torch.Tensor:
        if self.value is None:
            return torch.zeros(self.shape, dtype=dtype, device=self.device)
        return self.value.to(dtype)


class OutputAccumulator:
    """The running (out, lse) of the attention rows of q; lse is kept in q's row layout, q.shape[:-1]."""

    def __init__(self, q: torch.Tensor, seq_dim: int):
        self.shape, self.device, self.seq_dim = q.shape, q.device, seq_dim
        self.dtype = lse_dtype(q.dtype)
        self.out = self.lse = None

    def add(self, sel, out: torch.Tensor, lse: torch.Tensor) -> None:
        """Merge a block result for rows ``sel``: out like q's rows, lse like q.shape[:-1]."""
        if self.out is None and _whole(sel):  # the first block covering every row: nothing to merge with
            self.out, self.lse = out, lse.to(self.dtype)
            return
        if self.out is None:
            self.out = torch.zeros(self.shape, dtype=self.dtype, device=self.device)
            self.lse = torch.full(self.shape[:-1], float("-inf"), dtype=self.dtype, device=self.device)
        elif self.out.dtype != self.dtype:
            self.out = self.out.to(self.dtype)
        d = self.seq_dim
        if isinstance(sel, slice):
            merge_(take(self.out, sel, d), take(self.lse, sel, d), out, lse.to(self.dtype))
        else:
            acc_out, acc_lse = take(self.out, sel, d), take(self.lse, sel, d)
            merge_(acc_out, acc_lse, out, lse.to(self.dtype))
            self.out.index_copy_(d, sel, acc_out)
            self.lse.index_copy_(d, sel, acc_lse)


def merge_(out_a, lse_a, out_b, lse_b) -> None:
    """In place: (out_a, lse_a) becomes the softmax-weighted combination of two partial attentions
    over disjoint keys (lse -inf = no key seen)."""
    m = torch.maximum(lse_a, lse_b)
    m.masked_fill_(m == float("-inf"), 0.0)
    wa, wb = (lse_a - m).exp_(), (lse_b - m).exp_()
    total = wa + wb
    lse_a.copy_(total.log().add_(m))
    inv = total.clamp_min_(torch.finfo(total.dtype).tiny).reciprocal_()
    out_a.mul_(wa.mul_(inv).unsqueeze(-1)).addcmul_(out_b, wb.mul_(inv).unsqueeze(-1))

