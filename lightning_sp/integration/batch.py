"""Batch preparation: one pure function from a batch of full sequences to this rank's part of it.

:func:`prepare_batch` is what both strategies do to every batch and what
:class:`~lightning_sp.app.lm.CausalLM` does under any other strategy (for one process, through
:func:`prepared_batch`):

1. validate: a dict whose shard keys have one sequence length; a packed batch is one row of
   documents that ``cu_seqlens`` describes, or, without ``cu_seqlens``, whose ``position_ids``
   restart at 0 for each document (Hugging Face's convention, :func:`documents_from_positions`);
2. agree: across the ranks of the mesh, one tiny all-reduce per batch, so that a bad batch on any
   rank fails every rank at once with the same message, and count the valid labels of the whole
   world (:mod:`.agreement`);
3. shift ``labels`` on the full sequence (``labels[t] <- labels[t + 1]``; the last position and, in
   packed batches, every document's last token get ``ignore_index``, so no token learns to
   predict the next document even when ``labels`` is just ``input_ids``);
4. add global ``position_ids`` (within-document positions for packed batches);
5. pad to the layout's multiple (at the end, where causal attention hides it from real tokens) and
   keep this rank's tokens of every shard key; packed batches get local ``cu_seqlens``/``max_seqlen``,
   also under the names Hugging Face models pass on to their attention (``cu_seq_lens_q``,
   ``cu_seq_lens_k``, ``max_length_q``, ``max_length_k``).

Where a packed batch's documents go is the mesh config's ``document_placement``: by default
(``"work"``, over a ring of several ranks) :func:`~lightning_sp.core.placement.place_documents`
places them on the ring ranks by causal work, short documents whole on one rank, and the attention
layers attend over that placement (the local ``cu_seqlens`` carry it, and the strategy puts it in
their sequence context for calls without them); ``"spread"``
splits every document over every ring rank with the layout
(:func:`~lightning_sp.core.layout.shard_documents`). Either way every rank computes the same
placement from the batch alone, and :func:`gather_sequence` undoes it.

A batch with ``labels`` also gets what Hugging Face's causal-LM loss reads, so that
``model(**batch).loss`` of a Hugging Face model is exact on every rank:

* ``shift_labels``: this rank's part of the labels shifted on the full sequence (the same tensor
  as ``labels``, which keeps its meaning: shifted unless ``shift_labels=False``); the model's loss
  takes them as they are instead of shifting this rank's shard again;
* ``num_items_in_batch``: the valid labels of the whole world's batches divided by the world size
  (a float64 scalar tensor). The loss divides this rank's sum of token losses by it, and the
  strategy averages gradients over the world's ranks, so the step follows the exact token mean of
  the global batch. (Hugging Face's Trainer passes the count itself and multiplies the loss by the
  number of processes; Lightning does not, hence the division here.)

The result carries a :class:`ShardInfo` under ``batch["shard_info"]``: what :func:`gather_sequence`
needs to undo the sharding, and the mark that the batch is prepared. Hugging Face models take the
extra entries as keyword arguments they pass on to attention, which ignores the ones it does not use.
"""
from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch

from ..core import layout as L
from ..core.config import check_document_placement
from ..core.errors import SPConfigError
from ..core.mesh import SPMesh, single_process_mesh
from ..core.packing import PaddedDocuments, record_packing
from ..core.placement import DocumentPlacement, place_documents
from .agreement import agree_on_batch

DEFAULT_SHARD_KEYS = ("input_ids", "labels", "position_ids", "attention_mask")
SHARD_INFO = "shard_info"  # the key of a prepared batch's ShardInfo
MADE_FROM_LABELS = ("shift_labels", "num_items_in_batch")  # what preparation adds for Hugging Face's loss


class ShardInfo:
    """How a batch was laid out over its sequence-parallel group: what :func:`gather_sequence` undoes.

    A plain object (not a dataclass) on purpose: Lightning's batch transfer rebuilds dataclasses
    found in a batch, and this one holds process groups.
    """

    __slots__ = ("seq_len", "padded_len", "layout", "mesh", "packed", "placement", "document_lengths")

    def __init__(self, seq_len: int, padded_len: int, layout: str, mesh: SPMesh, packed: L.PackedShard | None = None,
                 placement: DocumentPlacement | None = None, document_lengths: list[int] | None = None):
        self.seq_len = seq_len  # tokens of the original (unpadded) sequence or packed row
        self.padded_len = padded_len  # tokens of the padded sequence, over all ranks of the group
        self.layout = layout
        self.mesh = mesh
        self.packed = packed  # packed documents spread with the layout, or None
        self.placement = placement  # packed documents placed by work, or None
        self.document_lengths = document_lengths  # a packed row's non-empty documents in order; None: dense

    @property
    def token_index(self) -> torch.Tensor:
        """This rank's tokens as indices into the original sequence (packed row), -1 for padding."""
        mesh = self.mesh
        if self.placement is not None:
            return self.placement.local_indices(mesh.ring_rank, mesh.ulysses_rank)
        if self.packed is not None:
            return self.packed.token_index
        index = L.local_indices(self.padded_len, mesh, self.layout)
        return torch.where(index < self.seq_len, index, -1)

    def __repr__(self) -> str:
        kind = "placed" if self.placement is not None else "packed" if self.packed is not None else "dense"
        return (f"ShardInfo({kind}, seq_len={self.seq_len}, padded_len={self.padded_len}, layout={self.layout!r}, "
                f"sp_rank={self.mesh.sp_rank} of {self.mesh.sp_size})")


def prepare_batch(batch: Mapping, mesh: SPMesh | None = None, *, layout: str | None = None, shift_labels: bool = True,
                  ignore_index: int = -100, shard_keys=DEFAULT_SHARD_KEYS, pad_to_multiple: bool = True,
                  check_identical: bool = False, agree: bool = True,
                  document_placement: str | None = None) -> tuple[dict, ShardInfo]:
    """This rank's part of a batch of full sequences, and how it was cut (see the module doc).

    Args:
        batch: a dict of tensors; ``shard_keys`` present in it are split along the sequence (dim 1,
            dim 0 for 1-D tensors), other entries pass through unchanged.
        mesh: this rank's place in the sequence-parallel mesh; None: one process.
        layout: the token layout; default the mesh config's (``contiguous`` for ``mesh=None``).
        shift_labels: shift ``labels`` by one on the full sequence (False: leave them as they are).
        ignore_index: the label the loss ignores (shifting and padding use it).
        pad_to_multiple: pad dense sequences to the layout's multiple (else such a length is an error).
        check_identical: also check that the ranks of each sequence-parallel group hold the same
            token values (not only the same keys and shapes); costs one reduction over the batch.
        agree: check with the other ranks of the mesh (a collective; False for index maths without
            process groups, where ``num_items_in_batch`` counts this batch's tokens only).
        document_placement: where a packed batch's documents go, ``work`` or ``spread`` (see the
            module doc); default the mesh config's. The local ``cu_seqlens`` carry how the documents
            were laid out (:mod:`lightning_sp.core.packing`): attention given them attends over a
            batch's placement by work (``shard_info.placement``, causal only) and refuses attention
            that is not causal over documents that got padding. A model called without them (positions
            only) needs its layers bound to a sequence context that holds the placement, as the strategy does.

    Returns:
        ``(local_batch, shard_info)``; ``local_batch["shard_info"]`` is ``shard_info``.
    """
    layout = L.canonical_layout(layout or ("contiguous" if mesh is None else mesh.config.layout))
    mesh = mesh or single_process_mesh()
    placement = check_document_placement(document_placement or mesh.config.document_placement)
    plan, problem, targets = None, None, None
    try:
        plan = _Plan(batch, mesh, layout, tuple(shard_keys), pad_to_multiple, placement)
        targets = plan.targets(batch, shift_labels, ignore_index)
    except SPConfigError as err:
        problem = str(err)
    valid = 0 if targets is None else (targets != ignore_index).sum()
    if agree and mesh.world_size > 1:
        description = None if plan is None else plan.description(batch, check_identical)
        valid = agree_on_batch(problem, description, mesh, _describe_difference, valid)
    elif problem is not None:
        raise SPConfigError(problem)
    return plan.apply(batch, targets, ignore_index, valid, mesh.world_size)


def prepared_batch(batch: Mapping, **options) -> dict:
    """This rank's prepared batch under any strategy: ``batch`` itself where a sequence-parallel
    strategy prepared it (it carries ``shard_info``), else ``prepare_batch(batch, **options)[0]`` for
    this process alone (no collective).

    Call it first in the steps of a LightningModule written for ``ulysses_ring`` so that under any
    other strategy (DDP, one device) it trains on the same shifted labels and positions instead of
    the raw ``labels``. There ``num_items_in_batch`` counts this process's batch only, so Hugging
    Face's loss is each process's token mean (as without lightning_sp); :mod:`lightning_sp.loss`
    reduces its count over the world and stays exact. ``options`` are those of :func:`prepare_batch`
    (``ignore_index``, ``shift_labels``, ``shard_keys``, ...), used only where the batch is prepared here.
    """
    if isinstance(batch, Mapping) and SHARD_INFO in batch:
        return batch
    return prepare_batch(batch, **options)[0]


def gather_sequence(x_local: torch.Tensor, shard_info: ShardInfo, dim: int = 1) -> torch.Tensor:
    """Collective over the sequence-parallel group: the full-sequence ``x`` of a prepared batch in
    original order, padding dropped (e.g. for predict outputs). ``dim``: the sequence (packed: token) dim."""
    if not isinstance(shard_info, ShardInfo):
        raise SPConfigError(f"gather_sequence needs the ShardInfo of a prepared batch (batch['{SHARD_INFO}']), "
                            f"got {type(shard_info).__name__}")
    if shard_info.placement is not None:
        P, U = shard_info.placement, shard_info.mesh.ulysses_size
        return L.gather_packed(x_local, shard_info.mesh, P.total_tokens, dim,
                               lambda r: P.local_indices(*divmod(r, U)))
    if shard_info.packed is not None:
        return shard_info.packed.unshard(x_local, shard_info.mesh, dim=dim)
    full = L.unshard(x_local, shard_info.mesh, shard_info.layout, dim=dim)
    return full.narrow(dim, 0, shard_info.seq_len)


class _Plan:
    """A validated batch: which keys to split along which dim, and how long the sequence is.
    Constructing it raises :class:`SPConfigError` for a batch that cannot be prepared."""

    def __init__(self, batch, mesh: SPMesh, layout: str, shard_keys: tuple, pad_to_multiple: bool,
                 document_placement: str):
        if not isinstance(batch, Mapping):
            raise SPConfigError(f"batch preparation needs batches that are dicts (e.g. with 'input_ids', 'labels'), "
                                f"got {type(batch).__name__}; return a dict from the dataset or collate_fn")
        if SHARD_INFO in batch:
            raise SPConfigError(f"this batch was prepared already (it has {SHARD_INFO!r}); prepare each batch once")
        made = [k for k in MADE_FROM_LABELS if k in batch]
        if made:
            raise SPConfigError(f"the batch already has {made}, which batch preparation makes from 'labels' (this "
                                f"rank's part of the shifted labels, the world's valid-token count); put the "
                                f"unshifted labels under 'labels' (or pass shift_labels=False with per-position "
                                f"targets there) and leave {made} out")
        self.mesh, self.layout = mesh, layout
        self.keys = [k for k in shard_keys if k in batch and torch.is_tensor(batch[k])]
        if not self.keys:
            raise SPConfigError(f"the batch has none of the shard keys {list(shard_keys)} (it has {sorted(batch)}); "
                                f"pass shard_keys=[...] naming its sequence tensors")
        self.dims = {k: 0 if batch[k].dim() == 1 else 1 for k in self.keys}
        lengths = {k: batch[k].shape[self.dims[k]] for k in self.keys}
        self.seq_len = lengths[self.keys[0]]
        cu = batch.get("cu_seqlens")
        if cu is None and "position_ids" in self.keys:  # Hugging Face's convention: positions restart per document
            cu = documents_from_positions(batch["position_ids"])
        self.cu = None if cu is None else _check_packed(cu, batch, self.keys, lengths)
        self.document_lengths = None if self.cu is None else self.cu.diff()[self.cu.diff() > 0]
        self.positions_given = "position_ids" in self.keys and batch.get("cu_seqlens") is not None
        self.placement = None
        if self.cu is not None and document_placement == "work" and mesh.ring_size > 1:
            if mesh.config.transport == "copy_engine":
                raise SPConfigError("transport 'copy_engine' cannot carry the ring traffic of packed documents "
                                    "placed by work (each long document moves along its own sub-ring of ranks); "
                                    "pass document_placement='spread' to lay out every document over every ring "
                                    "rank, or use transport 'auto' or 'nccl'")
            self.placement = place_documents(self.cu, mesh.ring_size, mesh.ulysses_size)
        if self.cu is None and len(set(lengths.values())) > 1:
            raise SPConfigError(f"shard keys have different sequence lengths {lengths}; every shard key needs "
                                f"the same length along dim 1 (dim 0 for 1-D tensors)")
        self.pad = 0 if self.cu is not None else (-self.seq_len) % L.layout_multiple(layout, mesh)
        if self.pad and not pad_to_multiple:
            L.check_seq_len(self.seq_len, layout, mesh)

    def description(self, batch, check_identical: bool) -> tuple:
        """What the ranks of a sequence-parallel group must agree on (their batches' keys, shapes,
        dtypes, documents) and, with ``check_identical``, fingerprints of the token values."""
        keys = tuple((k, tuple(batch[k].shape), str(batch[k].dtype)) for k in self.keys)
        cu = None if self.cu is None else tuple(self.cu.tolist())
        content = None
        if check_identical:
            sums = []
            for k in self.keys:
                x = batch[k].detach().to(torch.float64).flatten()
                weights = torch.arange(1, x.numel() + 1, dtype=torch.float64, device=x.device).remainder(9973) + 1
                sums += [x.sum(), (x * weights).sum()]
            content = tuple(torch.stack(sums).tolist()) if sums else ()
        return keys, cu, content

    def targets(self, batch, shift_labels: bool, ignore_index: int) -> torch.Tensor | None:
        """The full sequence's ``labels`` as the loss reads them (shifted unless ``shift_labels`` is
        False), or None for a batch without labels among its shard keys."""
        if "labels" not in self.keys:
            return None
        labels = batch["labels"]
        return _shift(labels, self.dims["labels"], ignore_index, self.cu) if shift_labels else labels

    def apply(self, batch, targets, ignore_index: int, valid, world_size: int) -> tuple[dict, ShardInfo]:
        out = dict(batch)
        full = {k: batch[k] for k in self.keys}  # every tensor to split, on the full sequence
        fills = {k: 0 for k in self.keys}  # what padding holds; "count" continues the positions
        if targets is not None:
            full["labels"], fills["labels"] = targets, ignore_index
        if self.placement is not None:
            out, info = self._apply_placed(out, full, fills)
        elif self.cu is not None:
            out, info = self._apply_packed(out, full, fills)
        else:
            out, info = self._apply_dense(out, full, fills)
        if targets is not None:  # what Hugging Face's causal-LM loss reads (see the module doc)
            out["shift_labels"] = out["labels"]
            out["num_items_in_batch"] = torch.as_tensor(valid, device=targets.device).to(torch.float64) / world_size
        return out, info

    def _apply_dense(self, out: dict, full: dict, fills: dict) -> tuple[dict, ShardInfo]:
        if "position_ids" not in full and "input_ids" in full:
            ids = full["input_ids"]
            full["position_ids"] = torch.arange(self.seq_len, device=ids.device).expand(ids.shape[:2])
            self.dims["position_ids"] = self.dims["input_ids"]
        fills.setdefault("position_ids", "count")
        for k, x in full.items():
            if self.pad:
                x = _pad(x, self.dims[k], self.pad, fills[k])
            out[k] = L.shard(x, self.mesh, self.layout, dim=self.dims[k])
        info = ShardInfo(self.seq_len, self.seq_len + self.pad, self.layout, self.mesh)
        out[SHARD_INFO] = info
        return out, info

    def _apply_packed(self, out: dict, full: dict, fills: dict) -> tuple[dict, ShardInfo]:
        packed = L.shard_documents(self.cu, self.mesh, self.layout)
        info = ShardInfo(packed.total_tokens, len(packed.slot_to_token), self.layout, self.mesh, packed,
                         document_lengths=self.document_lengths.tolist())
        lengths = self.document_lengths
        padded = lengths[packed.padded_cu_seqlens.diff()[:len(lengths)] != lengths].tolist()
        multiple = L.ring_multiple(self.layout, self.mesh.ring_size)
        return self._documents(out, full, fills, info, lambda x, dim, pad: packed.shard(x, dim=dim, pad_value=pad),
                               packed.position_ids, packed.cu_seqlens,
                               PaddedDocuments(tuple(padded), multiple) if padded else None)

    def _apply_placed(self, out: dict, full: dict, fills: dict) -> tuple[dict, ShardInfo]:
        P, r, u = self.placement, self.mesh.ring_rank, self.mesh.ulysses_rank
        info = ShardInfo(P.total_tokens, P.ring_size * P.tokens_per_rank, self.layout, self.mesh, placement=P,
                         document_lengths=self.document_lengths.tolist())
        cu = P.cu_seqlens[r]
        if int(cu[-1]) < P.tokens_per_rank:  # the filler after the pieces as one last segment, so that
            # cu_seqlens ends at the ring rank's tokens as shard_documents' padding document makes it
            cu = torch.cat([cu, cu.new_tensor([P.tokens_per_rank])])
        return self._documents(out, full, fills, info, lambda x, dim, pad: P.shard(x, r, u, dim=dim, pad_value=pad),
                               P.position_ids(r).chunk(P.ulysses_size)[u], cu, P)

    def _documents(self, out, full, fills, info, shard, positions, cu, packing) -> tuple[dict, ShardInfo]:
        """The packed batch's local tensors (``shard(x, dim, pad_value)``), within-document
        ``positions`` and local ``cu_seqlens`` of this rank (those of its ring rank's tokens), which
        carry ``packing`` (the placement, padded documents or None, see :mod:`lightning_sp.core.packing`)."""
        device = full[self.keys[0]].device
        if not self.positions_given:  # within-document positions (those that restart at 0 are these)
            full.pop("position_ids", None)
            shape = (-1,) if self.dims.get("position_ids", 1) == 0 else (1, -1)
            out["position_ids"] = positions.to(device).view(shape)
        for k, x in full.items():
            out[k] = shard(x, self.dims[k], fills[k])
        max_seqlen = out["max_seqlen"] = int((cu[1:] - cu[:-1]).max())
        # a copy: the record keeps the packing while this tensor lives, so the packing must not hold it
        cu = out["cu_seqlens"] = cu.to(device, copy=True)
        if packing is not None:
            record_packing(cu, packing)
        # the same, under the names Hugging Face models pass on to attention, so model(**batch) works
        out.update(cu_seq_lens_q=cu, cu_seq_lens_k=cu, max_length_q=max_seqlen, max_length_k=max_seqlen)
        out[SHARD_INFO] = info
        return out, info


def documents_from_positions(position_ids) -> torch.Tensor | None:
    """The global ``cu_seqlens`` of one packed row whose ``position_ids`` restart at 0 for each
    document (Hugging Face's packed-batch convention, what ``DataCollatorWithFlattening`` and TRL's
    padding-free packing produce), or None where they never restart (a dense batch). Positions
    that neither count up by one nor restart at 0, or restarts in a batch of several rows, are errors."""
    pos = torch.as_tensor(position_ids)
    rows = pos.reshape(-1, pos.shape[-1]) if pos.dim() > 1 else pos[None]
    if pos.numel() == 0 or not bool((rows[:, 1:] == 0).any()):
        return None
    if rows.shape[0] != 1:
        raise SPConfigError(f"position_ids restart at 0 inside a row (packed documents, Hugging Face's convention) "
                            f"but the batch has {rows.shape[0]} rows (shape {tuple(pos.shape)}); pack the documents "
                            f"of a batch into one row (e.g. DataCollatorWithFlattening with batch size 1 per step) "
                            f"or give each row positions that count 0, 1, 2, ...")
    row = rows[0].to("cpu", torch.int64)
    bad = torch.nonzero((row[1:] != 0) & (row[1:] != row[:-1] + 1)).flatten()
    if len(bad) or int(row[0]) != 0:
        t = int(bad[0]) + 1 if len(bad) else 0
        raise SPConfigError(f"position_ids restart at 0 (packed documents) but position {t} holds "
                            f"{int(row[t])} after {int(row[t - 1]) if t else 'nothing'}; each document's "
                            f"positions must count 0, 1, 2, ..., or pass the documents' cu_seqlens instead")
    starts = torch.nonzero(row[1:] == 0).flatten() + 1
    return torch.cat([torch.zeros(1, dtype=torch.int64), starts, torch.tensor([len(row)])])


def _check_packed(cu, batch, keys, lengths) -> torch.Tensor:
    """The global cu_seqlens of a packed batch (on the CPU), checked against its tensors."""
    cu = torch.as_tensor(cu).to("cpu", torch.int64).flatten()
    if len(cu) < 2 or int(cu[0]) != 0 or bool((cu[1:] < cu[:-1]).any()):
        raise SPConfigError(f"cu_seqlens must be a 1-D non-decreasing sequence starting at 0, got {cu.tolist()}")
    for k in keys:
        x = batch[k]
        if x.dim() > 1 and x.shape[0] != 1:
            raise SPConfigError(f"a packed batch (with cu_seqlens) must have batch size 1; {k!r} has shape "
                                f"{tuple(x.shape)}; pack the documents of a batch into one row")
        if lengths[k] != int(cu[-1]):
            raise SPConfigError(f"cu_seqlens ends at {int(cu[-1])} but {k!r} has {lengths[k]} tokens; "
                                f"cu_seqlens must describe the packed sequence")
    return cu


def _shift(labels: torch.Tensor, dim: int, ignore_index: int, cu: torch.Tensor | None) -> torch.Tensor:
    """labels[t] <- labels[t + 1] along dim; the last position, and the last token of every document
    of a packed batch, get ignore_index (the one place the document-boundary rule lives)."""
    tail = labels.narrow(dim, 1, labels.shape[dim] - 1)
    shifted = torch.cat([tail, _pad(tail.narrow(dim, 0, 0), dim, 1, ignore_index)], dim=dim)
    if cu is None:
        return shifted
    ends = (cu[1:] - 1)[cu[1:] > cu[:-1]].to(labels.device)
    return shifted.index_fill(dim, ends, ignore_index)


def _pad(x: torch.Tensor, dim: int, n: int, fill: Any = 0) -> torch.Tensor:
    """Append n positions along dim, filled with ``fill``; ``fill="count"`` continues counting (positions)."""
    if fill == "count":
        last = x.narrow(dim, x.shape[dim] - 1, 1)
        steps = torch.arange(1, n + 1, device=x.device).view([-1 if d == dim else 1 for d in range(x.dim())])
        return torch.cat([x, last + steps], dim=dim)
    shape = list(x.shape)
    shape[dim] = n
    return torch.cat([x, x.new_full(shape, fill)], dim=dim)


def _describe_difference(groups: list[int], descriptions: list, sp_size: int) -> str:
    """The same words on every rank for sequence-parallel groups whose ranks hold different batches."""
    first = groups[0]
    ranks = range(first * sp_size, (first + 1) * sp_size)
    others = f" (and of groups {groups[1:]})" if len(groups) > 1 else ""
    fix = "every rank of a group must get the same batch: shard data over trainer.strategy.dp_rank / dp_size only"
    if all(len({descriptions[r][:2] for r in range(g * sp_size, (g + 1) * sp_size)}) == 1 for g in groups):
        keys = [k for k, _, _ in descriptions[first * sp_size][0]]
        return f"ranks of sequence-parallel group(s) {groups} received different samples (keys {keys}); {fix}"

    def summary(rank: int) -> str:
        keys, cu, _ = descriptions[rank]
        text = ", ".join(f"{k} {shape} {dtype.replace('torch.', '')}" for k, shape, dtype in keys)
        if cu is not None:
            text += f", cu_seqlens {list(cu[:8])}{'...' if len(cu) > 8 else ''}"
        return f"rank {rank}: {text}"

    return (f"the ranks of sequence-parallel group {first}{others} hold batches with different keys, shapes or "
            f"documents ({'; '.join(summary(r) for r in ranks)}); {fix}, and let every rank's batch hooks "
            f"treat the batch alike")
