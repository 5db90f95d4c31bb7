"""Distributed attention error against float64, next to the single-device kernel's own error.

    torchrun --nproc_per_node 2 benchmark/numerics.py --seq_lens 32768 131072 --backends fa4 cudnn

For each sequence length, every (ulysses, ring) split of the world and every layout, prints the
relative error of the output and of dq, dk, dv against a float64 reference, and the ratio to the
error of the same kernel on the whole sequence on one device. Targets (issue 2): ratio <= 1.3 with
ring degree >= 2, <= 1.05 for pure Ulysses. On CPU (gloo) it runs in float64/float32 as a check of
the script itself.
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import sys

import torch
import torch.distributed as dist

import lightning_sp
from lightning_sp import layout as L
from lightning_sp.testing import kernel_errors, reference_attention, sharded_rel_errors

NAMES = ("out", "dq", "dk", "dv")


def distributed_errors(mesh, layout, backend, q, k, v, dout, ref, causal):
    local = [L.shard(t, mesh, layout).requires_grad_() for t in (q, k, v)]
    out = lightning_sp.LongContextAttention(mesh, ring_impl=layout, backend=backend)(*local, causal=causal)
    out.backward(L.shard(dout, mesh, layout))
    want = [L.shard(r, mesh, layout) for r in ref]
    return sharded_rel_errors([out.detach(), *(t.grad for t in local)], want)


def splits(world):
    return [(u, world // u) for u in range(1, world + 1) if world % u == 0]


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--seq_lens", type=int, nargs="+", default=[32768, 131072])
    p.add_argument("--nheads", type=int, default=8)
    p.add_argument("--kv_heads", type=int, default=None)
    p.add_argument("--head_dim", type=int, default=128)
    p.add_argument("--backends", nargs="+", default=["fa4", "cudnn"])
    p.add_argument("--layouts", nargs="+", default=["contiguous", "zigzag", "stripe"])
    p.add_argument("--dtype", default=None, help="default: bfloat16 on cuda, float64 on cpu")
    p.add_argument("--non_causal", action="store_true")
    p.add_argument("--out", default=None, help="JSON lines file for the records")
    args = p.parse_args(argv)

    cuda = torch.cuda.is_available()
    if cuda:
        os.environ.setdefault("NCCL_NVLS_ENABLE", "0")
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
    dist.init_process_group("nccl" if cuda else "gloo")
    device = torch.device("cuda" if cuda else "cpu")
    dtype = getattr(torch, args.dtype) if args.dtype else (torch.bfloat16 if cuda else torch.float64)
    world, rank = dist.get_world_size(), dist.get_rank()
    causal = not args.non_causal
    rows = []
    for S in args.seq_lens:
        g = torch.Generator(device=device).manual_seed(S)
        shape_kv = (1, S, args.kv_heads or args.nheads, args.head_dim)
        q = torch.randn(1, S, args.nheads, args.head_dim, generator=g, device=device, dtype=dtype)
        k, v = (torch.randn(shape_kv, generator=g, device=device, dtype=dtype) for _ in range(2))
        dout = torch.randn(q.shape, generator=g, device=device, dtype=dtype)
        ref = reference_attention(q, k, v, dout, causal=causal)
        for backend in args.backends:
            try:
                kernel_name, single = kernel_errors(backend, q, k, v, dout, ref, causal=causal)
            except Exception as exc:  # a backend not installed or declining: say so and go on
                if rank == 0:
                    print(f"S={S} backend={backend}: skipped ({exc})", flush=True)
                continue
            for u, r in splits(world):
                mesh = lightning_sp.init_sp_mesh(ulysses_degree=u, ring_degree=r)
                for layout in (args.layouts if r > 1 else ["contiguous"]):
                    errs = distributed_errors(mesh, layout, backend, q, k, v, dout, ref, causal)
                    row = dict(seq_len=S, backend=kernel_name, ulysses=u, ring=r, layout=layout,
                               **{f"{n}_err": e for n, e in zip(NAMES, errs)},
                               **{f"{n}_single": e for n, e in zip(NAMES, single)},
                               **{f"{n}_ratio": _ratio(e, s) for n, e, s in zip(NAMES, errs, single)})
                    rows.append(row)
                    if rank == 0:
                        ratios = " ".join(f"{n} {row[n + '_err']:.2e}/{row[n + '_single']:.2e}={row[n + '_ratio']:.3f}"
                                          for n in NAMES)
                        print(f"S={S} {kernel_name:9s} u{u}xr{r} {layout:10s} {ratios}", flush=True)
        del q, k, v, dout, ref
        if cuda:
            torch.cuda.empty_cache()
    if rank == 0 and args.out:
        meta = dict(card=torch.cuda.get_device_name() if cuda else "cpu", date=str(datetime.date.today()),
                    world=world, dtype=str(dtype), causal=causal, nheads=args.nheads,
                    kv_heads=args.kv_heads or args.nheads, head_dim=args.head_dim, torch=torch.__version__,
                    command="torchrun --nproc_per_node %d benchmark/numerics.py %s" % (world, " ".join(sys.argv[1:])))
        with open(args.out, "a") as f:
            for row in rows:
                f.write(json.dumps({**meta, **row}) + "\n")
    dist.barrier()  # see benchmark/common.py: teardown_distributed
    dist.destroy_process_group()
    return rows


def _ratio(err: float, single: float) -> float:
    """err / single; an exact one-device kernel (the float64 reference) gives 1 if ours is exact too."""
    if single > 0:
        return err / single
    return 1.0 if err == 0 else float("inf")


if __name__ == "__main__":
    main()
