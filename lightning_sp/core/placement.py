"""Packed documents placed on ring ranks by causal work.

Today's packed layout (:func:`lightning_sp.core.layout.shard_documents`) splits every document over
every ring rank, so every ring step carries every document's K/V. Here a document that can sit whole
on one rank does, and only documents that must span ranks are split, with the zigzag rule, over a
sub-ring of as few ranks as the balance needs. The K/V of a whole document never travels. What a
placement is and how its work is counted: :mod:`lightning_sp.core.placed_documents` (its names are
importable from here too).

The placement (:func:`place_documents`), documents longest first:

* a document goes whole onto one rank when some rank has the token room and the work stays under
  the cap (``max_imbalance`` x the mean) and, treating the documents still to come as a fluid, every
  group of ranks could still end under the cap even if it got the lightest of them;
* otherwise it is split over the smallest k for which k ranks have room for a piece and each one's
  *predicted* work stays under a soft target: its work so far plus its remaining token room filled
  at the remaining documents' average work per token. That prediction is what spreads a dominant
  document over (nearly) every rank: a rank left without a piece of it could not catch up with the
  shorter documents that remain;
* ranks are taken in order of that prediction: the lowest first for documents denser than the
  remainder's average, the highest first for lighter ones (they pull a rank's prediction down);
* a document no rank can take within the cap goes where it raises the largest work least.

That greedy runs for a few soft targets and token slacks, and the per-document zigzag of
:func:`spread_documents` is always a candidate, so the result is never worse balanced than it. Among
the candidates within ``max_imbalance`` and ``max_padding``, the one whose slowest rank is fastest by
a kernel-time model wins (ties: the least K/V traffic; one with no traffic at all is taken at
once): a rank's time is its attended pairs plus a cost per query and key row of its blocks
(``row_cost``; a document split over k ranks puts about 1.5 n rows on each), since a tighter
balance bought with more split documents costs more in their short blocks than it gains. A local
search (:func:`_refine`) then lowers that slowest rank further by moving, splitting or handing over
single documents within the same targets.

Only causal attention (optionally with a left window) is placed: the padding at a split
document's end is then invisible to its real tokens.
"""
from __future__ import annotations

import bisect

import torch

from .errors import SPConfigError
from .placed_documents import (DocumentPlacement, PlacedBlock, PlacedDocument, check_sizes,  # noqa: F401
                               document_pairs, split_shares)


def _documents(cu_seqlens) -> tuple[list[int], list[int]]:
    cu = torch.as_tensor(cu_seqlens).to("cpu", torch.int64)
    if cu.dim() != 1 or len(cu) < 2 or int(cu[0]) != 0 or bool((cu[1:] < cu[:-1]).any()):
        raise SPConfigError(f"cu_seqlens must be a 1-D non-decreasing sequence starting at 0, got {cu.tolist()}")
    bounds = cu.tolist()
    docs = [(a, b - a) for a, b in zip(bounds[:-1], bounds[1:]) if b > a]
    if not docs:
        raise SPConfigError(f"cu_seqlens {bounds} holds no tokens; a packed batch needs at least one token")
    return [a for a, _ in docs], [n for _, n in docs]


# The kernel-time model's cost per row of a block (a query row or a key row) beyond the block's
# attended pairs, in attended pairs: fitted to FA4's forward and backward on Hopper over the ranks of
# packed batches (benchmark/results/2026-12-06-run15/NOTES.md).
ROW_COST = 363


def _round_up(x: int, m: int) -> int:
    return -(-x // m) * m


def _assemble(starts, lengths, assignment, ring_size, ulysses_size, window):
    """The placement of ``assignment`` (per document: (ranks, padded length)); the buffer is the
    fullest rank's tokens rounded up to the Ulysses degree."""
    documents = tuple(PlacedDocument(i, starts[i], lengths[i], padded, tuple(ranks))
                      for i, (ranks, padded) in enumerate(assignment))
    held: list[list[tuple[int, int]]] = [[] for _ in range(ring_size)]
    # spanning pieces first, the largest sub-ring's first: the pieces still moving at any ring step
    # then lie back to back, so that step's calls take this rank's rows as one slice
    for doc in sorted(documents, key=lambda doc: (not doc.spans, -len(doc.ranks), doc.index)):
        for member, rank in enumerate(doc.ranks):
            held[rank].append((doc.index, member))
    fullest = max(sum(documents[d].piece_length for d, _ in p) for p in held)
    return DocumentPlacement(ring_size, ulysses_size, _round_up(max(fullest, 1), ulysses_size),
                             sum(lengths), window, documents, tuple(tuple(p) for p in held))


def spread_documents(cu_seqlens, ring_size: int, ulysses_size: int = 1, *, window: int | None = None) -> DocumentPlacement:
    """Today's per-document zigzag as a placement: every document padded to a multiple of 2R and
    split over all R ring ranks (the token layout of ``layout.shard_documents``, with the padding
    that makes the buffer divisible by the Ulysses degree as filler instead of a padding document)."""
    check_sizes(ring_size, ulysses_size, window)
    starts, lengths = _documents(cu_seqlens)
    ranks = tuple(range(ring_size))
    return _assemble(starts, lengths, [(ranks, split_shares(n, ring_size, window)[0]) for n in lengths],
                     ring_size, ulysses_size, window)


class _Greedy:
    """One greedy pass (see the module docstring) for a token capacity per rank and a soft target."""

    def __init__(self, lengths, ring_size, capacity, cap, target, window):
        self.R, self.T, self.cap, self.target, self.window = ring_size, capacity, cap, target, window
        self.order = sorted(range(len(lengths)), key=lambda i: (-lengths[i], i))
        self.ns = [lengths[i] for i in self.order]
        self.works = [document_pairs(n, window) for n in self.ns]
        self.ctok, self.cwork = [0], [0]
        for n, w in zip(self.ns, self.works):
            self.ctok.append(self.ctok[-1] + n)
            self.cwork.append(self.cwork[-1] + w)
        self.tokens, self.work = [0] * ring_size, [0] * ring_size

    def _lightest(self, i: int, count: int) -> float:
        """Work of the ``count`` lightest tokens of the documents after the i-th (a fluid: a document's
        work spread evenly over its tokens)."""
        N, x = self.ctok[-1], self.ctok[-1] - count
        if x <= self.ctok[i + 1]:
            return self.cwork[-1] - self.cwork[i + 1]
        j = bisect.bisect_right(self.ctok, x) - 1
        return self.cwork[-1] - self.cwork[j] - (x - self.ctok[j]) * self.works[j] / self.ns[j] if x < N else 0.0

    def _fluid_ok(self, i: int, rank: int, tokens: int, work: int) -> bool:
        """After adding (tokens, work) to ``rank``: can every group of ranks take its share of the
        remaining documents and stay under the cap? Groups are checked from the tightest (the least
        work headroom per token of room) up."""
        room = [self.T - t for t in self.tokens]
        head = [self.cap - w for w in self.work]
        room[rank] -= tokens
        head[rank] -= work
        if min(head) >= self.cwork[-1] - self.cwork[i + 1]:  # every rank could take all the rest
            return True
        slack = sum(room) - (self.ctok[-1] - self.ctok[i + 1])
        total_room, total_head = 0, 0.0
        for r in sorted(range(self.R), key=lambda r: head[r] / room[r] if room[r] > 0 else float("inf")):
            total_room += room[r]
            total_head += head[r]
            if total_head < self._lightest(i, max(0, total_room - slack)) - 1e-6:
                return False
        return True

    def _fewest(self, i: int) -> int:
        """A lower bound on the ranks the i-th document needs: a piece holds at least n/k tokens and
        n/k of the document's work, and must fit the roomiest rank."""
        room, head = self.T - min(self.tokens), self.cap - min(self.work)
        if room <= 0 or head <= 0:
            return self.R + 1
        return max(1, -(-self.ns[i] // room), int(-(-self.works[i] // head)))

    def place(self, i: int) -> tuple[list[int], int]:
        n, R, T = self.ns[i], self.R, self.T
        rest = self.ctok[-1] - self.ctok[i + 1]
        density = (self.cwork[-1] - self.cwork[i + 1]) / rest if rest else 0.0
        predicted = [w + (T - t) * density for w, t in zip(self.work, self.tokens)]
        heavy = self.works[i] >= n * density
        by_prediction = sorted(range(R), key=lambda r: ((predicted[r] if heavy else -predicted[r]), r))
        for k in range(self._fewest(i), R + 1):
            padded, shares = split_shares(n, k, self.window)
            piece, top = padded // k, max(shares)
            fits = [r for r in by_prediction if T - self.tokens[r] >= piece and self.work[r] + top <= self.cap]
            if len(fits) < k:
                continue
            if k == 1:
                ranks = next(([r] for r in fits[:4] if self._fluid_ok(i, r, n, shares[0])), None)
            else:
                ranks = sorted(fits[:k])
                if any(predicted[r] + s - piece * density > self.target for r, s in zip(ranks, shares)):
                    ranks = None
            if ranks:
                return self._take(ranks, piece, shares, padded)
        return self._fallback(n)

    def _fallback(self, n: int) -> tuple[list[int], int]:
        """Where the document raises the largest work least (token overflow first, then work)."""
        by_work = sorted(range(self.R), key=lambda r: (self.work[r], r))
        floor, best = max(self.work), None
        for k in range(min(self.R, max(1, -(-n // max(1, self.T - min(self.tokens))))), self.R + 1):
            padded, shares = split_shares(n, k, self.window)
            piece = padded // k
            room = [r for r in by_work if self.tokens[r] + piece <= self.T]
            if len(room) < k:  # overflow the ranks with the fewest tokens
                room += sorted((r for r in by_work if self.tokens[r] + piece > self.T), key=lambda r: (self.tokens[r], r))
            ranks = sorted(room[:k])
            score = (max(0, max(self.tokens[r] for r in ranks) + piece - self.T),
                     max(max(self.work[r] + s for r, s in zip(ranks, shares)), floor))
            if best is None or score < best[0]:
                best = (score, ranks, piece, shares, padded)
            if score == (0, floor):  # nothing can do better
                break
        return self._take(*best[1:])

    def _take(self, ranks, piece, shares, padded):
        for r, s in zip(ranks, shares):
            self.tokens[r] += piece
            self.work[r] += s
        return ranks, padded

    def run(self) -> list[tuple[list[int], int]]:
        placed = [self.place(i) for i in range(len(self.ns))]
        assignment = [None] * len(self.ns)
        for doc, where in zip(self.order, placed):
            assignment[doc] = where
        return assignment


def _traffic(assignment) -> int:
    """K/V tokens sent over all ring steps and ranks: a document over k ranks sends its padded length k-1 times."""
    return sum(padded * (len(ranks) - 1) for ranks, padded in assignment)


def block_rows(n: int, k: int, padded: int) -> int:
    """The query plus key rows of the blocks one rank computes (without a window) for a document of n
    tokens over k ranks, padded to ``padded``: whole, one causal n x n block; split with the zigzag rule
    into chunks of c, one causal 2c x 2c block of its own two chunks and one block of c x 2c or 2c x c
    at each other step."""
    return 2 * n if k == 1 else (3 * k + 1) * (padded // (2 * k))


class _Loads:
    """Per ring rank: the attended pairs, block rows and tokens of an assignment, kept up to date as
    documents change place. A rank's modelled kernel time is its pairs plus ``row_cost`` per block
    row (query or key): a fitted stand-in for the lower rate of shorter blocks, under which a document
    split over k ranks costs more than its pairs, about 1.5 n rows on each of them against 2 n once
    whole."""

    def __init__(self, lengths, assignment, ring_size, window, row_cost):
        self.lengths, self.window, self.row_cost = lengths, window, row_cost
        self.assignment = [(tuple(ranks), padded) for ranks, padded in assignment]
        self.pairs, self.rows, self.tokens = [0] * ring_size, [0] * ring_size, [0] * ring_size
        self._shares: dict = {}
        for d, where in enumerate(self.assignment):
            self._add(d, where, 1)

    def split(self, d: int, k: int) -> tuple[int, list[int]]:
        key = (self.lengths[d], k)
        if key not in self._shares:
            self._shares[key] = split_shares(*key, self.window)
        return self._shares[key]

    def _add(self, d: int, where, sign: int) -> None:
        ranks, padded = where
        rows = block_rows(self.lengths[d], len(ranks), padded)
        for r, share in zip(ranks, self.split(d, len(ranks))[1]):
            self.pairs[r] += sign * share
            self.rows[r] += sign * rows
            self.tokens[r] += sign * (padded // len(ranks))

    def move(self, d: int, where) -> tuple:
        """Put document d at ``where`` (ranks, padded length); returns where it was."""
        old = self.assignment[d]
        self._add(d, old, -1)
        self._add(d, where, 1)
        self.assignment[d] = where
        return old

    def cost(self, r: int) -> int:
        return self.pairs[r] + self.row_cost * self.rows[r]

    def largest_cost(self) -> int:
        return max(map(self.cost, range(len(self.pairs))))


def _refine(loads: _Loads, max_tokens: int, max_pairs: int, *, tries: int = 6, rounds: int = 24) -> None:
    """Lower the largest modelled rank time of ``loads`` in place (then the sum of squares, so that
    ranks tied at the top come down one by one), keeping every rank within ``max_tokens`` and
    ``max_pairs``. Each round takes the best single change that involves the costliest rank: one of
    its ``tries`` heaviest documents moved whole to another rank, split over it and another, or its
    piece of a split document handed to a rank outside the sub-ring or dropped (the sub-ring one
    smaller) or added to by one more rank; each alone or with a whole document of the rank that
    gained coming back to make room (the ``tries`` nearest in tokens to what it gained)."""
    R = len(loads.pairs)
    for _ in range(rounds):
        costs = [loads.cost(r) for r in range(R)]
        worst = max(range(R), key=costs.__getitem__)
        order = sorted(range(R), key=lambda r: -costs[r])
        square = sum(c * c for c in costs)
        best = ((costs[worst], square), None)
        held = [d for d, (ranks, _) in enumerate(loads.assignment) if worst in ranks]
        whole = [[] for _ in range(R)]
        for d, (ranks, _) in enumerate(loads.assignment):
            if len(ranks) == 1:
                whole[ranks[0]].append(d)

        def score(changes, touched):
            olds = [(d, loads.move(d, where)) for d, where in changes]
            ok = all(loads.tokens[r] <= max_tokens and loads.pairs[r] <= max_pairs for r in touched)
            result = None
            if ok:
                top = max([loads.cost(r) for r in touched] + [next((costs[r] for r in order if r not in touched), 0)])
                result = (top, square + sum(loads.cost(r) ** 2 - costs[r] ** 2 for r in touched))
            for d, where in reversed(olds):
                loads.move(d, where)
            return result

        for d in sorted(held, key=lambda d: -loads.split(d, len(loads.assignment[d][0]))[1][0])[:tries]:
            ranks, padded = loads.assignment[d]
            k = len(ranks)
            if k == 1:
                options = [((b,), loads.lengths[d]) for b in range(R) if b != worst]
                options += [(tuple(sorted((worst, b))), loads.split(d, 2)[0]) for b in range(R) if b != worst]
            else:
                rest = tuple(r for r in ranks if r != worst)
                options = [(rest, loads.split(d, k - 1)[0])]  # (k - 1 = 1: whole, unpadded)
                options += [(tuple(sorted(b if r == worst else r for r in ranks)), padded) for b in range(R) if b not in ranks]
                options += [(tuple(sorted(ranks + (b,))), loads.split(d, k + 1)[0]) for b in range(R) if b not in ranks]
            for where in options:
                gained = [r for r in where[0] if r not in ranks]
                touched = set(ranks) | set(where[0])
                candidates = [[(d, where)]]
                for b in gained:
                    need = where[1] // len(where[0])
                    back = sorted(whole[b], key=lambda e: abs(loads.lengths[e] - need))[:tries]
                    candidates += [[(d, where), (e, ((worst,), loads.lengths[e]))] for e in back]
                for changes in candidates:
                    result = score(changes, touched)
                    if result is not None and result < best[0]:
                        best = (result, changes)
        if best[1] is None:
            return
        for d, where in best[1]:
            loads.move(d, where)


def place_documents(cu_seqlens, ring_size: int, ulysses_size: int = 1, *, window: int | None = None,
                    max_imbalance: float = 1.03, max_padding: float = 0.01,
                    row_cost: int = ROW_COST) -> DocumentPlacement:
    """Place packed documents (global ``cu_seqlens`` of the unpadded packed sequence) on ``ring_size``
    ring ranks by causal work (see the module docstring). ``ulysses_size``: each ring rank's token
    count is made a multiple of it. ``window``: a left window bound, for the work count. The result
    is balanced within ``max_imbalance`` (largest rank's attended pairs over the mean) with at most
    ``max_padding`` padding whenever some candidate reaches both, else as close as the candidates get.
    ``row_cost``: what a kernel spends per query or key row of a block beyond its attended pairs, in
    attended pairs (the model that picks among the balanced placements; 0: pairs alone)."""
    check_sizes(ring_size, ulysses_size, window)
    if max_imbalance < 1 or max_padding < 0:
        raise SPConfigError(f"max_imbalance must be >= 1 and max_padding >= 0, got {max_imbalance}, {max_padding}")
    if not isinstance(row_cost, int) or isinstance(row_cost, bool) or row_cost < 0:
        raise SPConfigError(f"row_cost must be an int >= 0 (attended pairs per block row; 0: pairs alone), got {row_cost!r}")
    starts, lengths = _documents(cu_seqlens)
    R, N = ring_size, sum(lengths)
    spread = spread_documents(cu_seqlens, R, ulysses_size, window=window)
    if R == 1:
        return spread
    mean = sum(document_pairs(n, window) for n in lengths) / R

    def assignment(p: DocumentPlacement):
        return [(d.ranks, d.padded_length) for d in p.documents]

    def preference(p: DocumentPlacement):
        within = p.balance <= max_imbalance and p.padding <= max_padding
        excess = max(p.balance / max_imbalance, (1 + p.padding) / (1 + max_padding))
        slowest = _Loads(lengths, assignment(p), R, window, row_cost).largest_cost()
        return ((0, slowest, _traffic(assignment(p)), p.padding) if within
                else (1, excess, max(1.0, p.balance / max_imbalance), slowest, p.padding))

    candidates = [spread]
    for slack in (0.0, max_padding / 3, 2 * max_padding / 3):
        capacity = _round_up(-(-N // R) + int(slack * N / R), ulysses_size)
        for soft in (1.0, 1 + (max_imbalance - 1) / 3, 1 + 2 * (max_imbalance - 1) / 3, max_imbalance):
            placed = _Greedy(lengths, R, capacity, max_imbalance * mean, soft * mean, window).run()
            candidates.append(_assemble(starts, lengths, placed, R, ulysses_size, window))
            if _traffic(placed) == 0 and preference(candidates[-1])[0] == 0:
                return candidates[-1]  # within the targets with no ring traffic at all
    best = min(candidates, key=preference)
    if best is spread:
        return spread
    # the budgets: no rank fuller than the best candidate's fullest (no padding added for speed),
    # its pairs within the balance target (or as the best candidate has them where it misses it)
    loads = _Loads(lengths, assignment(best), R, window, row_cost)
    _refine(loads, max(loads.tokens), max(int(max_imbalance * mean), max(loads.pairs)))
    refined = _assemble(starts, lengths, loads.assignment, R, ulysses_size, window)
    return min((refined, best), key=preference)
