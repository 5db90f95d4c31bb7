"""Shared pieces of the attention benchmarks: arguments, process setup, timing, FLOPs, JSON records.

Every benchmark appends one JSON record per configuration (one line, "JSON lines") to ``--out``;
a configuration that fails gets a record too, with ``error`` set. Run as a script, this module
appends the record of a launch that died before it could write its own (the suite uses it):

    python benchmark/common.py failure --out FILE --name ours --rc 124 --command "..." --seq_len 131072

Nothing here imports lightning_sp, so the torch CP baseline runs without it.
"""
from __future__ import annotations

import argparse
import datetime
import itertools
import json
import os
import shlex
import statistics
import sys
import time

import torch
import torch.distributed as dist

DTYPES = {"bf16": torch.bfloat16, "bfloat16": torch.bfloat16, "fp16": torch.float16, "float16": torch.float16,
          "fp32": torch.float32, "float32": torch.float32, "fp64": torch.float64, "float64": torch.float64}
MODES = ("fwd_bwd", "fwd")


# ---------------------------------------------------------------------------------------------
# Arguments


def add_shape_args(p: argparse.ArgumentParser) -> None:
    """Arguments every benchmark shares. List-valued ones sweep: each combination is one record."""
    p.add_argument("--nheads", type=int, default=32, help="query heads")
    p.add_argument("--kv_heads", type=int, nargs="+", default=None,
                   help="key/value heads (default: nheads; fewer = GQA); several values sweep")
    p.add_argument("--head_dim", type=int, default=128)
    p.add_argument("--batch_size", type=int, default=1)
    p.add_argument("--seq_len", type=int, nargs="+", default=[32768],
                   help="global sequence length in tokens; several values sweep")
    p.add_argument("--fwd_only", action="store_true", help="time the forward only (same as --mode fwd)")
    p.add_argument("--mode", nargs="+", choices=MODES, default=None,
                   help="fwd_bwd and/or fwd (default: fwd_bwd, or fwd with --fwd_only)")
    p.add_argument("--dtype", choices=sorted(DTYPES), default=None, help="default: bf16 on cuda, float32 on cpu")
    p.add_argument("--warmup", type=int, default=3, help="untimed iterations per configuration (FA4 compiles here)")
    p.add_argument("--iters", type=int, default=10, help="timed iterations; the median is reported")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default=None, help="JSON-lines file to append one record per configuration to")


def finish_args(args: argparse.Namespace, device: torch.device) -> argparse.Namespace:
    if args.kv_heads is None:
        args.kv_heads = [args.nheads]
    if args.mode is None:
        args.mode = ["fwd"] if args.fwd_only else ["fwd_bwd"]
    elif args.fwd_only and args.mode != ["fwd"]:
        raise SystemExit("--fwd_only contradicts --mode %s" % " ".join(args.mode))
    if args.dtype is None:
        args.dtype = "bf16" if device.type == "cuda" else "fp32"
    if args.warmup < 0 or args.iters < 1:
        raise SystemExit("--warmup must be >= 0 and --iters >= 1")
    return args


def shape_configs(args):
    """(kv_heads, seq_len, fwd_only) for every swept shape, in the order the records are written."""
    for kv, seq_len, mode in itertools.product(args.kv_heads, args.seq_len, args.mode):
        yield kv, seq_len, mode == "fwd"


# ---------------------------------------------------------------------------------------------
# Processes and devices


def setup_distributed() -> tuple[torch.device, int, int]:
    """Initialize the default process group of a torchrun launch: NCCL on cuda, gloo on cpu."""
    if "RANK" not in os.environ:
        raise SystemExit(f"run {sys.argv[0]} with torchrun, e.g. torchrun --nproc_per_node 2 {sys.argv[0]} ...")
    if torch.cuda.is_available():
        os.environ.setdefault("NCCL_NVLS_ENABLE", "0")
        local_rank = int(os.environ.get("LOCAL_RANK", 0))
        torch.cuda.set_device(local_rank)
        device = torch.device("cuda", local_rank)
        dist.init_process_group("nccl", device_id=device, timeout=datetime.timedelta(minutes=5))
    else:
        device = torch.device("cpu")
        dist.init_process_group("gloo", timeout=datetime.timedelta(minutes=5))
    return device, dist.get_rank(), dist.get_world_size()


def teardown_distributed() -> None:
    """End a torchrun launch: wait for every rank, then destroy the groups (without the barrier a
    rank could tear gloo's connections down while another still closes its own, which aborted a
    rank now and then on CPU)."""
    dist.barrier()
    dist.destroy_process_group()


def local_device() -> torch.device:
    return torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else torch.device("cpu")


def card_name(device: torch.device) -> str:
    return torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"


def release_memory(device: torch.device) -> None:
    import gc

    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


# ---------------------------------------------------------------------------------------------
# FLOPs and timing


def attention_flops(batch: int, seq_len: int, nheads: int, head_dim: int, causal: bool = True,
                    fwd_only: bool = False) -> float:
    """FLOPs of attention over the whole sequence: forward 4*b*S^2*h*d (halved when causal), the
    backward 2.5x the forward. Query heads count (GQA does not reduce the work)."""
    fwd = 4.0 * batch * seq_len * seq_len * nheads * head_dim / (2 if causal else 1)
    return fwd if fwd_only else 3.5 * fwd


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def clock_and_power(device: torch.device) -> tuple[float, float]:
    """This GPU's SM clock (MHz) and power draw (W) now, from NVML through torch (pynvml); NaN where
    there is no NVML (cpu, or pynvml missing). Under the 700 W cap both show why timings move."""
    if device.type == "cuda":
        try:
            return float(torch.cuda.clock_rate(device)), torch.cuda.power_draw(device) / 1000.0
        except Exception:  # no pynvml / NVML: not measured
            pass
    return float("nan"), float("nan")


def time_iterations(fn, warmup: int, iters: int, device: torch.device, group=None, fastest_rank: bool = False,
                    probe_clocks: bool = False) -> dict:
    """Run ``fn`` warmup + iters times. Each timed iteration is measured with CUDA events (cpu:
    perf_counter) on every rank; an iteration counts as the slowest rank's time, and the median
    over iterations is reported (``times_ms``: every iteration, in order). ``enqueue_ms`` is the
    median host time to issue one iteration (the slowest rank's): near ``time_ms`` the GPU waits
    for the CPU. Peak memory is the max over ranks of the allocator's peak during the timed
    iterations (inputs included); ``peak_extra_gib`` subtracts what was allocated before.
    ``fastest_rank``: each iteration counts as the fastest rank's instead (for work every rank does
    on its own, like a one-GPU baseline run on every GPU at once). ``probe_clocks``: also each rank's
    SM clock and power, read once just after the middle iteration is enqueued (the host runs ahead,
    so often while an earlier iteration runs; ``sm_mhz``, ``power_w``: one per rank, None where NVML
    is missing)."""
    for _ in range(warmup):
        fn()
    synchronize(device)
    if dist.is_initialized():
        dist.barrier(group=group)
    cuda = device.type == "cuda"
    if cuda:
        torch.cuda.reset_peak_memory_stats(device)
        base = torch.cuda.memory_allocated(device)
        events = [(torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)) for _ in range(iters)]
        enqueue = []
        for i, (start, end) in enumerate(events):
            t0 = time.perf_counter()
            start.record()
            fn()
            end.record()
            enqueue.append((time.perf_counter() - t0) * 1e3)
            if probe_clocks and i == iters // 2:  # the GPU is busy with what was just enqueued
                clocks = clock_and_power(device)
        torch.cuda.synchronize(device)
        times = [s.elapsed_time(e) for s, e in events]
        peak = torch.cuda.max_memory_allocated(device)
    else:
        base = peak = 0
        times = []
        for _ in range(iters):
            t0 = time.perf_counter()
            fn()
            times.append((time.perf_counter() - t0) * 1e3)
        enqueue = times
    stats = torch.tensor([*times, statistics.median(enqueue), float(peak), float(peak - base)],
                         dtype=torch.float64, device=device)
    if dist.is_initialized():
        dist.all_reduce(stats, op=dist.ReduceOp.MIN if fastest_rank else dist.ReduceOp.MAX, group=group)
    times = stats[:iters].tolist()
    enqueue_ms, peak, extra = stats[iters:].tolist()
    probed = {}
    if probe_clocks:
        local = torch.tensor(clocks if cuda else clock_and_power(device), dtype=torch.float64, device=device)
        ranks = [local.clone() for _ in range(dist.get_world_size(group))] if dist.is_initialized() else [local]
        if dist.is_initialized():
            dist.all_gather(ranks, local, group=group)
        probed = {name: [None if v != v else round(v, 1) for v in (r[i].item() for r in ranks)]
                  for i, name in enumerate(("sm_mhz", "power_w"))}
    return dict(**probed, time_ms=statistics.median(times), time_ms_min=min(times),
                time_ms_mean=statistics.fmean(times), times_ms=[round(t, 4) for t in times], enqueue_ms=enqueue_ms,
                peak_mem_gib=peak / 2**30 if cuda else None, peak_extra_gib=extra / 2**30 if cuda else None)


def throughput_fields(timing: dict, flops: float, gpus: int) -> dict:
    t = timing["time_ms"] / 1e3
    return dict(iters_per_s=1.0 / t, flops=flops, tflops_per_gpu=flops / gpus / t / 1e12)


# ---------------------------------------------------------------------------------------------
# Profiling


def profile_iterations(fn, iters: int, out_dir: str, tag: str, rank: int, device: torch.device) -> dict:
    """Profile ``iters`` iterations of ``fn``: a chrome trace and a key_averages table per rank
    under ``out_dir``, and a summary of the GPU timeline (see :func:`summarize_trace`)."""
    from torch.profiler import ProfilerActivity, profile

    os.makedirs(out_dir, exist_ok=True)
    cuda = device.type == "cuda"
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    synchronize(device)
    with profile(activities=activities) as prof:
        for _ in range(iters):
            fn()
            prof.step()
        synchronize(device)
    return save_profile(prof, os.path.join(out_dir, f"{tag}_rank{rank}"), iters, cuda)


def save_profile(prof, stem: str, iters: int, cuda: bool, rows: int = 40) -> dict:
    """Write a finished profiler's chrome trace (``stem.trace.json``) and kernel table
    (``stem.key_averages.txt``); return :func:`summarize_trace` of its ``iters`` iterations."""
    os.makedirs(os.path.dirname(stem) or ".", exist_ok=True)
    prof.export_chrome_trace(stem + ".trace.json")
    sort_by = "self_device_time_total" if cuda else "self_cpu_time_total"
    with open(stem + ".key_averages.txt", "w") as f:
        f.write(prof.key_averages().table(sort_by=sort_by, row_limit=rows) + "\n")
    return dict(summarize_trace(stem + ".trace.json", iters), trace=stem + ".trace.json",
                table=stem + ".key_averages.txt")


def _union_us(intervals) -> float:
    total, end = 0.0, float("-inf")
    for a, b in sorted(intervals):
        if b > end:
            total += b - max(a, end)
            end = b
    return total


COPY_WORDS = ("memcpy", "copy", "catarray", "memset", "fill")
# kernel kinds by name: attention (FA4, cuDNN, torch's flash / efficient), matrix multiplies, NCCL
KINDS = (("attention", ("flash", "fmha", "attention", "cudnn_generated")),
         ("matmul", ("gemm", "nvjet", "xmma", "cutlass", "matmul")), ("nccl", ("nccl",)))


def kernel_kind(name: str) -> str:
    low = name.lower()
    if any(w in low for w in COPY_WORDS):
        return "copy"
    return next((kind for kind, words in KINDS if any(w in low for w in words)), "other")


def summarize_trace(path: str, iters: int) -> dict:
    """Per iteration, from the GPU activity of one rank's chrome trace: the window from the first to
    the last GPU activity, the time some compute kernel runs, the communication not hidden behind
    compute (only NCCL runs), idle time (nothing runs), and time in copy-like kernels; plus the
    heaviest kernels. On cpu there is no GPU activity and only ``gpu_events = 0`` is reported."""
    with open(path) as f:
        events = json.load(f).get("traceEvents", [])
    gpu = [e for e in events if e.get("ph") == "X" and e.get("cat") in ("kernel", "gpu_memcpy", "gpu_memset")
           and "dur" in e]
    if not gpu:
        return dict(gpu_events=0)
    span = [(float(e["ts"]), float(e["ts"]) + float(e["dur"])) for e in gpu]
    comm = [s for s, e in zip(span, gpu) if "nccl" in e["name"].lower()]
    compute = [s for s, e in zip(span, gpu) if "nccl" not in e["name"].lower()]
    window = max(b for _, b in span) - min(a for a, _ in span)
    busy = _union_us(span)
    busy_compute = _union_us(compute)
    per_kernel: dict[str, list] = {}
    for (a, b), e in zip(span, gpu):
        entry = per_kernel.setdefault(e["name"][:120], [0, 0.0])
        entry[0] += 1
        entry[1] += b - a
    top = sorted(per_kernel.items(), key=lambda kv: -kv[1][1])[:8]
    ms = 1e-3 / iters
    by_kind: dict[str, float] = {}
    for (a, b), e in zip(span, gpu):
        kind = "copy" if e["cat"] != "kernel" else kernel_kind(e["name"])
        by_kind[kind] = by_kind.get(kind, 0.0) + (b - a) * ms
    return dict(gpu_events=len(gpu), window_ms=window * ms, compute_ms=busy_compute * ms,
                comm_ms=_union_us(comm) * ms, exposed_comm_ms=(busy - busy_compute) * ms,
                idle_ms=(window - busy) * ms, copy_ms=by_kind.get("copy", 0.0),
                compute_busy_pct=100.0 * busy_compute / window if window else None,
                kernel_ms_by_kind=by_kind,  # summed kernel time, overlaps counted twice
                top_kernels=[dict(name=n, calls_per_iter=c / iters, ms_per_iter=t * ms) for n, (c, t) in top])


# ---------------------------------------------------------------------------------------------
# Records


def command_line() -> str:
    script = os.path.relpath(sys.argv[0]) if os.path.isabs(sys.argv[0]) else sys.argv[0]
    args = shlex.join(sys.argv[1:])
    if "LOCAL_WORLD_SIZE" in os.environ:
        return f"torchrun --nproc_per_node {os.environ['LOCAL_WORLD_SIZE']} {script} {args}".rstrip()
    return f"python {script} {args}".rstrip()


def base_record(name: str, args: argparse.Namespace, device: torch.device, world: int, *, kv_heads: int,
                seq_len: int, fwd_only: bool, **fields) -> dict:
    return dict(
        name=name, card=card_name(device), date=datetime.datetime.now().isoformat(timespec="seconds"),
        world=world, nheads=args.nheads, kv_heads=kv_heads, head_dim=args.head_dim, batch_size=args.batch_size,
        seq_len=seq_len, fwd_only=fwd_only, causal=True, dtype=str(DTYPES[args.dtype]).replace("torch.", ""),
        warmup=args.warmup, iters=args.iters, **fields, error=None,
        args=vars(args), command=command_line(), env=tuning_env(), torch=torch.__version__)


TUNING_ENV_PREFIXES = ("NCCL_", "TORCH_NCCL_", "CUDA_DEVICE_MAX_CONNECTIONS", "LIGHTNING_SP_")


def tuning_env() -> dict:
    """The environment variables that change how kernels and communication run (part of the command)."""
    return {k: v for k, v in sorted(os.environ.items()) if k.startswith(TUNING_ENV_PREFIXES)}


def append_record(path: str | None, record: dict) -> None:
    if path:
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        with open(path, "a") as f:
            f.write(json.dumps(record, default=str) + "\n")


def error_text(exc: BaseException) -> str:
    text = f"{type(exc).__name__}: {exc}".strip()
    return text if len(text) <= 2000 else text[:2000] + " ..."


def report(record: dict, out: str | None, rank: int = 0) -> None:
    """Rank 0 prints the record's one-line summary and appends it to ``out``."""
    if rank == 0:
        print(describe(record), flush=True)
        append_record(out, record)


def describe(record: dict) -> str:
    """One line for the console."""
    tag = (f"{record['name']} h{record['nheads']}/kv{record['kv_heads']} S={record['seq_len']} "
           f"{'fwd' if record['fwd_only'] else 'fwd+bwd'} {record.get('config', '')}").rstrip()
    if record.get("error"):
        return f"{tag}: FAILED {record['error'].splitlines()[0][:300]}"
    mem = f", peak {record['peak_mem_gib']:.2f} GiB" if record.get("peak_mem_gib") is not None else ""
    inter = record.get("interleaved") or {}
    clocks = [_median_probe(inter.get(f"{side}_sm_mhz")) for side in ("baseline", "ours")]
    clocks = f" at {clocks[0]:.0f} / {clocks[1]:.0f} MHz" if None not in clocks else ""
    inter = (f"; interleaved with the one-GPU {inter['baseline_kernel']}: {inter['ours_ms']:.3f} vs perfect "
             f"{inter['perfect_ms']:.3f} ms = {inter['perfect_pct']:.1f}%{clocks}") if "perfect_pct" in inter else ""
    return (f"{tag}: {record['time_ms']:.3f} ms ({record['iters_per_s']:.2f} it/s, "
            f"{record['tflops_per_gpu']:.1f} TFLOP/s per GPU{mem}){inter}")


def _median_probe(rounds) -> float | None:
    """The median of per-round, per-rank probe values (None where none was measured)."""
    values = [v for per_rank in rounds or [] for v in per_rank if v is not None]
    return statistics.median(values) if values else None


def load_records(paths) -> list[dict]:
    """Records from JSON-lines files (directories: every *.jsonl inside), in file order."""
    files = []
    for path in paths:
        if os.path.isdir(path):
            files += sorted(os.path.join(path, f) for f in os.listdir(path) if f.endswith(".jsonl"))
        else:
            files.append(path)
    records = []
    for path in files:
        with open(path) as f:
            records += [json.loads(line) for line in f if line.strip()]
    return records


def _failure_main(argv) -> int:
    p = argparse.ArgumentParser(description="append the record of a benchmark launch that died")
    p.add_argument("what", choices=["failure"])
    p.add_argument("--out", required=True)
    p.add_argument("--name", required=True)
    p.add_argument("--rc", type=int, required=True)
    p.add_argument("--command", required=True)
    p.add_argument("--nheads", type=int, default=None)
    p.add_argument("--kv_heads", type=int, default=None)
    p.add_argument("--head_dim", type=int, default=None)
    p.add_argument("--batch_size", type=int, default=None)
    p.add_argument("--seq_len", type=int, default=None)
    p.add_argument("--fwd_only", action="store_true")
    p.add_argument("--note", default="")
    a = p.parse_args(argv)
    if a.rc == 0:
        error = f"launch skipped: {a.note or 'not run'}"
    else:
        reason = "timed out" if a.rc in (124, 137) else f"exited with status {a.rc}"
        error = f"launch {reason}; its configurations without a record of their own did not finish. {a.note}".strip()
    append_record(a.out, dict(
        name=a.name, date=datetime.datetime.now().isoformat(timespec="seconds"), nheads=a.nheads,
        kv_heads=a.kv_heads, head_dim=a.head_dim, batch_size=a.batch_size, seq_len=a.seq_len,
        fwd_only=a.fwd_only, launch_failure=True, rc=a.rc, command=a.command, torch=torch.__version__, error=error))
    return 0


if __name__ == "__main__":
    sys.exit(_failure_main(sys.argv[1:]))
