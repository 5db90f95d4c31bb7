"""The ring's sums of block results in bfloat16: every sum of several blocks rounded once, exactly as
a float32 sum (or float32 merge) rounded at the end, while the kernel dtype is kept where that is exact
(a second term added in place, the first hop's dK/dV messages, the two-block output merge)."""
from dataclasses import replace

import pytest
import torch

import lightning_sp
from lightning_sp import layout as L
from lightning_sp.attention import ring as ring_mod
from lightning_sp.attention.merge import OutputAccumulator, PartialSum, merge_, take
from lightning_sp.attention.ring import RingSpec, StepPlan
from lightning_sp.core.mesh import rank_coordinates

BF16, F32 = torch.bfloat16, torch.float32
SHAPE = (2, 24, 3, 5)  # (b, s, h, d): odd sizes, so no vectorized loop covers a row evenly


def _spread(*shape, seed):
    """bfloat16 values over many magnitudes, so that sums of two of them round."""
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(*shape, generator=g) * 2.0 ** torch.randint(-6, 7, shape, generator=g)).to(BF16)


def _same(a, b) -> bool:
    return a.dtype == b.dtype and a.shape == b.shape and torch.equal(a.view(torch.int16), b.view(torch.int16))


# --- PartialSum --------------------------------------------------------------------------------

ALL, HEAD, TAIL, MID = slice(None), slice(0, 16), slice(8, 24), slice(4, 20)


@pytest.mark.parametrize("sels", [(ALL, ALL), (ALL, TAIL), (HEAD, ALL), (HEAD, TAIL), (HEAD, slice(16, 24)),
                                  (ALL, HEAD, TAIL), (HEAD, MID, ALL), (HEAD, ALL, TAIL), (ALL, ALL, ALL, MID),
                                  (MID,)],
                         ids=["whole+whole", "whole+slice", "slice+whole", "slice+slice", "disjoint",
                              "three", "three-first-slice", "slice-whole-slice", "four", "one-slice"])
def test_partial_sum_bf16_is_float32_sum_rounded(sels):
    parts = [_spread(2, take(torch.empty(SHAPE[1]), s, 0).numel(), 3, 5, seed=i) for i, s in enumerate(sels)]
    want = torch.zeros(SHAPE)
    for s, p in zip(sels, parts):
        take(want, s, 1).add_(p.float())
    acc = PartialSum(SHAPE, BF16, "cpu", 1)
    for s, p in zip(sels, parts):
        acc.add(s, p.clone())
    if len(sels) == 2:  # at most two terms a row: never widened to float32
        assert acc.value.dtype == BF16
    got = acc.result(BF16)
    assert _same(got, want.to(BF16))
    assert _same(acc.result(BF16), got)  # taking the result again changes nothing


def test_partial_sum_adds_onto_first_whole_term():
    first, second = _spread(*SHAPE, seed=1), _spread(*SHAPE, seed=2)
    want = first.clone()
    want[:, TAIL] = (first[:, TAIL].float() + second[:, TAIL].float()).to(BF16)
    acc = PartialSum(SHAPE, BF16, "cpu", 1)
    acc.add(ALL, first)
    acc.add(TAIL, second[:, TAIL])
    got = acc.result(BF16)
    assert got.data_ptr() == first.data_ptr()  # written into the first term, no copy of the sum
    assert _same(got, want)


def test_partial_sum_adds_a_first_slice_onto_a_later_whole_term():
    """The ring backward's dq on a rank whose first block covers half its queries: no zeros, the
    half is added onto the whole term (same bits as the float32 sum rounded once)."""
    first, second = _spread(2, 16, 3, 5, seed=7), _spread(*SHAPE, seed=8)
    want = second.clone()
    want[:, TAIL] = (first.float() + second[:, TAIL].float()).to(BF16)
    acc = PartialSum(SHAPE, BF16, "cpu", 1)
    acc.add(TAIL, first)
    acc.add(ALL, second)
    got = acc.result(BF16)
    assert got.data_ptr() == second.data_ptr()
    assert _same(got, want)


def test_partial_sum_result_into_a_term_it_holds():
    """The ring backward's own-block dK/dV written by the kernel into a packed gradient's slice: the
    received sum is added onto that slice (same bits as the float32 sum rounded once), no copy."""
    packed = _spread(2, 24, 3, 3, 5, seed=11)
    received, own = _spread(*SHAPE, seed=12), packed[:, :, 1]
    want = (received.float() + own.float()).to(BF16)
    acc = PartialSum(SHAPE, BF16, "cpu", 1, start=received)
    acc.add(ALL, own)
    got = acc.result(BF16, out=own)
    assert got is own and _same(got.contiguous(), want)


@pytest.mark.parametrize("sels", [(ALL, TAIL), (HEAD, TAIL), (ALL, ALL, MID), ()], ids=["two", "slices", "three", "none"])
def test_partial_sum_result_into_another_tensor(sels):
    """Where no term lives in ``out`` the sum is copied there: the same bits as without ``out``."""
    parts = [_spread(2, take(torch.empty(SHAPE[1]), s, 0).numel(), 3, 5, seed=20 + i) for i, s in enumerate(sels)]
    sums = []
    for out in (None, torch.full((2, 24, 2, 3, 5), float("nan"), dtype=BF16)[:, :, 1]):
        acc = PartialSum(SHAPE, BF16, "cpu", 1)
        for s, p in zip(sels, parts):
            acc.add(s, p.clone())
        got = acc.result(BF16, out=out)
        assert out is None or got is out
        sums.append(got.contiguous())
    assert _same(*sums)


def test_partial_sum_start_and_float32_result():
    """A received single-term start plus own terms; the float32 result (a later hop's message) keeps
    the second term unrounded, and the kernel-dtype result of the same terms rounds it once."""
    start, own = _spread(*SHAPE, seed=3), _spread(2, 16, 3, 5, seed=4)
    want = start.float()
    want[:, MID] += own.float()
    for dtype in (F32, BF16):
        acc = PartialSum(SHAPE, BF16, "cpu", 1, start=start.clone())
        acc.add(MID, own)
        got = acc.result(dtype)
        assert _same(got, want.to(dtype)) if dtype == BF16 else torch.equal(got, want)


def test_partial_sum_index_selection_sums_in_float32():
    """Varlen: index-tensor selections keep the float32 sum."""
    idx = torch.tensor([1, 5, 6, 20])
    first, second = _spread(*SHAPE, seed=5), _spread(2, 4, 3, 5, seed=6)
    acc = PartialSum(SHAPE, BF16, "cpu", 1)
    acc.add(ALL, first.clone())
    acc.add(idx, second)
    assert acc.value.dtype == F32
    want = first.float().index_add_(1, idx, second.float())
    assert _same(acc.result(BF16), want.to(BF16))


def test_partial_sum_float64_unchanged():
    parts = [torch.randn(SHAPE, dtype=torch.float64) for _ in range(3)]
    acc = PartialSum(SHAPE, torch.float64, "cpu", 1)
    for p in parts:
        acc.add(ALL, p.clone())
    assert torch.equal(acc.result(torch.float64), parts[0] + parts[1] + parts[2])


# --- OutputAccumulator -------------------------------------------------------------------------

def _block(rows: int, seed: int, dtype=BF16):
    g = torch.Generator().manual_seed(seed)
    out = torch.randn(2, rows, 3, 5, generator=g).to(dtype)
    lse = (torch.randn(2, rows, 3, generator=g) * 3).to(torch.float64 if dtype == torch.float64 else F32)
    lse[0, :2, 0] = float("-inf")  # rows that saw no key in this block (their out is 0)
    out[0, :2, 0] = 0
    return out, lse


def _float32_merge(blocks, dtype):
    """Today's merge written out: every block merged into a float32 (float64) sum, rounded at the end."""
    wide = torch.float64 if dtype == torch.float64 else F32
    out, lse = torch.zeros(SHAPE, dtype=wide), torch.full(SHAPE[:-1], float("-inf"), dtype=wide)
    for sel, (o, l) in blocks:
        merge_(take(out, sel, 1), take(lse, sel, 1), o, l)
    return out.to(dtype), lse


@pytest.mark.parametrize("sels", [(ALL, ALL), (ALL, TAIL), (HEAD, ALL), (HEAD, TAIL), (HEAD, slice(16, 24))],
                         ids=["whole+whole", "whole+slice", "slice+whole", "slice+slice", "disjoint"])
@pytest.mark.parametrize("dtype", [BF16, torch.float64])
def test_output_accumulator_two_blocks(sels, dtype):
    blocks = [(s, _block(take(torch.empty(SHAPE[1]), s, 0).numel(), seed=i, dtype=dtype))
              for i, s in enumerate(sels)]
    want_out, want_lse = _float32_merge(blocks, dtype)
    for merges_once in (True, False):
        acc = OutputAccumulator(torch.empty(SHAPE, dtype=dtype), 1, merges_once=merges_once)
        first_out = blocks[0][1][0].clone()
        acc.add(sels[0], first_out, blocks[0][1][1].clone())
        acc.add(sels[1], *blocks[1][1])
        if dtype == BF16 and merges_once:  # merged into the first block's out, never widened as a whole
            assert acc.out.dtype == BF16
            assert sels[0] != ALL or acc.out.data_ptr() == first_out.data_ptr()
        got = acc.out.to(dtype)
        assert _same(got, want_out) if dtype == BF16 else torch.equal(got, want_out)
        assert torch.equal(acc.lse, want_lse)


# --- the ring: which dtype the dK/dV sums travel in ----------------------------------------------

def _plan(layout, R, r, causal=True, window=(None, None), n=16, cu=None):
    mesh = rank_coordinates(ring_size=R, ring_rank=r)
    q = torch.zeros((n, 2, 8) if cu else (1, n, 2, 8), dtype=BF16)  # varlen: (tokens, heads, head_dim)
    return StepPlan(RingSpec(mesh, layout, causal, 1.0, window, "auto", cu), q, q)


def _send_dtypes(R, **kw):
    """Per backward hop, the set of dtypes the ring ranks send dK/dV in."""
    plans = [_plan(R=R, r=r, **kw) for r in range(R)]
    return [{p.grad_send_dtype(step, BF16) for p in plans} for step in range(R - 1)]


@pytest.mark.parametrize("layout", ["contiguous", "zigzag", "stripe"])
@pytest.mark.parametrize("causal", [True, False])
def test_two_ranks_send_bf16(layout, causal):
    assert _send_dtypes(2, layout=layout, causal=causal) == [{BF16}]
    assert all(_plan(layout, 2, r, causal).merges_once for r in range(2))


def test_later_hops_and_varlen_send_float32():
    assert _send_dtypes(4, layout="zigzag") == [{BF16}, {F32}, {F32}]
    assert _send_dtypes(2, layout="zigzag", cu=(0, 8, 16)) == [{F32}]
    assert not _plan("zigzag", 2, 0, cu=(0, 8, 16)).merges_once
    assert not any(_plan("zigzag", 4, r).merges_once for r in range(4))  # rows get four blocks


def test_first_hop_decided_by_every_rank():
    """Zigzag with a left window, not causal, on 4 local tokens: rank 0's first-hop calls cover a key
    row twice, rank 1's (its two chunks one run) each once; both send float32, since the receive
    buffers are made like the tensors sent."""
    kw = dict(layout="zigzag", R=2, causal=False, window=(3, None), n=4)
    assert [_plan(r=r, **kw)._first_hop_single for r in range(2)] == [False, False]
    assert _send_dtypes(**kw) == [{F32}]


# --- the ring in bfloat16 on 2 and 4 gloo ranks, against the previous implementation's numbers ----

def _previous_ring(specs, q, k, v, dout):
    """What the previous implementation computed for every ring rank: outputs merged in float32 and
    gradients summed in float32 in the backward's order (the owner's sum from the rank after it down
    to itself), each rounded once at the end."""
    R = len(specs)
    plans = [StepPlan(s, q[r], k[r]) for r, s in enumerate(specs)]
    outs, lses = [], []
    for r in range(R):
        out, lse = torch.zeros(q[r].shape), torch.full(q[r].shape[:-1], float("-inf"))
        for step, calls in enumerate(plans[r].steps):
            kv = (r - step) % R
            for call in calls:
                o, l = plans[r].forward(call, q[r], k[kv], v[kv])
                merge_(take(out, call.q_sel, 1), take(lse, call.q_sel, 1), o, l)
        outs.append(out.to(BF16))
        lses.append(lse)
    dq, dk, dv = ([torch.zeros(t.shape) for t in ts] for ts in (q, k, v))
    for hop in range(R):
        for r in range(R):
            kv = (r + 1 + hop) % R
            lse_k = lses[r].transpose(-1, -2).contiguous()
            for call in plans[r].steps[R - 1 - hop]:
                gq, gk, gv = plans[r].backward(call, dout[r], q[r], k[kv], v[kv], outs[r], lse_k)
                take(dq[r], call.q_sel, 1).add_(gq)
                take(dk[kv], call.k_sel, 1).add_(gk)
                take(dv[kv], call.k_sel, 1).add_(gv)
    return outs, [[t.to(BF16) for t in ts] for ts in (dq, dk, dv)]


def bf16_ring_case(layout, causal, window=(-1, -1), seq=64):
    """One rank of a pure ring in bfloat16: output and gradients bit for bit the previous
    implementation's; returns the dtypes of the backward's messages."""
    R = torch.distributed.get_world_size()
    mesh = lightning_sp.init_sp_mesh(ulysses_degree=1, ring_degree=R)
    g = torch.Generator().manual_seed(7)
    full = [torch.randn(2, seq, h, 16, generator=g) for h in (4, 2, 2, 4)]  # q, k, v, dout; GQA
    shards = [[t.index_select(1, L.ring_rank_indices(seq, layout, R, r)).to(BF16) for r in range(R)] for t in full]
    scale = 0.7 / 16 ** 0.5
    win = tuple(None if w < 0 else w for w in window)
    specs = [RingSpec(replace(mesh, ring_rank=r), L.canonical_layout(layout), causal, scale, win, "auto")
             for r in range(R)]
    want_out, (want_dq, want_dk, want_dv) = _previous_ring(specs, *shards)

    sent = []

    class Recording(ring_mod.RingExchange):
        def __init__(self, mesh, reverse=False):
            super().__init__(mesh, reverse=reverse)
            self.reverse = reverse

        def start(self, tensors):
            if self.reverse:
                sent.append(tuple(str(t.dtype) for t in tensors))
            return super().start(tensors)

    me, exchange = mesh.ring_rank, ring_mod.RingExchange
    q, k, v = [shards[i][me].clone().requires_grad_() for i in range(3)]
    ring_mod.RingExchange = Recording
    try:
        attn = lightning_sp.LongContextAttention(mesh, ring_impl=layout)
        out = attn(q, k, v, causal=causal, softmax_scale=scale, window_size=window)
        out.backward(shards[3][me])
    finally:
        ring_mod.RingExchange = exchange
    for name, got, want in [("out", out, want_out[me]), ("dq", q.grad, want_dq[me]), ("dk", k.grad, want_dk[me]),
                            ("dv", v.grad, want_dv[me])]:
        assert got.dtype == BF16 and torch.equal(got, want), f"{name} differs from the previous implementation"
    return sent


@pytest.mark.parametrize("world,layout,causal,window", [
    (2, "zigzag", True, (-1, -1)), (2, "zigzag", False, (-1, -1)), (2, "contiguous", True, (-1, -1)),
    (2, "contiguous", False, (-1, -1)), (2, "stripe", True, (-1, -1)), (2, "zigzag", False, (3, 2)),
    (4, "zigzag", True, (-1, -1)), (4, "contiguous", False, (-1, -1))])
def test_bf16_ring_matches_previous(worlds, world, layout, causal, window):
    sent = worlds(world).run(bf16_ring_case, layout, causal, window, timeout=180)
    bf16, f32 = ("torch.bfloat16",) * 2, ("torch.float32",) * 2
    # the backward sends R-2 K/V blocks (bf16) and R-1 dK/dV sums: the first hop's in bf16, the rest float32
    for messages in sent:
        assert sorted(messages) == sorted([bf16] * (world - 2) + [bf16] + [f32] * (world - 2))
