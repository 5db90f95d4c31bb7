"""Layouts and the ring block schedule, single process."""
import itertools

import pytest
import torch

from lightning_sp import SPConfigError
from lightning_sp import layout as L
from lightning_sp.core.mesh import rank_coordinates as mesh


def test_reference_definitions():
    # the reference system's layouts over 4 ring ranks of 16 tokens
    assert L.ring_rank_indices(16, "basic", 4, 1).tolist() == [4, 5, 6, 7]
    assert L.ring_rank_indices(16, "zigzag", 4, 1).tolist() == [2, 3, 12, 13]
    assert L.ring_rank_indices(16, "stripe", 4, 1).tolist() == [1, 5, 9, 13]


@pytest.mark.parametrize("layout", L.LAYOUTS)
@pytest.mark.parametrize("ring,ulysses", [(1, 1), (2, 1), (1, 2), (2, 2), (4, 2), (2, 4)])
def test_shards_partition_the_sequence(layout, ring, ulysses):
    S = 2 * L.layout_multiple(layout, mesh(ring, ulysses))
    seen = torch.cat([L.local_indices(S, mesh(ring, ulysses, r, u), layout)
                      for r in range(ring) for u in range(ulysses)])
    assert sorted(seen.tolist()) == list(range(S))
    # a ring rank's tokens, split contiguously over its ulysses ranks
    for r in range(ring):
        joined = torch.cat([L.local_indices(S, mesh(ring, ulysses, r, u), layout) for u in range(ulysses)])
        assert torch.equal(joined, L.ring_rank_indices(S, layout, ring, r))


def test_shard_and_position_ids_agree():
    x = torch.arange(2 * 32).view(2, 32)
    m = mesh(4, 2, ring_rank=1, ulysses_rank=1)
    assert torch.equal(L.shard(x, m, "zigzag")[0], L.position_ids(32, m, "zigzag"))
    assert L.position_ids(32, m, "zigzag").tolist() == [24, 25, 26, 27]  # chunk 6 of 8


def test_seq_len_error_names_multiple_and_fix():
    with pytest.raises(SPConfigError, match=r"sequence length 30 is not divisible by 16.*pad the sequence to 32"):
        L.shard(torch.zeros(1, 30), mesh(4, 2), "zigzag")


def test_unknown_layout():
    with pytest.raises(SPConfigError, match="unknown layout 'spiral'; choose one of basic, contiguous, zigzag, stripe"):
        L.canonical_layout("spiral")


def _mask_of(pairs, n):
    M = torch.zeros(n, n, dtype=torch.int64)
    for p in pairs:
        nq, nk = p.q_stop - p.q_start, p.k_stop - p.k_start
        d = torch.arange(nq)[:, None] + (nk - nq) - torch.arange(nk)[None, :]
        ok = torch.ones(nq, nk, dtype=torch.bool)
        if p.causal:
            ok &= d >= 0
        if p.window[0] is not None:
            ok &= d <= p.window[0]
        if p.window[1] is not None:
            ok &= d >= -p.window[1]
        M[p.q_start:p.q_stop, p.k_start:p.k_stop] += ok.long()
    return M


@pytest.mark.parametrize("layout", ["contiguous", "zigzag", "stripe"])
def test_block_schedule_reproduces_the_position_mask(layout):
    """Brute force: the kernel calls of every (q rank, kv rank) step cover exactly the allowed pairs, once."""
    windows = [(None, None), (3, None), (0, None), (5, 2), (None, 4), (1, 1), (7, 0)]
    for R, n, causal, window in itertools.product([1, 2, 3, 4], [4, 8, 12], [False, True], windows):
        for r, s in itertools.product(range(R), range(R)):
            qp = L.ring_rank_indices(n * R, layout, R, r)
            kp = L.ring_rank_indices(n * R, layout, R, s)
            d = qp[:, None] - kp[None, :]
            ok = torch.ones_like(d, dtype=torch.bool)
            if causal:
                ok &= d >= 0
            if window[0] is not None:
                ok &= d <= window[0]
            if window[1] is not None:
                ok &= d >= -window[1]
            got = _mask_of(L.block_schedule(layout, r, s, R, n, causal, window), n)
            assert torch.equal(got, ok.long()), (layout, R, n, causal, window, r, s)


@pytest.mark.parametrize("layout", ["contiguous", "zigzag", "stripe"])
def test_block_schedule_calls_are_plain(layout):
    """Every call is trimmed to the rows and keys its mask touches and its window bounds are never
    negative, so every kernel that takes windows (FA4 included) takes every call; a causal block with
    unequal sides (zigzag's middle rank holds its two chunks as one run) is bottom-right aligned, and
    ``square_causal`` makes it square, with the same mask, for kernels that need that."""
    windows = [(None, None), (3, None), (0, None), (5, 2), (None, 4), (1, 1), (7, 0), (2, 5), (0, 0)]
    for R, n, causal, window in itertools.product([1, 2, 3, 4], [2, 4, 8, 12], [False, True], windows):
        for r, s in itertools.product(range(R), range(R)):
            pairs = L.block_schedule(layout, r, s, R, n, causal, window)
            squared = L.square_causal(pairs)
            assert torch.equal(_mask_of(squared, n), _mask_of(pairs, n))
            for p in pairs + squared:
                assert all(w is None or w >= 0 for w in p.window), p
                assert p.q_stop > p.q_start and p.k_stop > p.k_start, p
            assert all(not p.causal or p.q_stop - p.q_start == p.k_stop - p.k_start for p in squared)
            if layout != "zigzag":
                assert squared == pairs  # only zigzag's merged middle run gives unequal causal blocks


def test_zigzag_middle_rank_runs_its_chunks_as_one():
    """The sub-ring's last member holds chunks R-1 and R, back to back: with a window, its local step
    is one call (the band between the chunks included), not three."""
    assert L.block_schedule("zigzag", 1, 1, 2, 8, True, (2, None)) == [L.BlockPair(0, 8, 0, 8, window=(2, 0))]
    assert len(L.block_schedule("zigzag", 0, 0, 2, 8, True, (2, None))) == 2  # chunks 0 and 3: apart


@pytest.mark.parametrize("window", [(None, None), (2, None), (None, 1), (3, 0)])
@pytest.mark.parametrize("nq,nk", [(3, 7), (7, 3), (5, 5), (1, 4), (4, 1)])
def test_square_causal_keeps_the_mask(nq, nk, window):
    """A causal block of unequal lengths (bottom-right) becomes calls with square causal blocks (or
    windows) that cover exactly the same pairs, once."""
    pair = L.BlockPair(0, nq, 0, nk, causal=True, window=window)
    n = max(nq, nk)
    fitted = L.square_causal([pair])
    assert torch.equal(_mask_of(fitted, n), _mask_of([pair], n))
    assert all(not p.causal or p.q_stop - p.q_start == p.k_stop - p.k_start for p in fitted)
    assert L.square_causal([L.BlockPair(0, 4, 0, 4, causal=True)]) == [L.BlockPair(0, 4, 0, 4, causal=True)]


@pytest.mark.parametrize("layout", ["zigzag", "stripe"])
def test_balanced_layouts_do_equal_causal_work(layout):
    R, n = 4, 16
    for step in range(R):
        work = []
        for r in range(R):
            pairs = L.block_schedule(layout, r, (r - step) % R, R, n, causal=True)
            work.append(int(_mask_of(pairs, n).sum()))
        # equal up to the diagonal (stripe) and within a rank's causal half-block
        assert max(work) - min(work) <= n, (layout, step, work)


def test_shard_documents_pads_each_document():
    cu = torch.tensor([0, 5, 12, 20])  # lengths 5, 7, 8
    m = mesh(2, 1, ring_rank=1)
    packed = L.shard_documents(cu, m, "zigzag")  # multiple 4 per document
    assert packed.padded_cu_seqlens.tolist() == [0, 8, 16, 24]
    assert packed.cu_seqlens.tolist() == [0, 4, 8, 12]
    # zigzag of an 8-slot document over 2 ranks: rank 1 holds chunks 1 and 2 of 4 -> slots 2,3,4,5
    assert packed.position_ids[:4].tolist() == [2, 3, 4, 5]
    assert packed.token_index[:4].tolist() == [2, 3, 4, -1]  # document 0 has 5 tokens
    x = torch.arange(20.0)
    assert packed.shard(x, pad_value=-1)[:4].tolist() == [2.0, 3.0, 4.0, -1.0]


def test_shard_documents_pads_for_ulysses():
    packed = L.shard_documents(torch.tensor([0, 6]), mesh(2, 2), "contiguous")
    # one 6-token document over 2 ring ranks, then a padding document so each ring share splits in 2
    assert packed.padded_cu_seqlens.tolist() == [0, 6, 8]
    assert packed.cu_seqlens.tolist() == [0, 3, 4]


def test_shard_documents_refuses_visible_padding():
    with pytest.raises(SPConfigError, match=r"documents of lengths \[5\] need padding to a multiple of 4"):
        L.shard_documents(torch.tensor([0, 8, 13]), mesh(2), "zigzag", causal=False)


def test_bad_cu_seqlens():
    with pytest.raises(SPConfigError, match="cu_seqlens must be a 1-D non-decreasing sequence starting at 0"):
        L.shard_documents(torch.tensor([1, 4]), mesh(2), "stripe")
