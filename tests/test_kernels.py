"""Block kernels against plain float64 attention written here, and the registry's choices."""
import pytest
import torch

from lightning_sp import kernels as K
from lightning_sp.kernels.reference import block_mask

CPU_KERNELS = ["reference", "cpu_flash"]


def plain(q, k, v, dout, causal, scale, window):
    """Autograd float64 attention with the contract's bottom-right mask; returns out, lse, grads."""
    q, k, v = [t.double().clone().requires_grad_() for t in (q, k, v)]
    rep = q.shape[2] // k.shape[2]
    kk, vv = k.repeat_interleave(rep, 2), v.repeat_interleave(rep, 2)
    s = torch.einsum("bqhd,bkhd->bhqk", q, kk) * scale
    mask = block_mask(q.shape[1], k.shape[1], causal, window, "cpu")
    if mask is not None:
        s = s.masked_fill(~mask, float("-inf"))
    lse = torch.logsumexp(s, -1)
    out = torch.einsum("bhqk,bkhd->bqhd", torch.exp(s - lse[..., None]).nan_to_num(0.0), vv)
    out.backward(dout.double())
    return out.detach(), lse.detach(), q.grad, k.grad, v.grad


def rel(a, b):
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


CASES = [  # sq, sk, heads, kv_heads, causal, window
    (16, 16, 4, 4, False, (None, None)), (16, 16, 4, 4, True, (None, None)),
    (16, 16, 4, 2, True, (None, None)), (16, 16, 4, 1, False, (None, None)),
    (8, 24, 4, 2, True, (None, None)), (24, 8, 2, 1, True, (None, None)),
    (16, 16, 2, 2, False, (3, 2)), (16, 24, 2, 1, True, (4, None)), (16, 16, 2, 2, False, (-2, 5)),
]


@pytest.mark.parametrize("name", CPU_KERNELS)
@pytest.mark.parametrize("dtype,tol", [(torch.float64, 1e-12), (torch.float32, 1e-5)])
@pytest.mark.parametrize("sq,sk,h,hk,causal,window", CASES)
def test_kernel_contract(name, dtype, tol, sq, sk, h, hk, causal, window):
    kernel = K.get_kernel(name)
    g = torch.Generator().manual_seed(sq * 100 + sk)
    q = torch.randn(2, sq, h, 16, generator=g, dtype=dtype)
    k, v = (torch.randn(2, sk, hk, 16, generator=g, dtype=dtype) for _ in range(2))
    dout = torch.randn(2, sq, h, 16, generator=g, dtype=dtype)
    reason = kernel.why_not(q, k, causal, window)
    if reason:
        assert name != "reference"
        with pytest.raises(K.KernelError, match=reason.split(" ")[0]):
            K.select_kernel(name, q, k, causal, window)
        return
    ref = plain(q, k, v, dout, causal, 0.3, window)
    out, lse = kernel.forward(q, k, v, causal=causal, softmax_scale=0.3, window=window)
    assert out.dtype == dtype and lse.dtype == K.lse_dtype(dtype) and lse.shape == (2, h, sq)
    assert rel(out, ref[0]) < tol
    finite = torch.isfinite(ref[1])
    assert torch.equal(torch.isfinite(lse), finite)  # rows that see no key: -inf
    assert rel(lse[finite], ref[1][finite]) < tol
    grads = kernel.backward(dout, q, k, v, out, lse, causal=causal, softmax_scale=0.3, window=window)
    for got, want in zip(grads, ref[2:]):
        assert got.shape == want.shape and rel(got, want) < tol
    # into: the gradients land in the given tensors (here slices of one packed (b, s, 3, h, d) buffer)
    if sq == sk and h == hk:
        packed = torch.full((2, sq, 3, h, 16), float("nan"), dtype=dtype)
        into = (packed[:, :, 0], None, packed[:, :, 2])
        placed = kernel.backward(dout, q, k, v, out, lse, causal=causal, softmax_scale=0.3, window=window,
                                 into=into)
        assert placed[0] is into[0] and placed[2] is into[2]
        for got, want in zip(placed, grads):
            assert torch.equal(got, want)
        assert packed[:, :, 1].isnan().all()  # no destination: untouched


@pytest.mark.parametrize("name", CPU_KERNELS)
def test_varlen_by_documents(name):
    kernel = K.get_kernel(name)
    cu = torch.tensor([0, 5, 12, 20], dtype=torch.int32)
    q, k, v, dout = (torch.randn(20, 2, 8, dtype=torch.float64) for _ in range(4))
    out, lse = kernel.forward_varlen(q, k, v, cu, cu, causal=True)
    assert lse.shape == (2, 20)
    grads = kernel.backward_varlen(dout, q, k, v, out, lse, cu, cu, causal=True)
    for a, b in zip(cu[:-1].tolist(), cu[1:].tolist()):
        ref = plain(q[None, a:b], k[None, a:b], v[None, a:b], dout[None, a:b], True, 8 ** -0.5, (None, None))
        assert rel(out[a:b], ref[0][0]) < 1e-12
        for got, want in zip(grads, ref[2:]):
            assert rel(got[a:b], want[0]) < 1e-12


def test_auto_picks_fastest_that_accepts():
    q = torch.randn(1, 8, 2, 16)
    assert K.select_kernel("auto", q, q).name == "cpu_flash"
    assert K.select_kernel("auto", q, q, window=(2, 0)).name == "reference"  # cpu_flash declines windows
    assert K.select_kernel("auto", q, q[:, :4], causal=True).name == "reference"  # unequal causal
    assert K.auto_order()[:2] == ["fa4", "cudnn"]  # on a GPU: FA4, then cuDNN


def test_one_kernel_for_every_mask_of_a_call():
    """``masks``: the kernel must take every (causal, window) a call's blocks have."""
    q = torch.randn(1, 8, 2, 16)
    assert K.select_kernel("auto", q, q, masks=[(True, K.NO_WINDOW), (False, K.NO_WINDOW)]).name == "cpu_flash"
    assert K.select_kernel("auto", q, q, masks=[(True, K.NO_WINDOW), (False, (2, 0))]).name == "reference"
    with pytest.raises(K.KernelError, match="backend 'cpu_flash' cannot run this attention block: cpu_flash has no "
                                            "sliding-window support"):
        K.select_kernel("cpu_flash", q, q, masks=[(False, K.NO_WINDOW), (False, (2, 0))])


def test_unknown_backend_names_supported():
    with pytest.raises(K.KernelError, match=r"unknown attention backend 'triton'; supported: auto, fa4, .*reference"):
        K.get_kernel("triton")


def test_declining_backend_says_why():
    q = torch.randn(1, 8, 2, 16)
    with pytest.raises(K.KernelError, match="cpu_flash has no sliding-window support"):
        K.select_kernel("cpu_flash", q, q, window=(4, 0))
    with pytest.raises(K.KernelError, match="cudnn runs on CUDA GPUs only"):
        K.select_kernel("cudnn", q, q)


def test_auto_never_gives_the_reference_kernel_a_large_block_on_a_gpu():
    """On CUDA, ``auto`` falling back to the reference kernel for a block over 1024 x 1024 (query rows
    x keys) is an error naming the block and its window; smaller blocks, an explicit
    ``backend='reference'``, another kernel or a CPU tensor pass."""
    cuda, cpu = torch.device("cuda"), torch.device("cpu")  # only the device type is read
    ref, fused = K.get_kernel("reference"), K.get_kernel("cpu_flash")
    big = [(1024, 1024, False, (None, None)), (2048, 1536, False, (1023, 0))]
    with pytest.raises(K.KernelError, match=r"2048 query rows x 1536 keys \(causal=False, window=\(1023, 0\)\)"):
        K.check_auto_fallback("auto", ref, cuda, big)
    K.check_auto_fallback("auto", ref, cuda, big[:1])
    K.check_auto_fallback("reference", ref, cuda, big)
    K.check_auto_fallback("auto", fused, cuda, big)
    K.check_auto_fallback("auto", ref, cpu, big)
