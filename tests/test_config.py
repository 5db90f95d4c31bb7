"""SPConfig: validated once, with messages that carry the numbers and the fix; derived sizes; "auto"
degrees; the mesh of one rank built from it without process groups."""
import dataclasses

import pytest

from lightning_sp import KernelError, SPConfig, SPConfigError, build_mesh
from lightning_sp import layout as L
from lightning_sp.core.mesh import rank_coordinates, single_process_mesh


def test_defaults_and_derived_sizes():
    c = SPConfig()
    assert (c.ulysses_degree, c.ring_degree, c.world_size, c.layout, c.backend, c.head_groups) == (
        1, 1, 1, "zigzag", None, None)
    assert c.transport in ("auto", "nccl", "copy_engine")  # the default, read at construction
    c = SPConfig(ulysses_degree=2, ring_degree=3, world_size=12, layout="strip", backend="reference",
                 head_groups=2, transport="nccl")
    assert (c.sp_size, c.dp_size, c.layout, c.sequence_multiple) == (6, 2, "stripe", 6)
    assert c.describe() == ("dp=2 x ring=3 x ulysses=2, layout 'stripe', backend reference, head_groups 2, "
                            "transport 'nccl', document_placement 'work'")
    assert SPConfig(document_placement="spread").document_placement == "spread"
    assert SPConfig(layout="basic").layout == "contiguous"
    with pytest.raises(dataclasses.FrozenInstanceError):
        c.ring_degree = 1
    assert hash(c) == hash(dataclasses.replace(c))


@pytest.mark.parametrize("layout", ["contiguous", "zigzag", "stripe"])
@pytest.mark.parametrize("u,r", [(1, 1), (2, 1), (1, 4), (2, 3)])
def test_sequence_multiple_is_the_layouts(layout, u, r):
    config = SPConfig(ulysses_degree=u, ring_degree=r, world_size=u * r, layout=layout)
    assert config.sequence_multiple == L.layout_multiple(layout, rank_coordinates(r, u))


@pytest.mark.parametrize("fields,error,message", [
    (dict(ulysses_degree=0), SPConfigError, "ulysses_degree must be a positive int, got 0"),
    (dict(ring_degree=2.0), SPConfigError, r"ring_degree must be a positive int, got 2\.0"),
    (dict(world_size=True), SPConfigError, "world_size must be a positive int, got True"),
    (dict(ulysses_degree=3, world_size=4), SPConfigError,
     r"ulysses_degree x ring_degree = 3 x 1 = 3 does not divide the world size 4; choose degrees whose product "
     r"divides 4 \(the remaining factor becomes data parallelism\)"),
    (dict(layout="spiral"), SPConfigError, "unknown layout 'spiral'; choose one of basic, contiguous, zigzag, stripe"),
    (dict(backend="xformers"), KernelError, "unknown attention backend 'xformers'; supported: auto, fa4"),
    (dict(head_groups=0), SPConfigError, "head_groups must be a positive int, 'auto' or None, got 0"),
    (dict(head_groups="two"), SPConfigError, "head_groups must be a positive int, 'auto' or None, got 'two'"),
    (dict(transport="ib"), SPConfigError, "unknown transport 'ib'; choose one of auto, nccl, copy_engine"),
    (dict(document_placement="zigzag"), SPConfigError,
     r"unknown document_placement 'zigzag'; choose 'work' \(packed documents placed on ring ranks by causal work, "
     r"short ones whole on one rank\) or 'spread' \(every document split over every ring rank with the layout\)"),
])
def test_validation_names_the_value_and_the_fix(fields, error, message):
    with pytest.raises(error, match=message):
        SPConfig(**fields)


def test_cuda_backends_are_valid_choices_anywhere():
    """A config may name a CUDA-only backend on a CPU machine (it is chosen there, used elsewhere)."""
    for backend in ("cudnn", "flash", "efficient", "fa4", "auto"):
        assert SPConfig(backend=backend).backend == backend


@pytest.mark.parametrize("args,kwargs,degrees", [
    ((8,), dict(node_devices=4, attention_heads=32), (4, 2)),   # Ulysses within a node, ring across
    ((8,), dict(node_devices=8, attention_heads=6), (2, 4)),    # as far as the heads allow
    ((8,), dict(), (8, 1)),                                     # one node by default
    ((16, "auto", 2), dict(node_devices=8), (8, 2)),            # beside an explicit ring: dp 1
    ((16, "auto", 4), dict(node_devices=8), (4, 4)),
    ((16, "auto", 3), dict(node_devices=8), None),              # 3 does not divide 16: an error
    ((8, 2), dict(), (2, 4)),                                   # ring: every remaining rank
    ((8, 2, 2), dict(attention_heads=4), (2, 2)),               # explicit: as given, dp 2
])
def test_resolve_auto_degrees(args, kwargs, degrees):
    if degrees is None:
        with pytest.raises(SPConfigError, match="does not divide the world size 16"):
            SPConfig.resolve(*args, **kwargs)
        return
    config = SPConfig.resolve(*args, **kwargs)
    assert (config.ulysses_degree, config.ring_degree) == degrees
    assert config.world_size == args[0]


def test_resolve_passes_fields_and_checks_heads():
    config = SPConfig.resolve(4, 2, "auto", layout="strip", backend="reference", transport="nccl", head_groups=1)
    assert (config.ring_degree, config.layout, config.backend, config.transport, config.head_groups) == (
        2, "stripe", "reference", "nccl", 1)
    with pytest.raises(SPConfigError, match="6 query heads are not divisible by the ulysses degree 4; choose a "
                                            "ulysses degree that divides 6"):
        SPConfig.resolve(8, 4, attention_heads=6)
    with pytest.raises(SPConfigError, match="does not divide the world size 8"):
        SPConfig.resolve(8, 3)
    with pytest.raises(SPConfigError, match="ulysses_degree must be a positive int or 'auto', got 'max'"):
        SPConfig.resolve(8, "max")
    with pytest.raises(SPConfigError, match="node_devices must be a positive int, got 0"):
        SPConfig.resolve(8, node_devices=0)
    with pytest.raises(SPConfigError, match="attention_heads must be a positive int or None, got 0"):
        SPConfig.resolve(8, attention_heads=0)


def test_mesh_sizes_come_from_its_config():
    mesh = rank_coordinates(ring_size=2, ulysses_size=2, ring_rank=1, ulysses_rank=1, dp_size=3)
    assert (mesh.dp_size, mesh.ring_size, mesh.ulysses_size, mesh.sp_size, mesh.sp_rank, mesh.world_size) == (
        3, 2, 2, 4, 3, 12)
    other = mesh.at_sp_rank(2)
    assert (other.ring_rank, other.ulysses_rank, other.config) == (1, 0, mesh.config)
    assert mesh.with_config(transport="nccl", layout="stripe").config.transport == "nccl"
    with pytest.raises(SPConfigError, match="with_config cannot change ring_degree, world_size: the mesh's groups"):
        mesh.with_config(ring_degree=4, world_size=24)


def test_build_mesh_without_a_process_group():
    config = SPConfig(layout="stripe", transport="nccl")
    mesh = build_mesh(config)
    assert mesh.config is config and mesh.ring_group is None and mesh.sp_size == 1
    assert single_process_mesh().config == SPConfig()
    with pytest.raises(SPConfigError, match="the config's world_size is 2 but no process group is initialized; "
                                            "call torch.distributed.init_process_group first"):
        build_mesh(SPConfig(ring_degree=2, world_size=2))
    with pytest.raises(SPConfigError, match="a single-process mesh needs world_size 1, the config has 2"):
        single_process_mesh(SPConfig(world_size=2))
