"""ring-flash-attention's functional names, generated from one table.

Each takes this rank's tokens in its function's layout and the same arguments as the original:
``(q, k, v | q, kv | qkv, [cu_seqlens, max_seqlen,] dropout_p=0.0, softmax_scale=None,
causal=False, window_size=(-1, -1), alibi_slopes=None, deterministic=False,
return_attn_probs=False, group=None)``. ``group`` is the ring's process group (default: the world).
With ``return_attn_probs`` the result is ``(out, softmax_lse, None)`` as in flash-attn, lse (b, h, s)
in float32 (or (h, t) for varlen).
"""
from __future__ import annotations

import inspect

import torch.distributed as dist

from ..config import SPConfig
from ..mesh import SPMesh, single_process_mesh
from .hybrid import packed_long_context_attention, reject_unsupported

_P = inspect.Parameter
_OPTIONS = (("dropout_p", 0.0), ("softmax_scale", None), ("causal", False), ("window_size", (-1, -1)),
            ("alibi_slopes", None), ("deterministic", False), ("return_attn_probs", False), ("group", None))
_PACKINGS = {"": ("q", "k", "v"), "kvpacked_": ("q", "kv"), "qkvpacked_": ("qkv",)}
_FAMILIES = {"ring_flash_attn": "contiguous", "zigzag_ring_flash_attn": "zigzag", "stripe_flash_attn": "stripe"}
_VARLEN_FAMILIES = ("ring_flash_attn", "zigzag_ring_flash_attn")


def ring_mesh(group=None) -> SPMesh:
    """A pure-ring mesh over ``group`` (default: the whole world)."""
    if not dist.is_available() or not dist.is_initialized():
        return single_process_mesh()
    group = group or dist.group.WORLD
    ranks = tuple(dist.get_process_group_ranks(group))
    config = SPConfig(ring_degree=len(ranks), world_size=len(ranks))
    return SPMesh(config=config, ring_rank=dist.get_rank(group), ring_ranks=ranks, ring_group=group, sp_group=group)


def _make(family: str, packing: str, varlen: bool):
    layout = _FAMILIES[family]
    names = _PACKINGS[packing] + (("cu_seqlens", "max_seqlen") if varlen else ())
    signature = inspect.Signature([_P(n, _P.POSITIONAL_OR_KEYWORD) for n in names]
                                  + [_P(n, _P.POSITIONAL_OR_KEYWORD, default=d) for n, d in _OPTIONS])

    def attention(*args, **kwargs):
        bound = signature.bind(*args, **kwargs)
        bound.apply_defaults()
        a = bound.arguments
        reject_unsupported(a["dropout_p"], a["alibi_slopes"])
        inputs = tuple(a[name] for name in _PACKINGS[packing])  # packed tensors stay packed
        out, lse = packed_long_context_attention(
            inputs, ring_mesh(a["group"]), layout, causal=a["causal"], softmax_scale=a["softmax_scale"],
            window_size=a["window_size"], cu_seqlens=a.get("cu_seqlens"), max_seqlen=a.get("max_seqlen"),
            return_lse=True)
        return (out, lse.transpose(-1, -2), None) if a["return_attn_probs"] else out

    attention.__name__ = attention.__qualname__ = f"{family}_{'varlen_' if varlen else ''}{packing}func"
    attention.__signature__ = signature
    attention.__doc__ = (f"Ring attention in the {layout} layout{' over packed documents' if varlen else ''}; "
                         f"see lightning_sp.attention.functional.")
    return attention


FUNCTIONS = {f.__name__: f for f in (_make(fam, pk, vl) for fam in _FAMILIES for pk in _PACKINGS
                                     for vl in ((False, True) if fam in _VARLEN_FAMILIES else (False,)))}
globals().update(FUNCTIONS)
__all__ = sorted(FUNCTIONS)
