"""Measuring exactness: float64 attention with gradients, computed in query chunks so that 128K-token
sequences fit on one GPU, and the relative error used throughout the tests and the GPU numerics."""
from __future__ import annotations

import torch


def rel_error(got: torch.Tensor, want: torch.Tensor) -> float:
    """||got - want|| / ||want||, in float64."""
    want = want.double()
    return ((got.double() - want).norm() / want.norm()).item()


def reference_attention(q, k, v, dout=None, *, causal=False, softmax_scale=None, chunk_bytes=2 << 30):
    """float64 attention of full (b, S, h, d) tensors (k, v may have fewer heads).

    Returns (out, dq, dk, dv) in float64 when ``dout`` is given, else (out,). Queries are processed
    in chunks whose score matrix stays under ``chunk_bytes``; everything runs as (b, h, S, d) matrix
    products on views, so a 128K-token reference costs seconds on a GPU.
    """
    b, S, h, d = q.shape
    hk = k.shape[2]
    scale = d ** -0.5 if softmax_scale is None else softmax_scale
    bhsd = lambda t: t.double().transpose(1, 2).contiguous()  # noqa: E731
    q64 = bhsd(q)
    k64 = bhsd(k.repeat_interleave(h // hk, dim=2))
    v64 = bhsd(v.repeat_interleave(h // hk, dim=2))
    rows = max(1, int(chunk_bytes // (8 * b * h * S)))
    out = torch.empty_like(q64)
    lse = torch.empty(b, h, S, dtype=torch.float64, device=q.device)

    def probabilities(a, z, lse_rows=None):
        end = z if causal else S  # a causal chunk never looks past its last row
        s = torch.matmul(q64[:, :, a:z], k64[:, :, :end].transpose(-1, -2)) * scale
        if causal:
            s.masked_fill_(torch.arange(a, z, device=q.device)[:, None] < torch.arange(end, device=q.device), float("-inf"))
        if lse_rows is None:
            lse_rows = torch.logsumexp(s, dim=-1)
        return s.sub_(lse_rows[..., None]).exp_(), lse_rows, end

    for a in range(0, S, rows):
        z = min(S, a + rows)
        p, lse[:, :, a:z], end = probabilities(a, z)
        out[:, :, a:z] = torch.matmul(p, v64[:, :, :end])
    as_bshd = lambda t: t.transpose(1, 2)  # noqa: E731
    if dout is None:
        return (as_bshd(out),)
    do = bhsd(dout)
    delta = (do * out).sum(-1)  # (b, h, S)
    dq = torch.empty_like(q64)
    dk = torch.zeros_like(k64)
    dv = torch.zeros_like(v64)
    for a in range(0, S, rows):
        z = min(S, a + rows)
        p, _, end = probabilities(a, z, lse[:, :, a:z])
        dv[:, :, :end] += torch.matmul(p.transpose(-1, -2), do[:, :, a:z])
        ds = p.mul_(torch.matmul(do[:, :, a:z], v64[:, :, :end].transpose(-1, -2)).sub_(delta[:, :, a:z, None]))
        dq[:, :, a:z] = torch.matmul(ds, k64[:, :, :end]) * scale
        dk[:, :, :end] += torch.matmul(ds.transpose(-1, -2), q64[:, :, a:z]) * scale
    fold = lambda g: as_bshd(g).unflatten(2, (hk, h // hk)).sum(3)  # noqa: E731  (GQA: sum each KV group)
    return as_bshd(out), as_bshd(dq), fold(dk), fold(dv)


def sharded_rel_errors(got_local, want_local, group=None) -> list[float]:
    """Relative errors of tensors sharded over a process group, measured on the whole (sums of
    squares all-reduced), one per pair."""
    import torch.distributed as dist

    sums = torch.stack([torch.stack([(g.double() - w.double()).pow(2).sum(), w.double().pow(2).sum()])
                        for g, w in zip(got_local, want_local)])
    if dist.is_available() and dist.is_initialized():
        dist.all_reduce(sums, group=group)
    return [(n / d) ** 0.5 for n, d in sums.tolist()]


def kernel_errors(backend: str, q, k, v, dout, ref, *, causal=False):
    """(kernel name, relative errors of out, dq, dk, dv) of one block kernel on the whole sequence:
    the yardstick for the error of the distributed attention on the same inputs."""
    from .kernels import select_kernel

    kernel = select_kernel(backend, q, k, causal)
    out, lse = kernel.forward(q, k, v, causal=causal)
    got = [out, *kernel.backward(dout, q, k, v, out, lse, causal=causal)]
    return kernel.name, [rel_error(a, b) for a, b in zip(got, ref)]


def packed_leaves(api: str, q, k, v) -> list[torch.Tensor]:
    """Fresh leaves (requiring grad) in the form an API takes: q, k, v; q, kv for ``*_kvpacked_*``
    functions and ``kvpacked`` (kv stacked along dim -3); qkv for ``*_qkvpacked_*`` functions and the
    ``qkvpacked`` module. ``lightning_sp.attention.hybrid.unpack`` turns their gradients back into
    dq, dk, dv."""
    if api in ("qkvpacked", "LongContextAttentionQKVPacked") or "_qkvpacked_" in api:
        leaves = [torch.stack([q, k, v], dim=-3)]
    elif api == "kvpacked" or "_kvpacked_" in api:
        leaves = [q, torch.stack([k, v], dim=-3)]
    else:
        leaves = [q, k, v]
    return [t.detach().clone().requires_grad_() for t in leaves]
