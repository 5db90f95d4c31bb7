from .functional import FUNCTIONS, ring_mesh
from .hybrid import (LongContextAttention, LongContextAttentionQKVPacked, UlyssesAttention,
                     long_context_attention, packed_long_context_attention)
from .ring import RingSpec

globals().update(FUNCTIONS)
__all__ = ["LongContextAttention", "LongContextAttentionQKVPacked", "UlyssesAttention", "RingSpec",
           "long_context_attention", "packed_long_context_attention", "ring_mesh", *sorted(FUNCTIONS)]
