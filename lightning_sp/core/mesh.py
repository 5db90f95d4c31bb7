"""The sequence-parallel device mesh: ("dp", "ring", "ulysses"), ulysses innermost.

Consecutive ranks form a Ulysses group, so on a node whose GPUs are numbered consecutively the
all-to-all stays on NVLink while the ring's point-to-point traffic crosses nodes. The sizes come
from a :class:`~lightning_sp.core.config.SPConfig`; :func:`build_mesh` makes the groups.
"""
from __future__ import annotations

import os
from dataclasses import dataclass, replace

import torch
import torch.distributed as dist
from torch.distributed.device_mesh import DeviceMesh, init_device_mesh

from .config import SPConfig, check_degrees  # noqa: F401  (check_degrees: importable from here, as before)
from .errors import SPConfigError

MESH_DIMS = ("dp", "ring", "ulysses")


@dataclass(frozen=True, kw_only=True)
class SPMesh:
    """One rank's place in the dp x ring x ulysses mesh of a :class:`SPConfig`: its coordinates and
    process groups; the sizes are the config's. Build it with :func:`build_mesh` (or
    :func:`init_sp_mesh`).

    With a world of one process (or no process group at all) every group is ``None`` and every
    size is 1, so the same code path serves single-process references.
    """

    config: SPConfig
    dp_rank: int = 0
    ring_rank: int = 0
    ulysses_rank: int = 0
    ring_ranks: tuple[int, ...] = (0,)  # global ranks of this rank's ring group, in ring order
    device_mesh: DeviceMesh | None = None
    dp_group: dist.ProcessGroup | None = None
    ring_group: dist.ProcessGroup | None = None
    ulysses_group: dist.ProcessGroup | None = None
    sp_group: dist.ProcessGroup | None = None

    @property
    def dp_size(self) -> int:
        """Data-parallel degree."""
        return self.config.dp_size

    @property
    def ring_size(self) -> int:
        """Ranks of one ring."""
        return self.config.ring_degree

    @property
    def ulysses_size(self) -> int:
        """Ranks of one Ulysses group."""
        return self.config.ulysses_degree

    @property
    def sp_size(self) -> int:
        """Ranks that share one sequence."""
        return self.config.sp_size

    @property
    def sp_rank(self) -> int:
        """This rank's index in its sequence-parallel group (ring-major, as the layout counts)."""
        return self.ring_rank * self.ulysses_size + self.ulysses_rank

    @property
    def world_size(self) -> int:
        """All ranks of the mesh."""
        return self.config.world_size

    def describe(self) -> str:
        """The grid and this rank's coordinates, for logs."""
        return (f"dp={self.dp_size} x ring={self.ring_size} x ulysses={self.ulysses_size} "
                f"(rank: dp {self.dp_rank}, ring {self.ring_rank}, ulysses {self.ulysses_rank})")

    def at_sp_rank(self, sp_rank: int) -> SPMesh:
        """The coordinates of rank ``sp_rank`` of this rank's sequence-parallel group, without
        process groups: for index maths about another rank's tokens."""
        return SPMesh(config=self.config, dp_rank=self.dp_rank, ring_rank=sp_rank // self.ulysses_size,
                      ulysses_rank=sp_rank % self.ulysses_size, ring_ranks=self.ring_ranks)

    def with_config(self, **changes) -> SPMesh:
        """The same ranks and groups under a config with ``changes`` to its layout, backend,
        head_groups or transport; the degrees and the world size made the groups and stay."""
        fixed = sorted({"ulysses_degree", "ring_degree", "world_size"} & set(changes))
        if fixed:
            raise SPConfigError(f"with_config cannot change {', '.join(fixed)}: the mesh's groups were built "
                                f"for them; build another mesh with build_mesh(SPConfig(...))")
        return replace(self, config=replace(self.config, **changes))


def single_process_mesh(config: SPConfig | None = None) -> SPMesh:
    """The mesh of a world of one process: no groups, every size 1."""
    config = SPConfig() if config is None else config
    if config.world_size != 1:
        raise SPConfigError(f"a single-process mesh needs world_size 1, the config has {config.world_size}")
    return SPMesh(config=config)


def rank_coordinates(ring_size: int = 1, ulysses_size: int = 1, ring_rank: int = 0, ulysses_rank: int = 0, *,
                     dp_size: int = 1) -> SPMesh:
    """The mesh one rank of a dp x ring x ulysses grid sees, without process groups: for index maths
    (layouts, ring schedules) about any rank in a single process."""
    config = SPConfig(ulysses_degree=ulysses_size, ring_degree=ring_size, world_size=dp_size * ring_size * ulysses_size)
    return SPMesh(config=config, ring_rank=ring_rank, ulysses_rank=ulysses_rank)


def _default_device_type() -> str:
    backend = dist.get_backend()
    if torch.cuda.is_available() and "nccl" in str(backend):
        return "cuda"
    return "cpu"


# Meshes already built over the current default process group. Process groups are never freed
# while the default group lives, and each costs threads and sockets, so asking twice for the same
# degrees must not build the groups twice; another config with the same degrees gets the same groups.
_built: dict[tuple, SPMesh] = {}


def build_mesh(config: SPConfig, device_type: str | None = None) -> SPMesh:
    """The dp x ring x ulysses mesh of ``config`` over the default process group.

    Collective: every rank must call it with equal configs. The groups of given degrees are made
    once per default process group; a later call with the same degrees (whatever the config's other
    fields) reuses them. Without an initialized process group, ``config.world_size`` must be 1.
    ``device_type``: of the device mesh (default: ``cuda`` with NCCL, else ``cpu``).
    """
    if not dist.is_available() or not dist.is_initialized():
        if config.world_size != 1:
            raise SPConfigError(
                f"the config's world_size is {config.world_size} but no process group is initialized; call "
                f"torch.distributed.init_process_group first (or use world_size=1)")
        return single_process_mesh(config)
    world = dist.get_world_size()
    if config.world_size != world:
        raise SPConfigError(f"the config's world_size is {config.world_size} but the default process group has "
                            f"{world} ranks; build the config with world_size={world}")
    device_type = device_type or _default_device_type()
    key = (id(dist.group.WORLD), world, config.ulysses_degree, config.ring_degree, device_type)
    cached = _built.get(key)
    if cached is None or cached.ring_group is None or not _alive(cached.ring_group):
        cached = _built[key] = _build(config, device_type)
    return cached if cached.config == config else replace(cached, config=config)


def init_sp_mesh(ulysses_degree: int = 1, ring_degree: int = 1, device_type: str | None = None) -> SPMesh:
    """Build the dp x ring x ulysses mesh over the default process group (see :func:`build_mesh`):
    ``build_mesh(SPConfig(ulysses_degree, ring_degree, world_size), device_type)``.

    Collective: every rank must call it with the same arguments. It may be called again: the same
    degrees give the same groups, other degrees new ones. Without an initialized process group it
    returns the single-process mesh, which only accepts degrees of 1; in a process that a launcher
    such as torchrun started as one of several (``WORLD_SIZE`` > 1), that is an error saying to call
    ``torch.distributed.init_process_group()`` first (it reads the launcher's environment).
    """
    initialized = dist.is_available() and dist.is_initialized()
    launched = os.environ.get("WORLD_SIZE", "1")
    if not initialized and launched.isdigit() and int(launched) > 1:
        raise SPConfigError(
            f"call torch.distributed.init_process_group() before init_sp_mesh: this process is rank "
            f"{os.environ.get('RANK', '?')} of WORLD_SIZE={launched} processes (e.g. started by torchrun), but no "
            f"process group is initialized, so it would see a world of 1")
    world = dist.get_world_size() if initialized else 1
    config = SPConfig(ulysses_degree=ulysses_degree, ring_degree=ring_degree, world_size=world)
    return build_mesh(config, device_type)


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


def _build(config: SPConfig, device_type: str) -> SPMesh:
    mesh = init_device_mesh(device_type, (config.dp_size, config.ring_degree, config.ulysses_degree),
                            mesh_dim_names=MESH_DIMS, backend_override=_overlap_group_options(device_type))
    sp_mesh = mesh["ring", "ulysses"]._flatten("sp")
    ring_group = mesh.get_group("ring")
    return SPMesh(
        config=config,
        dp_rank=mesh.get_local_rank("dp"),
        ring_rank=mesh.get_local_rank("ring"),
        ulysses_rank=mesh.get_local_rank("ulysses"),
        ring_ranks=tuple(dist.get_process_group_ranks(ring_group)),
        device_mesh=mesh,
        dp_group=mesh.get_group("dp"),
        ring_group=ring_group,
        ulysses_group=mesh.get_group("ulysses"),
        sp_group=sp_mesh.get_group(),
    )
