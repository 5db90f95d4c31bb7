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
