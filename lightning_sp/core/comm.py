"""The two communication patterns of sequence parallelism: the ring's point-to-point exchange and
the Ulysses all-to-all. Nothing else lives here.

Both travel through torch.distributed (NCCL on GPUs, gloo on CPUs) or, on request, between the GPUs
of one node through the copy engines (:mod:`lightning_sp.copy_engine`: no SMs taken from the
attention kernels). ``auto`` is torch.distributed: the copy engines hide the transfers, but their
memory traffic slows the attention kernels by about as much (benchmark/RESULTS.md), so they are opt-in.
"""
from __future__ import annotations

import os

import torch
import torch.distributed as dist

from typing import TYPE_CHECKING

from .errors import SPConfigError

if TYPE_CHECKING:
    from .mesh import SPMesh

TRANSPORTS = ("auto", "nccl", "copy_engine")
ENV_TRANSPORT = "LIGHTNING_SP_TRANSPORT"
_default_transport: str | None = None  # set_transport's choice; None: the environment's, else "auto"
_engines: dict = {}  # process group -> (CopyEngineTransport or None, why it cannot be used)


def set_transport(name: str) -> None:
    """Set the default transport: the one a :class:`~lightning_sp.core.config.SPConfig` built later
    with ``transport=None`` takes. ``auto`` (today: torch.distributed, see the module doc), ``nccl``
    (torch.distributed: NCCL, or gloo for CPU tensors) or ``copy_engine`` (the GPUs' copy engines;
    an error where a group cannot use them). Meshes already built keep their config's transport."""
    global _default_transport
    _default_transport = check_transport(name)


def check_transport(name: str) -> str:
    """``name`` if it is one of ``TRANSPORTS``, else an SPConfigError naming the choices."""
    if name not in TRANSPORTS:
        raise SPConfigError(f"unknown transport {name!r}; choose one of {', '.join(TRANSPORTS)}")
    return name


def current_transport() -> str:
    """The default transport: ``set_transport``'s choice, else the ``LIGHTNING_SP_TRANSPORT``
    environment variable, else ``auto``."""
    if _default_transport is not None:
        return _default_transport
    name = os.environ.get(ENV_TRANSPORT, "auto")
    if name not in TRANSPORTS:
        raise SPConfigError(f"{ENV_TRANSPORT}={name!r} is not a transport; set it to one of {', '.join(TRANSPORTS)}")
    return name


def copy_engine_for(group, device: torch.device, transport: str):
    """The copy-engine transport of ``group`` where ``transport`` is ``copy_engine``, else None
    (torch.distributed). Collective at the group's first exchange (every rank of a group exchanges
    in the same order)."""
    if check_transport(transport) != "copy_engine":
        return None
    if device.type != "cuda":
        raise SPConfigError(f"transport 'copy_engine' needs CUDA tensors, got {device.type}; "
                            f"use transport 'auto' or 'nccl'")
    if group not in _engines:
        from . import copy_engine
        reason = copy_engine.unavailable_reason(group)
        _engines[group] = (None if reason else copy_engine.CopyEngineTransport(group), reason)
    engine, reason = _engines[group]
    if engine is None:
        raise SPConfigError(f"transport 'copy_engine' cannot be used: {reason}; use 'auto' or 'nccl'")
    return engine


def transport_buffer_bytes(uncounted_only: bool = False) -> int:
    """GPU memory held by copy-engine transports; ``uncounted_only``: what torch's allocator
    statistics (``max_memory_allocated``) miss, which a memory comparison must add."""
    return sum(engine.buffer_bytes for engine, _ in _engines.values()
               if engine is not None and not (uncounted_only and engine.counted_by_allocator))


class _Pending:
    def __init__(self, requests, received):
        self._requests, self._received = requests, received

    def wait(self) -> list[torch.Tensor]:
        for req in self._requests:
            req.wait()
        return self._received


class RingExchange:
    """Send tensors to the next rank of the ring while receiving the previous rank's (``reverse``:
    to the previous, from the next).

    ``start`` returns at once; the transfer overlaps whatever runs before ``wait``. Each call uses
    fresh receive buffers, so the tensors being sent may be read until then (double buffering).
    """

    def __init__(self, mesh: SPMesh, reverse: bool = False):
        size, rank = mesh.ring_size, mesh.ring_rank
        step = -1 if reverse else 1
        self.group, self.transport = mesh.ring_group, mesh.config.transport
        self.next_index, self.prev_index = (rank + step) % size, (rank - step) % size  # within the group
        self.next_rank, self.prev_rank = mesh.ring_ranks[self.next_index], mesh.ring_ranks[self.prev_index]

    def start(self, tensors):
        tensors = [t.contiguous() for t in tensors]
        engine = copy_engine_for(self.group, tensors[0].device, self.transport)
        if engine is not None:
            return engine.send_recv(tensors, self.next_index, self.prev_index)
        received = [torch.empty_like(t) for t in tensors]
        ops = [dist.P2POp(dist.isend, t, self.next_rank, self.group) for t in tensors]
        ops += [dist.P2POp(dist.irecv, t, self.prev_rank, self.group) for t in received]
        return _Pending(dist.batch_isend_irecv(ops), received)


def start_all_to_all(x: torch.Tensor, group, transport: str):
    """x is (U, ...): slice i goes to rank i of ``group``; slice i of the result (``wait()[0]``) came
    from rank i. ``transport``: the mesh's (``mesh.config.transport``). Returns at once, like
    ``RingExchange.start``."""
    engine = copy_engine_for(group, x.device, transport)
    if engine is not None:
        return engine.all_to_all(x)
    out = torch.empty_like(x)
    work = dist.all_to_all_single(out, x.contiguous(), group=group, async_op=True)
    return _Pending([work], [out])
