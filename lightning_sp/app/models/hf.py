"""Hugging Face transformers models: our attention through their attention-function registry.

``swap_hf_attention`` registers one function under the name ``"lightning_sp"``, gives every
attention layer a ``sp_attention`` submodule (a :class:`LongContextAttention`, which the strategy
binds like any other) and switches the model's ``attn_implementation`` to it. The registered
function receives q, k, v as ``(batch, heads, seq, head_dim)``, already rotated by the model with
the ``position_ids`` it was given, which must therefore be the global ones. Packed documents come
in through the ``cu_seq_lens_q`` / ``max_length_q`` keyword arguments the models forward to attention,
or, for a model called with ``input_ids`` and ``position_ids`` only (positions restarting at 0 for
each document), from the strategy's sequence context, which the layer checks against those positions.
Where the strategy placed the documents by work (its default ``document_placement``), the layer
attends over that placement either way.
"""
from __future__ import annotations

import torch

from ...core.errors import SPConfigError

HF_ATTENTION_NAME = "lightning_sp"


def _attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0, sliding_window=None,
               is_causal=None, **kwargs):
    attn = getattr(module, "sp_attention", None)
    if attn is None:
        raise SPConfigError(f"{type(module).__name__} has no sp_attention; call lightning_sp.swap_attention(model) "
                            f"instead of setting attn_implementation={HF_ATTENTION_NAME!r} by hand")
    if dropout:
        raise SPConfigError(f"attention dropout {dropout} is not supported by sequence-parallel attention; "
                            f"set the model config's attention_dropout=0.0")
    _no_mask(attention_mask=attention_mask)
    causal = getattr(module, "is_causal", True) if is_causal is None else is_causal
    window = (-1, -1) if sliding_window is None else (int(sliding_window) - 1, -1 if causal else int(sliding_window) - 1)
    q, k, v = (t.transpose(1, 2) for t in (query, key, value))  # (b, s, h, d)
    cu = kwargs.get("cu_seq_lens_q")
    if cu is not None:
        if q.shape[0] != 1:
            raise SPConfigError(f"packed documents need one packed row, got batch {q.shape[0]}")
        out = attn(q[0], k[0], v[0], causal=causal, softmax_scale=scaling, window_size=window, cu_seqlens=cu,
                   max_seqlen=kwargs.get("max_length_q"))[None]
    else:
        # the layer finds packed documents of a batch called with position_ids only (Hugging Face's
        # packed convention) in the strategy's sequence context
        out = attn(q, k, v, causal=causal, softmax_scale=scaling, window_size=window,
                   position_ids=kwargs.get("position_ids"))
    return out, None


def _no_mask(*args, attention_mask=None, **kwargs):
    """The mask builder registered with our attention: masking is the layout's and cu_seqlens' job."""
    if attention_mask is not None and not bool(attention_mask.bool().all()):
        raise SPConfigError("a padding attention_mask is not supported with sequence parallelism; pack the "
                            "documents instead (pass cu_seqlens) or pad labels with ignore_index and drop the mask")
    return None


def _register() -> None:
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface
    AttentionInterface.register(HF_ATTENTION_NAME, _attention)
    AttentionMaskInterface.register(HF_ATTENTION_NAME, _no_mask)


def attention_layers(model) -> list:
    """The model's attention layers (modules named *Attention with a ``layer_idx``), in model order."""
    return [m for m in model.modules() if type(m).__name__.endswith("Attention") and hasattr(m, "layer_idx")]


def layer_window(layer, config) -> int | None:
    """The ``sliding_window`` (tokens a query sees) the model passes to attention for ``layer``, None
    for a global layer: the layer's own attribute where it keeps one (Gemma, Qwen2, GPT-OSS), else
    the config's ``layer_types``, else the config's ``sliding_window`` for every layer (Mistral)."""
    if hasattr(layer, "sliding_window"):
        return layer.sliding_window
    types = getattr(config, "layer_types", None)
    if types is not None:
        return config.sliding_window if types[layer.layer_idx] == "sliding_attention" else None
    return getattr(config, "sliding_window", None)


def swap_hf_attention(model, make):
    config = model.config
    if getattr(config, "is_encoder_decoder", False):
        raise SPConfigError(f"cannot swap {type(model).__name__}: encoder-decoder models have cross-attention, "
                            f"which sequence parallelism over one sequence does not cover")
    if not getattr(model, "_supports_attention_backend", False):
        raise SPConfigError(f"cannot swap {type(model).__name__}: it does not dispatch attention through the "
                            f"transformers attention-function registry (_supports_attention_backend is False)")
    layers = attention_layers(model)
    if not layers:
        raise SPConfigError(f"cannot swap {type(model).__name__}: found no attention layers (modules named "
                            f"*Attention with a layer_idx)")
    _register()
    for layer in layers:
        layer.sp_attention = make()
    model.set_attn_implementation(HF_ATTENTION_NAME)
    return model


def is_hf_model(model) -> bool:
    return any(cls.__module__.startswith("transformers.") and cls.__name__ == "PreTrainedModel"
               for cls in type(model).__mro__)


def _inputs(batch) -> dict:
    """Model inputs of a (sharded) batch; packed documents go in as the varlen keyword arguments."""
    kwargs = dict(input_ids=batch["input_ids"], position_ids=batch.get("position_ids"), use_cache=False)
    if batch.get("cu_seqlens") is not None:
        kwargs.update(cu_seq_lens_q=batch["cu_seqlens"], cu_seq_lens_k=batch["cu_seqlens"],
                      max_length_q=batch["max_seqlen"], max_length_k=batch["max_seqlen"])
    return kwargs


def causal_lm_logits(model, batch):
    return model(**_inputs(batch)).logits


def causal_lm_loss_sum(model, batch, ignore_index=-100):
    """The sum of this rank's token losses, by the model's own loss function: labels already shifted
    (``shift_labels``), ``num_items_in_batch=1`` so that it sums; :mod:`lightning_sp.loss` divides by
    the global valid-token count."""
    labels = batch["labels"]
    return model(**_inputs(batch), labels=labels, shift_labels=labels, ignore_index=ignore_index,
                 num_items_in_batch=torch.ones((), device=labels.device)).loss
