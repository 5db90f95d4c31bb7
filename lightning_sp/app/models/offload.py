"""Checkpointed layer inputs kept in host memory: copied out during the forward pass and prefetched
back one layer ahead during the backward pass, on a side CUDA stream, so the copies overlap compute.

Under full activation checkpointing a decoder layer keeps only its input for the backward pass
(``torch.utils.checkpoint`` saves it and recomputes the layer from it): at long sequences these
float32 ``(batch, tokens, hidden)`` tensors, one per layer, are most of the activation memory.
:class:`CheckpointOffload` moves them to pinned host memory with ``torch.autograd.graph.saved_tensors_hooks``
entered around each layer's checkpoint call: the checkpoint's inputs are the only tensors saved under
these hooks (what the layer computes inside goes to the checkpoint's own hooks, which keep nothing).

``torch.autograd.graph.save_on_cpu`` is the same pair of hooks with neither overlap: it copies each
tensor out synchronously and back when the backward reaches it. Here:

* pack (forward): a side stream copies the tensor device-to-host once the current stream has made
  it; the caching allocator is told (``record_stream``) so that its GPU memory is reused only after
  the copy. The forward does not wait.
* unpack (backward): when the backward reaches layer i (the checkpoint recomputes it from its input),
  layer i's input is restored (prefetched already, or copied now) and layer i-1's is prefetched: its
  host-to-device copy runs on the side stream while layer i is recomputed and differentiated. The
  current stream waits for a copy (a CUDA event, not a host synchronization) before reading it.
* the last checkpointed layer's input stays on the GPU: the backward needs it first, so its copies
  would overlap nothing.

In the backward pass at most two layer inputs are on the GPU at once (the one in use and the one
prefetched). Host memory is pinned, from torch's caching host allocator (reused step after step; a
block is handed out again only after the copies that use it are done); the allocator rounds every
block up to a power of two, so each tensor is held in pieces whose sizes are powers of two: a tensor
of n bytes takes less than n + ``granule`` bytes of host memory.

Only floating-point tensors move: a layer's integer inputs (``position_ids``, ``cu_seqlens``) are
the same for every layer and the caller holds them anyway. A non-contiguous tensor stays where it is.

With no CUDA tensors there is nothing to offload: :meth:`CheckpointOffload.begin` says so once in
the log and installs no hooks, unless the offload was made with ``force=True``. Then the same hooks
copy each tensor into separate CPU buffers, in the same pieces, and back (synchronously: no streams):
the tests check that way that every restored tensor is exact.
"""
from __future__ import annotations

import contextlib
import functools
import logging
import os
import threading
import weakref

import torch
import torch.distributed as dist

from ...core.errors import SPConfigError

log = logging.getLogger(__name__)

GRANULE = 2 << 20  # bytes: host buffers are whole multiples of this (powers of two below it)


def piece_sizes(nbytes: int, granule: int = GRANULE) -> list[int]:
    """Powers of two, largest first, that hold ``nbytes``: the binary digits of ``nbytes`` rounded up
    to a multiple of ``granule`` (one power of two when ``nbytes`` is smaller)."""
    if granule < 1 or granule & (granule - 1):
        raise SPConfigError(f"granule must be a power of two, got {granule}")
    if nbytes <= granule:
        return [1 << max(nbytes - 1, 0).bit_length()]
    total = -(-nbytes // granule) * granule
    return [1 << b for b in range(total.bit_length() - 1, -1, -1) if total >> b & 1]


class CheckpointOffload:
    """The saved-tensor hooks and host buffers of one model's offloaded layer inputs.

    ``begin(device)`` once per forward pass (False: nothing is offloaded this pass), then
    ``hooks(keep=...)`` around each checkpointed layer, in the order of the layers. ``host_bytes`` and
    ``peak_host_bytes`` count the host memory held by saved tensors; ``offloaded`` the tensors moved.
    ``force=True`` runs the same hooks and host buffers when the tensors are on the CPU (for tests).
    """

    def __init__(self, force: bool = False, granule: int = GRANULE):
        piece_sizes(1, granule)  # validates the granule
        self.force, self.granule = force, granule
        self.host_bytes = self.peak_host_bytes = self.offloaded = 0
        self._last = None  # weak reference to the last tensor packed in this forward pass
        self._streams: dict[torch.device, torch.cuda.Stream] = {}
        self._lock = threading.Lock()  # saved tensors are freed on the autograd engine's threads
        self._said_no_op = False

    def begin(self, device: torch.device) -> bool:
        """Start a forward pass whose activations are on ``device``: whether its layer inputs move."""
        self._last = None
        if device.type == "cuda" or self.force:
            return True
        if not self._said_no_op:
            self._said_no_op = True
            rank = dist.get_rank() if dist.is_available() and dist.is_initialized() else int(os.environ.get("RANK", 0))
            if rank == 0:
                log.warning(f"offload_checkpoints: the layer inputs are on {device.type}, not a GPU: nothing to "
                            f"offload, they stay where they are")
        return False

    def hooks(self, keep: bool = False) -> torch.autograd.graph.saved_tensors_hooks:
        """The hooks for one checkpointed layer; ``keep``: its input stays on the device (the backward
        starts with it) but still starts the prefetch of the layer before."""
        return torch.autograd.graph.saved_tensors_hooks(functools.partial(self._pack, keep=keep), self._unpack)

    def _pack(self, t: torch.Tensor, keep: bool):
        if not t.is_floating_point() or t.numel() == 0:
            return t
        saved = _Saved(self, t, keep or not t.is_contiguous(), self._last)
        self._last = weakref.ref(saved)
        return saved

    def _unpack(self, saved):
        if isinstance(saved, torch.Tensor):
            return saved
        t = saved.restore()
        before = saved.prev and saved.prev()
        if before is not None:  # the layer the backward reaches next
            before.prefetch()
        return t

    def _stream(self, device: torch.device):
        """The side stream of ``device`` (None on the CPU: the copies are synchronous)."""
        if device.type != "cuda":
            return None
        if device not in self._streams:
            self._streams[device] = torch.cuda.Stream(device)
        return self._streams[device]

    def _copy_out(self, t: torch.Tensor) -> list[torch.Tensor]:
        """Host pieces holding ``t``'s bytes, filled on the side stream (or now, on the CPU)."""
        flat = t.reshape(-1).view(torch.uint8)
        stream = self._stream(t.device)
        pieces = [torch.empty(n, dtype=torch.uint8, pin_memory=stream is not None)
                  for n in piece_sizes(flat.numel(), self.granule)]
        if stream is not None:
            stream.wait_stream(torch.cuda.current_stream(t.device))  # t is made
        with torch.cuda.stream(stream) if stream is not None else contextlib.nullcontext():
            for piece, part in zip(pieces, _parts(flat, pieces)):
                piece[:part.numel()].copy_(part, non_blocking=stream is not None)
        if stream is not None:
            t.record_stream(stream)  # its memory is reused only after the copy
        self._count(sum(p.numel() for p in pieces), tensors=1)
        return pieces

    def _copy_in(self, saved: "_Saved") -> tuple[torch.Tensor, object]:
        """(a new device tensor with the saved bytes, the event its copy records, or None)."""
        flat = torch.empty(saved.nbytes, dtype=torch.uint8, device=saved.device)
        stream = self._stream(saved.device)
        event = None
        if stream is not None:
            stream.wait_stream(torch.cuda.current_stream(saved.device))  # flat is allocated
        with torch.cuda.stream(stream) if stream is not None else contextlib.nullcontext():
            for piece, part in zip(saved.pieces, _parts(flat, saved.pieces)):
                part.copy_(piece[:part.numel()], non_blocking=stream is not None)
            if stream is not None:
                event = stream.record_event()
                flat.record_stream(stream)  # safe to free even if no one waits for it
        return flat.view(saved.dtype).view(saved.shape), event

    def _count(self, nbytes: int, tensors: int = 0) -> None:
        with self._lock:
            self.host_bytes += nbytes
            self.peak_host_bytes = max(self.peak_host_bytes, self.host_bytes)
            self.offloaded += tensors


def _parts(flat: torch.Tensor, pieces: list[torch.Tensor]) -> list[torch.Tensor]:
    """``flat`` cut at the pieces' sizes (the last part may be shorter than its piece)."""
    out, start = [], 0
    for piece in pieces:
        out.append(flat[start:start + piece.numel()])
        start += piece.numel()
    return out


class _Saved:
    """One saved tensor: kept on its device, or in host pieces and, once fetched, on the device again."""

    __slots__ = ("owner", "prev", "shape", "dtype", "device", "nbytes", "kept", "pieces", "fetched", "__weakref__")

    def __init__(self, owner: CheckpointOffload, t: torch.Tensor, keep: bool, prev):
        self.owner, self.prev = owner, prev
        self.shape, self.dtype, self.device = t.shape, t.dtype, t.device
        self.nbytes = t.numel() * t.element_size()
        self.kept = t if keep else None
        self.pieces = [] if keep else owner._copy_out(t)
        self.fetched = None

    def prefetch(self) -> None:
        if self.kept is None and self.fetched is None:
            self.fetched = self.owner._copy_in(self)

    def restore(self) -> torch.Tensor:
        if self.kept is not None:
            return self.kept
        self.prefetch()
        (t, event), self.fetched = self.fetched, None  # a second backward (retain_graph) copies again
        if event is not None:
            torch.cuda.current_stream(self.device).wait_event(event)
        return t

    def __del__(self):
        if self.pieces:
            self.owner._count(-sum(p.numel() for p in self.pieces))
