"""The block-kernel contract and the registry.

A block kernel computes attention of one block of queries against one block of keys:

    forward(q, k, v, causal, softmax_scale, window) -> (out, lse)
    backward(dout, q, k, v, out, lse, causal, softmax_scale, window) -> (dq, dk, dv)

q is (b, sq, h, d), k and v (b, sk, hk, d) with h a multiple of hk (GQA/MQA); out is like q and
lse is (b, h, sq) in float32, or in the input dtype when that is wider (float64 stays float64).
``causal`` is aligned bottom-right, as in flash-attn: query i sees key j iff j <= i + sk - sq.
``window = (left, right)`` bounds i + sk - sq - j to [-right, left] (None: unbounded; any integer,
so the ring can express shifted masks); a row that sees no key gets lse = -inf and out = 0.
``backward`` receives the lse and out of the *whole* attention (every block merged), which is what
makes per-block gradients add up to the exact gradient. Its ``into=(dq, dk, dv)`` names tensors
(entries may be None) the gradients are written to and returned as: a kernel that writes its outputs
where it is told (``writes_into``) fills them directly, so a gradient can land in a slice of a packed
qkv gradient without a copy; any other kernel's result is copied there.

Varlen (packed documents) is the same contract on (total, h, d) tensors with ``cu_seqlens_q`` /
``cu_seqlens_k``; a backend without native support runs it document by document.
"""
from __future__ import annotations

import torch

from ..errors import KernelError

NO_WINDOW = (None, None)


def lse_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype of the log-sum-exp and of sums over blocks: float32, or float64 for float64 inputs."""
    return torch.float64 if dtype == torch.float64 else torch.float32


class BlockKernel:
    """Base of every backend. Subclasses implement ``_forward`` / ``_backward`` for dense tensors and
    declare what they support in ``decline``."""

    name = "?"
    supports_window = False       # arbitrary (left, right) windows
    supports_unequal_causal = False  # causal with sq != sk (bottom-right)
    native_gqa = True
    writes_into = False  # _backward takes ``into`` and writes the gradients there itself
    device_type: str | None = None  # the only device type it runs on ("cuda"), or None: any

    def available(self) -> bool:
        return True

    def decline(self, q: torch.Tensor, k: torch.Tensor, causal: bool, window) -> str | None:
        """Why this backend cannot run the call, or None."""
        return None

    def why_not(self, q, k, causal=False, window=NO_WINDOW) -> str | None:
        if self.device_type == "cuda" and not torch.cuda.is_available():
            return f"{self.name} runs on CUDA GPUs only and this process sees none"
        if not self.available():
            return f"{self.name} is not installed"
        if window != NO_WINDOW and not self.supports_window:
            return f"{self.name} has no sliding-window support"
        if causal and q.shape[-3] != k.shape[-3] and not self.supports_unequal_causal:
            return f"{self.name} cannot do causal attention between blocks of unequal length"
        if q.shape[-2] % k.shape[-2]:
            return f"query heads {q.shape[-2]} are not a multiple of key/value heads {k.shape[-2]}"
        return self.decline(q, k, causal, window)

    # --- dense ---------------------------------------------------------------------------
    def forward(self, q, k, v, *, causal=False, softmax_scale=None, window=NO_WINDOW):
        scale = q.shape[-1] ** -0.5 if softmax_scale is None else softmax_scale
        if self.native_gqa:
            return self._forward(q, k, v, causal, scale, window)
        return self._forward(q, *_expand_kv(q, k, v), causal, scale, window)

    def backward(self, dout, q, k, v, out, lse, *, causal=False, softmax_scale=None, window=NO_WINDOW,
                 into=(None, None, None)):
        scale = q.shape[-1] ** -0.5 if softmax_scale is None else softmax_scale
        if self.native_gqa and self.writes_into:
            return self._backward(dout, q, k, v, out, lse, causal, scale, window, into=into)
        if self.native_gqa:
            grads = self._backward(dout, q, k, v, out, lse, causal, scale, window)
        else:
            dq, dk, dv = self._backward(dout, q, *_expand_kv(q, k, v), out, lse, causal, scale, window)
            grads = dq, _reduce_kv_grad(dk, k.shape[-2]), _reduce_kv_grad(dv, k.shape[-2])
        return tuple(g if dest is None else dest.copy_(g) for g, dest in zip(grads, into))

    def _forward(self, q, k, v, causal, scale, window):
        raise NotImplementedError

    def _backward(self, dout, q, k, v, out, lse, causal, scale, window):
        raise NotImplementedError

    # --- varlen: document by document unless a backend overrides -------------------------
    def forward_varlen(self, q, k, v, cu_q, cu_k, *, causal=False, softmax_scale=None, window=NO_WINDOW,
                       max_seqlen=None):
        """Documents ``cu_q`` of q against ``cu_k`` of k, v (packed, no batch dim). ``max_seqlen``: the
        longest (query, key) document where the caller knows it (a kernel that needs it then does not
        read the device's cu tensors back)."""
        outs, lses = [], []
        for (qa, qb), (ka, kb) in _doc_bounds(cu_q, cu_k):
            o, l = self.forward(q[None, qa:qb], k[None, ka:kb], v[None, ka:kb], causal=causal,
                                softmax_scale=softmax_scale, window=window)
            outs.append(o[0])
            lses.append(l[0])
        return torch.cat(outs), torch.cat(lses, dim=-1)

    def backward_varlen(self, dout, q, k, v, out, lse, cu_q, cu_k, *, causal=False, softmax_scale=None,
                        window=NO_WINDOW, max_seqlen=None):
        """Gradients of :meth:`forward_varlen`."""
        dq, dk, dv = torch.zeros_like(q), torch.zeros_like(k), torch.zeros_like(v)
        for (qa, qb), (ka, kb) in _doc_bounds(cu_q, cu_k):
            g = self.backward(dout[None, qa:qb], q[None, qa:qb], k[None, ka:kb], v[None, ka:kb],
                              out[None, qa:qb], lse[None, :, qa:qb].contiguous(), causal=causal,
                              softmax_scale=softmax_scale, window=window)
            dq[qa:qb], dk[ka:kb], dv[ka:kb] = g[0][0], g[1][0], g[2][0]
        return dq, dk, dv

    def __repr__(self):
        return f"<block kernel {self.name}>"


def _doc_bounds(cu_q, cu_k):
    cq, ck = cu_q.tolist(), cu_k.tolist()
    return [((cq[i], cq[i + 1]), (ck[i], ck[i + 1])) for i in range(len(cq) - 1)
            if cq[i + 1] > cq[i] and ck[i + 1] > ck[i]]


def _expand_kv(q, k, v):
    rep = q.shape[-2] // k.shape[-2]
    if rep == 1:
        return k, v
    return k.repeat_interleave(rep, dim=-2), v.repeat_interleave(rep, dim=-2)


def _reduce_kv_grad(g, kv_heads):
    if g.shape[-2] == kv_heads:
        return g
    return g.unflatten(-2, (kv_heads, g.shape[-2] // kv_heads)).sum(-2)


# ---------------------------------------------------------------------------------------------
# Registry

_REGISTRY: dict[str, BlockKernel] = {}
_AUTO_ORDER: list[str] = []  # fastest first


def register(kernel: BlockKernel, auto_rank: int | None = None) -> BlockKernel:
    """Make ``kernel`` a backend by its name; ``auto_rank``: its place in ``auto``'s order (0 first)."""
    _REGISTRY[kernel.name] = kernel
    if auto_rank is not None and kernel.name not in _AUTO_ORDER:
        _AUTO_ORDER.insert(min(auto_rank, len(_AUTO_ORDER)), kernel.name)
    return kernel


def backends() -> list[str]:
    """The backend names a caller may ask for: ``auto`` and every registered kernel."""
    return ["auto", *_REGISTRY]


def check_backend(name: str) -> str:
    """``name`` if it is ``auto`` or a registered backend, else a KernelError naming the choices."""
    if name != "auto" and name not in _REGISTRY:
        raise KernelError(f"unknown attention backend {name!r}; supported: {', '.join(backends())}")
    return name


def get_kernel(name: str) -> BlockKernel:
    """The registered backend ``name`` (not ``auto``)."""
    if name == "auto":
        raise KernelError("get_kernel needs a backend name, not 'auto'; use select_kernel for 'auto'")
    return _REGISTRY[check_backend(name)]


def select_kernel(backend: str, q, k, causal=False, window=NO_WINDOW, *, masks=None) -> BlockKernel:
    """The named backend (which must accept the call), or with "auto" the fastest that accepts it.

    ``masks``: the ``(causal, window)`` of every block the kernel is to run, to choose one kernel
    for all of them (default: the one ``(causal, window)`` given)."""
    masks = [(causal, window)] if masks is None else list(masks)

    def why_not(kernel: BlockKernel) -> str | None:
        return next((reason for c, w in masks if (reason := kernel.why_not(q, k, c, w))), None)

    if backend != "auto":
        kernel = get_kernel(backend)
        reason = why_not(kernel)
        if reason:
            raise KernelError(f"backend {backend!r} cannot run this attention block: {reason}; "
                              f"use backend='auto' or one of {', '.join(backends())}")
        return kernel
    reasons = []
    for name in _AUTO_ORDER:
        reason = why_not(_REGISTRY[name])
        if reason is None:
            return _REGISTRY[name]
        reasons.append(reason)
    raise KernelError("no attention backend accepts this block: " + "; ".join(reasons))


# The largest block (query rows x keys) ``auto`` may give the reference kernel on a GPU: it builds the
# whole float32 score matrix, so a larger block would run orders of magnitude slower than a fused
# kernel or run out of memory.
REFERENCE_BLOCK_LIMIT = 1024 * 1024


def check_auto_fallback(backend: str, kernel: BlockKernel, device: torch.device, blocks) -> None:
    """Raise a KernelError where ``auto`` chose the reference kernel on a CUDA device for a block of
    more than ``REFERENCE_BLOCK_LIMIT`` query rows x keys. ``blocks``: (rows, keys, causal, window)
    of every block the kernel is to run."""
    if backend != "auto" or kernel.name != "reference" or device.type != "cuda":
        return
    for rows, keys, causal, window in blocks:
        if rows * keys > REFERENCE_BLOCK_LIMIT:
            raise KernelError(
                f"no fused attention kernel on this GPU accepts a block of {rows} query rows x {keys} keys "
                f"(causal={causal}, window={window}), and the reference kernel would build its whole score "
                f"matrix; install FlashAttention-4 (pip install 'lightning-sp[flash]', Hopper or Blackwell) "
                f"for windows, use bfloat16/float16 inputs, or pass backend='reference' to run it anyway")


def auto_order() -> list[str]:
    """The backends ``auto`` tries, fastest first."""
    return list(_AUTO_ORDER)
