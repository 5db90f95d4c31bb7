"""Helpers the SLURM tests put into the training job (the job imports this module from tests/ on its PYTHONPATH)."""
from __future__ import annotations

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
