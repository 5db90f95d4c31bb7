"""torch's own fused attention kernels through the aten ops that return the log-sum-exp.

torch's ``is_causal`` is aligned top-left, so these backends take causal blocks only when sq == sk
(where both alignments agree) and decline windows; the ring's schedule asks for nothing else on
the fast path.
"""
from __future__ import annotations

import torch

from .base import BlockKernel, register

aten = torch.ops.aten
_HALF = (torch.float16, torch.bfloat16)


def _bhsd(*xs):
    return [x.transpose(1, 2) for x in xs]


class _AtenKernel(BlockKernel):
    device_type = "cuda"
    dtypes = _HALF
    max_head_dim = 256

    def available(self) -> bool:
        return self.device_type == "cpu" or torch.cuda.is_available()

    def decline(self, q, k, causal, window):
        if q.device.type != self.device_type:
            return f"{self.name} runs on {self.device_type}, not {q.device.type}"
        if q.dtype not in self.dtypes:
            return f"{self.name} takes {', '.join(map(str, self.dtypes))}, not {q.dtype}"
        if q.shape[-1] > self.max_head_dim or q.shape[-1] % 8:
            return f"{self.name} takes head dims that are multiples of 8 up to {self.max_head_dim}, not {q.shape[-1]}"
        return None


class CpuFlashKernel(_AtenKernel):
    """torch's flash attention for CPU tensors, any float dtype."""

    name = "cpu_flash"
    device_type = "cpu"
    dtypes = (torch.float64, torch.float32, torch.bfloat16, torch.float16)
    max_head_dim = 1 << 16

    def decline(self, q, k, causal, window):
        if q.device.type != "cpu":
            return f"cpu_flash runs on cpu, not {q.device.type}"
        return None

    def _forward(self, q, k, v, causal, scale, window):
        out, lse = aten._scaled_dot_product_flash_attention_for_cpu(*_bhsd(q, k, v), 0.0, causal, scale=scale)
        return out.transpose(1, 2), lse

    def _backward(self, dout, q, k, v, out, lse, causal, scale, window):
        dq, dk, dv = aten._scaled_dot_product_flash_attention_for_cpu_backward(
            *_bhsd(dout, q, k, v, out), lse, 0.0, causal, scale=scale)
        return dq.transpose(1, 2), dk.transpose(1, 2), dv.transpose(1, 2)


class CudnnKernel(_AtenKernel):
    """cuDNN's attention (float16, bfloat16; head dims up to 128)."""

    name = "cudnn"
    max_head_dim = 128

    def _forward(self, q, k, v, causal, scale, window):
        r = aten._scaled_dot_product_cudnn_attention(*_bhsd(q, k, v), None, True, 0.0, causal, False, scale=scale)
        return r[0].transpose(1, 2), r[1].reshape(q.shape[0], q.shape[2], q.shape[1])

    def _backward(self, dout, q, k, v, out, lse, causal, scale, window):
        # no dropout: no philox state; undefined cum_seq tensors select the dense (not nested) path
        empty = torch.empty(0, device=q.device)
        dq, dk, dv = aten._scaled_dot_product_cudnn_attention_backward(
            *_bhsd(dout, q, k, v, out), lse.unsqueeze(-1), empty, empty, None, None, None,
            q.shape[1], k.shape[1], 0.0, causal, scale=scale)
        return dq.transpose(1, 2), dk.transpose(1, 2), dv.transpose(1, 2)


class FlashKernel(_AtenKernel):
    """torch's CUDA flash attention (float16, bfloat16)."""

    name = "flash"

    def _forward(self, q, k, v, causal, scale, window):
        r = aten._scaled_dot_product_flash_attention(*_bhsd(q, k, v), 0.0, causal, False, scale=scale)
        return r[0].transpose(1, 2), r[1]

    def _backward(self, dout, q, k, v, out, lse, causal, scale, window):
        empty = torch.empty(0, device=q.device)
        dq, dk, dv = aten._scaled_dot_product_flash_attention_backward(
            *_bhsd(dout, q, k, v, out), lse, None, None, q.shape[1], k.shape[1], 0.0, causal,
            empty, empty, scale=scale)
        return dq.transpose(1, 2), dk.transpose(1, 2), dv.transpose(1, 2)


class EfficientKernel(_AtenKernel):
    """torch's memory-efficient CUDA attention (float32 too); KV heads expanded for GQA."""

    name = "efficient"
    dtypes = (torch.float16, torch.bfloat16, torch.float32)
    native_gqa = False

    def _forward(self, q, k, v, causal, scale, window):
        r = aten._scaled_dot_product_efficient_attention(*_bhsd(q, k, v), None, True, 0.0, causal, scale=scale)
        return r[0].transpose(1, 2), r[1][..., : q.shape[1]]

    def _backward(self, dout, q, k, v, out, lse, causal, scale, window):
        empty = torch.empty(0, device=q.device)
        # the kernel wants the lse laid out as its forward wrote it: rows padded to a multiple of 32
        lse = torch.nn.functional.pad(lse, (0, -lse.shape[-1] % 32)).contiguous()
        dq, dk, dv, _ = aten._scaled_dot_product_efficient_attention_backward(
            *_bhsd(dout, q, k, v), None, out.transpose(1, 2), lse, empty, empty, 0.0,
            [True, True, True, False], causal, scale=scale)
        return dq.transpose(1, 2), dk.transpose(1, 2), dv.transpose(1, 2)


cudnn = register(CudnnKernel(), auto_rank=1)
flash = register(FlashKernel(), auto_rank=2)
efficient = register(EfficientKernel(), auto_rank=3)
cpu_flash = register(CpuFlashKernel(), auto_rank=4)
