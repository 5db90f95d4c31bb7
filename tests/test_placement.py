"""Packed documents placed on ring ranks by causal work (lightning_sp.core.placement), one process.

The issue's batches come from benchmark/benchmark_documents.py's ``distribution`` (S = 131072):
one document of 131,072 tokens; 16 x 8,192; 128 x 1,024; mixed = one 65,536-token document, then
lognormal lengths ``round(2048 * exp(z))`` clipped to [1, 16384], with
``z = torch.randn(64, generator=torch.Generator().manual_seed(0), dtype=torch.float64)`` taken in
order until 131,072 tokens, the last one truncated.
"""
from __future__ import annotations

import importlib.util
import os
import random
import sys

import pytest
import torch

from lightning_sp.core import placement as P
from lightning_sp.core.errors import SPConfigError
from lightning_sp.core.kernels.reference import block_mask
from lightning_sp.core.layout import ring_rank_indices, shard_documents
from lightning_sp.core.mesh import rank_coordinates

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _benchmark():
    spec = importlib.util.spec_from_file_location("benchmark_documents",
                                                  os.path.join(ROOT, "benchmark", "benchmark_documents.py"))
    module = sys.modules[spec.name] = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


DISTRIBUTION = _benchmark().distribution


def cu(lengths) -> torch.Tensor:
    return torch.tensor([0, *lengths]).cumsum(0)


def slot_docs(p: P.DocumentPlacement) -> list[torch.Tensor]:
    """Per ring rank: the document number of every local slot, -1 for filler."""
    out = []
    for pieces in p.pieces:
        parts = [torch.full((p.documents[d].piece_length,), d) for d, _ in pieces]
        out.append(torch.cat(parts + [torch.full((p.tokens_per_rank - sum(map(len, parts)),), -1)]))
    return out


def check_layout(p: P.DocumentPlacement, lengths) -> None:
    """Every token once; every document whole on one rank or in zigzag pieces over its sub-ring with the
    least padding; spanning pieces first, filler last; positions, cu_seqlens and buffer sizes agree."""
    R, U, T = p.ring_size, p.ulysses_size, p.tokens_per_rank
    assert T % U == 0 and len(p.pieces) == R
    assert [d.length for d in p.documents] == [n for n in lengths if n > 0]
    real = torch.cat([p.token_index(r) for r in range(R)])
    assert torch.equal(real[real >= 0].sort().values, torch.arange(sum(lengths)))  # every token exactly once
    for r in range(R):
        assert p.token_index(r).shape == p.position_ids(r).shape == (T,)
        used = int(p.cu_seqlens[r][-1])
        assert (p.token_index(r)[used:] == -1).all() and (p.position_ids(r)[used:] == 0).all()  # filler at the end
        spans = [p.documents[d].spans for d, _ in p.pieces[r]]
        assert spans == sorted(spans, reverse=True)  # spanning pieces first
    for d, doc in enumerate(p.documents):
        k = len(doc.ranks)
        assert len(set(doc.ranks)) == k and doc.piece_length * k == doc.padded_length
        if k == 1:
            assert doc.padded_length == doc.length
        else:  # the zigzag rule's multiple, padded no more than needed
            assert doc.padded_length % (2 * k) == 0 and doc.length <= doc.padded_length < doc.length + 2 * k
        for j, rank in enumerate(doc.ranks):
            at = p.piece_starts[rank][p.pieces[rank].index((d, j))]
            piece = slice(at, at + doc.piece_length)
            assert int(p.cu_seqlens[rank][p.pieces[rank].index((d, j))]) == at
            pos = ring_rank_indices(doc.padded_length, "zigzag", k, j) if k > 1 else torch.arange(doc.length)
            assert torch.equal(p.position_ids(rank)[piece], pos)
            assert torch.equal(p.token_index(rank)[piece], torch.where(pos < doc.length, pos + doc.start, -1))


def brute_force_pairs(p: P.DocumentPlacement) -> list[int]:
    """Per ring rank: query slots times the key slots anywhere on the ring of the same document at
    positions within [pos - window, pos]."""
    docs, pos = torch.cat(slot_docs(p)), torch.cat([p.position_ids(r) for r in range(p.ring_size)])
    window = p.window if p.window is not None else 1 << 40
    out = []
    for r, dq in enumerate(slot_docs(p)):
        pq = p.position_ids(r)
        ok = (dq[:, None] == docs[None]) & (dq[:, None] >= 0)
        gap = pq[:, None] - pos[None]
        out.append(int((ok & (gap >= 0) & (gap <= window)).sum()))
    return out


def check_blocks(p: P.DocumentPlacement, window=...) -> None:
    """The blocks of every ring step for a left ``window`` (default: the placement's) cover exactly the
    attention mask, each (query, key) pair once."""
    R, T = p.ring_size, p.tokens_per_rank
    docs, pos = torch.cat(slot_docs(p)), torch.cat([p.position_ids(r) for r in range(p.ring_size)])
    left = p.window if window is ... else window
    left = left if left is not None else 1 << 40
    for r in range(R):
        got = torch.zeros(T, R * T, dtype=torch.int64)
        for step, blocks in enumerate(p.step_blocks(r, window=window)):
            for b in blocks:
                d = p.documents[b.document]
                assert b.source == d.ranks[(d.ranks.index(r) - step) % len(d.ranks)]  # the sub-ring's rotation
                mask = block_mask(b.q_stop - b.q_start, b.k_stop - b.k_start, b.causal, b.window, "cpu")
                got[b.q_start:b.q_stop, b.source * T + b.k_start:b.source * T + b.k_stop] += (
                    1 if mask is None else mask.long())
        dq, pq = slot_docs(p)[r], p.position_ids(r)
        gap = pq[:, None] - pos[None]
        want = (dq[:, None] == docs[None]) & (dq[:, None] >= 0) & (gap >= 0) & (gap <= left)
        assert torch.equal(got, want.long())


def excess(p, max_imbalance=1.03, max_padding=0.01) -> float:
    return max(p.balance / max_imbalance, (1 + p.padding) / (1 + max_padding))


# ---------------------------------------------------------------------------------------------
# The issue's batches


@pytest.mark.parametrize("ulysses", [1, 2])
@pytest.mark.parametrize("ring", [2, 4, 8, 16, 64])
@pytest.mark.parametrize("name", ["one", "16x8k", "128x1k", "mixed"])
def test_issue_batches_are_balanced_by_work(name, ring, ulysses):
    lengths, _ = DISTRIBUTION(name)
    p = P.place_documents(cu(lengths), ring, ulysses)
    check_layout(p, lengths)
    assert p.balance <= 1.03, (p.balance, p.attended_pairs)
    spread = P.spread_documents(cu(lengths), ring, ulysses)
    assert sum(map(sum, p.step_tokens)) <= sum(map(sum, spread.step_tokens))
    spanning = [len(d.ranks) for d in p.documents if d.spans]
    if name == "one":  # longer than a rank's share: over every rank, as today
        assert spanning == [ring] and p.padding == 0
    elif name == "16x8k":  # whole while 16 documents fill the ranks, then each over as few ranks as its tokens need
        assert spanning == ([] if ring <= 16 else [ring // 16] * 16) and p.padding == 0
    elif name == "128x1k":  # no document spans, so no K/V travels
        assert spanning == [] and p.padding == 0 and not any(map(any, p.step_tokens))
    else:
        assert p.padding <= 0.01


@pytest.mark.parametrize("ulysses", [1, 2])
def test_mixed_batch_padding_at_every_ring_size(ulysses):
    lengths, _ = DISTRIBUTION("mixed")
    for ring in range(2, 65):
        p = P.place_documents(cu(lengths), ring, ulysses)
        assert p.padding <= 0.01 and p.balance <= 1.03, (ring, p.padding, p.balance)
        assert p.tokens_per_rank % ulysses == 0


def test_a_document_that_fits_is_split_when_whole_it_breaks_the_balance():
    # 1000 tokens fit a rank's share (1000 of 2000), but whole they are 99.8% of the work
    lengths = [1000] + [1] * 1000
    p = P.place_documents(cu(lengths), 2)
    assert p.documents[0].ranks in ((0, 1), (1, 0)) and p.balance <= 1.03
    assert all(not d.spans for d in p.documents[1:]) and p.padding == 0


def modelled_costs(p, row_cost=P.ROW_COST) -> list[int]:
    """Every rank's time by the placement's kernel-time model, counted from the blocks its ring steps
    compute: attended pairs plus row_cost per query and key row of every block."""
    rows = [sum(b.q_stop - b.q_start + b.k_stop - b.k_start for step in p.step_blocks(r) for b in step)
            for r in range(p.ring_size)]
    return [w + row_cost * n for w, n in zip(p.attended_pairs, rows)]


def test_mixed_batch_at_ring_8_is_placed_for_the_slowest_rank():
    # least traffic within the targets left the slowest rank 2.2% above the mean by the model (a whole
    # 5,564-token document on top of its pieces); the model and the search bring it within 1%
    lengths, _ = DISTRIBUTION("mixed")
    p = P.place_documents(cu(lengths), 8)
    costs = modelled_costs(p)
    assert p.balance <= 1.03 and p.padding <= 0.01
    assert max(costs) <= 1.01 * sum(costs) / 8, max(costs) * 8 / sum(costs)


def test_balance_comes_before_the_model_where_the_padding_target_cannot_be_met():
    # 103 tokens over 8 ranks need more than 1% padding whatever the placement; among such candidates
    # the balance target is still met where one meets it, before the kernel-time model decides
    p = P.place_documents(cu([97, 1, 5]), 8)
    assert p.padding > 0.01 and p.balance <= 1.03, p.balance


def test_refine_lowers_the_modelled_slowest_rank_within_the_budgets():
    rng = random.Random(5)
    for case in range(30):
        R = rng.choice([2, 3, 4, 8])
        lengths = [rng.choice([1, 3, 16, 40, 200, 900]) for _ in range(rng.randint(1, 20))]
        assignment = []
        for n in lengths:  # anywhere, whole or over a random sub-ring: a bad start
            ranks = tuple(sorted(rng.sample(range(R), rng.choice([1, 1, min(2, R), R]))))
            assignment.append((ranks, P.split_shares(n, len(ranks))[0]))
        cost = rng.choice([0, 5, 500])
        loads = P._Loads(lengths, assignment, R, None, cost)
        before, tokens, pairs = loads.largest_cost(), max(loads.tokens) + 8, max(loads.pairs)
        P._refine(loads, tokens, pairs)
        assert loads.largest_cost() <= before
        assert max(loads.tokens) <= tokens and max(loads.pairs) <= pairs
        # what the search kept track of is what the assignment it left counts
        fresh = P._Loads(lengths, loads.assignment, R, None, cost)
        assert (fresh.pairs, fresh.rows, fresh.tokens) == (loads.pairs, loads.rows, loads.tokens)
        for n, (ranks, padded) in zip(lengths, loads.assignment):
            assert len(set(ranks)) == len(ranks) and list(ranks) == sorted(ranks)
            assert padded == P.split_shares(n, len(ranks))[0]
    # four equal documents on one of two ranks: two move
    loads = P._Loads([8] * 4, [((0,), 8)] * 4, 2, None, 0)
    P._refine(loads, 32, 10 ** 6)
    assert loads.pairs == [72, 72] and loads.rows == [32, 32]


# ---------------------------------------------------------------------------------------------
# Predictions against brute force


RANDOM_CASES = [
    ([1, 1, 1, 7, 2, 30, 1], 2, 1, None), ([5, 4, 21, 1, 33], 2, 2, None), ([17, 3, 1, 64, 9, 9, 2], 3, 1, None),
    ([40, 1, 1, 1, 12, 5], 4, 2, None), ([25, 6, 6, 11, 1], 4, 1, 3), ([50, 7, 1], 2, 1, 0), ([31, 2, 19], 3, 2, 5),
    ([2] * 40 + [1] * 30, 4, 1, None), ([8], 1, 2, None), ([90, 3, 3], 8, 1, None),
]


@pytest.mark.parametrize("lengths,ring,ulysses,window", RANDOM_CASES)
@pytest.mark.parametrize("layout", ["placed", "spread"])
def test_predicted_pairs_and_blocks_match_brute_force(lengths, ring, ulysses, window, layout):
    make = P.place_documents if layout == "placed" else P.spread_documents
    p = make(cu(lengths), ring, ulysses, window=window)
    check_layout(p, lengths)
    assert list(p.attended_pairs) == brute_force_pairs(p)
    check_blocks(p)
    for other in (None, 0, 3):  # any causal left window on the same pieces
        check_blocks(p, other)


@pytest.mark.parametrize("lengths,ring,ulysses,window", [c for c in RANDOM_CASES if c[3] is None])
def test_modelled_rows_are_the_rows_of_the_planned_blocks(lengths, ring, ulysses, window):
    p = P.place_documents(cu(lengths), ring, ulysses)
    loads = P._Loads(lengths, [(d.ranks, d.padded_length) for d in p.documents], ring, None, 1)
    assert loads.rows == [c - w for c, w in zip(modelled_costs(p, 1), p.attended_pairs)]


def test_document_pairs_and_zigzag_shares():
    for n in (1, 2, 7, 64, 100):
        for window in (None, 0, 1, 5, 99):
            rows = torch.arange(n)
            want = int((torch.minimum(rows, torch.tensor(window if window is not None else n)) + 1).sum())
            assert P.document_pairs(n, window) == want
            for k in (2, 3, 5):
                padded, shares = P.split_shares(n, k, window)
                assert sum(shares) == P.document_pairs(padded, window)
                if window is None:
                    assert len(set(shares)) == 1  # the zigzag rule: every piece the same work


def test_step_tokens_hand_computed():
    # two documents over 2 ranks: 5 -> padded 8 (pieces of 4), 4 -> pieces of 2: 6 tokens each way at step 1
    p = P.spread_documents(cu([5, 4]), 2)
    assert p.step_tokens == ((0, 6), (0, 6)) and p.step_bytes(10) == ((0, 60), (0, 60))
    # 16 x 8K over 64 ranks: sub-rings of 4, each rank passes 2048 tokens at steps 1-3, nothing after
    lengths, _ = DISTRIBUTION("16x8k")
    p = P.place_documents(cu(lengths), 64)
    assert all(steps == (0, 2048, 2048, 2048) + (0,) * 60 for steps in p.step_tokens) and p.ring_steps == 4
    # no document spans: nothing travels
    assert not any(map(any, P.place_documents(cu([100] * 8), 4).step_bytes(1024)))


def test_step_tokens_simulated():
    """Rotate every sub-ring's blocks member to member and count what each rank sends per step."""
    rng = random.Random(3)
    for _ in range(20):
        lengths = [rng.choice([1, 2, 5, 40, 120]) for _ in range(rng.randint(1, 12))]
        p = P.place_documents(cu(lengths), rng.choice([2, 3, 4, 6]))
        sent = [[0] * p.ring_size for _ in range(p.ring_size)]
        for doc in p.documents:
            holding = list(range(len(doc.ranks)))  # member j holds the block of member holding[j]
            for step in range(1, len(doc.ranks)):
                for j, rank in enumerate(doc.ranks):
                    sent[rank][step] += doc.piece_length  # its current block goes to member j+1
                holding = holding[-1:] + holding[:-1]
            assert holding == [(j - len(doc.ranks) + 1) % len(doc.ranks) for j in range(len(doc.ranks))]
        assert [list(s) for s in p.step_tokens] == sent


@pytest.mark.parametrize("ring", [2, 3, 4])  # (on one rank it holds documents whole, unpadded)
def test_spread_is_todays_per_document_zigzag(ring):
    lengths = [5, 1, 16, 9, 2]
    spread = P.spread_documents(cu(lengths), ring)
    for r in range(ring):
        today = shard_documents(cu(lengths), rank_coordinates(ring, 1, r), "zigzag")
        assert torch.equal(spread.token_index(r), today.token_index)
        assert torch.equal(spread.position_ids(r), today.position_ids)
        assert torch.equal(spread.cu_seqlens[r], today.cu_seqlens)


# ---------------------------------------------------------------------------------------------
# Random batches


def _random_batches():
    rng = random.Random(0)
    yield [rng.randint(1, 4) for _ in range(300)]  # hundreds of tiny documents
    yield [1] * 50 + [rng.randint(1, 200) for _ in range(40)]
    for _ in range(6):  # 1-token documents beside documents longer than a rank's share
        yield [rng.choice([1, 1, 2, 3, rng.randint(4, 64), rng.randint(200, 900)]) for _ in range(rng.randint(1, 60))]


@pytest.mark.parametrize("ulysses", [1, 2])
@pytest.mark.parametrize("ring", [1, 2, 3, 4, 8])
def test_random_batches(ring, ulysses):
    for lengths in _random_batches():
        p = P.place_documents(cu(lengths), ring, ulysses)
        check_layout(p, lengths)
        spread = P.spread_documents(cu(lengths), ring, ulysses)
        # never further from the targets than today's per-document zigzag (always a candidate)
        assert excess(p) <= excess(spread) + 1e-12
        if excess(spread) <= 1:
            assert p.balance <= 1.03 and p.padding <= 0.01
        if sum(lengths) <= 1500:
            assert list(p.attended_pairs) == brute_force_pairs(p)


def test_shard_and_local_indices():
    lengths = [7, 1, 30, 2, 12]
    p = P.place_documents(cu(lengths), 2, 2)
    x = torch.arange(sum(lengths)).mul(10).view(-1, 1).expand(-1, 3)
    for r in range(2):
        for u in range(2):
            idx = p.local_indices(r, u)
            assert torch.equal(idx, p.token_index(r).chunk(2)[u]) and len(idx) == p.tokens_per_rank // 2
            got = p.shard(x, r, u, dim=0, pad_value=-5)
            assert torch.equal(got[:, 0], torch.where(idx >= 0, idx * 10, -5))
    assert torch.equal(p.shard(x.t(), 1, 0, dim=1), p.shard(x, 1, 0).t())
    with pytest.raises(SPConfigError, match="tensor has 51 tokens along dim 0, the placement has 52"):
        p.shard(x[:51], 0)


def test_spanning_pieces_come_first_largest_sub_ring_first():
    """Each rank's pieces: spanning ones by decreasing sub-ring size (then document order), then whole
    documents in document order; so the pieces still moving at a ring step are a prefix of the buffer."""
    lengths, _ = DISTRIBUTION("mixed")
    for ring in (4, 8, 16):
        p = P.place_documents(torch.tensor([0, *lengths]).cumsum(0), ring, 1)
        for pieces in p.pieces:
            docs = [p.documents[d] for d, _ in pieces]
            key = [(not d.spans, -len(d.ranks) if d.spans else 0, d.index) for d in docs]
            assert key == sorted(key)
        assert len({len(d.ranks) for d in p.documents if d.spans}) > 1  # sub-rings of several sizes


@pytest.mark.parametrize("ring", [4, 8])
def test_plan_gathers_only_rows_that_are_not_one_run(ring):
    """A call takes rows by an index (a gather: a copy of q, k, v, and in the backward of dout and out)
    only where its rows are not one contiguous run: the calls list their documents in key order, so a
    step's received blocks are one slice, and a rank's pieces still moving at a step lie back to back.
    The issue's mixed batch, where ranks hold pieces of several sub-rings."""
    from lightning_sp.core.attention.placed_plan import PlacedPlan
    from lightning_sp.core.attention.ring import RingSpec

    lengths, _ = DISTRIBUTION("mixed")
    placement = P.place_documents(cu(lengths), ring, 1)
    assert sum(d.spans for d in placement.documents) > 1
    received_as_one_slice = 0
    for r in range(ring):
        x = torch.zeros(placement.tokens_per_rank, 1, 8, dtype=torch.float64)
        plan = PlacedPlan(RingSpec(rank_coordinates(ring, 1, r), "zigzag", True, 1.0, (None, None), "auto"),
                          placement, x, x)
        for s, calls in enumerate(plan.steps):
            for call in calls:
                for sel in (call.q_sel, call.k_sel):
                    if isinstance(sel, torch.Tensor):
                        rows = sel.tolist()
                        assert sorted(rows) != list(range(min(rows), max(rows) + 1)), (r, s, rows[:8])
                received_as_one_slice += s > 0 and len(call.cu_k) > 2 and isinstance(call.k_sel, slice)
    assert received_as_one_slice  # blocks of several documents, received from peers, taken without a copy


def test_errors_name_the_value():
    with pytest.raises(SPConfigError, match=r"cu_seqlens must be a 1-D non-decreasing sequence starting at 0, got \[0, 5, 3\]"):
        P.place_documents([0, 5, 3], 2)
    with pytest.raises(SPConfigError, match=r"holds no tokens"):
        P.place_documents([0, 0], 2)
    with pytest.raises(SPConfigError, match="ring_size must be a positive int, got 0"):
        P.place_documents([0, 4], 0)
    with pytest.raises(SPConfigError, match="ulysses_size must be a positive int, got 2.0"):
        P.spread_documents([0, 4], 2, 2.0)
    with pytest.raises(SPConfigError, match="window must be None or a left bound >= 0.*got -1"):
        P.place_documents([0, 4], 2, window=-1)
    with pytest.raises(SPConfigError, match="window must be None or a left bound >= 0.*got -2"):
        P.place_documents([0, 4], 2).step_blocks(0, window=-2)
    with pytest.raises(SPConfigError, match="max_imbalance must be >= 1"):
        P.place_documents([0, 4], 2, max_imbalance=0.9)
    with pytest.raises(SPConfigError, match="row_cost must be an int >= 0"):
        P.place_documents([0, 4], 2, row_cost=-1)
    # documents of length 0 (repeated offsets) are skipped
    p = P.place_documents([0, 3, 3, 8], 2)
    assert [(d.index, d.start, d.length) for d in p.documents] == [(0, 0, 3), (1, 3, 5)]
