"""A Llama-style decoder whose core attention is pluggable.

RMSNorm, rotary embeddings computed from the *global* ``position_ids`` the caller passes (so a
rank holding a zigzag shard of the sequence rotates every token by its true position), SwiGLU,
grouped-query attention. Every attention layer calls ``self.core(q, k, v, causal=..., cu_seqlens=...,
max_seqlen=...)`` with q, k, v as ``(batch, seq, heads, head_dim)`` (or ``(tokens, heads, head_dim)``
for packed documents): :class:`LocalAttention` by default, a ``LongContextAttention`` after
:func:`lightning_sp.models.swap_attention`. The loss is a chunked cross entropy that never holds the
logits of more than ``loss_chunk_size`` tokens at once, in the forward or the backward pass; with
``mlp_chunk_size`` the MLPs likewise run over chunks of tokens.

Activation checkpointing (``LlamaForCausalLM(activation_checkpointing=...)``, see ``CHECKPOINTING``):
``"full"`` recomputes each whole decoder layer in the backward pass, attention included;
``"except_attention"`` recomputes everything but the core attention (norms, projections, RoPE, the
MLP), whose own autograd keeps q, k, v, its output and log-sum-exp, so the quadratic part runs
once forward and once backward as without checkpointing. ``offload_checkpoints=True`` (with
``"full"``) keeps the layer inputs that ``"full"`` saves in pinned host memory instead, copied out and
prefetched back on a side stream (:mod:`.offload`).

``compile_blocks=True`` compiles each layer's parts around the core attention with ``torch.compile``
(one compilation for all layers) to fuse their element-wise work, and the loss's cross entropy; the
core attention stays eager. Under ``"except_attention"`` the compiled backward then recomputes only
what the gradients read (RMSNorm, o_proj, gate and up; not the q/k/v projections or down_proj).
"""
from __future__ import annotations

import contextlib
import functools
from dataclasses import asdict

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from ...core.attention.hybrid import normalize_window
from ...core.errors import SPConfigError
from ...core.kernels.reference import block_mask
from .config import LlamaConfig  # noqa: F401  (part of this module's API)
from .chunked_loss import _add_product, _cross_entropy_and_grad, _LinearCrossEntropy  # noqa: F401
from .offload import CheckpointOffload

# activation checkpointing modes, from least memory (and most recomputation) to none:
#   full              - each decoder layer is recomputed in the backward (its input is kept)
#   except_attention  - each layer minus its core attention is recomputed; the attention keeps what
#                       its backward needs (q, k, v, out, lse) and is not re-run
#   none              - every activation is kept
CHECKPOINTING = ("none", "full", "except_attention")


def checkpointing_mode(value: bool | str | None) -> str:
    """The canonical mode of ``activation_checkpointing``: False/None -> "none", True -> "full"."""
    if value is None or value is False:
        return "none"
    if value is True:
        return "full"
    if isinstance(value, str) and value in CHECKPOINTING:
        return value
    raise SPConfigError(f"activation_checkpointing must be a bool or one of {', '.join(CHECKPOINTING)}; "
                        f"got {value!r}")


def _check_offload(mode: str) -> None:
    if mode != "full":
        raise SPConfigError(f"offload_checkpoints keeps in host memory the layer inputs that full activation "
                            f"checkpointing saves; it needs activation_checkpointing='full', got {mode!r}: set "
                            f"activation_checkpointing: full, or offload_checkpoints: false")


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x):
        dtype = x.dtype
        x = x.to(torch.promote_types(dtype, torch.float32))
        x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x.to(dtype)


def rope(x: torch.Tensor, position_ids: torch.Tensor, theta: float) -> torch.Tensor:
    """Rotate ``x`` (..., seq, heads, head_dim) by the angles of its global positions (..., seq)."""
    hd = x.shape[-1]
    wide = torch.promote_types(x.dtype, torch.float32)
    inv_freq = theta ** (-torch.arange(0, hd, 2, device=x.device, dtype=wide) / hd)
    angles = position_ids.to(wide)[..., None] * inv_freq  # (..., seq, hd/2)
    angles = torch.cat([angles, angles], dim=-1)[..., None, :]  # broadcast over heads
    cos, sin = angles.cos(), angles.sin()
    x1, x2 = x.to(wide).chunk(2, dim=-1)
    rotated = torch.cat([-x2, x1], dim=-1)
    return (x.to(wide) * cos + rotated * sin).to(x.dtype)


class LocalAttention(nn.Module):
    """Attention over the tokens this process holds (torch SDPA): the single-process core. A sliding
    ``window_size`` (flash-attn's ``(left, right)``, -1 unbounded) becomes an explicit mask."""

    def forward(self, q, k, v, causal=False, softmax_scale=None, window_size=(-1, -1), cu_seqlens=None,
                max_seqlen=None):
        if cu_seqlens is None:
            window = normalize_window(window_size)
            mask = None if window == (None, None) else block_mask(q.shape[1], k.shape[1], causal, window, q.device)
            out = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
                                                 attn_mask=mask, is_causal=causal and mask is None,
                                                 scale=softmax_scale, enable_gqa=True)
            return out.transpose(1, 2)
        bounds = [int(b) for b in torch.as_tensor(cu_seqlens).tolist()]
        if bounds[-1] != q.shape[0]:
            raise SPConfigError(f"cu_seqlens ends at {bounds[-1]} but q holds {q.shape[0]} tokens; pass the "
                                f"cu_seqlens of this process's tokens")
        outs = [self.forward(q[None, a:b], k[None, a:b], v[None, a:b], causal, softmax_scale, window_size)[0]
                for a, b in zip(bounds[:-1], bounds[1:]) if b > a]
        return torch.cat(outs) if outs else q.new_empty(q.shape)


class Attention(nn.Module):
    """The attention block's projections and its pluggable ``core``. It has no forward of its own:
    ``DecoderLayer`` runs ``project``, the core and ``o_proj`` as separate parts, so that
    checkpointing can recompute the projections without re-running the core."""

    def __init__(self, config: LlamaConfig, layer_idx: int = 0):
        super().__init__()
        c = config
        self.window_size = c.window_size(layer_idx)
        self.num_heads, self.num_kv_heads, self.head_dim, self.rope_theta = (c.num_heads, c.num_kv_heads,
                                                                             c.head_dim, c.rope_theta)
        self.q_proj = nn.Linear(c.hidden_size, c.num_heads * c.head_dim, bias=False)
        self.k_proj = nn.Linear(c.hidden_size, c.num_kv_heads * c.head_dim, bias=False)
        self.v_proj = nn.Linear(c.hidden_size, c.num_kv_heads * c.head_dim, bias=False)
        self.o_proj = nn.Linear(c.num_heads * c.head_dim, c.hidden_size, bias=False)
        self.core = LocalAttention()

    def project(self, x, position_ids, packed: bool = False):
        """q, k, v of ``x`` with rotary embeddings, as the core takes them: ``(batch, seq, heads,
        head_dim)``, or ``(tokens, heads, head_dim)`` for packed documents (``x`` is one row)."""
        shape = x.shape[:-1]
        q = rope(self.q_proj(x).view(*shape, self.num_heads, self.head_dim), position_ids, self.rope_theta)
        k = rope(self.k_proj(x).view(*shape, self.num_kv_heads, self.head_dim), position_ids, self.rope_theta)
        v = self.v_proj(x).view(*shape, self.num_kv_heads, self.head_dim)
        if packed:  # (1, tokens, ...) -> (tokens, ...)
            q, k, v = q[0], k[0], v[0]
        return q, k, v


class MLP(nn.Module):
    """SwiGLU. With ``chunk_size`` it runs over at most that many tokens at a time and, in training,
    keeps only each chunk's input: its ``intermediate_size``-wide activations are recomputed in the
    backward pass (one more MLP forward per step), so they never exist for the whole sequence."""

    def __init__(self, config: LlamaConfig, chunk_size: int | None = None):
        super().__init__()
        self.gate_proj = nn.Linear(config.hidden_size, config.intermediate_size, bias=False)
        self.up_proj = nn.Linear(config.hidden_size, config.intermediate_size, bias=False)
        self.down_proj = nn.Linear(config.intermediate_size, config.hidden_size, bias=False)
        self.chunk_size = chunk_size

    def forward(self, x):
        n = self.chunk_size
        if n is None or x.shape[:-1].numel() <= n:
            return self._swiglu(x)
        part = _recomputed if torch.is_grad_enabled() else _kept
        # split, not slices: the backward then cats the chunks' gradients once instead of adding
        # a zero-padded whole-sequence gradient per chunk
        chunks = x.reshape(-1, x.shape[-1]).split(n)
        return torch.cat([part(self._swiglu, c) for c in chunks]).view(*x.shape[:-1], -1)

    def _swiglu(self, x):
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class DecoderLayer(nn.Module):
    def __init__(self, config: LlamaConfig, mlp_chunk_size: int | None = None, layer_idx: int = 0):
        super().__init__()
        self.attn_norm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.attn = Attention(config, layer_idx)
        self.mlp_norm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.mlp = MLP(config, mlp_chunk_size)

    def forward(self, x, position_ids, cu_seqlens=None, max_seqlen=None, checkpointing: str = "none",
                compiled: bool = False, saved_hooks=None):
        """The layer, in three parts: the projections before the core attention, the core attention,
        and everything after it. ``checkpointing`` (see ``CHECKPOINTING``) says which parts are
        recomputed in the backward pass instead of keeping their activations; ``compiled`` runs the
        parts before and after the core through ``torch.compile`` (the core stays eager).
        ``saved_hooks``: saved-tensor hooks for what ``"full"`` keeps (the offload's)."""
        if checkpointing == "full":
            with saved_hooks or contextlib.nullcontext():
                return checkpoint(self.forward, x, position_ids, cu_seqlens, max_seqlen, "none", compiled,
                                  use_reentrant=False)
        if checkpointing not in ("none", "except_attention"):
            raise SPConfigError(f"unknown checkpointing mode {checkpointing!r}; use one of {', '.join(CHECKPOINTING)}")
        recompute = checkpointing == "except_attention"
        if compiled:  # the recomputation is part of the compiled graphs, which recompute only what is needed
            before, after = _compiled_parts()[3:5] if recompute else _compiled_parts()[:2]
            part = _kept
        else:
            before, after = _before_attention, _after_attention
            part = _recomputed if recompute else _kept
        q, k, v = part(before, self, x, position_ids, cu_seqlens is not None)
        out = self.attn.core(q, k, v, causal=True, window_size=self.attn.window_size, cu_seqlens=cu_seqlens,
                             max_seqlen=max_seqlen)
        return part(after, self, x, out)


# The parts of a decoder layer around its core attention, as functions of the layer: compiled, one
# function object serves every layer (the layer is an input of the graph, not a constant of it), so
# the 16 layers of a model share one compilation (per grad mode, packed or not and, when the number
# of tokens changes, one more that takes any number).


def _before_attention(layer: DecoderLayer, x, position_ids, packed: bool):
    return layer.attn.project(layer.attn_norm(x), position_ids, packed)


def _after_attention(layer: DecoderLayer, x, attn_out):
    x = x + layer.attn.o_proj(attn_out.reshape(*x.shape[:-1], -1))
    return x + layer.mlp(layer.mlp_norm(x))


def _before_attention_recomputed(layer: DecoderLayer, x, position_ids, packed: bool):
    return _recomputed(_before_attention, layer, x, position_ids, packed)


def _after_attention_recomputed(layer: DecoderLayer, x, attn_out):
    return _recomputed(_after_attention, layer, x, attn_out)


@functools.cache
def _compiled_parts(backend: str = "inductor"):
    """(before, after, cross entropy, before recomputed, after recomputed): ``_before_attention``,
    ``_after_attention``, the loss's ``_cross_entropy_and_grad`` and the two parts under activation
    checkpointing, under ``torch.compile``, built on first use and shared by every layer of every
    model. ``fullgraph``: each part is one graph (its element-wise work fused around the matmuls),
    never silently split; ``dynamic=None``: the first compilation is for the shapes seen, a second
    for a new number of tokens takes any.

    The checkpoint is inside the recomputed parts' graphs, not around them: the backward graph then
    recomputes only what the gradients need (RMSNorm, not the q/k/v projections; o_proj, gate and
    up, not down_proj), where a checkpoint around a compiled part re-runs its whole forward graph."""
    return tuple(_compile(fn, backend) for fn in (_before_attention, _after_attention, _cross_entropy_and_grad,
                                                  _before_attention_recomputed, _after_attention_recomputed))


def _compile(fn, backend: str):
    compiled = torch.compile(fn, backend=backend, fullgraph=True, dynamic=None)

    @functools.wraps(fn)
    def run(*args):
        try:
            return compiled(*args)
        except torch._dynamo.exc.FailOnRecompileLimitHit as err:
            raise SPConfigError(
                f"compile_blocks: {fn.__name__} already has torch._dynamo.config.recompile_limit="
                f"{torch._dynamo.config.recompile_limit} compilations and its inputs changed again (dtype, "
                f"device, grad mode, packed or not, autocast, mlp_chunk_size); run with TORCH_LOGS=recompiles "
                f"to see why, raise the limit, or use compile_blocks=False") from err
    return run


def _kept(fn, *args):
    return fn(*args)


def _recomputed(fn, *args):
    return checkpoint(fn, *args, use_reentrant=False)


class LlamaForCausalLM(nn.Module):
    """The decoder and its LM head.

    ``forward(input_ids, position_ids, cu_seqlens, max_seqlen)`` returns the final hidden states;
    :meth:`logits` and :meth:`loss_sum` turn them into logits or a (chunked) summed cross entropy.
    ``input_ids`` is ``(batch, seq)``; with ``cu_seqlens`` the batch is one packed row ``(1, tokens)``.
    ``position_ids`` default to ``0..seq-1``: pass the global positions of a shard.

    ``activation_checkpointing`` trades recomputation for memory in training (never when gradients
    are off): ``False``/``"none"`` keeps every activation; ``True``/``"full"`` keeps only each decoder
    layer's input and recomputes the whole layer, attention included, in the backward pass (least
    memory); ``"except_attention"`` recomputes everything but the core attention (norms,
    projections, RoPE, MLP): the attention's own autograd keeps q, k, v, its output and log-sum-exp
    and is not run again, which saves the quadratic recomputation on long sequences, for more
    memory than ``"full"`` (Llama-3.2-1B's shape in bf16-mixed: about 18.6 KB instead of 8 KB per
    token and layer; under Ulysses also the gathered attention output, about 22.7 KB). The
    attribute holds the canonical mode name.

    ``checkpointed_layers`` (default None: all) applies ``activation_checkpointing`` to the first that
    many decoder layers only; the others keep every activation and recompute nothing. Between two
    modes, it spends memory left over on a GPU on less recomputation (as Megatron-LM's
    ``--recompute-num-layers``).

    ``mlp_chunk_size`` (tokens, default None: the whole sequence at once) runs each MLP over at most
    that many tokens at a time, recomputing its wide activations per chunk in the backward pass:
    for the longest sequences, where the MLP's ``intermediate_size``-wide tensors of a whole shard
    (and their gradients) are the largest part of the backward's working memory.

    ``compile_blocks`` (default False) runs each decoder layer's parts around its core attention
    through ``torch.compile``: RMSNorm, the q/k/v projections and RoPE before it; o_proj, the
    residual adds, RMSNorm and the SwiGLU MLP after it, so their element-wise work and dtype casts
    fuse into a few kernels around the matmuls. The core attention (collectives, its own autograd)
    stays eager, and so do FSDP's hooks, which are on the layers: functions are compiled, not
    modules. Every layer shares one compilation (made in the first step); it composes with every
    checkpointing mode, ``mlp_chunk_size`` and packed documents. The training loss's cross entropy
    and its gradient (``loss_sum``) are compiled too. The attribute can be changed later.

    ``offload_checkpoints`` (default False; needs ``"full"``) keeps each checkpointed layer's input in
    pinned host memory instead of on the GPU: copied out on a side stream in the forward pass,
    prefetched back one layer ahead in the backward pass (:class:`~.offload.CheckpointOffload`, the
    ``checkpoint_offload`` attribute; the last checkpointed layer's input stays on the GPU). The
    GPU then holds about two layer inputs instead of one per layer. On a CPU it does nothing (one
    log line).
    """

    def __init__(self, config: LlamaConfig | None = None, activation_checkpointing: bool | str = False,
                 loss_chunk_size: int = 4096, mlp_chunk_size: int | None = None, compile_blocks: bool = False,
                 checkpointed_layers: int | None = None, offload_checkpoints: bool = False):
        super().__init__()
        self.config = config = config or LlamaConfig()
        if checkpointed_layers is not None and (not isinstance(checkpointed_layers, int) or isinstance(
                checkpointed_layers, bool) or not 0 <= checkpointed_layers <= config.num_layers):
            raise SPConfigError(f"checkpointed_layers must be None (all) or an int from 0 to num_layers="
                                f"{config.num_layers}, got {checkpointed_layers!r}")
        self.checkpointed_layers = checkpointed_layers
        if not isinstance(loss_chunk_size, int) or loss_chunk_size < 1:
            raise SPConfigError(f"loss_chunk_size must be a positive int, got {loss_chunk_size!r}")
        if mlp_chunk_size is not None and (not isinstance(mlp_chunk_size, int) or mlp_chunk_size < 1):
            raise SPConfigError(f"mlp_chunk_size must be a positive int or None, got {mlp_chunk_size!r}")
        if not isinstance(compile_blocks, bool):
            raise SPConfigError(f"compile_blocks must be a bool, got {compile_blocks!r}")
        self.activation_checkpointing = checkpointing_mode(activation_checkpointing)
        if not isinstance(offload_checkpoints, bool):
            raise SPConfigError(f"offload_checkpoints must be a bool, got {offload_checkpoints!r}")
        if offload_checkpoints:
            _check_offload(self.activation_checkpointing)
        self.checkpoint_offload = CheckpointOffload() if offload_checkpoints else None
        self.compile_blocks = compile_blocks
        self.loss_chunk_size = loss_chunk_size
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(DecoderLayer(config, mlp_chunk_size, i) for i in range(config.num_layers))
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.reset_parameters()

    def reset_parameters(self):
        std = self.config.init_std
        for module in self.modules():
            if isinstance(module, (nn.Linear, nn.Embedding)):
                nn.init.normal_(module.weight, std=std)
            elif isinstance(module, RMSNorm):
                nn.init.ones_(module.weight)
        if self.config.tie_word_embeddings:
            self.lm_head.weight = self.embed_tokens.weight

    def forward(self, input_ids, position_ids=None, cu_seqlens=None, max_seqlen=None):
        if input_ids.dim() != 2:
            raise SPConfigError(f"input_ids must be (batch, seq), got shape {tuple(input_ids.shape)}")
        if cu_seqlens is not None and input_ids.shape[0] != 1:
            raise SPConfigError(f"packed documents (cu_seqlens given) need one packed row, got batch "
                                f"{input_ids.shape[0]}; concatenate the documents into input_ids of shape (1, tokens)")
        if position_ids is None:
            position_ids = torch.arange(input_ids.shape[1], device=input_ids.device)
        position_ids = position_ids.to(input_ids.device).expand(input_ids.shape)
        x = self.embed_tokens(input_ids)
        mode = checkpointing_mode(self.activation_checkpointing) if torch.is_grad_enabled() else "none"
        checkpointed = len(self.layers) if self.checkpointed_layers is None else self.checkpointed_layers
        offload = self.checkpoint_offload
        if offload is not None:
            _check_offload(checkpointing_mode(self.activation_checkpointing))
            offload = offload if mode == "full" and offload.begin(x.device) else None
        for i, layer in enumerate(self.layers):
            hooks = offload.hooks(keep=i == checkpointed - 1) if offload is not None and i < checkpointed else None
            x = layer(x, position_ids, cu_seqlens, max_seqlen, checkpointing=mode if i < checkpointed else "none",
                      compiled=self.compile_blocks, saved_hooks=hooks)
        return self.norm(x)

    def logits(self, hidden):
        return self.lm_head(hidden)

    def loss_sum(self, hidden, labels, ignore_index: int = -100):
        """(sum of token cross entropies, number of counted tokens) for labels already aligned with
        ``hidden`` (shifted), in chunks of ``loss_chunk_size`` tokens: no more logits than one
        chunk's exist at once. With gradients, each chunk's gradients with respect to ``hidden`` and
        the LM head are computed right away (``_LinearCrossEntropy``), so the backward pass neither
        keeps nor recomputes logits."""
        if labels.shape != hidden.shape[:-1]:
            raise SPConfigError(f"labels shape {tuple(labels.shape)} does not match the tokens {tuple(hidden.shape[:-1])}")
        h, y = hidden.reshape(-1, hidden.shape[-1]), labels.reshape(-1)
        cross_entropy = _compiled_parts()[2] if self.compile_blocks else _cross_entropy_and_grad
        weight = self.lm_head.weight
        if torch.is_grad_enabled() and (h.requires_grad or weight.requires_grad):
            total = _LinearCrossEntropy.apply(h, weight, y, self.loss_chunk_size, ignore_index, cross_entropy)
        else:  # the same cross entropy, without its gradient
            n = self.loss_chunk_size
            total = sum((cross_entropy(self.lm_head(h[i:i + n]), y[i:i + n], ignore_index, False)[0]
                         for i in range(0, h.shape[0], n)),
                        h.new_zeros((), dtype=torch.promote_types(h.dtype, torch.float32)))
        return total, (y != ignore_index).sum()

    def extra_repr(self) -> str:
        return ", ".join(f"{k}={v}" for k, v in asdict(self.config).items())
