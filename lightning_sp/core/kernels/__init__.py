"""Block attention kernels behind one contract (see :mod:`lightning_sp.kernels.base`)."""
from . import fa4, reference, torch_sdpa  # noqa: F401  (registration, fastest first)
from .base import (NO_WINDOW, REFERENCE_BLOCK_LIMIT, BlockKernel, KernelError, auto_order, backends, check_auto_fallback,
                   check_backend, get_kernel, lse_dtype, register, select_kernel)

__all__ = ["BlockKernel", "KernelError", "NO_WINDOW", "REFERENCE_BLOCK_LIMIT", "auto_order", "backends",
           "check_auto_fallback", "check_backend", "get_kernel", "lse_dtype", "register", "select_kernel"]
