"""Where packed documents sit on the ring ranks (:class:`DocumentPlacement`) and what that costs;
:mod:`lightning_sp.core.placement` makes placements.

A document sits whole on one ring rank, or is split with the zigzag rule over a sub-ring of k ranks:
padded at its end to a multiple of 2k, piece j (chunks j and 2k-1-j) on the sub-ring's j-th rank.
The work of a rank is the number of (query, key) pairs its kernels compute: a causal document of
n tokens costs n(n+1)/2 (with a left window w, row i sees min(i, w) + 1 keys); each piece of a
split document costs an equal share (the padding rows included: the kernels compute them).
The ring exchanges equal buffers and Ulysses splits them, so every ring rank holds the same number
of tokens, a multiple of the Ulysses degree; what a rank lacks is filler padding after its pieces,
in no piece (it attends to nothing and nothing attends to it).
"""
from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property
from itertools import accumulate

import torch

from .errors import SPConfigError
from .layout import block_schedule, ring_rank_indices


def check_sizes(ring_size: int, ulysses_size: int, window) -> None:
    """An SPConfigError where the ring or Ulysses degree is not a positive int or ``window`` not a left bound."""
    for name, value in (("ring_size", ring_size), ("ulysses_size", ulysses_size)):
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            raise SPConfigError(f"{name} must be a positive int, got {value!r}")
    if window is not None and (not isinstance(window, int) or window < 0):
        raise SPConfigError(f"window must be None or a left bound >= 0 (tokens each query sees before it), got {window!r}")


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
    spanning pieces first (the largest sub-ring's first), then whole documents, each in document
    order; every rank then has ``tokens_per_rank`` tokens, the last of them filler padding.
    Everything else (token indices, positions, local ``cu_seqlens``, predicted work and traffic, the
    blocks of every ring step) is derived from that; what is per ring rank (token indices,
    positions, blocks) is made for a rank when asked for and kept. ``window`` is the left window (None: plain causal) the work was counted for.
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

    def _made(self, name: str, key, make):
        """``make()`` once per ``key`` (a ring rank, or rank and window), kept beside the frozen fields
        as a cached_property keeps its value: a rank's preparation needs its own ring rank's only."""
        made = self.__dict__.setdefault(name, {})
        if key not in made:
            made[key] = make()
        return made[key]

    def _tokens(self, ring_rank: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(packed-sequence index, position within the padded document) of every token of ring rank
        ``ring_rank``'s buffer; the filler after its pieces gets -1 for both."""
        def make():
            pieces = [(self.documents[d], self.documents[d].piece_positions(j)) for d, j in self.pieces[ring_rank]]
            filler = torch.full((self.tokens_per_rank - sum(len(pos) for _, pos in pieces),), -1, dtype=torch.int64)
            index = [torch.where(pos < doc.length, pos + doc.start, -1) for doc, pos in pieces]
            return torch.cat([*index, filler]), torch.cat([*(pos for _, pos in pieces), filler])
        return self._made("_tokens_of", ring_rank, make)

    def token_index(self, ring_rank: int) -> torch.Tensor:
        """The packed-sequence index of every token of ring rank ``ring_rank``'s buffer, -1 for padding."""
        return self._tokens(ring_rank)[0]

    def position_ids(self, ring_rank: int) -> torch.Tensor:
        """Every token of ring rank ``ring_rank``'s buffer: its position within its (padded) document; 0 for filler."""
        return self._made("_position_ids", ring_rank, lambda: self._tokens(ring_rank)[1].clamp(min=0))

    @cached_property
    def cu_seqlens(self) -> tuple[torch.Tensor, ...]:
        """Per ring rank: int32 boundaries of its pieces in local order (filler is in none)."""
        return tuple(torch.tensor(list(accumulate((self.documents[d].piece_length for d, _ in p), initial=0)),
                                  dtype=torch.int32) for p in self.pieces)

    def local_indices(self, ring_rank: int, ulysses_rank: int = 0) -> torch.Tensor:
        """Packed-sequence indices (-1 for padding) of one rank's tokens: its ring rank's buffer,
        split contiguously over the Ulysses ranks."""
        return self.token_index(ring_rank).chunk(self.ulysses_size)[ulysses_rank]

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
        check_sizes(self.ring_size, self.ulysses_size, window)
        return self._made("_step_blocks", (ring_rank, window), lambda: self._blocks(ring_rank, (window, None)))

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

