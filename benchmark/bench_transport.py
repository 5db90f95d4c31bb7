"""How fast the ring exchange and the all-to-all move data, alone and beside a busy GPU, for each
transport (NCCL kernels vs the copy engines):

    torchrun --nproc_per_node 2 benchmark/bench_transport.py --mib 256 1024 --out transport.jsonl

For each size: the exchange alone (GB/s per direction), the compute alone (a causal attention
forward through torch's cuDNN kernel, sized to take about as long as the exchange, or matmuls),
and both together: ``hidden`` is the share of the exchange that the overlap hid
((compute + exchange - both) / exchange; 1 = fully hidden, 0 = serialized).
"""
from __future__ import annotations

import argparse
import os
import sys

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(1, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import common  # noqa: E402

import lightning_sp  # noqa: E402
from lightning_sp import comm  # noqa: E402


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--mib", type=int, nargs="+", default=[256, 1024], help="bytes each rank sends, in MiB")
    p.add_argument("--transport", nargs="+", default=["nccl", "copy_engine"], choices=comm.TRANSPORTS)
    p.add_argument("--compute", nargs="+", default=["attention", "matmul"], choices=["attention", "matmul"])
    p.add_argument("--matmul_size", type=int, default=8192, help="n of the n x n bf16 matmuls of --compute matmul")
    p.add_argument("--iters", type=int, default=10)
    p.add_argument("--out", default=None)
    return p.parse_args(argv)


def compute_fn(kind, device, n):
    if kind == "matmul":
        a = torch.randn(n, n, device=device, dtype=torch.bfloat16)
        return lambda: a @ a
    q = torch.randn(1, 32, 16384, 128, device=device, dtype=torch.bfloat16)
    def attend():
        with torch.nn.attention.sdpa_kernel(torch.nn.attention.SDPBackend.CUDNN_ATTENTION):
            return F.scaled_dot_product_attention(q, q, q, is_causal=True)
    return attend


def timed(fn, iters, device):
    return common.time_iterations(fn, 2, iters, device)["time_ms"]


def main(argv=None) -> int:
    args = parse_args(argv)
    device, rank, world = common.setup_distributed()
    mesh = lightning_sp.init_sp_mesh(ulysses_degree=1, ring_degree=world)
    for mib in args.mib:
        numel = mib * 2**20 // 2
        payload = [torch.randn(numel, device=device, dtype=torch.bfloat16)]
        x = torch.randn(world, numel // world, device=device, dtype=torch.bfloat16)
        for transport in args.transport:
            for pattern in ("ring", "all_to_all"):
                record = dict(name="transport", card=common.card_name(device), world=world, mib=mib,
                              transport=transport, pattern=pattern, error=None, command=common.command_line(),
                              torch=torch.__version__)
                try:
                    by = mesh.with_config(transport=transport)  # the transport travels in the mesh's config
                    exchange = lambda: _start(pattern, by, payload, x).wait()  # noqa: E731
                    t_x = timed(exchange, args.iters, device)
                    crossing = mib * 2**20 * ((world - 1) / world if pattern == "all_to_all" else 1)
                    record.update(exchange_ms=t_x, gb_per_s=crossing / t_x / 1e6)
                    for kind in args.compute:
                        work = compute_fn(kind, device, args.matmul_size)
                        reps = max(1, round(t_x / timed(work, 3, device)))
                        compute = lambda: [work() for _ in range(reps)]  # noqa: E731
                        t_c = timed(compute, args.iters, device)
                        t_b = timed(lambda: _overlapped(pattern, by, payload, x, compute), args.iters, device)
                        record[kind] = dict(reps=reps, compute_ms=t_c, both_ms=t_b, hidden=(t_c + t_x - t_b) / t_x)
                except Exception as exc:  # recorded; the same on every rank
                    record["error"] = common.error_text(exc)
                if rank == 0:
                    print(record, flush=True)
                    common.append_record(args.out, record)
    common.teardown_distributed()
    return 0


def _start(pattern, mesh, payload, x):
    if pattern == "ring":
        return comm.RingExchange(mesh).start(payload)
    return comm.start_all_to_all(x, mesh.ring_group, mesh.config.transport)


def _overlapped(pattern, mesh, payload, x, compute):
    pending = _start(pattern, mesh, payload, x)
    compute()
    pending.wait()


if __name__ == "__main__":
    sys.exit(main())
