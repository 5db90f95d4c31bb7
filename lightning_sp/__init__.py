"""lightning_sp: exact sequence-parallel attention (Ulysses x Ring) for PyTorch and Lightning."""
from . import kernels, layout
from .attention import (FUNCTIONS, LongContextAttention, LongContextAttentionQKVPacked, UlyssesAttention,
                        long_context_attention, ring_mesh)
from .kernels import KernelError
from .mesh import SPConfigError, SPMesh, init_sp_mesh

globals().update(FUNCTIONS)

__version__ = "0.1.0"
__all__ = ["KernelError", "LongContextAttention", "LongContextAttentionQKVPacked", "SPConfigError", "SPMesh",
           "UlyssesAttention", "init_sp_mesh", "kernels", "layout", "long_context_attention", "ring_mesh",
           *sorted(FUNCTIONS)]
