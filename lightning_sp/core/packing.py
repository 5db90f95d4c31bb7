"""What the local ``cu_seqlens`` of a prepared packed batch describe, readable by attention without
any strategy or sequence context.

The local ``cu_seqlens`` of a packed batch mean different things by how its documents were laid
out: placed on the ring ranks by work (only a :class:`~lightning_sp.core.placement.DocumentPlacement`
says which rank holds what) or spread over every ring rank, where documents of lengths off the
layout's multiple got padding at their ends, which only causal attention hides. Batch preparation
records that on the tensor it returns (:func:`record_packing`), and attention reads it
(:func:`recorded_packing`); a tensor nothing recorded means documents spread with the layout.

The record is kept by the tensor object (and the views of it with its layout, e.g. detached for
a recomputation) while it lives, not by its values: the same boundaries mean another layout in
another batch.
"""
from __future__ import annotations

import weakref
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class PaddedDocuments:
    """Documents spread over every ring rank of which some were padded at their ends to the layout's
    ``multiple``: ``lengths`` are those documents' own lengths."""

    lengths: tuple[int, ...]
    multiple: int


_records: dict[tuple, tuple[weakref.ref, object]] = {}  # (device, address) -> (the tensor, what it describes)


def same_tensor(a: torch.Tensor, b: torch.Tensor | None) -> bool:
    """``a`` is ``b`` or a view of its memory with the same dtype and layout (e.g. detached for recomputation)."""
    return b is not None and (a is b or (a.device == b.device and a.data_ptr() == b.data_ptr() and a.dtype == b.dtype
                                         and a.shape == b.shape and a.stride() == b.stride()))


def record_packing(cu_seqlens: torch.Tensor, packing) -> None:
    """Record that ``cu_seqlens`` describe ``packing``: a ``DocumentPlacement`` or :class:`PaddedDocuments`."""
    key = (cu_seqlens.device, cu_seqlens.data_ptr())

    def forget(ref, key=key, records=_records):  # bound here: at interpreter exit the module's names are gone
        if records.get(key, (None,))[0] is ref:
            del records[key]

    _records[key] = (weakref.ref(cu_seqlens, forget), packing)


def recorded_packing(cu_seqlens):
    """What :func:`record_packing` recorded for ``cu_seqlens`` (or a view of it with its layout), else None."""
    if not torch.is_tensor(cu_seqlens):
        return None
    ref, packing = _records.get((cu_seqlens.device, cu_seqlens.data_ptr()), (None, None))
    return packing if ref is not None and same_tensor(cu_seqlens, ref()) else None
