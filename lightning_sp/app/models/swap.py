"""Put the sequence-parallel attention into models that were written without it."""
from __future__ import annotations

from torch import nn

from ...core.attention import LongContextAttention
from ...core.errors import SPConfigError
from ...core.mesh import SPMesh
from .hf import is_hf_model, swap_hf_attention
from .llama import Attention


def swap_attention(model: nn.Module, mesh: SPMesh | None = None, ring_impl: str = "zigzag",
                   backend: str = "auto") -> nn.Module:
    """Replace the core attention of ``model`` (in place) with :class:`LongContextAttention`.

    Works on :class:`LlamaForCausalLM` and on Hugging Face ``transformers`` decoder-only models whose
    attention layers dispatch through ``ALL_ATTENTION_FUNCTIONS`` (Llama, Qwen2/3, Mistral, ...).
    With ``mesh=None`` the attention is bound later (``UlyssesRingStrategy`` binds it). Returns
    the model; raises :class:`SPConfigError` saying why when the model cannot be swapped.
    """
    if not isinstance(model, nn.Module):
        raise SPConfigError(f"swap_attention needs a torch.nn.Module, got {type(model).__name__}")

    def make():
        return LongContextAttention(mesh, ring_impl=ring_impl, backend=backend)

    ours = [m for m in model.modules() if isinstance(m, Attention)]
    if ours:
        for layer in ours:
            layer.core = make()
        return model
    if is_hf_model(model):
        return swap_hf_attention(model, make)
    raise SPConfigError(
        f"cannot swap the attention of {type(model).__name__}: it is neither a lightning_sp.models.LlamaForCausalLM "
        f"nor a Hugging Face transformers PreTrainedModel; for your own model call a "
        f"lightning_sp.LongContextAttention on (batch, local_seq, heads, head_dim) q, k, v in its attention layer")
