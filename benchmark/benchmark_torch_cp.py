"""The baseline: PyTorch's own context parallelism (torch.distributed.tensor.experimental.context_parallel).

    torchrun --nproc_per_node 2 benchmark/benchmark_torch_cp.py --nheads 32 --seq_len 131072 \\
        --sdpa_backend cudnn --rotate allgather --out benchmark/results/attention.jsonl

Every rank builds the full q, k, v (b, h, S, d); ``context_parallel(mesh, buffers=[q, k, v],
buffer_seq_dims=[2, 2, 2], no_restore_buffers={q, k, v})`` shards them in place over a 1-D mesh of
all ranks (with its default load balancing, head-tail = zigzag, whenever S is a multiple of
2 x world) and patches ``F.scaled_dot_product_attention`` to ring attention; inside it we time
``F.scaled_dot_product_attention(q, k, v, is_causal=True)`` under
``sdpa_kernel(--sdpa_backend)``, forward and backward. GQA (--kv_heads < --nheads) passes
``enable_gqa=True``; if this torch's CP cannot do it the error goes into the record.

The shards are copied into storage of their own size before timing (CP's in-place sharding keeps
the full-size storage), so peak memory compares with a real model's, where q, k, v come from
local tokens. CP dispatches only the CUDA SDPA kernels (flash, efficient, cudnn): on cpu the run
fails at once with an error naming the missing sharding strategy, which is recorded.
"""
from __future__ import annotations

import argparse
import os
import sys

import torch
import torch.nn.functional as F  # CP patches F.scaled_dot_product_attention: always call it through F
from torch.distributed.device_mesh import init_device_mesh
from torch.nn.attention import SDPBackend, sdpa_kernel

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import common  # noqa: E402

SDPA_BACKENDS = {"cudnn": SDPBackend.CUDNN_ATTENTION, "flash": SDPBackend.FLASH_ATTENTION,
                 "efficient": SDPBackend.EFFICIENT_ATTENTION}


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    common.add_shape_args(p)
    p.add_argument("--sdpa_backend", nargs="+", default=["cudnn"], choices=sorted(SDPA_BACKENDS))
    p.add_argument("--rotate", nargs="+", default=["allgather"], choices=["allgather", "alltoall"],
                   help="CP's K/V rotation (set_rotate_method)")
    return p.parse_args(argv)


def cp_api():
    """context_parallel, set_rotate_method and the options object, wherever this torch keeps them."""
    from torch.distributed.tensor.experimental import _attention as cp
    return cp.context_parallel, cp.set_rotate_method, getattr(cp, "_cp_options", None)


def run_config(args, mesh, kv, seq_len, fwd_only, sdpa_backend, rotate, device, dtype, world):
    record = common.base_record(
        "torch_cp", args, device, world, kv_heads=kv, seq_len=seq_len, fwd_only=fwd_only, ulysses=1, ring=world,
        layout=None, backend=sdpa_backend, kernel=sdpa_backend, sdpa_backend=sdpa_backend, rotate=rotate,
        load_balance=None, sdpa_patched=None, config=f"{sdpa_backend} {rotate}")
    step = None
    try:
        context_parallel, set_rotate_method, options = cp_api()
        set_rotate_method(rotate)
        b, h, d = args.batch_size, args.nheads, args.head_dim
        g = torch.Generator(device=device).manual_seed(args.seed)  # the same full tensors on every rank
        q = torch.randn(b, h, seq_len, d, generator=g, device=device, dtype=dtype)
        k, v = (torch.randn(b, kv, seq_len, d, generator=g, device=device, dtype=dtype) for _ in range(2))
        gqa = {"enable_gqa": True} if kv != h else {}
        plain_sdpa = F.scaled_dot_product_attention
        with context_parallel(mesh, buffers=[q, k, v], buffer_seq_dims=[2, 2, 2], no_restore_buffers={q, k, v}):
            # False would mean this torch's CP does not route F.scaled_dot_product_attention to its ring
            # (then the timing is of local attention only)
            record["sdpa_patched"] = F.scaled_dot_product_attention is not plain_sdpa
            if options is not None:
                record["load_balance"] = bool(options.enable_load_balance)
                record["layout"] = "zigzag" if options.enable_load_balance else "contiguous"
            for t in (q, k, v):  # storage of the shard's size, then a leaf that takes gradients
                t.set_(t.clone())
                t.requires_grad_(not fwd_only)
            dout = torch.randn(q.shape, generator=g, device=device, dtype=dtype)

            if fwd_only:
                def step():
                    with torch.no_grad():
                        F.scaled_dot_product_attention(q, k, v, is_causal=True, **gqa)
            else:
                def step():
                    out = F.scaled_dot_product_attention(q, k, v, is_causal=True, **gqa)
                    torch.autograd.grad(out, (q, k, v), dout)

            with sdpa_kernel([SDPA_BACKENDS[sdpa_backend]]):
                timing = common.time_iterations(step, args.warmup, args.iters, device)
        flops = common.attention_flops(b, seq_len, h, d, True, fwd_only)
        record.update(timing, **common.throughput_fields(timing, flops, world))
    except Exception as exc:  # recorded; the sweep goes on
        record["error"] = common.error_text(exc)
        if device.type == "cpu":
            record["error"] += (" [torch's context_parallel dispatches only the CUDA SDPA kernels "
                                "(flash, efficient, cudnn): this baseline runs on GPUs only]")
    finally:
        q = k = v = dout = step = None  # noqa: F841
        common.release_memory(device)
    return record


def main(argv=None) -> int:
    args = parse_args(argv)
    device, rank, world = common.setup_distributed()
    args = common.finish_args(args, device)
    dtype = common.DTYPES[args.dtype]
    mesh = init_device_mesh(device.type, (world,), mesh_dim_names=("cp",))
    for kv, seq_len, fwd_only in common.shape_configs(args):
        for sdpa_backend in dict.fromkeys(args.sdpa_backend):
            for rotate in dict.fromkeys(args.rotate):
                record = run_config(args, mesh, kv, seq_len, fwd_only, sdpa_backend, rotate, device, dtype, world)
                common.report(record, args.out, rank)
    common.teardown_distributed()
    return 0  # failed configurations are in the records


if __name__ == "__main__":
    sys.exit(main())
