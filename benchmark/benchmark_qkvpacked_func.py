"""The one-GPU ceiling: the block kernel alone on the whole sequence, no communication.

    python benchmark/benchmark_qkvpacked_func.py --nheads 32 --seq_len 131072 --backend fa4 cudnn --world 2 \\
        --out benchmark/results/attention.jsonl

One process times ``kernel.forward`` (+ ``kernel.backward``) of lightning_sp's block-kernel
contract on contiguous (b, S, h, d) q and (b, S, kv_heads, d) k, v, causal. Every record also
carries the perfect-scaling limit on --world P GPUs: time / P (and P x its iterations per second),
the line a sequence-parallel run is measured against. --kv_heads, --seq_len, --mode and --backend
take several values and sweep. ``auto`` picks the fastest installed kernel that accepts the call.
"""
from __future__ import annotations

import argparse
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(1, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # lightning_sp, uninstalled
import common  # noqa: E402

from lightning_sp.kernels import backends, select_kernel  # noqa: E402


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    common.add_shape_args(p)
    p.add_argument("--backend", nargs="+", default=["auto"], choices=backends())
    p.add_argument("--world", type=int, default=2, help="P of the perfect-scaling limit time / P")
    return p.parse_args(argv)


def make_step(kernel, args, kv, seq_len, fwd_only, device, dtype):
    b, h, d = args.batch_size, args.nheads, args.head_dim
    g = torch.Generator(device=device).manual_seed(args.seed)
    q = torch.randn(b, seq_len, h, d, generator=g, device=device, dtype=dtype)
    k, v = (torch.randn(b, seq_len, kv, d, generator=g, device=device, dtype=dtype) for _ in range(2))
    if fwd_only:
        def step():
            kernel.forward(q, k, v, causal=True)
        return step
    dout = torch.randn_like(q)

    def step():
        out, lse = kernel.forward(q, k, v, causal=True)
        kernel.backward(dout, q, k, v, out, lse, causal=True)
    return step


def run_config(args, kv, seq_len, fwd_only, backend, device, dtype):
    record = common.base_record("single_gpu", args, device, 1, kv_heads=kv, seq_len=seq_len, fwd_only=fwd_only,
                                ulysses=1, ring=1, layout=None, backend=backend, kernel=None,
                                perfect_world=args.world, config=backend)
    try:
        stub = torch.zeros((), device=device, dtype=dtype)
        kernel = select_kernel(backend, stub.expand(args.batch_size, seq_len, args.nheads, args.head_dim),
                               stub.expand(args.batch_size, seq_len, kv, args.head_dim), causal=True)
        record["kernel"] = kernel.name
        record["config"] = kernel.name if backend == kernel.name else f"{backend}:{kernel.name}"
        step = make_step(kernel, args, kv, seq_len, fwd_only, device, dtype)
        timing = common.time_iterations(step, args.warmup, args.iters, device)
        flops = common.attention_flops(args.batch_size, seq_len, args.nheads, args.head_dim, True, fwd_only)
        record.update(timing, **common.throughput_fields(timing, flops, 1),
                      perfect_time_ms=timing["time_ms"] / args.world,
                      perfect_iters_per_s=args.world * 1e3 / timing["time_ms"])
    except Exception as exc:  # recorded; the sweep goes on
        record["error"] = common.error_text(exc)
    finally:
        step = None  # noqa: F841
        common.release_memory(device)
    return record


def main(argv=None) -> list[dict]:
    args = parse_args(argv)
    if int(os.environ.get("RANK", 0)) != 0:  # launched by torchrun: one process is the whole benchmark
        return []
    device = common.local_device()
    args = common.finish_args(args, device)
    dtype = common.DTYPES[args.dtype]
    records = []
    for kv, seq_len, fwd_only in common.shape_configs(args):
        for backend in dict.fromkeys(args.backend):
            record = run_config(args, kv, seq_len, fwd_only, backend, device, dtype)
            line = common.describe(record)
            if record["error"] is None:
                line += f"; perfect scaling on {args.world}: {record['perfect_time_ms']:.3f} ms"
            print(line, flush=True)
            common.append_record(args.out, record)
            records.append(record)
    return records


if __name__ == "__main__":
    main()
