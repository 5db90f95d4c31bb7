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
    """Send tensors to the next rank of the ring while receiving the previous rank's (``reverse``:
    to the previous, from the next).

    ``start`` returns at once; the transfer overlaps whatever runs before ``wait``. Each call uses
    fresh receive buffers, so the tensors being sent may be read until then (double buffering).
    """

    def __init__(self, mesh: SPMesh, reverse: bool = False):
        size, rank = mesh.ring_size, mesh.ring_rank
        step = -1 if reverse else 1
        self.group = mesh.ring_group
        self.next_rank = mesh.ring_ranks[(rank + step) % size]
        self.prev_rank = mesh.ring_ranks[(rank - step) % size]

    def start(self, tensors) -> _Pending:
        tensors = [t.contiguous() for t in tensors]
        received = [torch.empty_like(t) for t in tensors]
        ops = [dist.P2POp(dist.isend, t, self.next_rank, self.group) for t in tensors]
        ops += [dist.P2POp(dist.irecv, t, self.prev_rank, self.group) for t in received]
        return _Pending(dist.batch_isend_irecv(ops), received)


def start_all_to_all(x: torch.Tensor, group) -> _Pending:
    """x is (U, ...): slice i goes to rank i of the group; slice i of the result (``wait()[0]``) came
    from rank i. Returns at once, like ``RingExchange.start``."""
    out = torch.empty_like(x)
    work = dist.all_to_all_single(out, x.contiguous(), group=group, async_op=True)
    return _Pending([work], [out])
