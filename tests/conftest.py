import pytest

from dist_harness import World


@pytest.fixture(scope="session")
def worlds():
    """worlds(n): a gloo world of n processes, started once per session and shared by the tests."""
    started: dict[int, World] = {}

    def get(n: int) -> World:
        if n not in started:
            started[n] = World(n)
            started[n].start()
        return started[n]

    yield get
    for world in started.values():
        world.stop()


@pytest.fixture(scope="module")
def world4():
    """A 4-process gloo world of the module's own (the strategy tests run Lightning in it)."""
    world = World(4)
    world.start()
    yield world
    world.stop()


# tests/torchrun/ holds torchrun scripts, not pytest modules: tests/gpu/test_gpu_distributed.py
# launches each of them (its tests are collected everywhere and skip, saying why, without the GPUs)
collect_ignore = ["torchrun"]
