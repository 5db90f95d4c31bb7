"""ring-flash-attention's functional API: the same names and arguments, each a thin ``def`` over one
implementation (:func:`_attend`).

Each takes this rank's tokens in its function's layout and the same arguments as the original:
``(q, k, v | q, kv | qkv, [cu_seqlens, max_seqlen,] dropout_p=0.0, softmax_scale=None,
causal=False, window_size=(-1, -1), alibi_slopes=None, deterministic=False,
return_attn_probs=False, group=None)``. ``group`` is the ring's process group (default: the world);
``dropout_p`` and ``alibi_slopes`` are not supported (an error names the fix); ``deterministic`` is
accepted for compatibility (every backward here is deterministic given its kernel). The varlen
forms take (tokens, heads, head_dim) tensors with this rank's ``cu_seqlens`` (those of
:func:`lightning_sp.core.layout.shard_documents`). With ``return_attn_probs`` the result is
``(out, softmax_lse, None)`` as in flash-attn, lse (b, h, s) in float32 (or (h, t) for varlen).
"""
from __future__ import annotations

import torch.distributed as dist

from ..config import SPConfig
from ..mesh import SPMesh, single_process_mesh
from .hybrid import packed_long_context_attention, reject_unsupported


def ring_mesh(group=None) -> SPMesh:
    """A pure-ring mesh over ``group`` (default: the whole world)."""
    if not dist.is_available() or not dist.is_initialized():
        return single_process_mesh()
    group = group or dist.group.WORLD
    ranks = tuple(dist.get_process_group_ranks(group))
    config = SPConfig(ring_degree=len(ranks), world_size=len(ranks))
    return SPMesh(config=config, ring_rank=dist.get_rank(group), ring_ranks=ranks, ring_group=group, sp_group=group)


def _attend(layout, inputs, cu_seqlens, max_seqlen, dropout_p, softmax_scale, causal, window_size, alibi_slopes,
            return_attn_probs, group):
    """The one implementation behind every function of this module."""
    reject_unsupported(dropout_p, alibi_slopes)
    out, lse = packed_long_context_attention(
        inputs, ring_mesh(group), layout, causal=causal, softmax_scale=softmax_scale, window_size=window_size,
        cu_seqlens=cu_seqlens, max_seqlen=max_seqlen, return_lse=True)
    return (out, lse.transpose(-1, -2), None) if return_attn_probs else out


def ring_flash_attn_func(
        q, k, v, dropout_p=0.0, softmax_scale=None, causal=False, window_size=(-1, -1), alibi_slopes=None,
        deterministic=False, return_attn_probs=False, group=None):
    """Ring attention over ``group`` on one sequence, this rank's tokens in the contiguous layout, given as
    q, k, v."""
    return _attend("contiguous", (q, k, v), None, None, dropout_p, softmax_scale, causal, window_size,
                   alibi_slopes, return_attn_probs, group)


def ring_flash_attn_kvpacked_func(
        q, kv, dropout_p=0.0, softmax_scale=None, causal=False, window_size=(-1, -1), alibi_slopes=None,
        deterministic=False, return_attn_probs=False, group=None):
    """Ring attention over ``group`` on one sequence, this rank's tokens in the contiguous layout, given as
    q and kv (k, v stacked along dim -3)."""
    return _attend("contiguous", (q, kv), None, None, dropout_p, softmax_scale, causal, window_size,
                   alibi_slopes, return_attn_probs, group)


def ring_flash_attn_qkvpacked_func(
        qkv, dropout_p=0.0, softmax_scale=None, causal=False, window_size=(-1, -1), alibi_slopes=None,
        deterministic=False, return_attn_probs=False, group=None):
    """Ring attention over ``group`` on one sequence, this rank's tokens in the contiguous layout, given as
    qkv (q, k, v stacked along dim -3)."""
    return _attend("contiguous", (qkv,), None, None, dropout_p, softmax_scale, causal, window_size,
                   alibi_slopes, return_attn_probs, group)


def ring_flash_attn_varlen_func(
        q, k, v, cu_seqlens, max_seqlen, dropout_p=0.0, softmax_scale=None, causal=False, window_size=(-1, -1),
        alibi_slopes=None, deterministic=False, return_attn_probs=False, group=None):
    """Ring attention over ``group`` on packed documents (this rank's ``cu_seqlens``), this rank's tokens in the
    contiguous layout, given as q, k, v."""
    return _attend("contiguous", (q, k, v), cu_seqlens, max_seqlen, dropout_p, softmax_scale, causal, window_size,
                   alibi_slopes, return_attn_probs, group)


def ring_flash_attn_varlen_kvpacked_func(
        q, kv, cu_seqlens, max_seqlen, dropout_p=0.0, softmax_scale=None, causal=False, window_size=(-1, -1),
        alibi_slopes=None, deterministic=False, return_attn_probs=False, group=None):
    """Ring attention over ``group`` on packed documents (this rank's ``cu_seqlens``), this rank's tokens in the
    contiguous layout, given as q and kv (k, v stacked along dim -3)."""
    return _attend("contiguous", (q, kv), cu_seqlens, max_seqlen, dropout_p, softmax_scale, causal, window_size,
                   alibi_slopes, return_attn_probs, group)


def ring_flash_attn_varlen_qkvpacked_func(
        qkv, cu_seqlens, max_seqlen, dropout_p=0.0, softmax_scale=None, causal=False, window_size=(-1, -1),
        alibi_slopes=None, deterministic=False, return_attn_probs=False, group=None):
    """Ring attention over ``group`` on packed documents (this rank's ``cu_seqlens``), this rank's tokens in the
    contiguous layout, given as qkv (q, k, v stacked along dim -3)."""
    return _attend("contiguous", (qkv,), cu_seqlens, max_seqlen, dropout_p, softmax_scale, causal, window_size,
                   alibi_slopes, return_attn_probs, group)


def zigzag_ring_flash_attn_func(
        q, k, v, dropout_p=0.0, softmax_scale=None, causal=False, window_size=(-1, -1), alibi_slopes=None,
        deterministic=False, return_attn_probs=False, group=None):
    """Ring attention over ``group`` on one sequence, this rank's tokens in the zigzag layout, given as
    q, k, v."""
    return _attend("zigzag", (q, k, v), None, None, dropout_p, softmax_scale, causal, window_size,
                   alibi_slopes, return_attn_probs, group)


def zigzag_ring_flash_attn_kvpacked_func(
        q, kv, dropout_p=0.0, softmax_scale=None, causal=False, window_size=(-1, -1), alibi_slopes=None,
        deterministic=False, return_attn_probs=False, group=None):
    """Ring attention over ``group`` on one sequence, this rank's tokens in the zigzag layout, given as
    q and kv (k, v stacked along dim -3)."""
    return _attend("zigzag", (q, kv), None, None, dropout_p, softmax_scale, causal, window_size,
                   alibi_slopes, return_attn_probs, group)


def zigzag_ring_flash_attn_qkvpacked_func(
        qkv, dropout_p=0.0, softmax_scale=None, causal=False, window_size=(-1, -1), alibi_slopes=None,
        deterministic=False, return_attn_probs=False, group=None):
    """Ring attention over ``group`` on one sequence, this rank's tokens in the zigzag layout, given as
    qkv (q, k, v stacked along dim -3)."""
    return _attend("zigzag", (qkv,), None, None, dropout_p, softmax_scale, causal, window_size,
                   alibi_slopes, return_attn_probs, group)


def zigzag_ring_flash_attn_varlen_func(
        q, k, v, cu_seqlens, max_seqlen, dropout_p=0.0, softmax_scale=None, causal=False, window_size=(-1, -1),
        alibi_slopes=None, deterministic=False, return_attn_probs=False, group=None):
    """Ring attention over ``group`` on packed documents (this rank's ``cu_seqlens``), this rank's tokens in the
    zigzag layout, given as q, k, v."""
    return _attend("zigzag", (q, k, v), cu_seqlens, max_seqlen, dropout_p, softmax_scale, causal, window_size,
                   alibi_slopes, return_attn_probs, group)


def zigzag_ring_flash_attn_varlen_kvpacked_func(
        q, kv, cu_seqlens, max_seqlen, dropout_p=0.0, softmax_scale=None, causal=False, window_size=(-1, -1),
        alibi_slopes=None, deterministic=False, return_attn_probs=False, group=None):
    """Ring attention over ``group`` on packed documents (this rank's ``cu_seqlens``), this rank's tokens in the
    zigzag layout, given as q and kv (k, v stacked along dim -3)."""
    return _attend("zigzag", (q, kv), cu_seqlens, max_seqlen, dropout_p, softmax_scale, causal, window_size,
                   alibi_slopes, return_attn_probs, group)


def zigzag_ring_flash_attn_varlen_qkvpacked_func(
        qkv, cu_seqlens, max_seqlen, dropout_p=0.0, softmax_scale=None, causal=False, window_size=(-1, -1),
        alibi_slopes=None, deterministic=False, return_attn_probs=False, group=None):
    """Ring attention over ``group`` on packed documents (this rank's ``cu_seqlens``), this rank's tokens in the
    zigzag layout, given as qkv (q, k, v stacked along dim -3)."""
    return _attend("zigzag", (qkv,), cu_seqlens, max_seqlen, dropout_p, softmax_scale, causal, window_size,
                   alibi_slopes, return_attn_probs, group)


def stripe_flash_attn_func(
        q, k, v, dropout_p=0.0, softmax_scale=None, causal=False, window_size=(-1, -1), alibi_slopes=None,
        deterministic=False, return_attn_probs=False, group=None):
    """Ring attention over ``group`` on one sequence, this rank's tokens in the stripe layout, given as
    q, k, v."""
    return _attend("stripe", (q, k, v), None, None, dropout_p, softmax_scale, causal, window_size,
                   alibi_slopes, return_attn_probs, group)


def stripe_flash_attn_kvpacked_func(
        q, kv, dropout_p=0.0, softmax_scale=None, causal=False, window_size=(-1, -1), alibi_slopes=None,
        deterministic=False, return_attn_probs=False, group=None):
    """Ring attention over ``group`` on one sequence, this rank's tokens in the stripe layout, given as
    q and kv (k, v stacked along dim -3)."""
    return _attend("stripe", (q, kv), None, None, dropout_p, softmax_scale, causal, window_size,
                   alibi_slopes, return_attn_probs, group)


def stripe_flash_attn_qkvpacked_func(
        qkv, dropout_p=0.0, softmax_scale=None, causal=False, window_size=(-1, -1), alibi_slopes=None,
        deterministic=False, return_attn_probs=False, group=None):
    """Ring attention over ``group`` on one sequence, this rank's tokens in the stripe layout, given as
    qkv (q, k, v stacked along dim -3)."""
    return _attend("stripe", (qkv,), None, None, dropout_p, softmax_scale, causal, window_size,
                   alibi_slopes, return_attn_probs, group)


__all__ = ["ring_flash_attn_func", "ring_flash_attn_kvpacked_func", "ring_flash_attn_qkvpacked_func",
           "ring_flash_attn_varlen_func", "ring_flash_attn_varlen_kvpacked_func",
           "ring_flash_attn_varlen_qkvpacked_func", "stripe_flash_attn_func",
           "stripe_flash_attn_kvpacked_func", "stripe_flash_attn_qkvpacked_func",
           "zigzag_ring_flash_attn_func", "zigzag_ring_flash_attn_kvpacked_func",
           "zigzag_ring_flash_attn_qkvpacked_func", "zigzag_ring_flash_attn_varlen_func",
           "zigzag_ring_flash_attn_varlen_kvpacked_func", "zigzag_ring_flash_attn_varlen_qkvpacked_func"]
