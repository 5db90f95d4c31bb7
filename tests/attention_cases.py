"""Attention cases that run on every rank of a gloo world, compared with a float64 reference."""
from __future__ import annotations

from dataclasses import replace

import torch
import torch.distributed as dist

import lightning_sp
from lightning_sp import layout as L
from lightning_sp.attention.hybrid import unpack
from lightning_sp.testing import packed_leaves


def reference_attention(q, k, v, *, causal, scale, window=(-1, -1), doc_ids=None, positions=None):
    """Plain float64 attention of full sequences (b, S, h, d), written independently of the library."""
    b, S, h, d = q.shape
    rep = h // k.shape[2]
    k, v = k.repeat_interleave(rep, dim=2), v.repeat_interleave(rep, dim=2)
    pos = torch.arange(S) if positions is None else positions
    diff = pos[:, None] - pos[None, :]
    allowed = torch.ones(S, S, dtype=torch.bool)
    if causal:
        allowed &= diff >= 0
    if window[0] >= 0:
        allowed &= diff <= window[0]
    if window[1] >= 0:
        allowed &= diff >= -window[1]
    if doc_ids is not None:
        allowed &= doc_ids[:, None] == doc_ids[None, :]
    scores = torch.einsum("bqhd,bkhd->bhqk", q, k) * scale
    scores = scores.masked_fill(~allowed, float("-inf"))
    return torch.einsum("bhqk,bkhd->bqhd", scores.softmax(-1), v)


def rel_err(a, b) -> float:
    return ((a.double() - b.double()).norm() / b.double().norm().clamp_min(1e-300)).item()


TOL = {torch.float64: 1e-10, torch.float32: 1e-5}


def _inputs(b, S, h, hk, d, seed):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(b, S, h, d, generator=g, dtype=torch.float64)
    k = torch.randn(b, S, hk, d, generator=g, dtype=torch.float64)
    v = torch.randn(b, S, hk, d, generator=g, dtype=torch.float64)
    dout = torch.randn(b, S, h, d, generator=g, dtype=torch.float64)
    return q, k, v, dout


def _grads_reference(q, k, v, dout, **kw):
    q, k, v = [t.clone().requires_grad_() for t in (q, k, v)]
    out = reference_attention(q, k, v, **kw)
    out.backward(dout)
    return out.detach(), q.grad, k.grad, v.grad


def dense_case(ulysses, ring, layout, causal, heads, kv_heads, dtype=torch.float64, window=(-1, -1),
               seq=None, batch=2, head_dim=8, backend="auto", seed=0, api="module", head_groups="auto"):
    """Distributed output and dq, dk, dv against the float64 reference; returns the relative errors."""
    mesh = lightning_sp.init_sp_mesh(ulysses_degree=ulysses, ring_degree=ring)
    S = seq or 4 * L.layout_multiple(layout, mesh)
    q, k, v, dout = _inputs(batch, S, heads, kv_heads, head_dim, seed + 1000 * mesh.dp_rank)
    scale = 0.7 / head_dim ** 0.5
    ref = _grads_reference(q, k, v, dout, causal=causal, scale=scale, window=window)

    idx = L.local_indices(S, mesh, layout)
    local = [L.shard(t, mesh, layout).to(dtype) for t in (q, k, v)]
    assert local[0].shape[1] == S // mesh.sp_size, "a rank must hold exactly its share of the tokens"
    assert torch.equal(local[0].double(), q[:, idx].to(dtype).double())
    leaves = packed_leaves(api, *local)
    if api == "module":
        attn = lightning_sp.LongContextAttention(mesh, ring_impl=layout, backend=backend, head_groups=head_groups)
        out = attn(*leaves, causal=causal, softmax_scale=scale, window_size=window)
    elif api == "qkvpacked":
        out = lightning_sp.LongContextAttentionQKVPacked(mesh, ring_impl=layout, backend=backend)(
            *leaves, causal=causal, softmax_scale=scale, window_size=window)
    elif api == "kvpacked":  # (q, kv) on any mesh, through the functional form
        out = lightning_sp.packed_long_context_attention(leaves, mesh, layout, causal=causal, softmax_scale=scale,
                                                         window_size=window, backend=backend)
    else:  # a seed-compatible function name, pure ring over the world
        out = getattr(lightning_sp, api)(*leaves, softmax_scale=scale, causal=causal, window_size=window)
    out.backward(L.shard(dout, mesh, layout).to(dtype))
    grads = unpack([x.grad for x in leaves])
    errs = {"out": rel_err(out, L.shard(ref[0], mesh, layout))}
    for name, g, r in zip(("dq", "dk", "dv"), grads, ref[1:]):
        errs[name] = rel_err(g, L.shard(r, mesh, layout))
    # the full output, reassembled, matches too (exercises unshard)
    errs["unshard"] = rel_err(L.unshard(out.detach(), mesh, layout), ref[0])
    tol = TOL[dtype]
    assert all(e < tol for e in errs.values()), f"errors {errs} above {tol}"
    return errs


def packed_matches_separate_case(layout, api, dtype=torch.bfloat16, heads=4, head_dim=8):
    """bfloat16 output and gradients of a packed input are bit for bit those of separate q, k, v (the
    packed gradient is written in place, its sums rounded exactly as the separate ones)."""
    mesh = lightning_sp.init_sp_mesh(ulysses_degree=1, ring_degree=dist.get_world_size())
    S = 4 * L.layout_multiple(layout, mesh)
    q, k, v, dout = _inputs(2, S, heads, heads, head_dim, seed=3)
    local = [L.shard(t, mesh, layout).to(dtype) for t in (q, k, v)]
    dout = L.shard(dout, mesh, layout).to(dtype)
    results = []
    for form in (api.replace("qkvpacked_", "").replace("kvpacked_", ""), api):
        leaves = packed_leaves(form, *local)
        out = getattr(lightning_sp, form)(*leaves, causal=True)
        out.backward(dout)
        results.append([out.detach(), *unpack([x.grad for x in leaves])])
    for name, separate, packed in zip(("out", "dq", "dk", "dv"), *results):
        assert torch.equal(separate, packed), f"{name} of {api} differs from the separate q, k, v result"


def varlen_case(ulysses, ring, layout, causal, heads, kv_heads, doc_lengths, dtype=torch.float64,
                window=(-1, -1), head_dim=8, seed=0, api="module", head_groups="auto", backend="auto"):
    """Packed documents of uneven lengths: no attention across documents, padding per document."""
    mesh = lightning_sp.init_sp_mesh(ulysses_degree=ulysses, ring_degree=ring)
    T = sum(doc_lengths)
    cu = torch.tensor([0, *doc_lengths]).cumsum(0)
    q, k, v, dout = (t[0] for t in _inputs(1, T, heads, kv_heads, head_dim, seed))
    doc_ids = torch.repeat_interleave(torch.arange(len(doc_lengths)), torch.tensor(doc_lengths))
    positions = torch.arange(T) - cu[doc_ids]
    scale = head_dim ** -0.5
    ref = _grads_reference(q[None], k[None], v[None], dout[None], causal=causal, scale=scale, window=window,
                           doc_ids=doc_ids, positions=positions)
    ref = [r[0] for r in ref]

    packed = L.shard_documents(cu, mesh, layout, causal=causal or window[1] == 0)
    local = [packed.shard(t).to(dtype) for t in (q, k, v, dout)]
    real = packed.token_index >= 0
    assert torch.equal(packed.position_ids[real], positions[packed.token_index[real]])
    assert local[0].shape[0] * mesh.sp_size == int(packed.padded_cu_seqlens[-1]), "each rank holds its share only"
    leaves = packed_leaves(api, *local[:3])
    if api == "module":
        out = lightning_sp.LongContextAttention(mesh, ring_impl=layout, head_groups=head_groups, backend=backend)(
            *leaves, causal=causal, window_size=window, cu_seqlens=packed.cu_seqlens,
            max_seqlen=packed.max_seqlen)
    else:
        out = getattr(lightning_sp, api)(*leaves, packed.cu_seqlens, packed.max_seqlen, causal=causal,
                                         window_size=window)
    out.backward(local[3])
    errs = {}
    for name, got, want in zip(("out", "dq", "dk", "dv"), (out, *unpack([x.grad for x in leaves])), ref):
        errs[name] = rel_err(got[real], want[packed.token_index[real]])
        assert torch.all(got[~real] == 0) or name == "out", f"{name} of padding must be zero"
    errs["unshard"] = rel_err(packed.unshard(out.detach(), mesh), ref[0])
    tol = TOL[dtype]
    assert all(e < tol for e in errs.values()), f"errors {errs} above {tol}"
    return errs


def split_causal_schedule(layout, q_rank, kv_rank, ring_size, n_local, causal, window=(None, None)):
    """``layout.block_schedule`` with every square causal block of 2+ rows cut in two: its first half
    of rows (square causal) and its second half against every key (causal, fewer queries than keys,
    bottom-right aligned). The same mask, in blocks a square-causal kernel cannot take as they are."""
    pairs = []
    for p in L.block_schedule(layout, q_rank, kv_rank, ring_size, n_local, causal, window):
        n = p.q_stop - p.q_start
        if p.causal and n == p.k_stop - p.k_start and n >= 2:
            m = p.q_start + n // 2
            pairs += [replace(p, q_stop=m, k_stop=p.k_start + n // 2), replace(p, q_start=m)]
        else:
            pairs.append(p)
    return pairs


def kernel_choice_case(ulysses, ring, layout, packed=False, backend="cpu_flash", heads=(4, 2),
                       head_groups="auto") -> dict:
    """One attention call (forward and backward, float64) over a schedule with unequal causal blocks
    (``split_causal_schedule``): exact with ``backend`` although it takes causal blocks square only,
    since the plan cuts the blocks to fit it; returns how often a kernel was chosen and what the
    plan was handed and made."""
    from lightning_sp.core.attention import ring as ring_mod

    chosen, fitted = [], []
    schedule, select, fit = ring_mod.block_schedule, ring_mod.select_kernel, ring_mod.square_causal

    def counting_select(*args, **kwargs):
        kernel = select(*args, **kwargs)
        chosen.append(kernel.name)
        return kernel

    def recording_fit(pairs):
        fitted.append((pairs, fit(pairs)))
        return fitted[-1][1]

    ring_mod.block_schedule, ring_mod.select_kernel, ring_mod.square_causal = (split_causal_schedule,
                                                                              counting_select, recording_fit)
    try:
        if packed:
            varlen_case(ulysses, ring, layout, True, *heads, [13, 30, 7, 21], backend=backend, head_groups=head_groups)
        else:
            dense_case(ulysses, ring, layout, True, *heads, backend=backend, head_groups=head_groups)
    finally:
        ring_mod.block_schedule, ring_mod.select_kernel, ring_mod.square_causal = schedule, select, fit
    unequal = lambda p: p.causal and p.q_stop - p.q_start != p.k_stop - p.k_start  # noqa: E731
    return {"chosen": chosen, "unequal_in": sum(unequal(p) for pairs, _ in fitted for p in pairs),
            "unequal_out": sum(unequal(p) for _, pairs in fitted for p in pairs)}


def error_message(case: str) -> str:
    """Run a bad-input case on every rank; returns the message of the error it must raise."""
    import pytest

    with pytest.raises((lightning_sp.SPConfigError, lightning_sp.KernelError)) as info:
        if case == "degrees":
            lightning_sp.init_sp_mesh(ulysses_degree=3, ring_degree=1)
        mesh = lightning_sp.init_sp_mesh(ulysses_degree=2, ring_degree=2)
        x = torch.randn(1, 8, 6, 4)
        if case == "heads":
            y = torch.randn(1, 8, 5, 4)
            lightning_sp.LongContextAttention(mesh)(y, y, y)
        if case == "unbound":
            lightning_sp.LongContextAttention()(x, x, x)
        if case == "odd_zigzag":
            y = torch.randn(1, 3, 4, 4)
            ring4 = lightning_sp.init_sp_mesh(ulysses_degree=1, ring_degree=4)
            lightning_sp.LongContextAttention(ring4, ring_impl="zigzag")(y, y, y)
        if case == "cu_seqlens":
            y = torch.randn(8, 4, 4)
            lightning_sp.LongContextAttention(mesh)(y, y, y, cu_seqlens=torch.tensor([0, 4, 8]), max_seqlen=4)
        if case == "head_groups":
            lightning_sp.LongContextAttention(mesh, head_groups=4)(x, x, x)
        if case == "ulysses_on_ring":
            lightning_sp.UlyssesAttention(mesh)(x, x, x)
    return str(info.value)


def mesh_reuse_case() -> dict:
    """init_sp_mesh called again with the same degrees returns the same mesh and makes no groups."""
    def threads():
        with open("/proc/self/status") as f:
            return next(int(line.split()[1]) for line in f if line.startswith("Threads:"))

    first = lightning_sp.init_sp_mesh(ulysses_degree=2, ring_degree=2)
    before = threads()
    again = [lightning_sp.init_sp_mesh(ulysses_degree=2, ring_degree=2) for _ in range(5)]
    after = threads()
    other = lightning_sp.init_sp_mesh(ulysses_degree=1, ring_degree=4)
    assert all(m is first for m in again)
    assert other is not first and other.ring_size == 4
    assert lightning_sp.init_sp_mesh(ulysses_degree=1, ring_degree=4) is other
    return {"threads_before": before, "threads_after": after}
