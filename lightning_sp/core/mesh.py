"""The sequence-parallel device mesh: ("dp", "ring", "ulysses"), ulysses innermost.

Consecutive ranks form a Ulysses group, so on a node whose GPUs are numbered consecutively the
all-to-all stays on NVLink while the ring's point-to-point traffic crosses nodes.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch.distributed.device_mesh import DeviceMesh, init_device_mesh

from .errors import SPConfigError

MESH_DIMS = ("dp", "ring", "ulysses")


@dataclass(frozen=True)
class SPMesh:
    """Process groups and coordinates of one rank in a dp x ring x ulysses mesh.

    With a world of one process (or no process group at all) every group is ``None`` and every
    size is 1, so the same code path serves single-process references.
    """

    device_mesh: DeviceMesh | None
    dp_size: int
    ring_size: int
    ulysses_size: int
    dp_rank: int
    ring_rank: int
    ulysses_rank: int
    dp_group: dist.ProcessGroup | None
    ring_group: dist.ProcessGroup | None
    ulysses_group: dist.ProcessGroup | None
    sp_group: dist.ProcessGroup | None
    ring_ranks: tuple[int, ...]  # global ranks of this rank's ring group, in ring order

    @property
    def sp_size(self) -> int:
        return self.ring_size * self.ulysses_size

    @property
    def sp_rank(self) -> int:
        return self.ring_rank * self.ulysses_size + self.ulysses_rank

    @property
    def world_size(self) -> int:
        return self.dp_size * self.sp_size

    def describe(self) -> str:
        return (f"dp={self.dp_size} x ring={self.ring_size} x ulysses={self.ulysses_size} "
                f"(rank: dp {self.dp_rank}, ring {self.ring_rank}, ulysses {self.ulysses_rank})")


def check_degrees(world_size: int, ulysses_degree: int, ring_degree: int) -> int:
    """Validate the degrees against the world size; returns the data-parallel degree."""
    for name, value in (("ulysses_degree", ulysses_degree), ("ring_degree", ring_degree)):
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            raise SPConfigError(f"{name} must be a positive int, got {value!r}")
    sp = ulysses_degree * ring_degree
    if world_size % sp:
        raise SPConfigError(
            f"ulysses_degree x ring_degree = {ulysses_degree} x {ring_degree} = {sp} does not divide "
            f"the world size {world_size}; choose degrees whose product divides {world_size} "
            f"(the remaining factor becomes data parallelism)")
    return world_size // sp


def single_process_mesh() -> SPMesh:
    return SPMesh(None, 1, 1, 1, 0, 0, 0, None, None, None, None, (0,))


def _default_device_type() -> str:
    backend = dist.get_backend()
    if torch.cuda.is_available() and "nccl" in str(backend):
        return "cuda"
    return "cpu"


# Meshes already built over the current default process group. Process groups are never freed
# while the default group lives, and each costs threads and sockets, so asking twice for the same
# mesh must not build it twice.
_built: dict[tuple, SPMesh] = {}


def init_sp_mesh(ulysses_degree: int = 1, ring_degree: int = 1, device_type: str | None = None) -> SPMesh:
    """Build the dp x ring x ulysses mesh over the default process group.

    Collective: every rank must call it with the same arguments. It may be called again: the same
    degrees give the same mesh (its groups are made once per default process group), other
    degrees a new one. Without an initialized process group it returns the single-process mesh,
    which only accepts degrees of 1.
    """
    if not dist.is_available() or not dist.is_initialized():
        check_degrees(1, ulysses_degree, ring_degree)
        return single_process_mesh()
    world = dist.get_world_size()
    dp = check_degrees(world, ulysses_degree, ring_degree)
    device_type = device_type or _default_device_type()
    key = (id(dist.group.WORLD), world, ulysses_degree, ring_degree, device_type)
    cached = _built.get(key)
    if cached is not None and cached.ring_group is not None and _alive(cached.ring_group):
        return cached
    _built[key] = mesh = _build(dp, ulysses_degree, ring_degree, device_type)
    return mesh


def _alive(group) -> bool:
    """False once the default group this group was built on has been destroyed (ids can be reused)."""
    try:
        return dist.get_process_group_ranks(group) is not None
    except (RuntimeError, ValueError, KeyError):
        return False


def _overlap_group_options(device_type: str) -> dict | None:
    """NCCL options for the ring and Ulysses groups: a high-priority stream. Their transfers are
    meant to run beside attention kernels that occupy every SM; from a normal-priority stream the
    GPU hands freed SMs to the kernel's remaining blocks first, so the transfer waits for the very
    kernel it should hide behind (most of a ring forward's P2P time was exposed that way,
    benchmark/RESULTS.md). With priority NCCL's few blocks start as soon as any SM frees."""
    options = _high_priority_nccl_options() if device_type == "cuda" else None
    return None if options is None else {"ring": ("nccl", options), "ulysses": ("nccl", options)}


def _high_priority_nccl_options():
    """NCCL process-group options with a high-priority stream, or None where the default group is
    not NCCL."""
    if not dist.is_initialized() or not dist.is_nccl_available() or "nccl" not in str(dist.get_backend()):
        return None
    return dist.ProcessGroupNCCL.Options(is_high_priority_stream=True)


_priority_world: dict = {}


def priority_world_group():
    """All ranks in one NCCL group on a high-priority stream (created on first use, on every rank):
    for gradient all-reduces that start while attention kernels occupy every SM (see
    ``_overlap_group_options``). None where the default group is not NCCL."""
    options = _high_priority_nccl_options()
    if options is None:
        return None
    key = id(dist.group.WORLD)
    group = _priority_world.get(key)
    if group is None or not _alive(group):
        group = _priority_world[key] = dist.new_group(backend="nccl", pg_options=options)
    return group


def _build(dp: int, ulysses_degree: int, ring_degree: int, device_type: str) -> SPMesh:
    mesh = init_device_mesh(device_type, (dp, ring_degree, ulysses_degree), mesh_dim_names=MESH_DIMS,
                            backend_override=_overlap_group_options(device_type))
    sp_mesh = mesh["ring", "ulysses"]._flatten("sp")
    ring_group = mesh.get_group("ring")
    return SPMesh(
        device_mesh=mesh,
        dp_size=dp,
        ring_size=ring_degree,
        ulysses_size=ulysses_degree,
        dp_rank=mesh.get_local_rank("dp"),
        ring_rank=mesh.get_local_rank("ring"),
        ulysses_rank=mesh.get_local_rank("ulysses"),
        dp_group=mesh.get_group("dp"),
        ring_group=ring_group,
        ulysses_group=mesh.get_group("ulysses"),
        sp_group=sp_mesh.get_group(),
        ring_ranks=tuple(dist.get_process_group_ranks(ring_group)),
    )
