"""Helpers the SLURM tests put into the training job (the job imports this module from tests/ on its PYTHONPATH)."""
from __future__ import annotations

import json
import os
import time
from pathlib import Path

from lightning.pytorch.callbacks import Callback


class StepBeacon(Callback):
    """Rank 0 writes the finished step count to `path` after each step, then every rank waits `pause_s`.

    It lets a test signal a job while it is training (not while it starts) without touching the numbers.
    """

    def __init__(self, path: str, pause_s: float = 0.0) -> None:
        self.path, self.pause_s = Path(path), pause_s

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if trainer.is_global_zero:
            tmp = self.path.with_suffix(".tmp")
            tmp.write_text(str(trainer.global_step))
            tmp.replace(self.path)
        time.sleep(self.pause_s)


class ProcessRecord(Callback):
    """Every process that sets up a fit writes `<folder>/<pid>.json`: its ranks, its parent and submitit's rank.

    A test counts the files: one per rank means no process started the job a second time.
    """

    def __init__(self, folder: str) -> None:
        self.folder = Path(folder)

    def setup(self, trainer, pl_module, stage: str) -> None:
        self.folder.mkdir(parents=True, exist_ok=True)
        record = {"global_rank": trainer.global_rank, "local_rank": trainer.local_rank,
                  "world_size": trainer.world_size, "pid": os.getpid(), "ppid": os.getppid(),
                  "submitit_rank": os.environ.get("SUBMITIT_LOCAL_GLOBALID"),
                  "environment": type(trainer.strategy.cluster_environment).__name__}
        (self.folder / f"{os.getpid()}.json").write_text(json.dumps(record))
