"""Plain-math attention in any dtype (float64 included): the exactness reference and the fallback
for masks the fused kernels lack. Scores are computed in float32 for narrower inputs."""
from __future__ import annotations

import torch

from .base import BlockKernel, lse_dtype, register


def block_mask(sq: int, sk: int, causal: bool, window, device) -> torch.Tensor | None:
    """Boolean (sq, sk) mask of the contract's bottom-right causal / window rule, None when full."""
    left, right = window
    if not causal and left is None and right is None:
        return None
    d = torch.arange(sq, device=device)[:, None] + (sk - sq) - torch.arange(sk, device=device)[None, :]
    ok = torch.ones(sq, sk, dtype=torch.bool, device=device)
    if causal:
        ok &= d >= 0
    if left is not None:
        ok &= d <= left
    if right is not None:
        ok &= d >= -right
    return ok


class ReferenceKernel(BlockKernel):
    """Every mask in every dtype, with the whole score matrix in memory: the yardstick and the last resort."""

    name = "reference"
    supports_window = True
    supports_unequal_causal = True
    native_gqa = False

    def _scores(self, q, k, causal, scale, window):
        ct = lse_dtype(q.dtype)
        s = torch.einsum("bqhd,bkhd->bhqk", q.to(ct), k.to(ct)) * scale
        mask = block_mask(q.shape[1], k.shape[1], causal, window, q.device)
        if mask is not None:
            s = s.masked_fill(~mask, float("-inf"))
        return s

    def _forward(self, q, k, v, causal, scale, window):
        s = self._scores(q, k, causal, scale, window)
        lse = torch.logsumexp(s, dim=-1)
        p = torch.exp(s - lse[..., None]).nan_to_num(0.0)  # rows that see nothing: lse -inf, p 0
        out = torch.einsum("bhqk,bkhd->bqhd", p, v.to(s.dtype))
        return out.to(q.dtype), lse

    def _backward(self, dout, q, k, v, out, lse, causal, scale, window):
        ct = lse_dtype(q.dtype)
        s = self._scores(q, k, causal, scale, window)
        p = torch.exp(s - lse.to(ct)[..., None]).nan_to_num(0.0)
        do = dout.to(ct)
        dv = torch.einsum("bhqk,bqhd->bkhd", p, do)
        dp = torch.einsum("bqhd,bkhd->bhqk", do, v.to(ct))
        delta = (do * out.to(ct)).sum(-1).transpose(1, 2)  # (b, h, q)
        ds = p * (dp - delta[..., None])
        dq = torch.einsum("bhqk,bkhd->bqhd", ds, k.to(ct)) * scale
        dk = torch.einsum("bhqk,bqhd->bkhd", ds, q.to(ct)) * scale
        return dq.to(q.dtype), dk.to(k.dtype), dv.to(v.dtype)


reference = register(ReferenceKernel(), auto_rank=100)
