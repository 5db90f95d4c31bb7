"""Every block-kernel backend on this machine against float64, through the contract.

    python benchmark/kernel_check.py            # on a GPU: fa4, cudnn, flash, efficient, reference

For each backend and case (causal / full, MHA / GQA / MQA, unequal block lengths, windows, packed
documents) prints the relative error of out, lse, dq, dk, dv, or why the backend declines; exits
non-zero when an accepted case is off by more than the dtype allows or `auto` picks a declining one.
"""
from __future__ import annotations

import sys

import torch

from lightning_sp import kernels as K
from lightning_sp.testing import reference_attention, rel_error

TOL = {torch.bfloat16: 2e-2, torch.float16: 5e-3, torch.float32: 1e-4, torch.float64: 1e-10}
CASES = [  # name, sq, sk, heads, kv_heads, head_dim, causal, window
    ("full", 512, 512, 8, 8, 128, False, (None, None)),
    ("causal", 512, 512, 8, 8, 128, True, (None, None)),
    ("causal-gqa", 512, 512, 8, 2, 128, True, (None, None)),
    ("full-mqa", 512, 512, 8, 1, 64, False, (None, None)),
    ("causal-unequal", 256, 768, 4, 4, 64, True, (None, None)),
    ("window", 512, 512, 4, 4, 64, False, (64, 32)),
]


def plain_with_mask(q, k, v, dout, causal, window):
    """float64 reference for unequal lengths / windows: explicit bottom-right mask, autograd."""
    from lightning_sp.kernels.reference import block_mask
    q, k, v = [t.double().requires_grad_() for t in (q, k, v)]
    rep = q.shape[2] // k.shape[2]
    s = torch.einsum("bqhd,bkhd->bhqk", q, k.repeat_interleave(rep, 2)) * q.shape[-1] ** -0.5
    mask = block_mask(q.shape[1], k.shape[1], causal, window, q.device)
    if mask is not None:
        s = s.masked_fill(~mask, float("-inf"))
    lse = torch.logsumexp(s, -1)
    out = torch.einsum("bhqk,bkhd->bqhd", torch.exp(s - lse[..., None]).nan_to_num(0.0), v.repeat_interleave(rep, 2))
    out.backward(dout.double())
    return out.detach(), lse.detach(), q.grad, k.grad, v.grad


def check(kernel, dtype, device):
    failures = 0
    for name, sq, sk, h, hk, d, causal, window in CASES:
        g = torch.Generator(device=device).manual_seed(sq + sk + h)
        q = torch.randn(2, sq, h, d, generator=g, device=device, dtype=dtype)
        k, v = (torch.randn(2, sk, hk, d, generator=g, device=device, dtype=dtype) for _ in range(2))
        dout = torch.randn(2, sq, h, d, generator=g, device=device, dtype=dtype)
        reason = kernel.why_not(q, k, causal, window)
        if reason:
            print(f"{kernel.name:10s} {name:15s} declines: {reason}")
            continue
        ref = plain_with_mask(q, k, v, dout, causal, window)
        out, lse = kernel.forward(q, k, v, causal=causal, window=window)
        grads = kernel.backward(dout, q, k, v, out, lse, causal=causal, window=window)
        errs = [rel_error(out, ref[0]), rel_error(lse, ref[1]), *(rel_error(a, b) for a, b in zip(grads, ref[2:]))]
        ok = max(errs) < TOL[dtype] and lse.dtype == K.lse_dtype(dtype)
        failures += not ok
        print(f"{kernel.name:10s} {name:15s} {'ok  ' if ok else 'FAIL'} out {errs[0]:.1e} lse {errs[1]:.1e} "
              f"dq {errs[2]:.1e} dk {errs[3]:.1e} dv {errs[4]:.1e}")
    # packed documents through the varlen entry points
    cu = torch.tensor([0, 100, 356, 512], dtype=torch.int32, device=device)
    q, k, v, dout = (torch.randn(512, 4, 64, device=device, dtype=dtype) for _ in range(4))
    if kernel.why_not(q[None], k[None], True) is None:
        out, lse = kernel.forward_varlen(q, k, v, cu, cu, causal=True)
        grads = kernel.backward_varlen(dout, q, k, v, out, lse, cu, cu, causal=True)
        worst = 0.0
        for a, b in zip(cu[:-1].tolist(), cu[1:].tolist()):
            ref = reference_attention(q[None, a:b], k[None, a:b], v[None, a:b], dout[None, a:b], causal=True)
            worst = max(worst, *(rel_error(x[a:b], y[0]) for x, y in zip((out, *grads), ref)))
        ok = worst < TOL[dtype]
        failures += not ok
        print(f"{kernel.name:10s} {'varlen-causal':15s} {'ok  ' if ok else 'FAIL'} worst {worst:.1e}")
    return failures


def main():
    device = "cuda" if torch.cuda.is_available() else "cpu"
    failures = 0
    for name in K.backends()[1:]:
        kernel = K.get_kernel(name)
        if not kernel.available():
            print(f"{name:10s} not installed")
            continue
        for dtype in ((torch.bfloat16, torch.float16) if device == "cuda" else (torch.float32, torch.float64)):
            failures += check(kernel, dtype, device)
    q = torch.randn(1, 64, 4, 128, device=device, dtype=torch.bfloat16)
    print("auto order:", K.auto_order(), "-> picks", K.select_kernel("auto", q, q, True).name,
          "| with a window:", K.select_kernel("auto", q, q, False, (8, 8)).name)
    print(f"{failures} failures")
    sys.exit(1 if failures else 0)


if __name__ == "__main__":
    main()
