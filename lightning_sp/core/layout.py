"""Which global token lives on which rank.

Over the R ranks of a ring, ring rank r holds
  contiguous (alias ``basic``): chunk r of ``chunk(R)``;
  zigzag: chunks r and 2R-1-r of ``chunk(2R)``, in that order;
  stripe: tokens r, r+R, r+2R, ... (stripe width 1).
Each ring rank's tokens are then split contiguously over its U Ulysses ranks, so the Ulysses
all-to-all reassembles exactly the ring rank's tokens. Packed documents are laid out one by one.

This module is the only place that knows these rules; the ring attention gets its per-step block
schedule from :func:`block_schedule`.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, replace

import torch
import torch.distributed as dist

from .errors import SPConfigError
from .mesh import SPMesh, single_process_mesh

LAYOUT_ALIASES = {"basic": "contiguous", "contiguous": "contiguous", "zigzag": "zigzag",
                  "stripe": "stripe", "strip": "stripe"}
LAYOUTS = ("basic", "contiguous", "zigzag", "stripe")


def canonical_layout(layout: str) -> str:
    """The layout's own name (``basic`` -> ``contiguous``, ``strip`` -> ``stripe``); an error naming the choices."""
    try:
        return LAYOUT_ALIASES[layout]
    except (KeyError, TypeError):
        raise SPConfigError(f"unknown layout {layout!r}; choose one of {', '.join(LAYOUTS)}") from None


def ring_multiple(layout: str, ring_size: int) -> int:
    """How many tokens one document (or sequence) must be a multiple of for the ring layout."""
    return 2 * ring_size if canonical_layout(layout) == "zigzag" else ring_size


def layout_multiple(layout: str, mesh: SPMesh | None) -> int:
    """The multiple a dense sequence length must have on this mesh (ring layout x Ulysses split)."""
    mesh = mesh or single_process_mesh()
    return ring_multiple(layout, mesh.ring_size) * mesh.ulysses_size


def check_seq_len(seq_len: int, layout: str, mesh: SPMesh | None) -> None:
    """An error naming the padded length where a dense sequence does not split over the mesh."""
    m = layout_multiple(layout, mesh)
    if seq_len % m:
        mesh = mesh or single_process_mesh()
        raise SPConfigError(
            f"sequence length {seq_len} is not divisible by {m}, the multiple the {canonical_layout(layout)!r} "
            f"layout needs with ring degree {mesh.ring_size} and ulysses degree {mesh.ulysses_size}; "
            f"pad the sequence to {-(-seq_len // m) * m} tokens (the strategy and pad_to_multiple do this)")


def ring_rank_indices(n: int, layout: str, ring_size: int, ring_rank: int) -> torch.Tensor:
    """Positions (0..n-1) held by one ring rank, for a sequence or document of length n."""
    layout = canonical_layout(layout)
    if n % ring_multiple(layout, ring_size):
        raise SPConfigError(f"length {n} is not divisible by {ring_multiple(layout, ring_size)} "
                            f"({layout} layout over {ring_size} ring ranks)")
    if layout == "contiguous":
        per = n // ring_size
        return torch.arange(ring_rank * per, (ring_rank + 1) * per)
    if layout == "zigzag":
        c = n // (2 * ring_size)
        late = 2 * ring_size - 1 - ring_rank
        return torch.cat([torch.arange(ring_rank * c, (ring_rank + 1) * c), torch.arange(late * c, (late + 1) * c)])
    return torch.arange(ring_rank, n, ring_size)


def local_indices(seq_len: int, mesh: SPMesh | None, layout: str) -> torch.Tensor:
    """Global indices of this rank's tokens of a dense sequence, in local order."""
    mesh = mesh or single_process_mesh()
    check_seq_len(seq_len, layout, mesh)
    ring_idx = ring_rank_indices(seq_len, layout, mesh.ring_size, mesh.ring_rank)
    return ring_idx.chunk(mesh.ulysses_size)[mesh.ulysses_rank]


def shard(x: torch.Tensor, mesh: SPMesh | None, layout: str, dim: int = 1) -> torch.Tensor:
    """This rank's tokens of ``x`` along ``dim`` (a copy, in local order)."""
    idx = local_indices(x.shape[dim], mesh, layout).to(x.device)
    return x.index_select(dim, idx)


def position_ids(seq_len: int, mesh: SPMesh | None, layout: str, device=None) -> torch.Tensor:
    """Global positions of this rank's tokens, e.g. for RoPE: shape (local_seq,)."""
    return local_indices(seq_len, mesh, layout).to(device)


def _gather_sp(x_local: torch.Tensor, mesh: SPMesh) -> list[torch.Tensor]:
    parts = [torch.empty_like(x_local) for _ in range(mesh.sp_size)]
    dist.all_gather(parts, x_local.contiguous(), group=mesh.sp_group)
    return parts


def unshard(x_local: torch.Tensor, mesh: SPMesh | None, layout: str, dim: int = 1) -> torch.Tensor:
    """Collective over the sequence-parallel group: the full tensor, in original order, on every rank."""
    mesh = mesh or single_process_mesh()
    if mesh.sp_size == 1:
        return x_local
    dim = dim % x_local.dim()
    parts = _gather_sp(x_local, mesh)
    seq_len = x_local.shape[dim] * mesh.sp_size
    order = torch.cat([local_indices(seq_len, mesh.at_sp_rank(r), layout) for r in range(mesh.sp_size)])
    full = torch.cat(parts, dim=dim)
    return full.index_select(dim, torch.argsort(order).to(full.device))


# ---------------------------------------------------------------------------------------------
# Packed documents (varlen)


@dataclass(frozen=True)
class PackedShard:
    """This rank's share of a packed batch of documents.

    ``cu_seqlens`` / ``max_seqlen`` describe the ring rank's share of every (padded) document:
    that is what the varlen attention functions take, and with ulysses degree 1 it is exactly this
    rank's tokens. ``token_index`` maps each local token to its index in the original packed
    sequence (-1 for padding); ``position_ids`` are positions within each document.
    """

    layout: str
    token_index: torch.Tensor
    position_ids: torch.Tensor
    cu_seqlens: torch.Tensor
    max_seqlen: int
    padded_cu_seqlens: torch.Tensor
    slot_to_token: torch.Tensor  # for every slot of the padded packed sequence: original token or -1

    @property
    def total_tokens(self) -> int:
        return int((self.slot_to_token >= 0).sum())

    def shard(self, x: torch.Tensor, dim: int = 0, pad_value=0) -> torch.Tensor:
        """This rank's tokens of a packed tensor (original, unpadded) along ``dim``; pads get pad_value."""
        dim = dim % x.dim()
        if x.shape[dim] != self.total_tokens:
            raise SPConfigError(f"tensor has {x.shape[dim]} tokens along dim {dim}, the packing has {self.total_tokens}")
        idx = self.token_index.to(x.device)
        out = x.index_select(dim, idx.clamp(min=0))
        pad = (idx < 0).view([-1 if d == dim else 1 for d in range(x.dim())])
        return out.masked_fill(pad, pad_value)

    def unshard(self, x_local: torch.Tensor, mesh: SPMesh | None, dim: int = 0) -> torch.Tensor:
        """Collective over the sequence-parallel group: the packed tensor in original order, pads dropped."""
        mesh = mesh or single_process_mesh()
        return gather_packed(x_local, mesh, self.total_tokens, dim, lambda r: self.slot_to_token[
            _packed_slots(self.padded_cu_seqlens, mesh.at_sp_rank(r), self.layout)[0]])


def gather_packed(x_local: torch.Tensor, mesh: SPMesh, total_tokens: int, dim: int, rank_index) -> torch.Tensor:
    """Collective over the sequence-parallel group: the ``total_tokens`` of a packed tensor in original
    order, every rank's tokens put back where ``rank_index(sp_rank)`` (its token indices, -1 for
    padding) says they came from, padding dropped."""
    dim = dim % x_local.dim()
    parts = _gather_sp(x_local, mesh) if mesh.sp_size > 1 else [x_local]
    full = torch.cat(parts, dim=dim)
    index = torch.cat([rank_index(r) for r in range(mesh.sp_size)]).to(full.device)
    keep = torch.nonzero(index >= 0).flatten()
    out_shape = list(full.shape)
    out_shape[dim] = total_tokens
    return full.new_zeros(out_shape).index_copy(dim, index[keep], full.index_select(dim, keep))


def _packed_slots(padded_cu: torch.Tensor, mesh: SPMesh, layout: str):
    """(slots of the padded sequence, positions within documents, local cu_seqlens) of one rank."""
    ring_parts, pos_parts, local_lens = [], [], []
    bounds = padded_cu.tolist()
    for start, end in zip(bounds[:-1], bounds[1:]):
        pos = ring_rank_indices(end - start, layout, mesh.ring_size, mesh.ring_rank)
        ring_parts.append(pos + start)
        pos_parts.append(pos)
        local_lens.append(len(pos))
    u, U = mesh.ulysses_rank, mesh.ulysses_size
    slots = torch.cat(ring_parts).chunk(U)[u]
    pos = torch.cat(pos_parts).chunk(U)[u]
    return slots, pos, torch.tensor([0] + local_lens).cumsum(0).to(torch.int32)


def shard_documents(cu_seqlens, mesh: SPMesh | None, layout: str, causal: bool = True) -> PackedShard:
    """Lay out packed documents (global ``cu_seqlens`` of the unpadded packed sequence) over the mesh.

    Every document is padded at its end to the layout's multiple and split on its own; a final
    padding document makes the ring rank's share divisible by the ulysses degree. Returns the
    indices and the local ``cu_seqlens`` (see :class:`PackedShard`). Padding at a document's end
    is invisible to its real tokens only under causal attention (or a window with right bound 0);
    for attention that looks ahead, pass ``causal=False`` and document lengths must need no padding.
    """
    mesh = mesh or single_process_mesh()
    layout = canonical_layout(layout)
    cu = torch.as_tensor(cu_seqlens).to("cpu", torch.int64)
    if cu.dim() != 1 or len(cu) < 2 or int(cu[0]) != 0 or bool((cu[1:] < cu[:-1]).any()):
        raise SPConfigError(f"cu_seqlens must be a 1-D non-decreasing sequence starting at 0, got {cu.tolist()}")
    lengths = cu[1:] - cu[:-1]
    lengths = lengths[lengths > 0]
    m = ring_multiple(layout, mesh.ring_size)
    padded = (lengths + m - 1) // m * m
    if not causal and bool((padded != lengths).any()):
        bad = lengths[padded != lengths].tolist()
        raise SPConfigError(
            f"documents of lengths {bad} need padding to a multiple of {m} for the {layout} layout, and "
            f"padding is visible to attention that is not causal; make every document length a multiple "
            f"of {m} (or use causal attention)")
    extra = (-int(padded.sum())) % math.lcm(m, mesh.ring_size * mesh.ulysses_size)
    if extra:  # a padding document, so the ring rank's share splits evenly over the ulysses ranks
        padded = torch.cat([padded, torch.tensor([extra])])
    padded_cu = torch.cat([torch.zeros(1, dtype=torch.int64), padded.cumsum(0)])
    starts = padded_cu[:-1][: len(lengths)]
    slot_to_token = torch.full((int(padded_cu[-1]),), -1, dtype=torch.int64)
    doc_of_token = torch.repeat_interleave(torch.arange(len(lengths)), lengths)
    offset_in_doc = torch.arange(int(lengths.sum())) - torch.repeat_interleave(lengths.cumsum(0) - lengths, lengths)
    slot_to_token[starts[doc_of_token] + offset_in_doc] = torch.arange(int(lengths.sum()))
    slots, pos, local_cu = _packed_slots(padded_cu, mesh, layout)
    return PackedShard(
        layout=layout, token_index=slot_to_token[slots], position_ids=pos, cu_seqlens=local_cu,
        max_seqlen=int((local_cu[1:] - local_cu[:-1]).max()), padded_cu_seqlens=padded_cu,
        slot_to_token=slot_to_token)


# ---------------------------------------------------------------------------------------------
# Ring block schedule


@dataclass(frozen=True)
class BlockPair:
    """One kernel call of a ring step: local query rows q[q_start:q_stop] against received keys
    k[k_start:k_stop], masked by ``causal`` and ``window`` as the block-kernel contract defines them
    (bottom-right aligned; window bounds of None are unbounded and may be any integer)."""

    q_start: int
    q_stop: int
    k_start: int
    k_stop: int
    causal: bool = False
    window: tuple[int | None, int | None] = (None, None)


def _runs(layout: str, ring_rank: int, ring_size: int, n_local: int):
    """(local start, first position, length, stride) runs of a ring rank's share of one document."""
    if layout == "contiguous":
        return [(0, ring_rank * n_local, n_local, 1)]
    if layout == "zigzag":
        c = n_local // 2
        if ring_rank == ring_size - 1:  # chunks R-1 and R lie back to back: one run, fewer calls
            return [(0, ring_rank * c, n_local, 1)]
        return [(0, ring_rank * c, c, 1), (c, (2 * ring_size - 1 - ring_rank) * c, c, 1)]
    return [(0, ring_rank, n_local, ring_size)]


def _classify(qrun, krun, causal: bool, window) -> BlockPair | None:
    """Turn 'position mask restricted to two runs' into one kernel call (or None when empty): the
    rows and columns the mask touches, with a causal mask where it is one and otherwise window
    bounds, which are then never negative."""
    (qs, qp, nq, stride), (ks, kp, nk, _) = qrun, krun
    left, right = window
    bounds = [b for b in (0 if causal else None, None if right is None else -right) if b is not None]
    lo_d = max(bounds) if bounds else None  # smallest allowed q_pos - k_pos
    delta = qp - kp
    # allowed: lo <= i - j <= hi in local indices (None: unbounded)
    lo = None if lo_d is None else -((delta - lo_d) // stride)
    hi = None if left is None else (left - delta) // stride
    if lo is not None and hi is not None and lo > hi:
        return None
    r0, r1 = (0 if lo is None else max(0, lo)), (nq if hi is None else min(nq, nk + hi))  # rows that see a key
    c0, c1 = (0 if hi is None else max(0, -hi)), (nk if lo is None else min(nk, nq - lo))  # keys that are seen
    if r0 >= r1 or c0 >= c1:
        return None
    nq, nk, shift = r1 - r0, c1 - c0, c0 - r0
    lo = None if lo is None or lo + shift <= -(nk - 1) else lo + shift
    hi = None if hi is None or hi + shift >= nq - 1 else hi + shift
    pair = BlockPair(qs + r0, qs + r1, ks + c0, ks + c1)
    if lo is None and hi is None:
        return pair
    if hi is None and lo == nq - nk:  # bottom-right causal
        return replace(pair, causal=True)
    return replace(pair, window=(None if hi is None else hi + nk - nq, None if lo is None else nq - nk - lo))


def square_causal(pairs: list[BlockPair]) -> list[BlockPair]:
    """The same mask in calls whose causal blocks are square, for kernels that align a causal mask
    top-left (or only take it square): a causal block with more keys than queries becomes the
    keys every query sees (no mask) plus a square causal block; one with more queries than keys
    drops the rows that see nothing. A causal block with a window becomes a window block."""
    out = []
    for p in pairs:
        nq, nk = p.q_stop - p.q_start, p.k_stop - p.k_start
        if not p.causal or nq == nk:
            out.append(p)
        elif p.window != (None, None):
            left, right = p.window
            out.append(replace(p, causal=False, window=(left, 0 if right is None else min(right, 0))))
        elif nq < nk:
            split = p.k_stop - nq
            out += [replace(p, k_stop=split, causal=False), replace(p, k_start=split)]
        else:
            out.append(replace(p, q_start=p.q_stop - nk))
    return out


def block_schedule(layout: str, q_rank: int, kv_rank: int, ring_size: int, n_local: int,
                   causal: bool, window=(None, None)) -> list[BlockPair]:
    """The kernel calls with which ring rank ``q_rank`` attends to the keys of ``kv_rank``.

    ``n_local`` is the ring rank's share of one document (or of the dense sequence); ``window`` is
    ``(left, right)`` in global positions, None for unbounded. With zigzag and stripe every rank
    gets the same causal work at every step.
    """
    layout = canonical_layout(layout)
    full = BlockPair(0, n_local, 0, n_local)
    if not causal and window == (None, None):
        return [full]
    if layout == "zigzag" and window == (None, None):
        half = n_local // 2  # the balanced zigzag steps, one call each
        if kv_rank == q_rank:
            return [BlockPair(0, n_local, 0, n_local, causal=True)]
        if kv_rank < q_rank:
            return [BlockPair(0, n_local, 0, half)]
        return [BlockPair(half, n_local, 0, n_local)]
    qruns = _runs(layout, q_rank, ring_size, n_local)
    kruns = _runs(layout, kv_rank, ring_size, n_local)
    pairs = [_classify(qr, kr, causal, window) for qr in qruns for kr in kruns]
    return [p for p in pairs if p is not None and p.q_stop > p.q_start and p.k_stop > p.k_start]
