"""Callbacks of the recipes: :class:`PeakMemory` logs the memory a run has needed so far."""
from __future__ import annotations

import resource
import sys

import lightning as L
import torch
from typing_extensions import override

GIB = 2 ** 30


def memory_peaks(device: torch.device) -> dict[str, float | None]:
    """This process's peaks so far, in GiB: ``gpu`` (memory allocated by tensors on ``device``, None
    off CUDA), ``host_rss`` (resident host memory) and ``pinned`` (pinned host memory owned by
    torch's caching host allocator, cached blocks included; None without CUDA)."""
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * (1 if sys.platform == "darwin" else 1024)
    cuda = device.type == "cuda"
    pinned = torch.cuda.host_memory_stats().get("allocated_bytes.peak", 0) if torch.cuda.is_available() else None
    return {"gpu": torch.cuda.max_memory_allocated(device) / GIB if cuda else None, "host_rss": rss / GIB,
            "pinned": None if pinned is None else pinned / GIB}


class PeakMemory(L.Callback):
    """After every training step, logs this rank's peak memory so far (:func:`memory_peaks`) as
    ``train/peak_gpu_gib`` (on the progress bar), ``train/peak_host_rss_gib`` and ``train/peak_pinned_gib``,
    from global rank 0 (``log_every_n_steps`` applies)."""

    @override
    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs, batch, batch_idx) -> None:
        for name, value in memory_peaks(pl_module.device).items():
            if value is not None:
                pl_module.log(f"train/peak_{name}_gib", value, prog_bar=name == "gpu", rank_zero_only=True)
