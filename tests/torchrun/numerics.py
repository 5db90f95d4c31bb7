"""Distributed attention error against float64, next to the single-device kernel's own error.

    torchrun --nproc_per_node 2 tests/torchrun/numerics.py --seq_lens 32768 131072 --backends fa4 cudnn

For each sequence length, every (ulysses, ring) split of the world and every layout, prints the
relative error of the output and of dq, dk, dv against a float64 reference, and the ratio to the
error of the same kernel on the whole sequence on one device, and asserts it (issue 2): ratio <= 1.3
with ring degree >= 2 or replicated KV heads, <= 1.05 for pure Ulysses; one process runs the
single-rank path (ratio 1). On CPU (gloo) it runs in float64 (errors < 1e-10) as a check of the
script itself. Exits non-zero when a check fails or a backend cannot run. ``--out`` appends one JSON
record per configuration. ``benchmark/numerics.py`` is this script; ``python -m pytest -m gpu``
launches it for each GPU backend (tests/gpu/test_gpu_distributed.py).
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import sys

import torch
import torch.distributed as dist

from common import ROOT, finish, numerics, setup


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

    device, dtype = setup()
    dtype = getattr(torch, args.dtype) if args.dtype else dtype
    causal = not args.non_causal
    kv_heads = args.kv_heads or args.nheads
    rows, ok = numerics(args.seq_lens, args.nheads, kv_heads, args.head_dim, args.backends, args.layouts,
                        causal, device, dtype)
    if dist.get_rank() == 0 and args.out:
        cuda = device.type == "cuda"
        script = os.path.relpath(os.path.abspath(sys.argv[0]), ROOT)
        meta = dict(card=torch.cuda.get_device_name() if cuda else "cpu", date=str(datetime.date.today()),
                    world=dist.get_world_size(), dtype=str(dtype), causal=causal, nheads=args.nheads,
                    kv_heads=kv_heads, head_dim=args.head_dim, torch=torch.__version__,
                    command="torchrun --nproc_per_node %d %s %s" % (dist.get_world_size(), script,
                                                                     " ".join(sys.argv[1:])))
        with open(args.out, "a") as f:
            for row in rows:
                f.write(json.dumps({**meta, **row}) + "\n")
    finish(ok)


if __name__ == "__main__":
    main()
