"""A world of gloo processes that stays up across tests and runs one job at a time on every rank.

Starting processes and importing torch costs seconds, so each world size is started once per
test session and many cases run in it. Every job has a timeout: a hang kills the world and fails
the test (the next job starts a fresh world), it is never retried.
"""
from __future__ import annotations

import math
import multiprocessing as mp
import os
import socket
import time
import traceback


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank: int, world_size: int, port: int, conn) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank),
                      WORLD_SIZE=str(world_size), LOCAL_RANK=str(rank), OMP_NUM_THREADS="1")
    import torch
    import torch.distributed as dist

    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world_size)
    while True:
        job = conn.recv()
        if job is None:
            break
        fn, args, kwargs = job
        try:
            conn.send(("ok", fn(*args, **kwargs)))
        except BaseException:  # report everything, including assertion failures, to the parent
            conn.send(("error", traceback.format_exc()))
    dist.destroy_process_group()


class WorkerError(AssertionError):
    pass


class World:
    def __init__(self, size: int):
        self.size = size
        self.procs, self.conns = [], []

    def start(self) -> None:
        ctx = mp.get_context("spawn")
        port = _free_port()
        for rank in range(self.size):
            parent, child = ctx.Pipe()
            proc = ctx.Process(target=_worker, args=(rank, self.size, port, child), daemon=True)
            proc.start()
            self.procs.append(proc)
            self.conns.append(parent)

    @property
    def alive(self) -> bool:
        return bool(self.procs) and all(p.is_alive() for p in self.procs)

    def run(self, fn, *args, timeout: float = 120.0, **kwargs) -> list:
        """Run fn(*args, **kwargs) on every rank; returns the per-rank results."""
        if not self.alive:
            self.stop()
            self.start()
        for conn in self.conns:
            conn.send((fn, args, kwargs))
        results, errors = [None] * self.size, []
        pending = set(range(self.size))
        deadline = time.monotonic() + timeout
        error_deadline = math.inf  # 10 s after the first error: the other ranks may be stuck in a collective
        while pending:
            if time.monotonic() > min(deadline, error_deadline):
                self.stop()
                if errors:  # the other ranks are stuck in a collective the failed rank never joined
                    break
                raise TimeoutError(f"ranks {sorted(pending)} of {self.size} did not finish {fn.__name__} "
                                   f"in {timeout}s (a hang); the world was stopped")
            for rank in list(pending):
                conn = self.conns[rank]
                if not conn.poll(0.01):
                    continue
                try:
                    status, value = conn.recv()
                except (EOFError, OSError) as exc:
                    self.stop()
                    raise WorkerError(f"rank {rank} of {self.size} died during {fn.__name__}: {exc!r}") from exc
                pending.discard(rank)
                results[rank] = value
                if status == "error":
                    if not errors:
                        error_deadline = time.monotonic() + 10.0
                    errors.append(f"--- rank {rank} ---\n{value}")
        if errors:
            raise WorkerError(f"{fn.__name__} failed:\n" + "\n".join(errors))
        return results

    def stop(self) -> None:
        for conn, proc in zip(self.conns, self.procs):
            try:
                if proc.is_alive():
                    conn.send(None)
            except (BrokenPipeError, OSError):
                pass
        deadline = time.monotonic() + 5  # shared: ranks stuck in a collective would each wait out their own
        for proc in self.procs:
            proc.join(timeout=max(0.0, deadline - time.monotonic()))
        for proc in self.procs:
            if proc.is_alive():
                proc.kill()
                proc.join()
        self.procs, self.conns = [], []
