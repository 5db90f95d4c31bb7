"""The LM head's cross entropy over chunks of tokens, both gradients computed in the forward pass,
so that no more logits than one chunk's exist at once (used by ``LlamaForCausalLM.loss_sum``)."""
from __future__ import annotations

import torch


def _cross_entropy_and_grad(logits, labels, ignore_index: int, with_grad: bool = True):
    """(summed cross entropy of the rows whose label is not ``ignore_index``, its gradient with
    respect to ``logits`` in their dtype, or None without ``with_grad``), computed in float32
    (float64 stays float64)."""
    wide = logits.to(torch.promote_types(logits.dtype, torch.float32))
    valid = labels != ignore_index
    target = torch.where(valid, labels, 0)[:, None]
    lse = torch.logsumexp(wide, dim=-1, keepdim=True)
    loss = torch.where(valid, (lse - wide.gather(-1, target))[:, 0], 0.0).sum()
    if not with_grad:
        return loss, None
    grad = (wide - lse).exp_().scatter_add_(-1, target, torch.full_like(lse, -1.0))
    return loss, grad.mul_(valid[:, None]).to(logits.dtype)


class _LinearCrossEntropy(torch.autograd.Function):
    """Summed cross entropy of ``hidden @ weight.T`` against ``labels``, ``chunk`` rows at a time, with
    both gradients computed in the forward pass: a chunk's logits live only while it is processed,
    and nothing is recomputed in the backward pass, which only scales them. Under autocast the
    matmuls run in its dtype (the weight cast once), as ``F.linear`` would; the weight's gradient
    is summed over the chunks in float32 (float64 stays float64)."""

    @staticmethod
    def forward(ctx, hidden, weight, labels, chunk: int, ignore_index: int, cross_entropy):
        device = hidden.device.type
        dtype = torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else hidden.dtype
        need_dh, need_dw = ctx.needs_input_grad[:2]
        with torch.autocast(device, enabled=False):
            w, h = weight.to(dtype), hidden.to(dtype)
            total = torch.zeros((), dtype=torch.promote_types(dtype, torch.float32), device=hidden.device)
            dh = torch.empty_like(h) if need_dh else None
            dw = torch.zeros(weight.shape, dtype=total.dtype, device=weight.device) if need_dw else None
            for start in range(0, h.shape[0], chunk):
                rows = slice(start, start + chunk)
                loss, grad = cross_entropy(h[rows] @ w.T, labels[rows], ignore_index)
                total += loss
                if need_dh:
                    torch.matmul(grad, w, out=dh[rows])
                if need_dw:
                    _add_product(dw, grad.T, h[rows])
        ctx.save_for_backward(dh, dw)
        ctx.dtypes = hidden.dtype, weight.dtype
        return total

    @staticmethod
    def backward(ctx, grad_total):
        dh, dw = ctx.saved_tensors
        h_dtype, w_dtype = ctx.dtypes
        return (None if dh is None else (dh * grad_total).to(h_dtype),
                None if dw is None else (dw * grad_total).to(w_dtype), None, None, None, None)


def _add_product(acc: torch.Tensor, a: torch.Tensor, b: torch.Tensor):
    """acc += a @ b. On CUDA, a float32 ``acc`` of bfloat16/float16 products takes the product in
    float32 within the one cuBLAS call (no rounded product, no separate add pass)."""
    if acc.is_cuda and acc.dtype == torch.float32 and a.dtype in (torch.bfloat16, torch.float16):
        torch.addmm(acc, a, b, out_dtype=torch.float32, out=acc)
    else:
        acc += a @ b
