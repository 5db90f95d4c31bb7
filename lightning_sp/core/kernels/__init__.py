"""Block attention kernels behind one contract (see :mod:`lightning_sp.kernels.base`)."""
from . import fa4, reference, torch_sdpa  # noqa: F401  (registration, fastest first)
from .base import (NO_WINDOW, BlockKernel, KernelError, auto_order, backends, check_backend, get_kernel,
                   lse_dtype, register, select_kernel)

__all__ = ["BlockKernel", "KernelError", "NO_WINDOW", "auto_order", "backends", "check_backend", "get_kernel",
           "lse_dtype", "register", "select_kernel"]
