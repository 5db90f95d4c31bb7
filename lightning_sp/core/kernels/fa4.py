"""FlashAttention-4 (``flash_attn.cute``, package ``flash-attn-4``), used when installed: the fastest
block kernel on Hopper. q, k, v are (b, s, h, d) as in our contract; causal and windows are aligned
bottom-right as ours; the lse comes back as float32 (b, h, s); varlen is native."""
from __future__ import annotations

import functools
import importlib.util

import torch

from .base import BlockKernel, register


def _interface():
    from flash_attn.cute import interface
    return interface


def _window_args(window):
    left, right = window
    return {"window_size_left": left, "window_size_right": right}


class FA4Kernel(BlockKernel):
    """FlashAttention-4 on Hopper and Blackwell: windows, unequal causal blocks and varlen natively."""

    name = "fa4"
    device_type = "cuda"
    supports_window = True
    supports_unequal_causal = True
    writes_into = True

    @functools.cache
    def available(self) -> bool:
        if not torch.cuda.is_available():
            return False
        try:
            return importlib.util.find_spec("flash_attn.cute") is not None
        except ModuleNotFoundError:  # no flash_attn package at all
            return False

    def decline(self, q, k, causal, window):
        if q.device.type != "cuda":
            return f"fa4 runs on cuda, not {q.device.type}"
        if torch.cuda.get_device_capability(q.device)[0] < 9:
            return "fa4 needs a Hopper or Blackwell GPU"
        if q.dtype not in (torch.float16, torch.bfloat16):
            return f"fa4 takes float16 or bfloat16, not {q.dtype}"
        if q.shape[-1] % 8 or q.shape[-1] > 256:
            return f"fa4 takes head dims that are multiples of 8 up to 256, not {q.shape[-1]}"
        if any(w is not None and w < 0 for w in window):
            return "fa4 takes window bounds >= 0 only"
        return None

    def _forward(self, q, k, v, causal, scale, window):
        out, lse = _interface()._flash_attn_fwd(q, k, v, softmax_scale=scale, causal=causal,
                                                return_lse=True, **_window_args(window))[:2]
        return out, lse

    def _backward(self, dout, q, k, v, out, lse, causal, scale, window, into=(None, None, None)):
        dq, dk, dv = into
        return tuple(_interface()._flash_attn_bwd(q, k, v, out, dout, lse, softmax_scale=scale, causal=causal,
                                                  dq=dq, dk=dk, dv=dv, **_window_args(window))[:3])

    def forward_varlen(self, q, k, v, cu_q, cu_k, *, causal=False, softmax_scale=None, window=(None, None),
                       max_seqlen=None):
        scale = q.shape[-1] ** -0.5 if softmax_scale is None else softmax_scale
        max_q, max_k = _max_lens(cu_q, cu_k, max_seqlen)
        out, lse = _interface()._flash_attn_fwd(
            q, k, v, cu_seqlens_q=cu_q, cu_seqlens_k=cu_k, max_seqlen_q=max_q, max_seqlen_k=max_k,
            softmax_scale=scale, causal=causal, return_lse=True, **_window_args(window))[:2]
        return out, lse

    def backward_varlen(self, dout, q, k, v, out, lse, cu_q, cu_k, *, causal=False, softmax_scale=None,
                        window=(None, None), max_seqlen=None):
        scale = q.shape[-1] ** -0.5 if softmax_scale is None else softmax_scale
        max_q, max_k = _max_lens(cu_q, cu_k, max_seqlen)
        return _interface()._flash_attn_bwd(
            q, k, v, out, dout, lse, softmax_scale=scale, causal=causal, cu_seqlens_q=cu_q,
            cu_seqlens_k=cu_k, max_seqlen_q=max_q, max_seqlen_k=max_k, **_window_args(window))[:3]


def _max_lens(cu_q, cu_k, known) -> tuple[int, int]:
    """The longest query and key documents: ``known`` where the caller gives them (reading them from
    the cu tensors waits for the GPU)."""
    if known is not None:
        return known
    return int((cu_q[1:] - cu_q[:-1]).max()), int((cu_k[1:] - cu_k[:-1]).max())


fa4 = register(FA4Kernel(), auto_rank=0)
