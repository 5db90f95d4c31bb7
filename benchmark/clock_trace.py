"""Iteration by iteration: time, SM clock and power of every GPU while the one-GPU kernel on the
whole sequence (every rank alone, as ``--interleave``'s baseline) and ours (a ring over all ranks)
alternate. It shows how the power cap moves timings (benchmark/results/2026-11-26-run8/NOTES.md).

    torchrun --nproc_per_node 2 benchmark/clock_trace.py --seq_len 32768 --backend fa4 --out clocks.jsonl

Each iteration is timed on its own (``common.time_iterations`` with one iteration, the clocks sampled
while it runs), so ours pays its launch latency every time: its times here run about 1 ms above
``benchmark_longctx_qkvpacked.py``'s at 32K. Clocks and power come from NVML (pynvml); None without it.
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(1, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # lightning_sp, uninstalled
import benchmark_longctx_qkvpacked as ours_bench  # noqa: E402
import benchmark_qkvpacked_func as one_gpu  # noqa: E402
import common  # noqa: E402

import lightning_sp  # noqa: E402
from lightning_sp.kernels import backends, select_kernel  # noqa: E402


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    common.add_shape_args(p)
    p.add_argument("--backend", default="auto", choices=backends())
    p.add_argument("--ring_impl_type", default="zigzag", help="ours' ring layout")
    p.add_argument("--separate_qkv", action="store_true", help="ours from separate q, k, v (default: packed qkv)")
    p.add_argument("--rounds", type=int, default=4)
    p.add_argument("--baseline_iters", type=int, default=12, help="one-GPU iterations per round")
    p.add_argument("--ours_iters", type=int, default=16, help="our iterations per round")
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    device, rank, world = common.setup_distributed()
    args = common.finish_args(args, device)
    dtype = common.DTYPES[args.dtype]
    kv, seq_len, fwd_only = next(common.shape_configs(args))
    mesh = lightning_sp.init_sp_mesh(ulysses_degree=1, ring_degree=world)
    ours, _ = ours_bench.make_step(mesh, args.ring_impl_type, args.backend, 1, args, kv, seq_len, fwd_only, device,
                                   dtype)
    kernel = select_kernel(args.backend, *ours_bench.whole_sequence_stubs(args, kv, seq_len, device, dtype),
                           causal=True)
    sides = (("baseline", one_gpu.make_step(kernel, args, kv, seq_len, fwd_only, device, dtype), args.baseline_iters),
             ("ours", ours, args.ours_iters))
    for _, step, _ in sides:  # compile and allocate outside the trace
        common.time_iterations(step, args.warmup, 1, device)
    iterations = []
    for round_ in range(args.rounds):
        for side, step, iters in sides:
            for i in range(iters):
                t = common.time_iterations(step, 0, 1, device, fastest_rank=side == "baseline", probe_clocks=True)
                iterations.append(dict(round=round_, side=side, i=i, ms=t["time_ms"], sm_mhz=t["sm_mhz"],
                                       power_w=t["power_w"]))
    record = common.base_record("clock_trace", args, device, world, kv_heads=kv, seq_len=seq_len, fwd_only=fwd_only,
                                ulysses=1, ring=world, layout=args.ring_impl_type, backend=args.backend,
                                kernel=kernel.name, iterations=iterations)
    if rank == 0:
        for it in iterations:
            print(f"round {it['round']} {it['side']:8s} {it['i']:2d} {it['ms']:9.3f} ms  SM MHz {it['sm_mhz']}  "
                  f"W {it['power_w']}", flush=True)
        for side, _, _ in sides:
            times = [it["ms"] for it in iterations if it["side"] == side]
            print(f"{side}: median {statistics.median(times):.3f} ms over {len(times)} iterations", flush=True)
        common.append_record(args.out, record)
    common.teardown_distributed()
    return 0


if __name__ == "__main__":
    sys.exit(main())
