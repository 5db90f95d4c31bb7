"""Batch preparation: one pure function from a batch of full sequences to this rank's part of it.

:func:`prepare_batch` is what both strategies do to every batch and what
:class:`~lightning_sp.app.lm.CausalLM` does under any other strategy (a single-process mesh):

1. validate: a dict whose shard keys have one sequence length; a packed batch (``cu_seqlens``) is
   one row that ``cu_seqlens`` describes;
2. agree: across the ranks of the mesh, one tiny all-reduce per batch, so that a bad batch on any
   rank fails every rank at once with the same message (:mod:`.agreement`);
3. shift ``labels`` on the full sequence (``labels[t] <- labels[t + 1]``; the last position and, in
   packed batches, every document's last token get ``ignore_index``, so no token learns to
   predict the next document even when ``labels`` is just ``input_ids``);
4. add global ``position_ids`` (within-document positions for packed batches);
5. pad to the layout's multiple (at the end, where causal attention hides it from real tokens) and
   keep this rank's tokens of every shard key; packed batches get local ``cu_seqlens``/``max_seqlen``.

The result carries a :class:`ShardInfo` under ``batch["shard_info"]``: what :func:`gather_sequence`
needs to undo the sharding, and the mark that the batch is prepared.
"""
from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch

from ..core import layout as L
from ..core.errors import SPConfigError
from ..core.mesh import SPMesh, single_process_mesh
from .agreement import agree_on_batch

DEFAULT_SHARD_KEYS = ("input_ids", "labels", "position_ids", "attention_mask")
SHARD_INFO = "shard_info"  # the key of a prepared batch's ShardInfo


class ShardInfo:
    """How a batch was laid out over its sequence-parallel group: what :func:`gather_sequence` undoes.

    A plain object (not a dataclass) on purpose: Lightning's batch transfer rebuilds dataclasses
    found in a batch, and this one holds process groups.
    """

    __slots__ = ("seq_len", "padded_len", "layout", "mesh", "packed")

    def __init__(self, seq_len: int, padded_len: int, layout: str, mesh: SPMesh, packed: L.PackedShard | None = None):
        self.seq_len = seq_len  # tokens of the original (unpadded) sequence or packed row
        self.padded_len = padded_len  # tokens of the padded sequence, over all ranks of the group
        self.layout = layout
        self.mesh = mesh
        self.packed = packed  # the placement of packed documents, or None for dense sequences

    def __repr__(self) -> str:
        kind = "packed" if self.packed is not None else "dense"
        return (f"ShardInfo({kind}, seq_len={self.seq_len}, padded_len={self.padded_len}, layout={self.layout!r}, "
                f"sp_rank={self.mesh.sp_rank} of {self.mesh.sp_size})")


def prepare_batch(batch: Mapping, mesh: SPMesh | None = None, *, layout: str | None = None, shift_labels: bool = True,
                  ignore_index: int = -100, shard_keys=DEFAULT_SHARD_KEYS, pad_to_multiple: bool = True,
                  check_identical: bool = False, agree: bool = True) -> tuple[dict, ShardInfo]:
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
            process groups).

    Returns:
        ``(local_batch, shard_info)``; ``local_batch["shard_info"]`` is ``shard_info``.
    """
    layout = L.canonical_layout(layout or ("contiguous" if mesh is None else mesh.config.layout))
    mesh = mesh or single_process_mesh()
    plan, problem = None, None
    try:
        plan = _Plan(batch, mesh, layout, tuple(shard_keys), pad_to_multiple)
    except SPConfigError as err:
        problem = str(err)
    if agree and mesh.world_size > 1:
        description = None if plan is None else plan.description(batch, check_identical)
        agree_on_batch(problem, description, mesh, _describe_difference)
    elif problem is not None:
        raise SPConfigError(problem)
    return plan.apply(batch, shift_labels, ignore_index)


def gather_sequence(x_local: torch.Tensor, shard_info: ShardInfo, dim: int = 1) -> torch.Tensor:
    """Collective over the sequence-parallel group: the full-sequence ``x`` of a prepared batch in
    original order, padding dropped (e.g. for predict outputs). ``dim``: the sequence (packed: token) dim."""
    if not isinstance(shard_info, ShardInfo):
        raise SPConfigError(f"gather_sequence needs the ShardInfo of a prepared batch (batch['{SHARD_INFO}']), "
                            f"got {type(shard_info).__name__}")
    if shard_info.packed is not None:
        return shard_info.packed.unshard(x_local, shard_info.mesh, dim=dim)
    full = L.unshard(x_local, shard_info.mesh, shard_info.layout, dim=dim)
    return full.narrow(dim, 0, shard_info.seq_len)


class _Plan:
    """A validated batch: which keys to split along which dim, and how long the sequence is.
    Constructing it raises :class:`SPConfigError` for a batch that cannot be prepared."""

    def __init__(self, batch, mesh: SPMesh, layout: str, shard_keys: tuple, pad_to_multiple: bool):
        if not isinstance(batch, Mapping):
            raise SPConfigError(f"batch preparation needs batches that are dicts (e.g. with 'input_ids', 'labels'), "
                                f"got {type(batch).__name__}; return a dict from the dataset or collate_fn")
        if SHARD_INFO in batch:
            raise SPConfigError(f"this batch was prepared already (it has {SHARD_INFO!r}); prepare each batch once")
        self.mesh, self.layout = mesh, layout
        self.keys = [k for k in shard_keys if k in batch and torch.is_tensor(batch[k])]
        if not self.keys:
            raise SPConfigError(f"the batch has none of the shard keys {list(shard_keys)} (it has {sorted(batch)}); "
                                f"pass shard_keys=[...] naming its sequence tensors")
        self.dims = {k: 0 if batch[k].dim() == 1 else 1 for k in self.keys}
        lengths = {k: batch[k].shape[self.dims[k]] for k in self.keys}
        self.seq_len = lengths[self.keys[0]]
        self.cu = None
        if batch.get("cu_seqlens") is not None:
            self.cu = _check_packed(batch, self.keys, lengths)
        elif len(set(lengths.values())) > 1:
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

    def apply(self, batch, shift_labels: bool, ignore_index: int) -> tuple[dict, ShardInfo]:
        out = dict(batch)
        full = {k: batch[k] for k in self.keys}  # every tensor to split, on the full sequence
        fills = {k: 0 for k in self.keys}  # what padding holds; "count" continues the positions
        if shift_labels and "labels" in full:
            full["labels"] = _shift(full["labels"], self.dims["labels"], ignore_index, self.cu)
        if "labels" in full:
            fills["labels"] = ignore_index
        if self.cu is not None:
            return self._apply_packed(out, full, fills)
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
        device = full[self.keys[0]].device
        for k, x in full.items():
            out[k] = packed.shard(x, dim=self.dims[k], pad_value=fills[k])
        if "position_ids" not in full:
            out["position_ids"] = packed.position_ids.to(device).view(1, -1)
        out["cu_seqlens"] = packed.cu_seqlens.to(device)
        out["max_seqlen"] = packed.max_seqlen
        info = ShardInfo(packed.total_tokens, len(packed.slot_to_token), self.layout, self.mesh, packed)
        out[SHARD_INFO] = info
        return out, info


def _check_packed(batch, keys, lengths) -> torch.Tensor:
    """The global cu_seqlens of a packed batch (on the CPU), checked against its tensors."""
    cu = torch.as_tensor(batch["cu_seqlens"]).to("cpu", torch.int64).flatten()
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
