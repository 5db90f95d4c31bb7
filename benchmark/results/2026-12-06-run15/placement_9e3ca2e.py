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

That greedy runs for a few soft targets and token slacks; the candidate with the least K/V traffic
among those within ``max_imbalance`` and ``max_padding`` wins (a tighter balance bought with more
split documents costs more in their short kernel calls than it gains), and the per-document zigzag
of :func:`spread_documents` is always a candidate, so the result is never worse balanced than it.

Only causal attention (optionally with a left window) is placed: the padding at a split
document's end is then invisible to its real tokens.
"""
from __future__ import annotations

import bisect

import torch

from lightning_sp.core.errors import SPConfigError
from lightning_sp.core.placed_documents import (DocumentPlacement, PlacedBlock, PlacedDocument, check_sizes,  # noqa: F401
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


def place_documents(cu_seqlens, ring_size: int, ulysses_size: int = 1, *, window: int | None = None,
                    max_imbalance: float = 1.03, max_padding: float = 0.01) -> DocumentPlacement:
    """Place packed documents (global ``cu_seqlens`` of the unpadded packed sequence) on ``ring_size``
    ring ranks by causal work (see the module docstring). ``ulysses_size``: each ring rank's token
    count is made a multiple of it. ``window``: a left window bound, for the work count. The result
    is balanced within ``max_imbalance`` (largest rank's attended pairs over the mean) with at most
    ``max_padding`` padding whenever some candidate reaches both, else as close as the candidates get."""
    check_sizes(ring_size, ulysses_size, window)
    if max_imbalance < 1 or max_padding < 0:
        raise SPConfigError(f"max_imbalance must be >= 1 and max_padding >= 0, got {max_imbalance}, {max_padding}")
    starts, lengths = _documents(cu_seqlens)
    R, N = ring_size, sum(lengths)
    spread = spread_documents(cu_seqlens, R, ulysses_size, window=window)
    if R == 1:
        return spread
    mean = sum(document_pairs(n, window) for n in lengths) / R

    def preference(p: DocumentPlacement):
        within = p.balance <= max_imbalance and p.padding <= max_padding
        excess = max(p.balance / max_imbalance, (1 + p.padding) / (1 + max_padding))
        traffic = _traffic([(d.ranks, d.padded_length) for d in p.documents])
        return (0, traffic, p.padding, p.balance) if within else (1, excess, traffic, p.padding)

    candidates = [spread]
    for slack in (0.0, max_padding / 3, 2 * max_padding / 3):
        capacity = _round_up(-(-N // R) + int(slack * N / R), ulysses_size)
        for soft in (1.0, 1 + (max_imbalance - 1) / 3, 1 + 2 * (max_imbalance - 1) / 3):
            assignment = _Greedy(lengths, R, capacity, max_imbalance * mean, soft * mean, window).run()
            candidates.append(_assemble(starts, lengths, assignment, R, ulysses_size, window))
            if _traffic(assignment) == 0 and preference(candidates[-1])[0] == 0:
                return candidates[-1]  # within the targets with no ring traffic at all
    return min(candidates, key=preference)
