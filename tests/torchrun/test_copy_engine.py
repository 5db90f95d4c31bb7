"""torchrun --nproc_per_node 2 tests/torchrun/test_copy_engine.py  (GPUs of one node)

The copy-engine transport against torch.distributed (NCCL): the ring exchange both ways and the
all-to-all must deliver the same bytes, through more messages than the outbox has slots and with a
growing message size; then the whole attention (ring, Ulysses, hybrid where the world allows it)
must give bit-identical outputs and gradients as close to float64 as NCCL's. Exits non-zero on failure.
"""
import sys

import torch
import torch.distributed as dist

from common import finish, inputs, setup  # first: it puts an uninstalled lightning_sp on the path
import lightning_sp
from lightning_sp.core import comm
from lightning_sp.core import layout as L
from lightning_sp.core.testing import kernel_errors, reference_attention, sharded_rel_errors


def report(ok, name):
    if dist.get_rank() == 0:
        print(f"{'PASS' if ok else 'FAIL'} {name}", flush=True)
    return ok


def primitives(device) -> bool:
    world, rank = dist.get_world_size(), dist.get_rank()
    mesh = lightning_sp.init_sp_mesh(ulysses_degree=1, ring_degree=world)
    ok = True
    g = torch.Generator(device=device).manual_seed(rank)
    for i, numel in enumerate([1000, 1 << 20, 333, 5 << 20, 7, 1 << 20]):  # grows twice, reuses slots
        dtype = (torch.bfloat16, torch.float32)[i % 2]
        tensors = [torch.randn(numel, generator=g, device=device).to(dtype) for _ in range(2)]
        for reverse in (False, True):
            got = {}
            for name in ("nccl", "copy_engine"):
                got[name] = comm.RingExchange(mesh.with_config(transport=name), reverse=reverse).start(tensors).wait()
            ok &= all(torch.equal(a, b) for a, b in zip(got["nccl"], got["copy_engine"]))
        x = torch.randn(world, numel, 3, generator=g, device=device).to(dtype)
        got = {}
        for name in ("nccl", "copy_engine"):
            got[name] = comm.start_all_to_all(x, mesh.ring_group, name).wait()[0]
        ok &= torch.equal(got["nccl"], got["copy_engine"])
    # many messages in flight at once (more than the outbox's slots), waited for at the end
    xs = [torch.full((world, 4096), float(rank * 100 + i), device=device) for i in range(5)]
    pending = [comm.start_all_to_all(x, mesh.ring_group, "copy_engine") for x in xs]
    for i, p in enumerate(pending):
        expect = torch.arange(world, device=device, dtype=torch.float32)[:, None] * 100 + i
        ok &= torch.equal(p.wait()[0], expect.expand(world, 4096))
    return report(ok, "copy-engine ring exchange and all-to-all deliver the same bytes as NCCL")


def attention(device, dtype) -> bool:
    """Both transports against float64: the outputs must be bit-identical (the forward kernels are
    deterministic), the gradients as close to float64 as NCCL's (backward kernels may add with
    atomics, so bit equality of gradients is not asked for); both within the torchrun bound."""
    world = dist.get_world_size()
    ok = True
    S, heads = 2048 * world, 8
    q, k, v, dout = inputs(S, heads, heads, 128, device, dtype)
    ref = reference_attention(q, k, v, dout, causal=True)
    single = kernel_errors("auto", q, k, v, dout, ref, causal=True)[1]
    for u in sorted({1, 2, world}):
        if world % u:
            continue
        mesh = lightning_sp.init_sp_mesh(ulysses_degree=u, ring_degree=world // u)
        for layout in ("zigzag", "contiguous"):
            for groups in (1, 2):
                results, errors = {}, {}
                for name in ("nccl", "copy_engine"):
                    local = [L.shard(t, mesh, layout).requires_grad_() for t in (q, k, v)]
                    by = mesh.with_config(transport=name)  # the transport travels in the mesh's config
                    attn = lightning_sp.LongContextAttention(by, ring_impl=layout, head_groups=groups)
                    out = attn(*local, causal=True)
                    out.backward(L.shard(dout, mesh, layout))
                    results[name] = [out.detach(), *(t.grad for t in local)]
                    errors[name] = sharded_rel_errors(results[name], [L.shard(r, mesh, layout) for r in ref])
                same_out = torch.equal(results["nccl"][0], results["copy_engine"][0])
                close = all(e <= 1.3 * s and e <= 1.02 * n
                            for e, n, s in zip(errors["copy_engine"], errors["nccl"], single))
                detail = " ".join(f"{e:.2e}/{n:.2e}" for e, n in zip(errors["copy_engine"], errors["nccl"]))
                ok &= report(same_out and close, f"attention u{u} x r{world // u} {layout} g{groups}: out "
                             f"{'bit-identical' if same_out else 'DIFFERS'}; errors copy_engine/nccl {detail}")
    return ok


if __name__ == "__main__":
    device, dtype = setup()
    if device.type != "cuda":
        print("SKIP: the copy-engine transport needs CUDA GPUs")
        sys.exit(0)
    finish(primitives(device) & attention(device, dtype))
