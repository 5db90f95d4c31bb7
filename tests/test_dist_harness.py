"""The test harness itself: a failing or hanging rank ends the job with a clear error, never a hang."""
import time

import pytest
import torch
import torch.distributed as dist

from dist_harness import World, WorkerError


def _rank_one_fails_while_rank_zero_waits():
    if dist.get_rank() == 1:
        raise ValueError("rank 1 broke")
    dist.all_reduce(torch.ones(1))  # never completes: rank 1 does not join


def _every_rank_sleeps(seconds):
    time.sleep(seconds)


def _world_size():
    t = torch.ones(1)
    dist.all_reduce(t)
    return int(t.item())


def test_a_failing_or_hanging_rank_ends_the_job_and_a_fresh_world_follows():
    world = World(2)
    try:
        start = time.monotonic()
        with pytest.raises(WorkerError, match="rank 1 broke"):
            world.run(_rank_one_fails_while_rank_zero_waits, timeout=120)
        assert time.monotonic() - start < 60  # the grace period after an error, not the job's timeout
        with pytest.raises(TimeoutError, match="did not finish _every_rank_sleeps"):
            world.run(_every_rank_sleeps, 600, timeout=5)
        assert world.run(_world_size, timeout=60) == [2, 2]
    finally:
        world.stop()
