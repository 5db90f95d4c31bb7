"""Every rank fails together: checks whose outcome all ranks agree on before any of them raises.

A problem seen by one rank only (a bad batch, a sampler that shards over the wrong ranks) must not
leave the other ranks waiting in a collective the failing rank never joins. The checks here are
collective: every rank calls them at the same point and, if any rank found a problem, every rank
raises the same :class:`SPConfigError`, naming the rank and the fix.
"""
from __future__ import annotations

import hashlib
from typing import Any

import torch
import torch.distributed as dist
from torch.utils.data import DistributedSampler

from ..core.errors import SPConfigError
from ..core.mesh import SPMesh

_LOW = -(2 ** 62)  # below every fingerprint: the identity of the MAX reduction


def world_size() -> int:
    """Processes of the default group (1 without one)."""
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def raise_if_any(problem: str | None) -> None:
    """Collective over the world: raise the same error on every rank if any rank found a problem
    (one object gather)."""
    problems = [problem]
    if world_size() > 1:
        problems = [None] * world_size()
        dist.all_gather_object(problems, problem)
    _raise_first(problems)


def _raise_first(problems: list) -> None:
    for rank, found in enumerate(problems):
        if found is not None:
            raise SPConfigError(f"rank {rank}: {found}" if len(problems) > 1 else found)


def fingerprint(description: Any) -> int:
    """A 62-bit digest of a description built from ints, strings and tuples: equal on every process
    for equal descriptions (Python's own ``hash`` of strings differs between processes)."""
    return int.from_bytes(hashlib.blake2b(repr(description).encode(), digest_size=8).digest(), "little") >> 2


def _collective_device() -> torch.device:
    """Where the default group reduces: the CPU under gloo, else this process's GPU."""
    if "gloo" in str(dist.get_backend()):
        return torch.device("cpu")
    return torch.device("cuda", torch.cuda.current_device())


def agree_on_batch(problem: str | None, description: Any, mesh: SPMesh, describe_difference,
                   valid_tokens: int | torch.Tensor = 0) -> int:
    """Collective over all ranks of ``mesh`` (a world of several processes), once per batch: raise the same error on every rank if
    any rank's batch is invalid (``problem``) or if the ranks of a sequence-parallel group hold
    batches with different ``description`` (keys, shapes, ...); else return the sum of
    ``valid_tokens`` over the data-parallel groups (each group's count of its full batch: the
    valid tokens of the whole world's batches, which an exact token mean divides by).

    It costs one all-reduce (MAX) of a (data-parallel groups x 4) int64 table: each rank writes into
    its group's row its problem flag, its description's fingerprint (and its negation, so that the
    maximum also yields the minimum) and ``valid_tokens``. The ranks of a group hold the same batch,
    so they write the same count and its maximum is that count; the rows' sum is the world's. Only
    when something is wrong are the messages or the descriptions gathered, so every rank can raise
    the same message; ``describe_difference(groups, descriptions, sp_size)`` words a difference.
    """
    mine = _LOW if problem is not None else fingerprint(description)
    device = _collective_device()
    table = torch.full((mesh.dp_size, 4), _LOW, dtype=torch.int64)
    table[:, 0] = table[:, 3] = 0
    table[mesh.dp_rank, :3] = torch.tensor([int(problem is not None), mine, -mine if problem is None else _LOW])
    table = table.to(device)
    table[mesh.dp_rank, 3] = torch.as_tensor(valid_tokens).to(device)  # may live on the GPU: no host sync here
    dist.all_reduce(table, op=dist.ReduceOp.MAX)
    flags, high, neg_low, counts = table.cpu().unbind(1)
    if bool(flags.any()):
        problems = [None] * mesh.world_size
        dist.all_gather_object(problems, problem)
        _raise_first(problems)
    differing = [d for d in range(mesh.dp_size) if int(high[d]) != -int(neg_low[d])]
    if differing:
        descriptions = [None] * mesh.world_size
        dist.all_gather_object(descriptions, description)
        raise SPConfigError(describe_difference(differing, descriptions, mesh.sp_size))
    return int(counts.sum())


def sampler_problem(dataloader, dp_size: int, dp_rank: int) -> str | None:
    """What is wrong with a dataloader whose sampler shards over other ranks than the data-parallel
    ones (under sequence parallelism every rank of a group must get the same samples), or None."""
    for sampler in (getattr(dataloader, "sampler", None),
                    getattr(getattr(dataloader, "batch_sampler", None), "sampler", None)):
        replicas, rank = getattr(sampler, "num_replicas", None), getattr(sampler, "rank", None)
        if isinstance(sampler, DistributedSampler) or (isinstance(replicas, int) and isinstance(rank, int)):
            if (replicas, rank) != (dp_size, dp_rank):
                return (f"the dataloader's {type(sampler).__name__} shards over num_replicas={replicas} "
                        f"(rank {rank}), but under sequence parallelism every rank of a sequence-parallel group "
                        f"must get the same samples; shard over the data-parallel dimension only: "
                        f"num_replicas=trainer.strategy.dp_size ({dp_size}), "
                        f"rank=trainer.strategy.dp_rank, or leave the sampler to Lightning")
    return None
