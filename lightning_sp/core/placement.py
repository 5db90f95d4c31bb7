"""Packed documents placed on ring ranks by causal work.

Today's packed layout (:func:`lightning_sp.core.layout.shard_documents`) splits every document over
every ring rank, so every ring step carries every document's K/V. Here a document that can sit whole
on one rank does, and only documents that must span ranks are split, with the zigzag rule, over a
sub-ring of as few ranks as the balance needs. The K/V of a whole document never travels.

The work of a rank is the number of (query, key) pairs its kernels compute: a causal document of
n tokens costs n(n+1)/2 (with a left window w, row i sees min(i, w) + 1 keys); a document split
with the zigzag rule over k ranks is padded at its end to a multiple of 2k and each rank's piece
(chunks j and 2k-1-j) costs an equal share (the padding rows included: the kernels compute them).
The ring exchanges equal buffers and Ulysses splits them, so every ring rank holds the same number
of tokens, a multiple of the Ulysses degree; what a rank lacks is filler padding after its pieces,
in no piece (it attends to nothing and nothing attends to it).

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
among those within ``max_imbalance`` and ``max_padding`` wins, and the per-document zigzag of
:func:`spread_documents` is always a candidate, so the result is never worse balanced than it.

Only causal attention (optionally with a left window) is placed: the padding at a split
document's end is then invisible to its real tokens.
"""
from __future__ import annotations

import bisect
from dataclasses import dataclass
from functools import cached_property
from itertools import accumulate

import torch

from .errors import SPConfigError
from .layout import block_schedule, ring_rank_indices


def _row_prefix(rows: int, window: int | None) -> int:
    """Attended pairs of the first ``rows`` rows of a causal document (row i sees min(i, window) + 1 keys)."""
    if window is None or rows <= window + 1:
        return rows * (rows + 1) // 2
    return (window + 1) * (window + 2) // 2 + (rows - window - 1) * (window + 1)


def document_pairs(n: int, window: int | None = None) -> int:
    """Attended (query, key) pairs of a causal document of n tokens, with an optional left window."""
    return _row_prefix(n, window)


def split_shares(n: int, k: int, window: int | None = None) -> tuple[int, list[int]]:
    """(padded length, attended pairs of each piece) of a document of n tokens over k ranks: whole
    when k is 1, else padded to a multiple of 2k and split with the zigzag rule."""
    if k == 1:
        return n, [document_pairs(n, window)]
    c = -(-n // (2 * k))
    padded = 2 * k * c
    if window is None or window >= padded - 1:  # chunks j and 2k-1-j: c * (padded + 1) pairs for every j
        return padded, [c * (padded + 1)] * k

    def rows(a, b):
        return _row_prefix(b * c, window) - _row_prefix(a * c, window)

    return padded, [rows(j, j + 1) + rows(2 * k - 1 - j, 2 * k - j) for j in range(k)]


@dataclass(frozen=True)
class PlacedDocument:
    """Where one document lives: whole on ``ranks[0]``, or split with the zigzag rule over the
    sub-ring ``ranks`` (piece j, chunks j and 2k-1-j of the padded document, on ``ranks[j]``)."""

    index: int          # its position among the batch's non-empty documents, in cu_seqlens order
    start: int          # its first token in the packed sequence
    length: int
    padded_length: int  # with the padding at its end the zigzag split needs (== length when whole)
    ranks: tuple[int, ...]

    @property
    def spans(self) -> bool:
        return len(self.ranks) > 1

    @property
    def piece_length(self) -> int:
        return self.padded_length // len(self.ranks)

    def piece_positions(self, member: int) -> torch.Tensor:
        """Positions within the (padded) document of the piece on ``ranks[member]``."""
        if not self.spans:
            return torch.arange(self.length)
        return ring_rank_indices(self.padded_length, "zigzag", len(self.ranks), member)


@dataclass(frozen=True)
class PlacedBlock:
    """One block of a ring step, in local token offsets: this rank's query rows
    [q_start, q_stop) against keys [k_start, k_stop) of ring rank ``source``'s buffer, masked as
    the block-kernel contract defines ``causal`` and ``window``."""

    document: int
    source: int
    q_start: int
    q_stop: int
    k_start: int
    k_stop: int
    causal: bool
    window: tuple[int | None, int | None]


@dataclass(frozen=True)
class DocumentPlacement:
    """Packed documents on the ring: which documents every ring rank holds, and in what order.

    ``pieces[r]`` lists ring rank r's pieces in local order as (document number, sub-ring member):
    spanning pieces first, then whole documents, each in document order; every rank then has
    ``tokens_per_rank`` tokens, the last of them filler padding. Everything else (token indices,
    positions, local ``cu_seqlens``, predicted work and traffic, the blocks of every ring step) is
    derived from that. ``window`` is the left window (None: plain causal) the work was counted for.
    """

    ring_size: int
    ulysses_size: int
    tokens_per_rank: int
    total_tokens: int
    window: int | None
    documents: tuple[PlacedDocument, ...]
    pieces: tuple[tuple[tuple[int, int], ...], ...]

    # --- tokens ---------------------------------------------------------------------------
    @cached_property
    def piece_starts(self) -> tuple[tuple[int, ...], ...]:
        """Local offset of every piece, per ring rank (same order as ``pieces``)."""
        return tuple(tuple(accumulate((self.documents[d].piece_length for d, _ in p[:-1]), initial=0)) if p else ()
                     for p in self.pieces)

    def _local(self, rank: int, of_position) -> torch.Tensor:
        parts = [of_position(self.documents[d], self.documents[d].piece_positions(j)) for d, j in self.pieces[rank]]
        used = sum(len(p) for p in parts)
        parts.append(torch.full((self.tokens_per_rank - used,), -1, dtype=torch.int64))
        return torch.cat(parts)

    @cached_property
    def token_index(self) -> tuple[torch.Tensor, ...]:
        """Per ring rank: the packed-sequence index of every local token, -1 for padding."""
        def index(doc, pos):
            return torch.where(pos < doc.length, pos + doc.start, -1)
        return tuple(self._local(r, index) for r in range(self.ring_size))

    @cached_property
    def position_ids(self) -> tuple[torch.Tensor, ...]:
        """Per ring rank: every local token's position within its (padded) document; 0 for filler."""
        return tuple(self._local(r, lambda doc, pos: pos).clamp(min=0) for r in range(self.ring_size))

    @cached_property
    def cu_seqlens(self) -> tuple[torch.Tensor, ...]:
        """Per ring rank: int32 boundaries of its pieces in local order (filler is in none)."""
        return tuple(torch.tensor(list(accumulate((self.documents[d].piece_length for d, _ in p), initial=0)),
                                  dtype=torch.int32) for p in self.pieces)

    def local_indices(self, ring_rank: int, ulysses_rank: int = 0) -> torch.Tensor:
        """Packed-sequence indices (-1 for padding) of one rank's tokens: its ring rank's buffer,
        split contiguously over the Ulysses ranks."""
        return self.token_index[ring_rank].chunk(self.ulysses_size)[ulysses_rank]

    def shard(self, x: torch.Tensor, ring_rank: int, ulysses_rank: int = 0, dim: int = 0, pad_value=0) -> torch.Tensor:
        """One rank's tokens of a packed tensor (``total_tokens`` along ``dim``); padding gets pad_value."""
        dim = dim % x.dim()
        if x.shape[dim] != self.total_tokens:
            raise SPConfigError(f"tensor has {x.shape[dim]} tokens along dim {dim}, the placement has {self.total_tokens}")
        idx = self.local_indices(ring_rank, ulysses_rank).to(x.device)
        out = x.index_select(dim, idx.clamp(min=0))
        return out.masked_fill((idx < 0).view([-1 if d == dim else 1 for d in range(x.dim())]), pad_value)

    # --- predictions ----------------------------------------------------------------------
    @cached_property
    def attended_pairs(self) -> tuple[int, ...]:
        """Per ring rank: the (query, key) pairs its kernels compute over all ring steps."""
        work = [0] * self.ring_size
        for doc in self.documents:
            for rank, share in zip(doc.ranks, split_shares(doc.length, len(doc.ranks), self.window)[1]):
                work[rank] += share
        return tuple(work)

    @property
    def balance(self) -> float:
        """The largest rank's attended pairs over the mean (1.0: perfectly balanced)."""
        work = self.attended_pairs
        return max(work) * len(work) / max(sum(work), 1)

    @property
    def padding(self) -> float:
        """Padding slots (document ends and filler) as a fraction of the real tokens."""
        return (self.ring_size * self.tokens_per_rank - self.total_tokens) / max(self.total_tokens, 1)

    @cached_property
    def step_tokens(self) -> tuple[tuple[int, ...], ...]:
        """Per ring rank, per ring step (0 .. ring_size - 1): the K/V tokens it sends, and receives,
        at that step. At step s every sub-ring of more than s ranks passes each member's current block
        to the next member; documents whole on one rank send nothing."""
        sent = [[0] * self.ring_size for _ in range(self.ring_size)]
        for doc in self.documents:
            for rank in doc.ranks:
                for step in range(1, len(doc.ranks)):
                    sent[rank][step] += doc.piece_length
        return tuple(tuple(s) for s in sent)

    def step_bytes(self, bytes_per_token: int) -> tuple[tuple[int, ...], ...]:
        """``step_tokens`` in bytes, e.g. ``bytes_per_token = 2 * kv_heads * head_dim * element_size``
        for K and V. The backward sends their dK/dV sums the same way (in float32 below float32) and
        the K/V again at steps 2 and later (``attention.placed``)."""
        return tuple(tuple(t * bytes_per_token for t in steps) for steps in self.step_tokens)

    @property
    def ring_steps(self) -> int:
        """How many ring steps carry any traffic plus the local one: the largest sub-ring's size."""
        return max((len(doc.ranks) for doc in self.documents), default=1)

    # --- the blocks of every ring step ----------------------------------------------------
    def step_blocks(self, ring_rank: int, window=...) -> tuple[tuple[PlacedBlock, ...], ...]:
        """Per ring step: the blocks ring rank ``ring_rank`` computes, its queries against the K/V
        block it holds at that step (step 0: its own), for causal attention with left ``window``
        (default ``...``: the placement's own; any window runs on the same pieces, only the balance
        was counted for ``self.window``). The masks come from
        :func:`lightning_sp.core.layout.block_schedule`, one document at a time. Made once per (rank, window)."""
        window = self.window if window is ... else window
        made = self.__dict__.setdefault("_step_blocks", {})  # beside the frozen fields, as cached_property
        if (ring_rank, window) not in made:
            _check(self.ring_size, self.ulysses_size, window)
            made[ring_rank, window] = self._blocks(ring_rank, (window, None))
        return made[ring_rank, window]

    def _blocks(self, ring_rank: int, window: tuple) -> tuple[tuple[PlacedBlock, ...], ...]:
        steps: list[list[PlacedBlock]] = [[] for _ in range(self.ring_steps)]
        for (d, member), q_at in zip(self.pieces[ring_rank], self.piece_starts[ring_rank]):
            doc = self.documents[d]
            k = len(doc.ranks)
            for step in range(k):
                src = (member - step) % k
                pairs = (block_schedule("contiguous", 0, 0, 1, doc.length, True, window) if k == 1 else
                         block_schedule("zigzag", member, src, k, doc.piece_length, True, window))
                source = doc.ranks[src]
                k_at = self.piece_starts[source][self.pieces[source].index((d, src))]
                steps[step] += [PlacedBlock(d, source, q_at + p.q_start, q_at + p.q_stop, k_at + p.k_start,
                                            k_at + p.k_stop, p.causal, p.window) for p in pairs]
        return tuple(tuple(s) for s in steps)


# ---------------------------------------------------------------------------------------------
# Building placements


def _documents(cu_seqlens) -> tuple[list[int], list[int]]:
    cu = torch.as_tensor(cu_seqlens).to("cpu", torch.int64)
    if cu.dim() != 1 or len(cu) < 2 or int(cu[0]) != 0 or bool((cu[1:] < cu[:-1]).any()):
        raise SPConfigError(f"cu_seqlens must be a 1-D non-decreasing sequence starting at 0, got {cu.tolist()}")
    bounds = cu.tolist()
    docs = [(a, b - a) for a, b in zip(bounds[:-1], bounds[1:]) if b > a]
    if not docs:
        raise SPConfigError(f"cu_seqlens {bounds} holds no tokens; a packed batch needs at least one token")
    return [a for a, _ in docs], [n for _, n in docs]


def _check(ring_size: int, ulysses_size: int, window) -> None:
    for name, value in (("ring_size", ring_size), ("ulysses_size", ulysses_size)):
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            raise SPConfigError(f"{name} must be a positive int, got {value!r}")
    if window is not None and (not isinstance(window, int) or window < 0):
        raise SPConfigError(f"window must be None or a left bound >= 0 (tokens each query sees before it), got {window!r}")


def _round_up(x: int, m: int) -> int:
    return -(-x // m) * m


def _assemble(starts, lengths, assignment, ring_size, ulysses_size, window):
    """The placement of ``assignment`` (per document: (ranks, padded length)); the buffer is the
    fullest rank's tokens rounded up to the Ulysses degree."""
    documents = tuple(PlacedDocument(i, starts[i], lengths[i], padded, tuple(ranks))
                      for i, (ranks, padded) in enumerate(assignment))
    held: list[list[tuple[int, int]]] = [[] for _ in range(ring_size)]
    for doc in sorted(documents, key=lambda doc: (not doc.spans, doc.index)):
        for member, rank in enumerate(doc.ranks):
            held[rank].append((doc.index, member))
    fullest = max(sum(documents[d].piece_length for d, _ in p) for p in held)
    return DocumentPlacement(ring_size, ulysses_size, _round_up(max(fullest, 1), ulysses_size),
                             sum(lengths), window, documents, tuple(tuple(p) for p in held))


def spread_documents(cu_seqlens, ring_size: int, ulysses_size: int = 1, *, window: int | None = None) -> DocumentPlacement:
    """Today's per-document zigzag as a placement: every document padded to a multiple of 2R and
    split over all R ring ranks (the token layout of ``layout.shard_documents``, with the padding
    that makes the buffer divisible by the Ulysses degree as filler instead of a padding document)."""
    _check(ring_size, ulysses_size, window)
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
    _check(ring_size, ulysses_size, window)
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
