"""The distributed attention: Ulysses around the ring (``hybrid``), the ring loop (``ring``), the
all-to-all (``ulysses``), the log-sum-exp merge (``merge``) and ring-flash-attention's functions
(``functional``)."""
from .functional import (ring_flash_attn_func, ring_flash_attn_kvpacked_func, ring_flash_attn_qkvpacked_func,
                         ring_flash_attn_varlen_func, ring_flash_attn_varlen_kvpacked_func,
                         ring_flash_attn_varlen_qkvpacked_func, stripe_flash_attn_func,
                         stripe_flash_attn_kvpacked_func, stripe_flash_attn_qkvpacked_func,
                         zigzag_ring_flash_attn_func, zigzag_ring_flash_attn_kvpacked_func,
                         zigzag_ring_flash_attn_qkvpacked_func, zigzag_ring_flash_attn_varlen_func,
                         zigzag_ring_flash_attn_varlen_kvpacked_func,
                         zigzag_ring_flash_attn_varlen_qkvpacked_func, ring_mesh)
from .hybrid import (LongContextAttention, LongContextAttentionQKVPacked, UlyssesAttention,
                     long_context_attention, packed_long_context_attention)
from .ring import RingSpec

from .functional import __all__ as _function_names

__all__ = ["LongContextAttention", "LongContextAttentionQKVPacked", "UlyssesAttention", "RingSpec",
           "long_context_attention", "packed_long_context_attention", "ring_mesh", *_function_names]
