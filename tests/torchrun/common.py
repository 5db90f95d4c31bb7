"""Shared body of the torchrun checks (the reference project's test commands, mirrored, and the
numerics of ``numerics.py``):

    torchrun --nproc_per_node 8 tests/torchrun/test_zigzag_ring_flash_attn_func.py

On GPUs (NCCL, bf16) each distributed error must stay within 1.3x the single-GPU kernel's own error
against float64 (1.05x for pure Ulysses without KV-head replication); on CPU (gloo, float64) within
1e-10. Exits non-zero on failure. ``python -m pytest -m gpu`` launches them (tests/gpu/).
"""
from __future__ import annotations

import itertools
import os
import sys

import torch
import torch.distributed as dist

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(1, ROOT)  # lightning_sp, uninstalled
import lightning_sp  # noqa: E402
from lightning_sp.core import layout as L  # noqa: E402
from lightning_sp.core.attention.hybrid import unpack  # noqa: E402
from lightning_sp.core.testing import (kernel_errors, packed_leaves, reference_attention,  # noqa: E402
                                       sharded_rel_errors)

NAMES = ("out", "dq", "dk", "dv")
MODULES = ("LongContextAttention", "UlyssesAttention", "LongContextAttentionQKVPacked")


def setup():
    cuda = torch.cuda.is_available()
    if cuda:
        os.environ.setdefault("NCCL_NVLS_ENABLE", "0")
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
    dist.init_process_group("nccl" if cuda else "gloo")
    return torch.device("cuda" if cuda else "cpu"), (torch.bfloat16 if cuda else torch.float64)


def inputs(S, heads, kv_heads, head_dim, device, dtype, seed=0):
    g = torch.Generator(device=device).manual_seed(seed)
    q = torch.randn(1, S, heads, head_dim, generator=g, device=device, dtype=dtype)
    k, v = (torch.randn(1, S, kv_heads, head_dim, generator=g, device=device, dtype=dtype) for _ in range(2))
    dout = torch.randn(1, S, heads, head_dim, generator=g, device=device, dtype=dtype)
    return q, k, v, dout


def ratio_bound(ulysses: int, world: int, kv_heads: int) -> float:
    """How far the distributed bf16 error may exceed the one-GPU kernel's: pure Ulysses is the
    kernel's own arithmetic (1.05), unless KV heads were replicated: then, as in the ring, bf16
    partial gradients of one KV head are summed (1.3)."""
    return 1.05 if ulysses == world and kv_heads % ulysses == 0 else 1.3


def judge(name, errs, single, bound, dtype) -> bool:
    if dtype == torch.float64:
        ok = max(errs) < 1e-10
        detail = " ".join(f"{n} {e:.1e}" for n, e in zip(NAMES, errs))
    else:
        ok = all(e <= bound * s for e, s in zip(errs, single))
        detail = " ".join(f"{n} {e:.2e} ({e / s:.3f}x)" for n, e, s in zip(NAMES, errs, single))
        detail += f" bound {bound}x"
    if dist.get_rank() == 0:
        print(f"{'PASS' if ok else 'FAIL'} {name}: {detail}", flush=True)
    return ok


def attend(api, mesh, layout, q, k, v, dout, ref, causal, backend=None) -> list[float]:
    """Relative errors of out, dq, dk, dv of one lightning_sp API (a function or module name) on the
    whole sequence, sharded in ``layout`` over ``mesh``, against the float64 ``ref``."""
    leaves = packed_leaves(api, *(L.shard(t, mesh, layout) for t in (q, k, v)))
    if api in MODULES:
        options = {} if api == "UlyssesAttention" else {"ring_impl": layout}
        if backend is not None:
            options["backend"] = backend
        out = getattr(lightning_sp, api)(mesh, **options)(*leaves, causal=causal)
    else:
        out = getattr(lightning_sp, api)(*leaves, causal=causal)
    out.backward(L.shard(dout, mesh, layout))
    grads = unpack([t.grad for t in leaves])
    return sharded_rel_errors([out.detach(), *grads], [L.shard(r, mesh, layout) for r in ref])


def check_dense(apis, layout: str, ulysses_degrees=(1,), heads=8, kv_heads=8, head_dim=128, seq_per_rank=None):
    """The named APIs (lightning_sp function or module names) on every causal/full case."""
    device, dtype = setup()
    world = dist.get_world_size()
    ok = True
    apis = [apis] if isinstance(apis, str) else apis
    for api, causal in itertools.product(apis, (False, True)):
        S = (seq_per_rank or (4096 if device.type == "cuda" else 64)) * world
        q, k, v, dout = inputs(S, heads, kv_heads, head_dim, device, dtype)
        ref = reference_attention(q, k, v, dout, causal=causal)
        single = kernel_errors("auto", q, k, v, dout, ref, causal=causal)[1] if dtype != torch.float64 else None
        for u in ulysses_degrees:
            if world % u or heads % u:
                continue
            mesh = lightning_sp.init_sp_mesh(ulysses_degree=u, ring_degree=world // u)
            errs = attend(api, mesh, layout, q, k, v, dout, ref, causal)
            ok &= judge(f"{api} {layout} ulysses={u} ring={world // u} causal={causal}", errs, single,
                        ratio_bound(u, world, kv_heads), dtype)
    finish(ok)


def check_varlen(api: str, layout: str, heads=8, kv_heads=8, head_dim=128, doc_lengths=None):
    """A varlen function on packed documents of uneven lengths (each padded by shard_documents)."""
    device, dtype = setup()
    world = dist.get_world_size()
    mesh = lightning_sp.ring_mesh()
    ok = True
    doc_lengths = doc_lengths or ((1000, 3000, 250, 1846) if device.type == "cuda" else (100, 30, 25, 77))
    for causal in (True,):  # uneven documents need padding, which only causal attention cannot see
        cu = torch.tensor([0, *doc_lengths]).cumsum(0)
        T = int(cu[-1])
        q, k, v, dout = inputs(T, heads, kv_heads, head_dim, device, dtype)
        refs = [reference_attention(*(t[:, a:b] for t in (q, k, v, dout)), causal=causal)
                for a, b in zip(cu[:-1].tolist(), cu[1:].tolist())]
        ref = [torch.cat(parts, dim=1)[0] for parts in zip(*refs)]
        packed = L.shard_documents(cu, mesh, layout)
        real = (packed.token_index >= 0).to(device)
        index = packed.token_index.clamp(min=0).to(device)
        local = [packed.shard(t[0]).requires_grad_() for t in (q, k, v)]
        out = getattr(lightning_sp, api)(*local, packed.cu_seqlens.to(device), packed.max_seqlen, causal=causal)
        out.backward(packed.shard(dout[0]))
        got = [x[real] for x in (out.detach(), *(t.grad for t in local))]
        want = [r[index][real] for r in ref]
        errs = sharded_rel_errors(got, want)
        single = None
        if dtype != torch.float64:
            singles = [kernel_errors("auto", *(t[:, a:b] for t in (q, k, v, dout)), r, causal=causal)[1]
                       for (a, b), r in zip(zip(cu[:-1].tolist(), cu[1:].tolist()), refs)]
            single = [max(s[i] for s in singles) for i in range(4)]
        ok &= judge(f"{api} {world} ranks causal={causal}", errs, single, 1.3, dtype)
    finish(ok)


def splits(world: int) -> list[tuple[int, int]]:
    """Every (ulysses, ring) degree pair of the world."""
    return [(u, world // u) for u in range(1, world + 1) if world % u == 0]


def numerics(seq_lens, heads, kv_heads, head_dim, backends, layouts, causal, device, dtype):
    """LongContextAttention with each backend, over every (ulysses, ring) split of the world and every
    layout, against float64 next to the same kernel's error on the whole sequence on one device.
    Returns (records, ok); a backend that cannot run the case is a failure, named on rank 0."""
    from lightning_sp.core.errors import KernelError

    world, rank = dist.get_world_size(), dist.get_rank()
    rows, ok = [], True
    for S in seq_lens:
        q, k, v, dout = inputs(S, heads, kv_heads, head_dim, device, dtype, seed=S)
        ref = reference_attention(q, k, v, dout, causal=causal)
        for backend in backends:
            try:
                kernel_name, single = kernel_errors(backend, q, k, v, dout, ref, causal=causal)
            except KernelError as exc:
                ok = False
                if rank == 0:
                    print(f"FAIL S={S} backend={backend} cannot run: {exc}", flush=True)
                continue
            for u, r in splits(world):
                mesh = lightning_sp.init_sp_mesh(ulysses_degree=u, ring_degree=r)
                for layout in (layouts if r > 1 else ["contiguous"]):
                    errs = attend("LongContextAttention", mesh, layout, q, k, v, dout, ref, causal, backend)
                    bound = ratio_bound(u, world, kv_heads)
                    passed = judge(f"S={S} {kernel_name} u{u}xr{r} {layout}", errs, single, bound, dtype)
                    ok &= passed
                    rows.append(dict(seq_len=S, backend=kernel_name, ulysses=u, ring=r, layout=layout,
                                     **{f"{n}_err": e for n, e in zip(NAMES, errs)},
                                     **{f"{n}_single": e for n, e in zip(NAMES, single)},
                                     **{f"{n}_ratio": _ratio(e, s) for n, e, s in zip(NAMES, errs, single)},
                                     bound=bound, passed=passed))
        del q, k, v, dout, ref
        if device.type == "cuda":
            torch.cuda.empty_cache()
    return rows, ok


def _ratio(err: float, single: float) -> float:
    """err / single; an exact one-device kernel (the float64 reference) gives 1 if ours is exact too."""
    if single > 0:
        return err / single
    return 1.0 if err == 0 else float("inf")


def finish(ok: bool):
    # every rank waits before the groups go (without it gloo aborted a rank now and then on CPU)
    dist.barrier()
    dist.destroy_process_group()
    sys.exit(0 if ok else 1)
