"""Ulysses: an all-to-all that trades sequence shards for head shards, and back.

The heads can travel in groups: each group's all-to-all is started at once and waited for only when
its attention begins, so group g+1 is in flight while group g attends, and group g's result travels
back while group g+1 attends. Rank u of the Ulysses group always owns heads
[u*H/U, (u+1)*H/U); group g of G is the g-th slice of those, whatever G is, so grouping changes the
schedule, never the result.
"""
from __future__ import annotations

import math

import torch

from ..comm import start_all_to_all
from ..config import check_heads  # noqa: F401  (importable from here, as before)
from ..errors import SPConfigError
from ..mesh import SPMesh


def replicated_kv_heads(kv_heads: int, ulysses_size: int) -> int:
    """KV heads after replication: when the Ulysses degree does not divide them (GQA/MQA), each is
    repeated so that every rank gets whole KV heads (autograd sums the replicas' gradients)."""
    return math.lcm(kv_heads, ulysses_size)


def choose_head_groups(q_heads: int, kv_heads: int, ulysses_size: int, requested: int | str = "auto") -> int:
    """How many head groups the all-to-all pipeline uses. A group must hold whole query heads and
    their KV heads on every rank, so G divides both per-rank head counts. Without Ulysses there is
    no all-to-all to overlap: any valid G gives 1. ``auto`` is 2 where the heads split in two, else
    1: since the Ulysses group runs on a high-priority NCCL stream (``mesh``), the second group's
    all-to-all overlaps the first group's attention, and more groups add launches without more
    overlap (the measurements are in benchmark/RESULTS.md)."""
    U = ulysses_size
    per_rank = math.gcd(q_heads // U, replicated_kv_heads(kv_heads, U) // U)
    if requested == "auto":
        return 2 if U > 1 and per_rank % 2 == 0 else 1
    if not isinstance(requested, int) or requested < 1 or per_rank % requested:
        valid = [g for g in range(1, per_rank + 1) if per_rank % g == 0]
        raise SPConfigError(
            f"head_groups={requested!r} does not split the {q_heads // U} query and "
            f"{replicated_kv_heads(kv_heads, U) // U} key/value heads each rank attends into equal groups; "
            f"choose one of {valid} or 'auto'")
    return requested if U > 1 else 1


def copy_rows(dst: torch.Tensor, src: torch.Tensor) -> None:
    """``dst.copy_(src)`` for the layout changes around the all-to-all: on 8-byte views of both
    where they allow it (see ``wide_views``), the same bits moved in a quarter of the bf16 loads."""
    dst, src = wide_views(dst, src)
    dst.copy_(src)


def wide_views(dst: torch.Tensor, src: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """int64 views of dst and src where both hold the same narrower dtype with the last dimension
    contiguous and every other stride and offset in whole 8 bytes (the head dimension of these
    layouts), else the tensors themselves. The strided copy kernel moves one element per load, so
    two bytes at a time are far from the memory's bandwidth."""
    size, wide = src.element_size(), torch.int64.itemsize
    fits = src.dtype == dst.dtype and size < wide and all(
        t.stride(-1) == 1 and t.shape[-1] * size % wide == 0 and t.storage_offset() * size % wide == 0
        and all(stride * size % wide == 0 for stride in t.stride()[:-1]) for t in (dst, src))
    return (dst.view(torch.int64), src.view(torch.int64)) if fits else (dst, src)


class HeadScatter:
    """Sequence shards (b, s, H_i, d) -> whole-sequence head shards (b, U*s, H_i/(U*G), d), one head
    group at a time. Every group's all-to-all starts here; ``[g]`` waits for group g only."""

    def __init__(self, xs, mesh: SPMesh, groups: int):
        self.U, self.groups = mesh.ulysses_size, groups
        if self.U == 1:
            self._xs = list(xs)
            return
        b, s, _, d = xs[0].shape
        self._shape = (b, s, d)
        self._heads = [x.shape[2] // (self.U * groups) for x in xs]
        self._pending = [self._start(xs, g, mesh) for g in range(groups)]

    def _start(self, xs, g, mesh: SPMesh):
        b, s, d = self._shape
        buf = xs[0].new_empty(self.U, b, s, sum(self._heads), d)
        for x, part in zip(xs, buf.split(self._heads, dim=3)):
            copy_rows(part, x.unflatten(2, (self.U, self.groups, -1))[:, :, :, g].permute(2, 0, 1, 3, 4))
        return start_all_to_all(buf, mesh.ulysses_group, mesh.config.transport)  # slice u of buf goes to rank u

    def __getitem__(self, g: int) -> list[torch.Tensor]:
        if self.U == 1:
            return self._xs
        b, s, d = self._shape
        recv = self._pending[g].wait()[0]  # slice u came from rank u: the u-th chunk of the sequence
        return [part.permute(1, 0, 2, 3, 4).reshape(b, self.U * s, h, d)
                for part, h in zip(recv.split(self._heads, dim=3), self._heads)]


class HeadGather:
    """The inverse of HeadScatter: ``send(g, ys)`` starts returning group g's head shards to their
    sequence shards; ``result()`` waits for every group and gives (b, s, H_i, d) per tensor."""

    def __init__(self, mesh: SPMesh, groups: int):
        self.U, self.groups, self.mesh = mesh.ulysses_size, groups, mesh
        self._sent = []

    def send(self, g: int, ys) -> None:
        if self.U == 1:
            self._sent.append(list(ys))
            return
        b, S, _, d = ys[0].shape
        heads = [y.shape[2] for y in ys]
        buf = ys[0].new_empty(self.U, b, S // self.U, sum(heads), d)
        for y, part in zip(ys, buf.split(heads, dim=3)):
            copy_rows(part, y.unflatten(1, (self.U, -1)).transpose(0, 1))
        self._sent.append((g, heads, start_all_to_all(buf, self.mesh.ulysses_group, self.mesh.config.transport)))

    def result(self, into=None) -> list[torch.Tensor]:
        """``into``: tensors to write the results to (slices of a packed gradient), U > 1 only."""
        if self.U == 1:
            return self._sent[0]
        outs = list(into) if into is not None else None
        for g, heads, pending in self._sent:
            recv = pending.wait()[0]  # slice u holds rank u's heads of group g
            b, s, d = recv.shape[1], recv.shape[2], recv.shape[-1]
            if outs is None:
                outs = [recv.new_empty(b, s, self.U * self.groups * h, d) for h in heads]
            for out, part in zip(outs, recv.split(heads, dim=3)):
                copy_rows(out.unflatten(2, (self.U, self.groups, -1))[:, :, :, g], part.permute(1, 2, 0, 3, 4))
        return outs
