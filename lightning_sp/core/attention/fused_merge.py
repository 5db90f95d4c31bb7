"""One Triton kernel for ``merge_``: read both blocks' rows and log-sum-exps once, combine in
float32, write the merged rows (rounded once, in the output's dtype) and log-sum-exp in place.

PyTorch's element-wise ops need about ten passes over the rows for the same arithmetic (weights,
float32 copies, the product sums), a visible share of a ring forward's time next to its attention
kernels. Imported by ``merge.py`` only for CUDA tensors, when Triton is
installed. ``TRITON_INTERPRET=1`` (set before this module is imported) runs it on CPU tensors too,
which is how the tests check it without a GPU.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

BLOCK_ROWS = 16


@triton.jit
def _merge_kernel(out_a, lse_a, out_b, lse_b, S, H, D,
                  oa_b, oa_s, oa_h, ob_b, ob_s, ob_h, la_b, la_s, la_h, lb_b, lb_s, lb_h,
                  TINY: tl.constexpr, BLOCK_S: tl.constexpr, BLOCK_D: tl.constexpr):
    bh = tl.program_id(1)
    b, h = bh // H, bh % H
    # every value is (rows, 1) or (rows, cols): one layout, so Triton never re-reads lse_a to
    # change a vector's layout; a re-read after the lse store below would see the merged lse
    rows = (tl.program_id(0) * BLOCK_S + tl.arange(0, BLOCK_S))[:, None]
    cols = tl.arange(0, BLOCK_D)[None, :]
    in_rows = rows < S
    la_ptr = lse_a + b * la_b + h * la_h + rows * la_s
    lse_1 = tl.load(la_ptr, mask=in_rows, other=float("-inf")).to(tl.float32)
    lse_2 = tl.load(lse_b + b * lb_b + h * lb_h + rows * lb_s, mask=in_rows, other=float("-inf")).to(tl.float32)
    m = tl.maximum(lse_1, lse_2)
    m = tl.where(m == float("-inf"), 0.0, m)  # no key on either side: weights 0, lse stays -inf
    w_1, w_2 = tl.exp(lse_1 - m), tl.exp(lse_2 - m)
    total = w_1 + w_2
    inv = 1.0 / tl.maximum(total, TINY)
    mask = in_rows & (cols < D)
    oa_ptr = out_a + b * oa_b + h * oa_h + rows * oa_s + cols
    o_1 = tl.load(oa_ptr, mask=mask, other=0.0).to(tl.float32)
    o_2 = tl.load(out_b + b * ob_b + h * ob_h + rows * ob_s + cols, mask=mask, other=0.0).to(tl.float32)
    tl.store(oa_ptr, (o_1 * (w_1 * inv) + o_2 * (w_2 * inv)).to(out_a.dtype.element_ty), mask=mask)
    tl.store(la_ptr, (tl.log(total) + m).to(lse_a.dtype.element_ty), mask=in_rows)  # last: after every read


def supports(out_a: torch.Tensor, lse_a: torch.Tensor, out_b: torch.Tensor, lse_b: torch.Tensor) -> bool:
    """(..., s, h, d) outputs with contiguous rows, (..., s, h) log-sum-exps, no float64; offsets
    that fit 32 bits (the kernel's index arithmetic) and at most 65535 (batch, head) pairs (the grid)."""
    small = all(_span(t) < 2**31 for t in (out_a, lse_a, out_b, lse_b))
    pairs = out_a.shape[-2] * (out_a.shape[0] if out_a.dim() == 4 else 1)
    return (out_a.dim() in (3, 4) and out_a.shape == out_b.shape and lse_a.shape == lse_b.shape == out_a.shape[:-1]
            and out_a.stride(-1) == 1 and out_b.stride(-1) == 1 and out_a.dtype != torch.float64
            and lse_a.dtype == torch.float32 and small and pairs <= 65535)


def _span(t: torch.Tensor) -> int:
    """One past the largest element offset a view reaches from its first element."""
    return 1 + sum((n - 1) * st for n, st in zip(t.shape, t.stride()) if n > 0)


def merge_(out_a: torch.Tensor, lse_a: torch.Tensor, out_b: torch.Tensor, lse_b: torch.Tensor) -> None:
    """``merge.merge_`` in one kernel; the caller checks :func:`supports`."""
    if out_a.dim() == 3:  # packed (t, h, d): one batch
        out_a, lse_a, out_b, lse_b = out_a[None], lse_a[None], out_b[None], lse_b[None]
    B, S, H, D = out_a.shape
    if out_a.numel() == 0:
        return
    grid = (triton.cdiv(S, BLOCK_ROWS), B * H)  # rows first: grid y and z stop at 65535
    _merge_kernel[grid](out_a, lse_a, out_b, lse_b, S, H, D,
                        *out_a.stride()[:3], *out_b.stride()[:3], *lse_a.stride(), *lse_b.stride(),
                        TINY=torch.finfo(torch.float32).tiny, BLOCK_S=BLOCK_ROWS,
                        BLOCK_D=triton.next_power_of_2(D))
