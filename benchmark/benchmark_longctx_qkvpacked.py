"""Time lightning_sp's LongContextAttention (Ulysses x Ring) on a causal sequence split over all ranks.

    torchrun --nproc_per_node 2 benchmark/benchmark_longctx_qkvpacked.py --nheads 32 --seq_len 131072 \\
        --ulysses_degree 1 --ring_impl_type zigzag --backend fa4 --out benchmark/results/attention.jsonl

The ring degree is world / ulysses_degree. Each rank holds its own shard of q, k, v: packed as
(b, s_local, 3, h, d) through LongContextAttentionQKVPacked for MHA (as the reference's benchmark;
--separate_qkv: separate contiguous q, k, v, as a model's attention layers pass them), separate q
and k, v through LongContextAttention for GQA (--kv_heads < --nheads). --kv_heads, --seq_len, --mode,
--ulysses_degree, --ring_impl_type, --backend and --head_groups take several values and sweep every combination
in one launch (one JSON record each; with ring degree 1 the layouts are all the same and run once).
--interleave N times, after each configuration, N alternating rounds of the one-GPU kernel on the
whole sequence (on every rank at once, benchmark_qkvpacked_func's step) and the configuration
again: the record's ``interleaved`` holds both medians and the share of perfect scaling, a baseline
taken under the same clocks and temperature as the run it is compared with. The first
--interleave_warmup_rounds round pairs are not counted: the GPUs reach their power cap during them.
--profile DIR adds a torch.profiler trace and a kernel table per rank and configuration, and a
summary of the GPU timeline in the record (compute-busy share, exposed communication, idle gaps,
copies) to show whether the ring's P2P hides behind the kernels.
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys

import torch
import torch.distributed as dist

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(1, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # lightning_sp, uninstalled
import benchmark_qkvpacked_func as one_gpu  # noqa: E402
import common  # noqa: E402

import lightning_sp  # noqa: E402
from lightning_sp import comm  # noqa: E402
from lightning_sp.attention.ulysses import choose_head_groups  # noqa: E402
from lightning_sp.comm import TRANSPORTS  # noqa: E402
from lightning_sp.kernels import backends, select_kernel  # noqa: E402
from lightning_sp.layout import LAYOUT_ALIASES, canonical_layout, check_seq_len  # noqa: E402


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    common.add_shape_args(p)
    p.add_argument("--ulysses_degree", type=int, nargs="+", default=[1],
                   help="Ulysses degree(s); the ring degree is world / ulysses_degree")
    p.add_argument("--ring_impl_type", nargs="+", default=["zigzag"], choices=sorted(LAYOUT_ALIASES),
                   help="ring layout(s): basic (= contiguous), zigzag, stripe (or strip)")
    p.add_argument("--backend", nargs="+", default=["auto"], choices=backends(),
                   help="block kernel(s); auto = the fastest that accepts the blocks")
    p.add_argument("--head_groups", nargs="+", default=["auto"], type=_groups,
                   help="Ulysses head groups (auto, 1, 2, 4, ...): all-to-all pieces overlapping attention")
    p.add_argument("--transport", nargs="+", default=["auto"], choices=TRANSPORTS,
                   help="how ranks exchange data: nccl (torch.distributed), copy_engine (one node), or auto (= nccl today)")
    p.add_argument("--separate_qkv", action="store_true",
                   help="MHA from separate contiguous q, k, v (LongContextAttention, as a model's layers call it) "
                        "instead of one packed qkv (the reference's default); GQA always takes separate q, k, v")
    p.add_argument("--interleave", type=int, default=0, metavar="N",
                   help="also time N rounds alternating the one-GPU kernel on the whole sequence with ours")
    p.add_argument("--interleave_iters", type=int, default=5, help="timed iterations of each side per round")
    p.add_argument("--interleave_warmup_rounds", type=int, default=1,
                   help="round pairs run first and not counted (the power draw settles at the cap during them)")
    p.add_argument("--profile", default=None, metavar="DIR",
                   help="also profile --profile_iters iterations of every configuration into DIR")
    p.add_argument("--profile_iters", type=int, default=2)
    return p.parse_args(argv)


def _groups(value: str):
    return value if value == "auto" else int(value)


def configs(args, world):
    """(shape, ulysses, layout, backend, head groups, transport) in run order; layouts collapse to one
    when the ring degree is 1, head groups to one when the Ulysses degree is 1."""
    for kv, seq_len, fwd_only in common.shape_configs(args):
        for u in dict.fromkeys(args.ulysses_degree):
            ring = world // u if u >= 1 and world % u == 0 else None
            if ring is None:  # one error record is enough
                yield (kv, seq_len, fwd_only), u, args.ring_impl_type[0], args.backend[0], 1, args.transport[0]
                continue
            layouts = args.ring_impl_type if ring > 1 else [args.ring_impl_type[0]]
            groups = args.head_groups if u > 1 else [1]
            for layout in dict.fromkeys(layouts):
                for backend in dict.fromkeys(args.backend):
                    for g in dict.fromkeys(groups):
                        for transport in dict.fromkeys(args.transport):
                            yield (kv, seq_len, fwd_only), u, layout, backend, g, transport


def selected_kernel(backend, mesh, args, kv, seq_len, device, dtype) -> str:
    """The kernel the ring picks for its diagonal block (b, S/R, h/U, d): an expanded 0-d tensor of
    that shape stands in for the real block (the choice depends on shape, dtype and device only)."""
    U, R = mesh.ulysses_size, mesh.ring_size
    stub = torch.zeros((), device=device, dtype=dtype)
    q = stub.expand(args.batch_size, seq_len // R, args.nheads // U, args.head_dim)
    k = stub.expand(args.batch_size, seq_len // R, max(kv // U, 1), args.head_dim)
    return select_kernel(backend, q, k, causal=True).name


def make_step(mesh, layout, backend, groups, args, kv, seq_len, fwd_only, device, dtype):
    """The function one iteration runs, on freshly made local inputs."""
    P = mesh.sp_size
    b, n, h, d = args.batch_size, seq_len // P, args.nheads, args.head_dim
    g = torch.Generator(device=device).manual_seed(args.seed + dist.get_rank())
    grad = not fwd_only
    if kv == h and not args.separate_qkv:
        attn = lightning_sp.LongContextAttentionQKVPacked(mesh, ring_impl=layout, backend=backend, head_groups=groups)
        qkv = torch.randn(b, n, 3, h, d, generator=g, device=device, dtype=dtype).requires_grad_(grad)
        inputs = (qkv,)
    else:
        attn = lightning_sp.LongContextAttention(mesh, ring_impl=layout, backend=backend, head_groups=groups)
        inputs = (torch.randn(b, n, h, d, generator=g, device=device, dtype=dtype).requires_grad_(grad),
                  *(torch.randn(b, n, kv, d, generator=g, device=device, dtype=dtype).requires_grad_(grad)
                    for _ in range(2)))
    dout = torch.randn(b, n, h, d, generator=g, device=device, dtype=dtype)

    if fwd_only:
        def step():
            with torch.no_grad():
                attn(*inputs, causal=True)
    else:
        def step():
            out = attn(*inputs, causal=True)
            torch.autograd.grad(out, inputs, dout)
    return step, "q,k,v" if len(inputs) == 3 else "qkvpacked"


def whole_sequence_stubs(args, kv, seq_len, device, dtype):
    """q and k shaped like the one-GPU baseline's (the whole sequence): expanded 0-d tensors, enough
    for a kernel choice."""
    stub = torch.zeros((), device=device, dtype=dtype)
    return (stub.expand(args.batch_size, seq_len, args.nheads, args.head_dim),
            stub.expand(args.batch_size, seq_len, kv, args.head_dim))


def interleaved_baseline(step, args, kernel_name, kv, seq_len, fwd_only, device, dtype, world) -> dict:
    """Alternate the one-GPU kernel on the whole sequence (every rank runs it alone, at the same
    time; an iteration counts as the fastest GPU's) with ``step`` (ours; the slowest rank's), so
    that both see the same clocks. Medians over the counted rounds; perfect = baseline / world.
    The warm-up rounds go first: from a GPU below its power cap the one-GPU round runs at boost
    clocks and ours follows while the draw still rises (ours 32 -> 28.6 ms against 26.5 at the cap,
    32K on 2 H200s: benchmark/results/2026-11-26-run8/NOTES.md)."""
    kernel = select_kernel(kernel_name, *whole_sequence_stubs(args, kv, seq_len, device, dtype), causal=True)
    baseline = one_gpu.make_step(kernel, args, kv, seq_len, fwd_only, device, dtype)
    for _ in range(args.interleave_warmup_rounds):
        common.time_iterations(baseline, 1, args.interleave_iters, device)
        common.time_iterations(step, 1, args.interleave_iters, device)
    rounds = {"baseline": [], "ours": []}
    for _ in range(args.interleave):
        rounds["baseline"].append(common.time_iterations(baseline, 1, args.interleave_iters, device, fastest_rank=True,
                                                         probe_clocks=True))
        rounds["ours"].append(common.time_iterations(step, 1, args.interleave_iters, device, probe_clocks=True))
    times = {side: [t for r in timed for t in r["times_ms"]] for side, timed in rounds.items()}
    base_ms, ours_ms = statistics.median(times["baseline"]), statistics.median(times["ours"])
    # each round's SM clock and power per rank, one reading per round (see time_iterations): under
    # the power cap, about the clocks each side ran at (NVML; None where missing)
    probes = {f"{side}_{name}": [r[name] for r in timed] for side, timed in rounds.items()
              for name in ("sm_mhz", "power_w")}
    return dict(baseline_kernel=kernel.name, rounds=args.interleave, warmup_rounds=args.interleave_warmup_rounds,
                iters_per_round=args.interleave_iters,
                baseline_ms=base_ms, ours_ms=ours_ms, perfect_ms=base_ms / world,
                perfect_pct=100.0 * base_ms / world / ours_ms, baseline_times_ms=times["baseline"],
                ours_times_ms=times["ours"], **probes)


def run_config(args, meshes, shape, u, layout, backend, groups, transport, device, dtype, rank, world):
    kv, seq_len, fwd_only = shape
    ring = world // u if u >= 1 and world % u == 0 else None
    separate_mha = args.separate_qkv and kv == args.nheads  # named in the config and the profile files
    record = common.base_record(
        "ours", args, device, world, kv_heads=kv, seq_len=seq_len, fwd_only=fwd_only, ulysses=u, ring=ring,
        layout=canonical_layout(layout), ring_impl_type=layout, backend=backend, kernel=None, head_groups=groups,
        transport=transport, config=f"u{u}xr{ring or '?'} {canonical_layout(layout)} {backend} {transport}"
        + (f" g{groups}" if u > 1 else "") + (" q,k,v" if separate_mha else ""))
    try:
        if ring is None:
            raise lightning_sp.SPConfigError(f"--ulysses_degree {u} does not divide the world size {world}")
        if u not in meshes:
            meshes[u] = lightning_sp.init_sp_mesh(ulysses_degree=u, ring_degree=world // u)
        mesh = meshes[u].with_config(transport=transport)  # the transport travels in the mesh's config
        check_seq_len(seq_len, layout, mesh)
        record["kernel"] = selected_kernel(backend, mesh, args, kv, seq_len, device, dtype)
        record["head_groups"] = choose_head_groups(args.nheads, kv, u, groups)
        step, record["input"] = make_step(mesh, layout, backend, groups, args, kv, seq_len, fwd_only, device, dtype)
        timing = common.time_iterations(step, args.warmup, args.iters, device)
        flops = common.attention_flops(args.batch_size, seq_len, args.nheads, args.head_dim, True, fwd_only)
        record.update(timing, **common.throughput_fields(timing, flops, world))
        # the copy engines' outboxes: reported, and added to the peak where torch's statistics miss them
        record["transport_buffer_gib"] = comm.transport_buffer_bytes() / 2**30
        if record.get("peak_mem_gib") is not None:
            record["peak_mem_gib"] += comm.transport_buffer_bytes(uncounted_only=True) / 2**30
        if args.interleave:
            record["interleaved"] = interleaved_baseline(step, args, record["kernel"], kv, seq_len, fwd_only, device,
                                                         dtype, world)
        if args.profile:
            tag = (f"ours_h{args.nheads}kv{kv}_s{seq_len}_{'fwd' if fwd_only else 'fwdbwd'}_u{u}r{mesh.ring_size}"
                   f"_{canonical_layout(layout)}_{record['kernel']}_{transport}" + (f"_g{groups}" if u > 1 else "")
                   + ("_separate_qkv" if separate_mha else ""))
            try:
                record["profile"] = common.profile_iterations(step, args.profile_iters, args.profile, tag, rank, device)
            except Exception as exc:  # the timing stands; say why the profile is missing
                record["profile"] = dict(error=common.error_text(exc))
    except Exception as exc:  # recorded, and the sweep goes on (errors here are the same on every rank)
        record["error"] = common.error_text(exc)
    finally:
        step = None  # noqa: F841  (drop the inputs before the next configuration)
        common.release_memory(device)
    return record


def main(argv=None) -> int:
    args = parse_args(argv)
    device, rank, world = common.setup_distributed()
    args = common.finish_args(args, device)
    dtype = common.DTYPES[args.dtype]
    meshes: dict[int, object] = {}
    for shape, u, layout, backend, groups, transport in configs(args, world):
        common.report(run_config(args, meshes, shape, u, layout, backend, groups, transport, device, dtype, rank,
                                 world), args.out, rank)
    common.teardown_distributed()
    return 0  # failed configurations are in the records


if __name__ == "__main__":
    sys.exit(main())
