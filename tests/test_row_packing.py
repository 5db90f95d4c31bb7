"""Packing strided tensors for a send: ``copy_engine.row_layout`` (which strided tensors one 2-D copy
can pack) and ``contiguous_by_copy_engines`` (the copy, by the GPUs' copy engines; on CUDA only)."""
from __future__ import annotations

import pytest
import torch

from lightning_sp.copy_engine import contiguous_by_copy_engines, row_layout


def test_row_layout_of_packed_qkv_parts():
    qkv = torch.empty(2, 16, 3, 4, 8, dtype=torch.bfloat16)  # (b, s, 3, h, d)
    q, k, v = qkv.unbind(2)
    assert row_layout(k) == (4 * 8 * 2, 2 * 16, 3 * 4 * 8 * 2)  # a row per token, pitch: the packed row
    assert row_layout(v) == row_layout(q)
    assert row_layout(qkv[:, :, 1:]) == (2 * 4 * 8 * 2, 2 * 16, 3 * 4 * 8 * 2)  # K and V together
    kv = torch.empty(2, 16, 2, 4, 8)
    assert row_layout(kv[:, :, 0]) == (4 * 8 * 4, 2 * 16, 2 * 4 * 8 * 4)


def test_row_layout_contiguous_and_unpackable():
    x = torch.empty(3, 5, 7)
    assert row_layout(x) == (3 * 5 * 7 * 4, 1, 3 * 5 * 7 * 4)
    assert row_layout(x[:, :, :4]) == (4 * 4, 15, 7 * 4)
    assert row_layout(x.transpose(0, 1)) is None  # the outer dimensions do not merge into one pitch
    assert row_layout(x[:, 1:3]) == (2 * 7 * 4, 3, 5 * 7 * 4)  # two rows of 7 make one row of 14
    assert row_layout(x[:, ::2]) is None  # rows of 7 at pitch 14 within a plane, planes 35 apart
    assert row_layout(x[:, :, ::2]) is None  # no innermost element next to the next one
    assert row_layout(torch.empty(4, 1, 6)[:, :, :3]) == (3 * 4, 4, 6 * 4)  # size-1 dims do not matter


def test_cpu_tensors_are_made_contiguous_on_the_callers_stream():
    qkv = torch.randn(2, 16, 3, 4, 8)
    _, k, v = qkv.unbind(2)
    packed, side = contiguous_by_copy_engines([k, v])
    assert side is None
    assert all(p.is_contiguous() for p in packed) and torch.equal(packed[0], k) and torch.equal(packed[1], v)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_copy_engines_pack_rows_exactly_and_in_stream_order():
    """Bit-exact copies; the side stream starts after the caller's earlier work (the qkv is written
    just before) and the caller's stream is not held up by the copies."""
    qkv = torch.empty(1, 4096, 3, 32, 128, dtype=torch.bfloat16, device="cuda")
    qkv.normal_()  # on the caller's stream, right before the packing
    _, k, v = qkv.unbind(2)
    contiguous = torch.randn(64, 64, device="cuda")
    transposed = torch.randn(64, 32, device="cuda").t()  # no row layout: .contiguous() on the caller's stream
    packed, side = contiguous_by_copy_engines([k, v, contiguous, transposed])
    assert side is not None
    torch.cuda.current_stream().wait_stream(side)
    assert packed[2] is contiguous
    for got, want in zip(packed, [k, v, contiguous, transposed]):
        assert got.is_contiguous() and torch.equal(got, want)
