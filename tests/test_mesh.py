"""The sequence-parallel mesh: groups, ranks, and reuse across calls."""
import attention_cases as C


def test_mesh_coordinates(worlds):
    results = worlds(4).run(_coords, timeout=60)
    assert [r["ranks"] for r in results] == [(0, 0, 0), (0, 0, 1), (0, 1, 0), (0, 1, 1)]
    assert all(r["ring_ranks"] == r["expected_ring"] for r in results)


def _coords():
    import lightning_sp
    m = lightning_sp.init_sp_mesh(ulysses_degree=2, ring_degree=2)
    import torch.distributed as dist
    rank = dist.get_rank()
    return {"ranks": (m.dp_rank, m.ring_rank, m.ulysses_rank), "ring_ranks": m.ring_ranks,
            "expected_ring": (rank % 2, rank % 2 + 2), "sp": (m.sp_rank, m.sp_size, m.world_size)}


def test_same_degrees_reuse_the_mesh(worlds):
    results = worlds(4).run(C.mesh_reuse_case, timeout=60)
    for r in results:  # a new mesh would have started gloo threads for its groups
        assert r["threads_after"] == r["threads_before"], r


def test_build_mesh_from_config(worlds):
    results = worlds(4).run(_from_config, timeout=60)
    for r in results:
        assert r["same_groups"] and r["transport"] == ("nccl", "auto") and r["sizes"] == (1, 2, 2)
        assert r["error"] == ("the config's world_size is 8 but the default process group has 4 ranks; build "
                              "the config with world_size=4")


def _from_config():
    import lightning_sp
    from lightning_sp import SPConfig, SPConfigError, build_mesh
    mesh = build_mesh(SPConfig(ulysses_degree=2, ring_degree=2, world_size=4, transport="nccl"))
    again = lightning_sp.init_sp_mesh(ulysses_degree=2, ring_degree=2)  # the same degrees: the same groups
    try:
        build_mesh(SPConfig(ring_degree=2, world_size=8))
        error = None
    except SPConfigError as exc:
        error = str(exc)
    return {"same_groups": mesh.ring_group is again.ring_group and mesh.sp_group is again.sp_group,
            "transport": (mesh.config.transport, again.config.transport),
            "sizes": (mesh.dp_size, mesh.ring_size, mesh.ulysses_size), "error": error}
