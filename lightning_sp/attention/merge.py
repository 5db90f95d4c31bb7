"""Accumulating block outputs through their log-sum-exp, in float32 (float64 stays float64)."""
from __future__ import annotations

import torch

from ..kernels import lse_dtype


def take(x: torch.Tensor, sel, dim: int) -> torch.Tensor:
    """Rows ``sel`` (a slice or an index tensor) of x along ``dim``."""
    if isinstance(sel, slice):
        return x[(slice(None),) * dim + (sel,)]
    return x.index_select(dim, sel)


def add_at(acc: torch.Tensor, sel, dim: int, value: torch.Tensor) -> None:
    if isinstance(sel, slice):
        take(acc, sel, dim).add_(value)
    else:
        acc.index_add_(dim, sel, value.to(acc.dtype))


class OutputAccumulator:
    """The running (out, lse) of the attention rows of q; lse is kept in q's row layout, q.shape[:-1]."""

    def __init__(self, q: torch.Tensor, seq_dim: int):
        self.shape, self.device, self.seq_dim = q.shape, q.device, seq_dim
        self.dtype = lse_dtype(q.dtype)
        self.out = self.lse = None

    def add(self, sel, out: torch.Tensor, lse: torch.Tensor) -> None:
        """Merge a block result for rows ``sel``: out like q's rows, lse like q.shape[:-1]."""
        whole = isinstance(sel, slice) and sel == slice(None)
        if self.out is None and whole:  # the first block covering every row: nothing to merge with
            self.out, self.lse = out.to(self.dtype), lse.to(self.dtype)
            return
        if self.out is None:
            self.out = torch.zeros(self.shape, dtype=self.dtype, device=self.device)
            self.lse = torch.full(self.shape[:-1], float("-inf"), dtype=self.dtype, device=self.device)
        d = self.seq_dim
        acc_out, acc_lse = take(self.out, sel, d), take(self.lse, sel, d)
        new_out, new_lse = merge(acc_out, acc_lse, out, lse.to(self.dtype))
        if isinstance(sel, slice):
            acc_out.copy_(new_out)
            acc_lse.copy_(new_lse)
        else:
            self.out.index_copy_(d, sel, new_out)
            self.lse.index_copy_(d, sel, new_lse)


def merge(out_a, lse_a, out_b, lse_b):
    """Softmax-weighted combination of two partial attentions over disjoint keys (-inf lse = empty)."""
    m = torch.maximum(lse_a, lse_b)
    m = m.masked_fill(m == float("-inf"), 0.0)
    wa, wb = torch.exp(lse_a - m), torch.exp(lse_b - m)
    total = wa + wb
    lse = m + torch.log(total)
    inv = 1.0 / total.clamp_min(torch.finfo(total.dtype).tiny)
    out = out_a * (wa * inv).unsqueeze(-1) + out_b.to(out_a.dtype) * (wb * inv).unsqueeze(-1)
    return out, lse
