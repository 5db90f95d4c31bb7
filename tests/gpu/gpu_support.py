"""What the GPU tests share: the backends a GPU runs and the skips, each with its reason, that let
every GPU test be collected on any machine (``python -m pytest -m gpu -rs`` lists why one skipped)."""
from __future__ import annotations

import pytest
import torch

from lightning_sp.core import kernels as K

# the block kernels a GPU runs (cpu_flash is tested on CPU in tests/test_kernels.py)
GPU_BACKENDS = ["fa4", "cudnn", "flash", "efficient", "reference"]
NO_CUDA = "needs a CUDA GPU: run `python -m pytest -m gpu` on the GPU machine (benchmark/gpu_check.sh)"
INSTALL = {"fa4": " (flash_attn.cute, package flash-attn-4: benchmark/README.md says how to bring it)"}


def gpu_count() -> int:
    return torch.cuda.device_count() if torch.cuda.is_available() else 0


def require_cuda() -> torch.device:
    if not torch.cuda.is_available():
        pytest.skip(NO_CUDA)
    return torch.device("cuda")


def usable_kernel(backend: str) -> K.BlockKernel:
    """The named block kernel, or a skip saying why it cannot run on this machine at all: no GPU,
    not installed, or declining the plainest bf16 causal block on this GPU."""
    device = require_cuda()
    kernel = K.get_kernel(backend)
    if not kernel.available():
        pytest.skip(f"{backend} is not installed{INSTALL.get(backend, '')}")
    probe = torch.empty(1, 128, 8, 128, device=device, dtype=torch.bfloat16)
    reason = kernel.why_not(probe, probe, True)
    if reason:
        pytest.skip(f"{backend} cannot run on this GPU: {reason}")
    return kernel
