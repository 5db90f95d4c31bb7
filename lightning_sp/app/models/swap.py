"""Put the sequence-parallel attention into models that were written without it."""
from __future__ import annotations

import inspect

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

    The model must then be called with the global ``position_ids`` of its tokens whenever its
    attention is split over several ranks (as the strategy's prepared batch holds them): a forward
    pre-hook (:func:`require_position_ids`) raises at a call without them, where the model would
    number each rank's tokens from 0.
    """
    if not isinstance(model, nn.Module):
        raise SPConfigError(f"swap_attention needs a torch.nn.Module, got {type(model).__name__}")

    def make():
        return LongContextAttention(mesh, ring_impl=ring_impl, backend=backend)

    ours = [m for m in model.modules() if isinstance(m, Attention)]
    if ours:
        for layer in ours:
            layer.core = make()
    elif is_hf_model(model):
        swap_hf_attention(model, make)
    else:
        raise SPConfigError(
            f"cannot swap the attention of {type(model).__name__}: it is neither a lightning_sp.models.LlamaForCausalLM "
            f"nor a Hugging Face transformers PreTrainedModel; for your own model call a "
            f"lightning_sp.LongContextAttention on (batch, local_seq, heads, head_dim) q, k, v in its attention layer")
    if require_position_ids not in model._forward_pre_hooks.values():
        model.register_forward_pre_hook(require_position_ids, with_kwargs=True)
    return model


def require_position_ids(model: nn.Module, args: tuple, kwargs: dict) -> None:
    """Forward pre-hook of a swapped model: a call without ``position_ids`` while its attention is
    split over several ranks raises, naming the fix. Without them the model would number each
    rank's tokens from 0 (rotary embeddings at shard-local positions: a silently different model).

    It checks only that they are given, so every rank decides alike and any global positions pass,
    the within-document positions of packed documents included. An unbound attention layer in a
    world of several processes raises its own error at the call."""
    try:
        given = inspect.signature(model.forward).bind_partial(*args, **kwargs).arguments.get("position_ids")
    except TypeError:  # arguments the forward does not take: its own error says which
        return
    if given is not None:
        return
    mesh = next((m.mesh for m in model.modules() if isinstance(m, LongContextAttention)), None)
    if mesh is None or mesh.sp_size == 1:
        return
    raise SPConfigError(
        f"pass position_ids=batch['position_ids'] to {type(model).__name__} (or call it as model(**batch)): its "
        f"attention is split over {mesh.sp_size} ranks (ulysses {mesh.ulysses_size} x ring {mesh.ring_size}), and "
        f"without position_ids it would number this rank's tokens from 0 instead of by their place in the full "
        f"sequence; the ulysses_ring strategy's batches hold the global positions (within-document positions for "
        f"packed documents), lightning_sp.layout.position_ids computes them")
