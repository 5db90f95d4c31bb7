"""The two communication patterns of sequence parallelism: the ring's point-to-point exchange and
the Ulysses all-to-all. Nothing else lives here."""
from __future__ import annotations

import torch
import torch.distributed as dist

from .mesh import SPMesh


class _Pending:
    def __init__(self, requests, received):
        self._requests, self._received = requests, received

    def wait(self) -> list[torch.Tensor]:
        for req in self._requests:
            req.wait()
        return self._received


class RingExchange:
    """Send tensors to the next rank of the ring while receiving the previous rank's.

    ``start`` returns at once; the transfer overlaps whatever runs before ``wait``. Each call uses
    fresh receive buffers, so the tensors being sent may be read until then (double buffering).
    """

    def __init__(self, mesh: SPMesh):
        size, rank = mesh.ring_size, mesh.ring_rank
        self.group = mesh.ring_group
        self.next_rank = mesh.ring_ranks[(rank + 1) % size]
        self.prev_rank = mesh.ring_ranks[(rank - 1) % size]

    def start(self, tensors) -> _Pending:
        tensors = [t.contiguous() for t in tensors]
        received = [torch.empty_like(t) for t in tensors]
        ops = [dist.P2POp(dist.isend, t, self.next_rank, self.group) for t in tensors]
        ops += [dist.P2POp(dist.irecv, t, self.prev_rank, self.group) for t in received]
        return _Pending(dist.batch_isend_irecv(ops), received)


def all_to_all(x: torch.Tensor, group) -> torch.Tensor:
    """x is (U, ...): slice i goes to rank i of the group; slice i of the result came from rank i."""
    out = torch.empty_like(x)
    dist.all_to_all_single(out, x.contiguous(), group=group)
    return out
