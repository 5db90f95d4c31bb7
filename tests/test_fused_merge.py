"""The Triton merge kernel (lightning_sp/core/attention/fused_merge.py) against the float64 merge and
against the PyTorch path of ``merge_``, on CPU through Triton's interpreter (TRITON_INTERPRET=1).
On GPUs the ring tests run it for real (``merge_`` takes it for CUDA tensors)."""
from __future__ import annotations

import importlib.util
import os

import pytest
import torch

from lightning_sp.attention import merge

pytestmark = pytest.mark.filterwarnings("ignore:divide by zero encountered in log:RuntimeWarning")
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def fused():
    """A copy of the module loaded with the interpreter on (Triton reads the switch when a kernel
    is defined), so that it runs on CPU tensors."""
    pytest.importorskip("triton")
    os.environ["TRITON_INTERPRET"] = "1"
    try:
        spec = importlib.util.spec_from_file_location(
            "fused_merge_interpreted", os.path.join(ROOT, "lightning_sp", "core", "attention", "fused_merge.py"))
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
    finally:
        del os.environ["TRITON_INTERPRET"]
    return module


def _case(shape, dtype, seed, dead_rows=()):
    """Two partial results (out, lse) over the rows of ``shape`` = (..., s, h, d); lse as the kernels
    return it, (..., h, s), seen in row layout (..., s, h) through a transpose. ``dead_rows``:
    (row, side) pairs where that side saw no key (lse -inf, out 0); side 2 = both."""
    g = torch.Generator().manual_seed(seed)
    outs, lses = [], []
    for side in range(2):
        out = torch.randn(shape, generator=g, dtype=torch.float64)
        lse = (torch.randn(shape[:-1], generator=g, dtype=torch.float64) * 3).transpose(-1, -2).contiguous()
        lse = lse.transpose(-1, -2)
        for row, dead in dead_rows:
            if dead in (side, 2):
                out[..., row, :, :] = 0
                lse[..., row, :] = float("-inf")
        outs.append(out.to(dtype))
        lses.append(lse.float())
    return outs, lses


def _reference(outs, lses):
    (oa, ob), (la, lb) = [o.double() for o in outs], [lse.double() for lse in lses]
    lse = torch.logaddexp(la, lb)
    safe = torch.where(lse == float("-inf"), 0.0, lse)
    out = oa * (la - safe).exp().unsqueeze(-1) + ob * (lb - safe).exp().unsqueeze(-1)
    return out, lse


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize("shape", [(2, 37, 3, 64), (50, 4, 80)], ids=["bshd", "packed_thd_d80"])
def test_fused_merge_matches_float64_and_torch_path(fused, dtype, shape):
    dead = [(0, 0), (1, 1), (2, 2)]  # one side empty, the other, both
    (oa, ob), (la, lb) = _case(shape, dtype, seed=len(shape), dead_rows=dead)
    ref_out, ref_lse = _reference((oa, ob), (la, lb))
    assert fused.supports(oa, la, ob, lb)

    out_f, lse_f = oa.clone(), la.clone()
    fused.merge_(out_f, lse_f, ob, lb)
    out_t, lse_t = oa.clone(), la.clone()
    merge.merge_(out_t, lse_t, ob, lb)  # CPU tensors: the PyTorch path

    # relative to values in [1, 2): float32 arithmetic errs by a few 1e-7; a narrow out is rounded
    # once, to nearest by the PyTorch path (half an ulp), truncated by Triton's interpreter (a GPU
    # rounds to nearest), hence a whole ulp for the kernel
    ulp = {torch.bfloat16: 2**-7, torch.float16: 2**-10, torch.float32: 0.0}[dtype]
    scale = ref_out.abs().clamp_min(1)
    assert ((out_t.double() - ref_out).abs() / scale).max() <= ulp / 2 + 5e-7
    assert ((out_f.double() - ref_out).abs() / scale).max() <= ulp + 5e-7
    assert ((out_f.double() - out_t.double()).abs() / scale).max() <= ulp + 1e-6
    assert torch.equal(lse_f.isinf(), ref_lse.isinf())
    finite = ref_lse.isfinite()
    assert (lse_f.double()[finite] - ref_lse[finite]).abs().max() <= 1e-5
    assert (out_f[..., 2, :, :] == 0).all()  # no key on either side: zeros


def test_fused_merge_writes_a_strided_slice_in_place(fused):
    """The ring merges the rows of a sequence slice: views into bigger tensors, written in place;
    rows outside the slice stay as they were."""
    (oa, ob), (la, lb) = _case((1, 40, 2, 32), torch.bfloat16, seed=3)
    big_out, big_lse = oa.clone(), la.clone()
    rows = slice(8, 32)
    view_out, view_lse = big_out[:, rows], big_lse[:, rows]
    fused.merge_(view_out, view_lse, ob[:, rows], lb[:, rows])
    ref_out, ref_lse = _reference((oa[:, rows], ob[:, rows]), (la[:, rows], lb[:, rows]))
    assert ((big_out[:, rows].double() - ref_out).abs() / ref_out.abs().clamp_min(1)).max() <= 2**-7
    assert (big_lse[:, rows].double() - ref_lse).abs().max() <= 1e-5
    outside = torch.ones(40, dtype=torch.bool)
    outside[rows] = False
    assert torch.equal(big_out[:, outside], oa[:, outside]) and torch.equal(big_lse[:, outside], la[:, outside])


def test_fused_merge_declines_what_it_cannot_take(fused):
    (oa, ob), (la, lb) = _case((1, 8, 2, 16), torch.float64, seed=4)
    assert not fused.supports(oa, la.double(), ob, lb.double())  # float64 stays on the PyTorch path
    (oa, ob), (la, lb) = _case((1, 8, 2, 16), torch.bfloat16, seed=5)
    assert not fused.supports(oa.transpose(-1, -2).contiguous().transpose(-1, -2), la, ob, lb)  # strided rows
    assert not fused.supports(oa, la, ob[:, :4], lb[:, :4])  # shapes differ
    huge = torch.empty_strided(oa.shape, (2**32, 2**29, 16, 1), dtype=oa.dtype, device="meta")  # offsets past 32 bits
    assert fused.supports(oa, la, ob, lb) and not fused.supports(huge, la, ob, lb)
    many = torch.empty((4, 8, 2**14, 16), device="meta")  # 65536 (batch, head) pairs
    assert not fused.supports(many, many[..., 0], many, many[..., 0])


def test_merge_takes_the_fused_kernel_only_for_cuda_tensors(monkeypatch):
    calls = []

    class Spy:
        @staticmethod
        def supports(*args):
            return True

        @staticmethod
        def merge_(*args):
            calls.append(args)

    monkeypatch.setattr(merge, "_fused_merge", lambda: Spy)
    (oa, ob), (la, lb) = _case((1, 8, 2, 16), torch.bfloat16, seed=6)
    before = oa.clone()
    merge.merge_(oa, la, ob, lb)  # cpu: the PyTorch path, never the kernel
    assert not calls and not torch.equal(oa, before)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (run on the GPU machine)")
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
def test_fused_merge_on_gpu_rounds_to_nearest(dtype):
    if merge._fused_merge() is None:
        pytest.skip("Triton is not installed: the ring merges with PyTorch ops on this machine")
    (oa, ob), (la, lb) = _case((2, 1000, 4, 128), dtype, seed=7, dead_rows=[(0, 0), (1, 1), (2, 2)])
    ref_out, ref_lse = _reference((oa, ob), (la, lb))
    oa, ob, la, lb = (t.cuda() for t in (oa, ob, la, lb))
    merge.merge_(oa, la, ob, lb)
    ulp = {torch.bfloat16: 2**-7, torch.float16: 2**-10, torch.float32: 0.0}[dtype]
    assert ((oa.cpu().double() - ref_out).abs() / ref_out.abs().clamp_min(1)).max() <= ulp / 2 + 5e-7
    finite = ref_lse.isfinite()
    assert torch.equal(la.cpu().isinf(), ~finite)
    assert (la.cpu().double()[finite] - ref_lse[finite]).abs().max() <= 1e-5
