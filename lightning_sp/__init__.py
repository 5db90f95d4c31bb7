"""lightning_sp: exact sequence-parallel attention (Ulysses x Ring) for PyTorch and Lightning.

This module is the facade users import. The code lives in four layers, each importing only from
those before it: ``core`` (no Lightning, no Hydra), ``integration`` (the Lightning strategies),
``app`` (models, data, the LightningModule) and ``launch`` (SLURM and cluster helpers). The short
module names (``lightning_sp.layout``, ``lightning_sp.models``, ``lightning_sp.slurm``, ...) are
aliases of their modules in those layers.
"""
import importlib as _importlib
import sys as _sys

from .core import kernels, layout, loss
from .core.attention import (LongContextAttention, LongContextAttentionQKVPacked, UlyssesAttention,
                             long_context_attention, packed_long_context_attention, ring_mesh)
from .core.attention.functional import (  # ring-flash-attention's functions
    ring_flash_attn_func, ring_flash_attn_kvpacked_func, ring_flash_attn_qkvpacked_func, ring_flash_attn_varlen_func,
    ring_flash_attn_varlen_kvpacked_func, ring_flash_attn_varlen_qkvpacked_func, stripe_flash_attn_func,
    stripe_flash_attn_kvpacked_func, stripe_flash_attn_qkvpacked_func, zigzag_ring_flash_attn_func,
    zigzag_ring_flash_attn_kvpacked_func, zigzag_ring_flash_attn_qkvpacked_func, zigzag_ring_flash_attn_varlen_func,
    zigzag_ring_flash_attn_varlen_kvpacked_func, zigzag_ring_flash_attn_varlen_qkvpacked_func)
from .core.attention.functional import __all__ as _function_names
from .core.config import SPConfig
from .core.errors import KernelError, SPConfigError
from .core.loss import TokenLoss
from .core.mesh import SPMesh, build_mesh, init_sp_mesh
from .integration import UlyssesRingFSDPStrategy, UlyssesRingStrategy, prepared_batch, register_strategies
from .app.models import swap_attention

register_strategies()  # Trainer(strategy="ulysses_ring" | "ulysses" | "ring" | "ulysses_ring_fsdp"); re-import safe

# short name -> the module it stands for (and, recursively, its loaded submodules)
_ALIASES = {
    "config": "core.config", "mesh": "core.mesh", "layout": "core.layout", "comm": "core.comm", "copy_engine": "core.copy_engine",
    "loss": "core.loss", "testing": "core.testing", "kernels": "core.kernels", "attention": "core.attention",
    "errors": "core.errors", "strategy": "integration.strategy", "models": "app.models", "lm": "app.lm",
    "data": "app.data", "slurm": "launch.slurm", "cluster": "launch.cluster",
}


def _install_aliases() -> None:
    for short, target in _ALIASES.items():
        module = _importlib.import_module(f"{__name__}.{target}")
        globals()[short] = module
        prefix = f"{__name__}.{target}"
        for name, loaded in list(_sys.modules.items()):
            if name == prefix or name.startswith(prefix + "."):
                _sys.modules.setdefault(f"{__name__}.{short}{name[len(prefix):]}", loaded)


_install_aliases()

__version__ = "0.1.0"
__all__ = ["KernelError", "LongContextAttention", "LongContextAttentionQKVPacked", "SPConfig", "SPConfigError",
           "SPMesh", "TokenLoss", "UlyssesAttention", "UlyssesRingFSDPStrategy", "UlyssesRingStrategy", "build_mesh",
           "init_sp_mesh", "kernels", "layout", "long_context_attention", "loss", "packed_long_context_attention",
           "prepared_batch", "register_strategies", "ring_mesh", "swap_attention", *_function_names]
