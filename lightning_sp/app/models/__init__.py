"""Models for long-context training: a Llama-style decoder and ``swap_attention`` for models not ours."""
from .hf import HF_ATTENTION_NAME
from .llama import LlamaConfig, LlamaForCausalLM, LocalAttention
from .swap import swap_attention

__all__ = ["HF_ATTENTION_NAME", "LlamaConfig", "LlamaForCausalLM", "LocalAttention", "swap_attention"]
