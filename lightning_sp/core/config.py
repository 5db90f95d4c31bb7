"""The sequence-parallel configuration: one frozen, validated object that says how a run splits its
ranks and its attention. Everything else (the mesh, the strategies, the attention layers) reads it;
nothing changes it after construction.

The ranks form a dp x ring x ulysses grid, ulysses innermost (see :mod:`lightning_sp.core.mesh`):
``world_size = dp_size * ring_degree * ulysses_degree``.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

from . import comm
from .errors import SPConfigError
from .kernels import check_backend


def _is_positive_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 1


def check_degrees(world_size: int, ulysses_degree: int, ring_degree: int) -> int:
    """Validate the degrees against the world size; returns the data-parallel degree."""
    for name, value in (("world_size", world_size), ("ulysses_degree", ulysses_degree),
                        ("ring_degree", ring_degree)):
        if not _is_positive_int(value):
            raise SPConfigError(f"{name} must be a positive int, got {value!r}")
    sp = ulysses_degree * ring_degree
    if world_size % sp:
        raise SPConfigError(
            f"ulysses_degree x ring_degree = {ulysses_degree} x {ring_degree} = {sp} does not divide "
            f"the world size {world_size}; choose degrees whose product divides {world_size} "
            f"(the remaining factor becomes data parallelism)")
    return world_size // sp


DOCUMENT_PLACEMENTS = ("work", "spread")


def check_document_placement(value) -> str:
    """``value`` where it names a document placement (see :class:`SPConfig`), else an error naming the choices."""
    if value not in DOCUMENT_PLACEMENTS:
        raise SPConfigError(f"unknown document_placement {value!r}; choose 'work' (packed documents placed on ring "
                            f"ranks by causal work, short ones whole on one rank) or 'spread' (every document "
                            f"split over every ring rank with the layout)")
    return value


def check_heads(q_heads: int, kv_heads: int, ulysses_size: int) -> None:
    """Query heads must split evenly over the Ulysses ranks and be a multiple of the key/value heads."""
    if q_heads % ulysses_size:
        raise SPConfigError(
            f"{q_heads} query heads are not divisible by the ulysses degree {ulysses_size}; choose a "
            f"ulysses degree that divides {q_heads} and put the rest of the parallelism into the ring degree")
    if q_heads % kv_heads:
        raise SPConfigError(f"{q_heads} query heads are not a multiple of {kv_heads} key/value heads")


@dataclass(frozen=True)
class SPConfig:
    """How a run splits its ranks and its attention, validated once at construction.

    Args:
        ulysses_degree: ranks of one Ulysses (all-to-all) group.
        ring_degree: ranks of one ring.
        world_size: all ranks; the remaining factor ``world_size / (ulysses x ring)`` is data parallelism.
        layout: the ring's token layout, ``contiguous`` (alias ``basic``), ``zigzag`` or ``stripe``
            (alias ``strip``); stored canonical.
        backend: the block-kernel backend (``auto`` or a name of ``lightning_sp.kernels.backends()``);
            None: every attention layer keeps its own.
        head_groups: how many head groups the Ulysses all-to-all is split into (a positive int or
            ``auto``); None: every attention layer keeps its own.
        transport: how the ring and the all-to-all move data (``lightning_sp.core.comm.TRANSPORTS``);
            None takes the default, ``comm.set_transport`` or the ``LIGHTNING_SP_TRANSPORT``
            environment variable, read once here.
        document_placement: where the documents of a packed batch go (batch preparation reads it):
            ``work`` places them on the ring ranks by causal work, each short document whole on one
            rank and only long ones split (zigzag) over as few ranks as the balance needs, so only
            those move over the ring (:mod:`lightning_sp.core.placement`); ``spread`` splits every
            document over every ring rank with ``layout``. Dense batches and a ring of one rank
            are unaffected. ``work`` needs causal attention (it pads split documents at their ends).
    """

    ulysses_degree: int = 1
    ring_degree: int = 1
    world_size: int = 1
    layout: str = "zigzag"
    backend: str | None = None
    head_groups: int | str | None = None
    transport: str | None = None
    document_placement: str = "work"

    def __post_init__(self):
        from .layout import canonical_layout  # the layout module imports the mesh, which imports this one

        check_degrees(self.world_size, self.ulysses_degree, self.ring_degree)
        object.__setattr__(self, "layout", canonical_layout(self.layout))
        if self.backend is not None:
            check_backend(self.backend)
        if not (self.head_groups is None or self.head_groups == "auto" or _is_positive_int(self.head_groups)):
            raise SPConfigError(f"head_groups must be a positive int, 'auto' or None, got {self.head_groups!r}")
        transport = comm.current_transport() if self.transport is None else comm.check_transport(self.transport)
        object.__setattr__(self, "transport", transport)
        check_document_placement(self.document_placement)

    @property
    def sp_size(self) -> int:
        """Ranks that share one sequence: ``ulysses_degree * ring_degree``."""
        return self.ulysses_degree * self.ring_degree

    @property
    def dp_size(self) -> int:
        """Data-parallel degree: ranks that train on different samples."""
        return self.world_size // self.sp_size

    @property
    def sequence_multiple(self) -> int:
        """The multiple a dense sequence length must have: the layout's ring multiple x the ulysses degree."""
        from .layout import ring_multiple

        return ring_multiple(self.layout, self.ring_degree) * self.ulysses_degree

    def describe(self) -> str:
        """One line for logs: the grid and the choices."""
        return (f"dp={self.dp_size} x ring={self.ring_degree} x ulysses={self.ulysses_degree}, layout "
                f"{self.layout!r}, backend {self.backend or 'per layer'}, head_groups "
                f"{self.head_groups or 'per layer'}, transport {self.transport!r}, "
                f"document_placement {self.document_placement!r}")

    @classmethod
    def resolve(cls, world_size: int, ulysses_degree: int | str = "auto", ring_degree: int | str = "auto", *,
                node_devices: int | None = None, attention_heads: int | None = None, **fields) -> SPConfig:
        """The configuration with ``"auto"`` degrees turned into ints.

        ``ulysses_degree="auto"``: the largest degree that divides the devices of a node
        (``node_devices``, default: all of ``world_size``), the ranks left beside an explicit ring
        degree, and ``attention_heads`` when given, so the all-to-all stays within a node.
        ``ring_degree="auto"``: every remaining rank (data parallelism 1). Explicit degrees are
        validated as given; with ``attention_heads`` the Ulysses degree must divide them. ``fields``
        are the other fields of :class:`SPConfig`.
        """
        for name, value in (("ulysses_degree", ulysses_degree), ("ring_degree", ring_degree)):
            if value != "auto" and not _is_positive_int(value):
                raise SPConfigError(f"{name} must be a positive int or 'auto', got {value!r}")
        if not _is_positive_int(world_size):
            raise SPConfigError(f"world_size must be a positive int, got {world_size!r}")
        node_devices = world_size if node_devices is None else node_devices
        if not _is_positive_int(node_devices):
            raise SPConfigError(f"node_devices must be a positive int, got {node_devices!r}")
        if attention_heads is not None and not _is_positive_int(attention_heads):
            raise SPConfigError(f"attention_heads must be a positive int or None, got {attention_heads!r}")
        ulysses, ring = ulysses_degree, ring_degree
        if ulysses == "auto":
            rest = world_size // ring if ring != "auto" and world_size % ring == 0 else world_size
            ulysses = math.gcd(node_devices, rest, attention_heads or node_devices)
        if ring == "auto":
            check_degrees(world_size, ulysses, 1)  # raises, naming the fix, where ulysses does not divide
            ring = world_size // ulysses
        config = cls(ulysses_degree=ulysses, ring_degree=ring, world_size=world_size, **fields)
        if attention_heads is not None:
            check_heads(attention_heads, 1, ulysses)
        return config
