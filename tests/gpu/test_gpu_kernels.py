"""Every block-kernel backend on a CUDA GPU against float64, through the kernel contract: out, lse,
dq, dk, dv in bf16 and fp16 for causal / full, MHA / GQA / MQA, causal between blocks of unequal
length and windows (where the backend declares them; elsewhere it must decline by name), packed
documents through the varlen entry points, and gradients written into given destinations.

The float64 reference is ``plain`` of tests/test_kernels.py (autograd with the contract's
bottom-right mask), computed on the CPU from the same inputs. ``python benchmark/kernel_check.py``
runs this file alone.
"""
from __future__ import annotations

import pytest
import torch

from gpu_support import GPU_BACKENDS
from lightning_sp.core import kernels as K
from lightning_sp.core.testing import rel_error
from test_kernels import plain

pytestmark = pytest.mark.gpu

DTYPES = {"bf16": (torch.bfloat16, 2e-2), "fp16": (torch.float16, 5e-3)}
CASES = {  # name: (sq, sk, heads, kv_heads, head_dim, causal, window)
    "full": (512, 512, 8, 8, 128, False, K.NO_WINDOW),
    "causal": (512, 512, 8, 8, 128, True, K.NO_WINDOW),
    "causal-gqa": (512, 512, 8, 2, 128, True, K.NO_WINDOW),
    "full-mqa": (512, 512, 8, 1, 64, False, K.NO_WINDOW),
    "causal-unequal": (256, 768, 4, 4, 64, True, K.NO_WINDOW),
    "window": (512, 512, 4, 4, 64, False, (64, 32)),
}


def _inputs(sq, sk, h, hk, d, dtype, seed, batch=2):
    g = torch.Generator(device="cuda").manual_seed(seed)
    q = torch.randn(batch, sq, h, d, generator=g, device="cuda", dtype=dtype)
    k, v = (torch.randn(batch, sk, hk, d, generator=g, device="cuda", dtype=dtype) for _ in range(2))
    dout = torch.randn(batch, sq, h, d, generator=g, device="cuda", dtype=dtype)
    return q, k, v, dout


def _reference(q, k, v, dout, causal, window):
    """float64 (out, lse, dq, dk, dv) on the CPU."""
    return plain(*(t.cpu() for t in (q, k, v, dout)), causal, q.shape[-1] ** -0.5, window)


def _errors(got, want) -> dict[str, float]:
    """Relative errors of out, lse (its finite entries, which must be the reference's), dq, dk, dv."""
    out, lse, *grads = (t.cpu() for t in got)
    finite = torch.isfinite(want[1])
    assert torch.equal(torch.isfinite(lse), finite), "rows that see no key must get lse -inf, the others finite"
    errs = {"out": rel_error(out, want[0]), "lse": rel_error(lse[finite], want[1][finite])}
    errs.update({n: rel_error(g, w) for n, g, w in zip(("dq", "dk", "dv"), grads, want[2:])})
    return errs


def _report(record_property, label, errs, tol):
    record_property("errors", {n: f"{e:.2e}" for n, e in errs.items()})
    print(f"{label}: " + " ".join(f"{n} {e:.1e}" for n, e in errs.items()), flush=True)
    assert max(errs.values()) < tol, f"{label}: error above {tol}: {errs}"


@pytest.mark.parametrize("dtype_name", DTYPES)
@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("backend", GPU_BACKENDS)
def test_kernel_against_float64(kernel, backend, case, dtype_name, record_property):
    sq, sk, h, hk, d, causal, window = CASES[case]
    dtype, tol = DTYPES[dtype_name]
    q, k, v, dout = _inputs(sq, sk, h, hk, d, dtype, seed=sq + sk + h)
    reason = kernel.why_not(q, k, causal, window)
    declines = ((window != K.NO_WINDOW and not kernel.supports_window)
                or (causal and sq != sk and not kernel.supports_unequal_causal))
    if declines:
        assert reason, f"{backend} takes a {case} block it declares it cannot"
        pytest.skip(reason)  # the ring's schedule and `auto` route such blocks elsewhere
    assert reason is None, f"{backend} declines a {case} {dtype_name} block: {reason}"
    out, lse = kernel.forward(q, k, v, causal=causal, window=window)
    assert out.dtype == dtype and out.shape == q.shape
    assert lse.dtype == K.lse_dtype(dtype) and lse.shape == (q.shape[0], h, sq)
    grads = kernel.backward(dout, q, k, v, out, lse, causal=causal, window=window)
    assert [g.shape for g in grads] == [q.shape, k.shape, v.shape]
    _report(record_property, f"{backend} {case} {dtype_name}",
            _errors((out, lse, *grads), _reference(q, k, v, dout, causal, window)), tol)


@pytest.mark.parametrize("dtype_name", DTYPES)
@pytest.mark.parametrize("backend", GPU_BACKENDS)
def test_varlen_against_float64(kernel, backend, dtype_name, record_property):
    """Packed documents of 100, 256 and 156 tokens, causal, through forward_varlen/backward_varlen;
    each document against its own float64 attention (worst error over documents)."""
    dtype, tol = DTYPES[dtype_name]
    cu = torch.tensor([0, 100, 356, 512], dtype=torch.int32, device="cuda")
    q, k, v, dout = (t[0] for t in _inputs(512, 512, 4, 4, 64, dtype, seed=7, batch=1))
    out, lse = kernel.forward_varlen(q, k, v, cu, cu, causal=True)
    assert out.shape == q.shape and lse.shape == (4, 512) and lse.dtype == K.lse_dtype(dtype)
    grads = kernel.backward_varlen(dout, q, k, v, out, lse, cu, cu, causal=True)
    worst: dict[str, float] = {}
    for a, b in zip(cu[:-1].tolist(), cu[1:].tolist()):
        want = _reference(*(t[None, a:b] for t in (q, k, v, dout)), True, K.NO_WINDOW)
        got = (out[None, a:b], lse[None, :, a:b], *(g[None, a:b] for g in grads))
        for name, err in _errors(got, want).items():
            worst[name] = max(worst.get(name, 0.0), err)
    _report(record_property, f"{backend} varlen-causal {dtype_name}", worst, tol)


@pytest.mark.parametrize("backend", GPU_BACKENDS)
def test_backward_writes_into_destinations(kernel, backend):
    """``into=(dq, None, dv)``, slices of one packed (b, s, 3, h, d) gradient: the gradients land
    there and come back as those tensors; the slot without a destination stays untouched."""
    dtype, tol = DTYPES["bf16"]
    q, k, v, dout = _inputs(512, 512, 8, 8, 128, dtype, seed=11)
    out, lse = kernel.forward(q, k, v, causal=True)
    packed = torch.full((2, 512, 3, 8, 128), float("nan"), device="cuda", dtype=dtype)
    into = (packed[:, :, 0], None, packed[:, :, 2])
    placed = kernel.backward(dout, q, k, v, out, lse, causal=True, into=into)
    assert placed[0] is into[0] and placed[2] is into[2]
    want = _reference(q, k, v, dout, True, K.NO_WINDOW)
    for name, got, ref in zip(("dq", "dk", "dv"), placed, want[2:]):
        assert rel_error(got.cpu(), ref) < tol, name
    assert packed[:, :, 1].isnan().all()


def test_auto_takes_the_fastest_kernel_that_accepts_the_block(cuda):
    """On a GPU `auto` runs fa4 where it is installed, else cuDNN; blocks that only fa4 and the
    reference take (windows, causal between unequal lengths) fall to the reference without fa4."""
    q = torch.empty(1, 256, 8, 128, device=cuda, dtype=torch.bfloat16)
    fa4 = K.get_kernel("fa4").why_not(q, q, True) is None
    assert K.select_kernel("auto", q, q, True).name == ("fa4" if fa4 else "cudnn")
    assert K.select_kernel("auto", q, q, False, (8, 8)).name == ("fa4" if fa4 else "reference")
    assert K.select_kernel("auto", q[:, :128], q, True).name == ("fa4" if fa4 else "reference")
