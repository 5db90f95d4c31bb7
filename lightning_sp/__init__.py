"""lightning_sp: exact sequence-parallel attention (Ulysses x Ring) for PyTorch and Lightning."""
from . import kernels, layout
from .attention import (FUNCTIONS, LongContextAttention, LongContextAttentionQKVPacked, UlyssesAttention,
                        long_context_attention, packed_long_context_attention, ring_mesh)
from .kernels import KernelError
from .mesh import SPConfigError, SPMesh, init_sp_mesh
from . import loss
from .loss import TokenLoss
from .strategy import UlyssesRingFSDPStrategy, UlyssesRingStrategy, register_strategies

register_strategies()  # Trainer(strategy="ulysses_ring" | "ulysses" | "ring" | "ulysses_ring_fsdp"); re-import safe

globals().update(FUNCTIONS)

__version__ = "0.1.0"
__all__ = ["KernelError", "LongContextAttention", "LongContextAttentionQKVPacked", "SPConfigError", "SPMesh",
           "TokenLoss", "UlyssesAttention", "UlyssesRingFSDPStrategy", "UlyssesRingStrategy", "init_sp_mesh",
           "kernels", "layout", "long_context_attention", "loss", "packed_long_context_attention",
           "register_strategies", "ring_mesh",
           *sorted(FUNCTIONS)]

from .models import swap_attention  # noqa: E402  (models sit above the attention layer)

__all__.append("swap_attention")
