"""Training speed and memory of the Llama decoder under Lightning: tokens/s, MFU and peak memory.

    python benchmark/benchmark_train.py --model llama_1b --strategy ulysses_ring --ulysses_degree 2 \\
        --seq_len 65536 131072 --devices 2 --checkpointing except_attention --out results/train.jsonl

What runs is what users run: ``lightning_sp.lm.CausalLM`` around ``LlamaForCausalLM`` in a
``Trainer`` with ``strategy="ulysses_ring"`` (or ``ulysses_ring_fsdp``, or plain ``ddp``), on random
tokens (uniform over the vocabulary: the speed does not depend on the data), batch 1 per
sequence-parallel group, AdamW. Run it with ``python``, not ``torchrun``: every sequence length is a
fresh launch (a subprocess that starts a Trainer, whose own launcher starts the other ranks), so an
out-of-memory error or a crash on one rank cannot leave another rank blocked in a collective and
stop the sweep: the launch is ended (its whole process group), recorded with ``completed: false``
and the error, and the sweep goes on. ``--find_max`` then keeps doubling the longest length until
one fails (or passes ``--max_seq_len``) and reports the longest that completed its steps, the first
that failed and what stopped it: ``memory`` (out of memory, or the launch killed by the system),
``time`` (``--launch_timeout``, or a next length whose launch would outlast it: the longest
completed launch's step time x (length ratio)^2, the attention's scaling) or ``error``. With
``--find_max_state FILE`` each call launches ONE length and keeps the search in FILE (per card and
configuration), so that successive calls, each within a time limit, continue it;
``--find_max_resolution N`` then also bisects between the longest success and the first failure
until they are N tokens apart.

``--offload`` is the model's ``offload_checkpoints`` (with ``--checkpointing full``): the layer inputs
that full checkpointing keeps go to pinned host memory. Every record has the peak host memory
besides the GPU's: resident memory (RSS) and pinned memory per rank, and the offload's own host bytes.

Timing: a callback synchronizes the GPU at the end of every training step; a step's time is the
interval between the ends of consecutive steps (the whole loop: data, sharding, forward, backward,
optimizer, logging), the slowest rank's, and the first ``--warmup`` steps are not timed (FA4
compiles its kernels in the first step, and so does ``--compile``, the model's ``compile_blocks``:
torch.compile of each layer's parts around the core attention). MFU = tokens/s x model FLOPs per
token / (peak x GPUs) with ``LlamaConfig.flops_per_token``: 6 x the parameters used in matmuls (all
but the input embedding lookup; tied embeddings count once, as the LM head) + the attention's 12 x
layers x heads x head_dim x seq_len, halved for causal; recomputation (checkpointing) is not counted.
Tokens are global: under ``ddp`` every GPU trains its own sequence, under ``ulysses_ring`` the ranks
of a group share one.

With ``--strategy ddp`` the model keeps its own attention (``--backend local``: torch SDPA on the
whole sequence of each GPU) unless ``--backend`` names a kernel (fa4, cudnn, ...): then each layer
runs ``LongContextAttention`` on a one-rank mesh, i.e. the sequence-parallel runs' kernel without the
communication, for a like-for-like baseline.

Test hook: with ``LIGHTNING_SP_BENCH_SIMULATE_OOM_ABOVE=N`` in the environment, the last rank raises
``torch.OutOfMemoryError`` at its first step when the length exceeds N (the failure path, on CPU).
"""
from __future__ import annotations

import argparse
import collections
import dataclasses
import datetime
import json
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time

import torch

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path.insert(0, HERE)
sys.path.insert(1, ROOT)  # lightning_sp, uninstalled
import common  # noqa: E402

STRATEGIES = ("ulysses_ring", "ulysses_ring_fsdp", "ddp")
CHECKPOINTING = ("none", "full", "except_attention")
MODELS = sorted(f[:-5] for f in os.listdir(os.path.join(ROOT, "conf", "model")) if f.endswith(".yaml"))
LOCAL = "local"  # --backend for ddp: the model's own attention (torch SDPA)
OOM_WORDS = ("OutOfMemoryError", "CUDA out of memory", "out of memory")
SIMULATE_OOM = "LIGHTNING_SP_BENCH_SIMULATE_OOM_ABOVE"


# ---------------------------------------------------------------------------------------------
# Arguments


def _degree(value: str):
    return value if value == "auto" else int(value)


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", choices=MODELS, default="llama_1b", help="a conf/model/*.yaml (read with plain yaml)")
    p.add_argument("--strategy", choices=STRATEGIES, default="ulysses_ring")
    p.add_argument("--seq_len", type=int, nargs="+", default=[65536],
                   help="tokens per sequence; each length is one launch and one record")
    p.add_argument("--ulysses_degree", type=_degree, default="auto")
    p.add_argument("--ring_degree", type=_degree, default="auto")
    p.add_argument("--ring_impl", default="zigzag", help="ring layout: zigzag, contiguous, stripe")
    p.add_argument("--head_groups", type=_degree, default=None,
                   help="the strategy's head_groups (Ulysses all-to-all in that many head groups; default: the layers' auto)")
    p.add_argument("--backend", default=None,
                   help="attention kernel: auto, fa4, cudnn, flash, efficient, cpu_flash, reference (default auto); "
                        f"with --strategy ddp also '{LOCAL}', the default: the model's own attention (torch SDPA)")
    p.add_argument("--checkpointing", choices=CHECKPOINTING, default=None,
                   help="activation checkpointing (default: the model config's)")
    p.add_argument("--checkpointed_layers", type=int, default=None,
                   help="apply --checkpointing to the first N layers only (default: the model config's, all)")
    p.add_argument("--mlp_chunk_size", type=int, default=None,
                   help="tokens per MLP chunk, recomputed in the backward (default: the model config's)")
    p.add_argument("--offload", action="store_true", default=None,
                   help="offload_checkpoints: full checkpointing's layer inputs in pinned host memory, copied on a "
                        "side stream, prefetched a layer ahead (needs --checkpointing full, or the yaml's full) "
                        "(default: the model config's)")
    p.add_argument("--compile", action="store_true", default=None,
                   help="compile_blocks: torch.compile each layer's parts around the core attention (norms, "
                        "projections, RoPE, MLP, residuals; compiled in the warmup) (default: the model config's)")
    p.add_argument("--steps", type=int, default=5, help="timed training steps; the median is reported")
    p.add_argument("--warmup", type=int, default=2, help="untimed steps first (at least 1; FA4 compiles here)")
    p.add_argument("--accelerator", default=None, help="gpu (default when CUDA is there) or cpu")
    p.add_argument("--devices", type=int, default=2)
    p.add_argument("--precision", default=None, help="default bf16-mixed on GPU, 32-true on CPU")
    p.add_argument("--gradient_clip_val", type=float, default=1.0, help="as conf/trainer/gpu.yaml; 0 = off")
    p.add_argument("--gradient_as_bucket_view", action="store_true",
                   help="DDP and ulysses_ring: gradients live in DDP's buckets (saves a gradient-sized buffer)")
    p.add_argument("--peak_tflops", type=float, default=None,
                   help="dense peak per device for MFU (default: 989 on H100/H200 as lightning_sp.lm.PEAK_TFLOPS; "
                        "none on CPU)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--find_max", action="store_true",
                   help="after the given lengths, keep doubling the longest until one fails or passes --max_seq_len; "
                        "report the longest that completed, the first that failed and why (memory, time, error)")
    p.add_argument("--max_seq_len", type=int, default=1 << 20, help="--find_max stops above this length")
    p.add_argument("--find_max_state", default=None, metavar="FILE",
                   help="--find_max launches one length per call and keeps the search (per card and configuration) "
                        "in this JSON file: call again to continue it")
    p.add_argument("--find_max_resolution", type=int, default=0,
                   help="with --find_max: after the first failure, bisect until the longest success and the first "
                        "failure are this many tokens apart (0: doubling only)")
    p.add_argument("--launch_timeout", type=float, default=1800, help="seconds per launch before it is killed")
    p.add_argument("--dist_timeout", type=float, default=600,
                   help="seconds a collective may wait (the process group's timeout) before the rank gives up")
    p.add_argument("--out", default=None, help="JSON-lines file to append one record per launch to")
    p.add_argument("--profile", default=None, metavar="DIR",
                   help="after the timed steps, one more step under torch.profiler on global rank 0: trace and "
                        "kernel table in DIR, a summary of the GPU time by kind of kernel in the record")
    p.add_argument("--quiet", action="store_true",
                   help="do not echo the launches' output (a failure still shows its tail)")
    p.add_argument("--worker", default=None, help=argparse.SUPPRESS)  # internal: the spec file of one launch
    args = p.parse_args(argv)
    if args.warmup < 1 or args.steps < 1:
        p.error("--warmup and --steps must be at least 1 (a step is timed from the end of the step before it)")
    if args.backend is None:
        args.backend = LOCAL if args.strategy == "ddp" else "auto"
    if args.backend == LOCAL and args.strategy != "ddp":
        p.error(f"--backend {LOCAL} is the model's own attention, for --strategy ddp only")
    if args.offload and (args.checkpointing or _mode(load_model_config(args.model)[1].get(
            "activation_checkpointing"))) != "full":
        p.error("--offload moves the layer inputs that full checkpointing keeps: add --checkpointing full")
    if args.find_max_state and not args.find_max:
        p.error("--find_max_state is the state of a --find_max search: add --find_max")
    if args.accelerator is None:
        args.accelerator = "gpu" if torch.cuda.is_available() else "cpu"
    if args.precision is None:
        args.precision = "bf16-mixed" if args.accelerator in ("gpu", "cuda") else "32-true"
    return args


def load_model_config(name: str) -> tuple[dict, dict]:
    """(LlamaConfig kwargs, LlamaForCausalLM kwargs) from conf/model/<name>.yaml, without Hydra."""
    import yaml

    with open(os.path.join(ROOT, "conf", "model", f"{name}.yaml")) as f:
        raw = yaml.safe_load(f)
    config = {k: v for k, v in raw["config"].items() if not k.startswith("_")}
    model = {k: v for k, v in raw.items() if not k.startswith("_") and k != "config"}
    return config, model


# ---------------------------------------------------------------------------------------------
# One launch (the worker: every rank runs this)


class RandomTokens(torch.utils.data.Dataset):
    """Sequences of tokens drawn uniformly from the vocabulary; labels = inputs (shifted by the
    strategy, or by CausalLM under ddp)."""

    def __init__(self, seq_len: int, vocab_size: int, num_samples: int, seed: int):
        self.seq_len, self.vocab_size, self.num_samples, self.seed = seq_len, vocab_size, num_samples, seed

    def __len__(self) -> int:
        return self.num_samples

    def __getitem__(self, i: int) -> dict:
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + i)
        ids = torch.randint(0, self.vocab_size, (self.seq_len,), generator=g)
        return {"input_ids": ids, "labels": ids.clone()}


def _make_profiler(spec: dict):
    """A callback that profiles the step after the timed ones on global rank 0 (so the profiler's
    overhead never enters the timing); ``summary`` is common.summarize_trace of that step."""
    import lightning as L
    from torch.profiler import ProfilerActivity, profile

    class StepProfiler(L.Callback):
        def __init__(self):
            self.prof, self.summary = None, None

        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            if trainer.global_rank == 0 and trainer.global_step == spec["warmup"] + spec["steps"]:
                cuda = pl_module.device.type == "cuda"
                self.prof = profile(activities=[ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else []))
                self.prof.__enter__()

        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            if self.prof is None:
                return
            common.synchronize(pl_module.device)
            self.prof.__exit__(None, None, None)
            stem = os.path.join(spec["profile"], f"train_{spec['strategy']}_s{spec['seq_len']}_rank0")
            self.summary = common.save_profile(self.prof, stem, 1, pl_module.device.type == "cuda", rows=50)
            self.prof = None

    return StepProfiler()


def _make_timer(spec: dict):
    import lightning as L
    import torch.distributed as dist

    class StepTimer(L.Callback):
        """End of every step (GPU synchronized); at the end, every rank's times and peak memory."""

        def __init__(self):
            self.start, self.ends, self.result = None, [], None

        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            limit = os.environ.get(SIMULATE_OOM)
            if limit and spec["seq_len"] > int(limit) and trainer.global_rank == trainer.world_size - 1:
                raise torch.OutOfMemoryError(f"simulated out of memory above {limit} tokens ({SIMULATE_OOM})")
            if self.start is None:
                common.synchronize(pl_module.device)
                self.start = time.perf_counter()

        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            common.synchronize(pl_module.device)
            self.ends.append(time.perf_counter())

        def on_train_end(self, trainer, pl_module):
            from lightning_sp.app.callbacks import memory_peaks

            device = pl_module.device
            marks = [self.start, *self.ends]
            times = [b - a for a, b in zip(marks[:-1], marks[1:])]
            cuda = device.type == "cuda"
            mem = [torch.cuda.max_memory_allocated(device), torch.cuda.max_memory_reserved(device)] if cuda else [0, 0]
            peaks = memory_peaks(device)
            offload = getattr(pl_module.model, "checkpoint_offload", None)
            host = [peaks["host_rss"], peaks["pinned"] or 0.0,  # GiB
                    offload.peak_host_bytes / 2**30 if offload is not None else 0.0]
            mine = torch.tensor([*times, *mem, *host], dtype=torch.float64, device=device)
            if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
                every = [torch.zeros_like(mine) for _ in range(dist.get_world_size())]
                dist.all_gather(every, mine)
            else:
                every = [mine]
            table = torch.stack(every).cpu()  # (ranks, steps + 5)
            steps = table[:, :len(times)].max(0).values.tolist()  # each step: the slowest rank
            n = len(times)
            gib = (table[:, n:n + 2] / 2**30).tolist() if cuda else None
            host = table[:, n + 2:].tolist()
            self.result = dict(all_step_times_s=steps,
                               peak_mem_gib_per_rank=[row[0] for row in gib] if cuda else None,
                               peak_reserved_gib_per_rank=[row[1] for row in gib] if cuda else None,
                               peak_host_rss_gib_per_rank=[row[0] for row in host],
                               peak_pinned_gib_per_rank=None if peaks["pinned"] is None else [row[1] for row in host],
                               offload_host_gib_per_rank=[row[2] for row in host] if offload is not None else None)

    return StepTimer()


def build_model(config_kwargs: dict, model_kwargs: dict, ddp_backend: str | None):
    from lightning_sp.mesh import single_process_mesh
    from lightning_sp.models import LlamaConfig, LlamaForCausalLM, swap_attention

    model = LlamaForCausalLM(LlamaConfig(**config_kwargs), **model_kwargs)
    if ddp_backend is not None:  # ddp with a kernel: the same block kernel on one rank's whole sequence
        swap_attention(model, single_process_mesh(), ring_impl="contiguous", backend=ddp_backend)
    return model


def make_strategy(spec: dict, num_heads: int):
    from lightning.pytorch.strategies import DDPStrategy

    from lightning_sp import UlyssesRingFSDPStrategy, UlyssesRingStrategy

    timeout = datetime.timedelta(seconds=spec["dist_timeout"])
    extra = {"gradient_as_bucket_view": True} if spec["gradient_as_bucket_view"] else {}
    if spec["strategy"] == "ddp":
        return DDPStrategy(timeout=timeout, **extra)
    kw = dict(ulysses_degree=spec["ulysses_degree"], ring_degree=spec["ring_degree"], ring_impl=spec["ring_impl"],
              backend=spec["backend"], head_groups=spec["head_groups"], attention_heads=num_heads, timeout=timeout)
    if spec["strategy"] == "ulysses_ring_fsdp":
        return UlyssesRingFSDPStrategy(**kw)
    return UlyssesRingStrategy(**kw, **extra)


def attention_kernel(spec: dict, config, strategy, device) -> tuple[str, str]:
    """(attention module, kernel it runs): for sequence parallelism the kernel lightning_sp.kernels
    picks for the ring's diagonal block (b, S/ring, heads/ulysses, d), as in benchmark_longctx_qkvpacked."""
    from lightning_sp.kernels import select_kernel

    if spec["backend"] == LOCAL:
        return "LocalAttention", "torch_sdpa"
    ulysses, ring = 1, 1
    if spec["strategy"] != "ddp":
        mesh = strategy.sp_mesh
        ulysses, ring = mesh.ulysses_size, mesh.ring_size
    dtype = {"bf16": torch.bfloat16, "16": torch.float16}.get(spec["precision"].split("-")[0], torch.float32)
    stub = torch.zeros((), device=device, dtype=dtype)
    q = stub.expand(1, spec["seq_len"] // ring, config.num_heads // ulysses, config.head_dim)
    k = stub.expand(1, spec["seq_len"] // ring, max(config.num_kv_heads // ulysses, 1), config.head_dim)
    return "LongContextAttention", select_kernel(spec["backend"], q, k, causal=True).name


def worker(spec_path: str) -> int:
    """One launch: train warmup + steps steps at one length; global rank 0 writes the measurements."""
    import functools
    import warnings

    import lightning as L

    from lightning_sp import comm
    from lightning_sp.lm import CausalLM, _device_peak_tflops
    from lightning_sp.models import LlamaConfig
    from lightning_sp.models.llama import checkpointing_mode

    with open(spec_path) as f:
        spec = json.load(f)
    warnings.filterwarnings("ignore", ".*does not have many workers.*")
    L.seed_everything(spec["seed"], verbose=False)
    config_kwargs, model_kwargs = load_model_config(spec["model"])
    if spec["checkpointing"] is not None:
        model_kwargs["activation_checkpointing"] = spec["checkpointing"]
    if spec["mlp_chunk_size"] is not None:
        model_kwargs["mlp_chunk_size"] = spec["mlp_chunk_size"]
    if spec["checkpointed_layers"] is not None:
        model_kwargs["checkpointed_layers"] = spec["checkpointed_layers"]
    if spec["compile"] is not None:
        model_kwargs["compile_blocks"] = spec["compile"]
    if spec["offload"] is not None:
        model_kwargs["offload_checkpoints"] = spec["offload"]
    config = LlamaConfig(**config_kwargs)
    kernel_backend = None if spec["strategy"] != "ddp" or spec["backend"] == LOCAL else spec["backend"]
    module = CausalLM(functools.partial(build_model, config_kwargs, model_kwargs, kernel_backend),
                      peak_tflops=spec["peak_tflops"])
    timer = _make_timer(spec)
    profiler = _make_profiler(spec) if spec.get("profile") else None
    total = spec["warmup"] + spec["steps"] + (1 if profiler else 0)
    trainer = L.Trainer(accelerator=spec["accelerator"], devices=spec["devices"], num_nodes=1,
                        strategy=make_strategy(spec, config.num_heads), precision=spec["precision"], max_steps=total,
                        gradient_clip_val=spec["gradient_clip_val"] or None, callbacks=[timer, *([profiler] if profiler else [])], logger=False,
                        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                        num_sanity_val_steps=0, limit_val_batches=0, log_every_n_steps=1)
    data = RandomTokens(spec["seq_len"], config.vocab_size, total * spec["devices"], spec["seed"])
    trainer.fit(module, train_dataloaders=torch.utils.data.DataLoader(data, batch_size=1))
    if not trainer.is_global_zero:
        return 0
    strategy, device = trainer.strategy, trainer.strategy.root_device  # the module is back on the CPU after fit
    world = trainer.world_size
    if spec["strategy"] == "ddp":
        ulysses = ring = 1
        layout = head_groups = None
    else:
        mesh = strategy.sp_mesh
        ulysses, ring, layout = mesh.ulysses_size, mesh.ring_size, strategy.ring_impl
        from lightning_sp.attention.ulysses import choose_head_groups
        head_groups = choose_head_groups(config.num_heads, config.num_kv_heads, ulysses, strategy.head_groups or "auto")
    dp = world // (ulysses * ring)
    try:
        attention, kernel = attention_kernel(spec, config, strategy, device)
    except Exception as err:  # noqa: BLE001 -- the run completed; say why the kernel is unknown
        attention, kernel = "LongContextAttention", f"unknown ({common.error_text(err)[:200]})"
    tokens = spec["seq_len"] * dp
    timed = timer.result["all_step_times_s"][spec["warmup"]:spec["warmup"] + spec["steps"]]
    step = statistics.median(timed)
    flops_token = config.flops_per_token(spec["seq_len"])
    n_flops = config.num_params() - (0 if config.tie_word_embeddings else config.vocab_size * config.hidden_size)
    attn_flops = 6 * config.num_layers * config.num_heads * config.head_dim * spec["seq_len"]
    assert abs(flops_token - (6 * n_flops + attn_flops)) <= 1e-6 * flops_token, "flops_per_token changed meaning"
    peak = spec["peak_tflops"] or _device_peak_tflops(device)
    tokens_per_s = tokens / step
    metrics = {k: float(v) for k, v in trainer.callback_metrics.items()}
    per_rank = timer.result["peak_mem_gib_per_rank"]
    record = dict(
        card=common.card_name(device), world=world, ulysses=ulysses, ring=ring, dp=dp, layout=layout,
        head_groups=head_groups,
        attention=attention, kernel=kernel,
        checkpointing=checkpointing_mode(model_kwargs.get("activation_checkpointing")),
        checkpointed_layers=model_kwargs.get("checkpointed_layers"),
        mlp_chunk_size=model_kwargs.get("mlp_chunk_size"), loss_chunk_size=model_kwargs.get("loss_chunk_size"),
        compile=bool(model_kwargs.get("compile_blocks", False)), offload=bool(model_kwargs.get("offload_checkpoints")),
        transport=comm.current_transport(),
        config=dataclasses.asdict(config), num_params=config.num_params(), flops_params=n_flops,
        flops_params_note="parameters in the 6N term: all but the input embedding lookup (tied embeddings count "
                          "once, as the LM head)",
        tokens_per_step=tokens, sequences_per_step=dp, step_time_s=step, all_step_times_s=timed,
        warmup_step_times_s=timer.result["all_step_times_s"][:spec["warmup"]], tokens_per_s=tokens_per_s,
        flops_per_token=flops_token, attention_flops_per_token=attn_flops, flops_per_step=flops_token * tokens,
        tflops_per_gpu=tokens_per_s * flops_token / world / 1e12, peak_tflops_per_gpu=peak,
        mfu=tokens_per_s * flops_token / (peak * 1e12 * world) if peak else None,
        peak_mem_gib=max(per_rank) if per_rank else None, peak_mem_gib_per_rank=per_rank,
        peak_reserved_gib=max(timer.result["peak_reserved_gib_per_rank"]) if per_rank else None,
        **_host_fields(timer.result),
        final_loss=metrics.get("train/loss"),
        module_logged={k: v for k, v in metrics.items() if k in ("train/tokens_per_s", "train/mfu")},
        profile=profiler.summary if profiler else None, lightning=L.__version__, alloc_conf=os.environ.get("PYTORCH_CUDA_ALLOC_CONF"), completed=True, error=None)
    with open(spec["record"], "w") as f:
        json.dump(record, f, default=str)
    return 0


def _host_fields(result: dict) -> dict:
    """The record's host-memory fields (GiB) from the ranks' peaks."""
    rss, pinned, offload = (result[f"{k}_per_rank"]
                            for k in ("peak_host_rss_gib", "peak_pinned_gib", "offload_host_gib"))
    return dict(peak_host_rss_gib=max(rss), peak_host_rss_gib_per_rank=rss, peak_host_rss_gib_sum=sum(rss),
                peak_pinned_gib=max(pinned) if pinned else None, peak_pinned_gib_per_rank=pinned,
                offload_host_gib=max(offload) if offload else None, offload_host_gib_per_rank=offload)


# ---------------------------------------------------------------------------------------------
# The sweep (the process the user started)


def _clean_env(gpu: bool) -> dict:
    env = dict(os.environ)
    for key in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE", "NODE_RANK", "MASTER_ADDR", "MASTER_PORT",
                "GROUP_RANK", "TORCHELASTIC_RUN_ID"):
        env.pop(key, None)
    env.setdefault("NCCL_NVLS_ENABLE", "0")  # no NVLink multicast (see the device notes)
    if gpu:
        env.setdefault("PYTORCH_CUDA_ALLOC_CONF", "expandable_segments:True")  # long sequences: less fragmentation
    env.setdefault("PYTHONUNBUFFERED", "1")
    return env


def _error_from(output: str, rc: int | None, timed_out: bool) -> tuple[str, str]:
    """(error text, cause: "memory", "time" or "error") from a failed launch's output."""
    lines = [l for l in output.splitlines() if l.strip()]
    oom = [l for l in lines if any(w in l for w in OOM_WORDS)]
    if oom:
        return oom[-1].strip()[:1000], "memory"
    if timed_out:
        return "launch timed out (killed)", "time"
    errors = [l for l in lines if "Error" in l or "Exception" in l]
    error = ((errors[-1].strip()[:1000] + "; ") if errors else "") + f"launch exited with status {rc}"
    if rc == -signal.SIGKILL:  # we kill only after the launch ended: the system did (its OOM killer, host memory)
        return error + " (killed by SIGKILL: the system's out-of-memory killer?)", "memory"
    return error, "error"


def launch(args: argparse.Namespace, seq_len: int, workdir: str) -> dict:
    """Run one length in a fresh launch; the worker's record, or one saying why there is none."""
    spec = {k: v for k, v in vars(args).items()
            if k not in ("worker", "seq_len", "out", "find_max", "find_max_state", "find_max_resolution", "quiet")}
    spec.update(seq_len=seq_len, record=os.path.join(workdir, f"record_{seq_len}.json"))
    spec_path = os.path.join(workdir, f"spec_{seq_len}.json")
    with open(spec_path, "w") as f:
        json.dump(spec, f)
    cmd = [sys.executable, os.path.abspath(__file__), "--worker", spec_path]
    tail = collections.deque(maxlen=400)
    # a session of its own: every rank of the launch is in its process group and ends with it
    proc = subprocess.Popen(cmd, cwd=ROOT, env=_clean_env(args.accelerator != "cpu"), stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, start_new_session=True)

    def pump():
        for line in proc.stdout:
            tail.append(line)
            if not args.quiet:
                print(f"  [S={seq_len}] {line}", end="", flush=True)

    reader = threading.Thread(target=pump, daemon=True)
    reader.start()
    timed_out = False
    try:
        rc = proc.wait(timeout=args.launch_timeout)
    except subprocess.TimeoutExpired:
        timed_out, rc = True, None
    try:  # rank 0 is done (or stuck): end every rank of the launch, e.g. one blocked in a collective
        os.killpg(proc.pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass
    if timed_out:
        rc = proc.wait()
    reader.join(timeout=30)
    base = dict(seq_len=seq_len, strategy=args.strategy, backend=args.backend)
    if rc == 0 and os.path.exists(spec["record"]):
        with open(spec["record"]) as f:
            return {**base, **json.load(f)}
    output = "".join(tail)
    error, cause = _error_from(output, rc, timed_out)
    if args.quiet:
        print("".join(list(tail)[-40:]), end="", flush=True)
    return {**base, "completed": False, "oom": cause == "memory", "cause": cause, "rc": rc, "error": error}


def finish_record(args: argparse.Namespace, record: dict, started: str) -> dict:
    """The record as written: what was asked (args, command) around what was measured."""
    head = dict(name="train", date=started, card=record.pop("card", None) or _card(args), torch=torch.__version__,
                command=common.command_line(), model=args.model, strategy=args.strategy,
                ulysses_degree=args.ulysses_degree, ring_degree=args.ring_degree, ring_impl=args.ring_impl,
                backend=args.backend, precision=args.precision, devices=args.devices, warmup=args.warmup,
                steps=args.steps)
    _, model = load_model_config(args.model)  # what the launch would have used, for failures
    record.setdefault("checkpointing", args.checkpointing or _mode(model.get("activation_checkpointing")))
    record.setdefault("mlp_chunk_size", args.mlp_chunk_size or model.get("mlp_chunk_size"))
    record.setdefault("compile", bool(model.get("compile_blocks", False) if args.compile is None else args.compile))
    record.setdefault("offload", bool(model.get("offload_checkpoints") if args.offload is None else args.offload))
    return {**head, **record, "args": {k: v for k, v in vars(args).items() if k != "worker"}}


def _card(args: argparse.Namespace) -> str:
    """The card's name without touching CUDA here (a context in this process would take GPU memory
    from the launches): nvidia-smi's, or "cpu"."""
    if args.accelerator == "cpu":
        return "cpu"
    try:
        out = subprocess.run(["nvidia-smi", "--query-gpu=name", "--format=csv,noheader"], capture_output=True,
                             text=True, timeout=30).stdout.splitlines()
        return out[0].strip() if out else "unknown"
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def _mode(value) -> str:
    from lightning_sp.models.llama import checkpointing_mode

    return checkpointing_mode(value)


def describe(r: dict) -> str:
    tag = (f"train {r['model']} {r['strategy']} S={r['seq_len']} ckpt={r.get('checkpointing')}"
           f"{' offload' if r.get('offload') else ''} backend={r['backend']}{' compiled' if r.get('compile') else ''}")
    if not r.get("completed"):
        return f"{tag}: FAILED{' (out of memory)' if r.get('oom') else ''} {r['error'][:300]}"
    mfu = f", MFU {100 * r['mfu']:.1f}%" if r.get("mfu") is not None else ""
    mem = f", peak {r['peak_mem_gib']:.1f} GiB" if r.get("peak_mem_gib") is not None else ""
    mem += f", host RSS {r['peak_host_rss_gib']:.1f} GiB" if r.get("peak_host_rss_gib") is not None else ""
    mem += f" (offload {r['offload_host_gib']:.1f} GiB)" if r.get("offload_host_gib") is not None else ""
    return (f"{tag} u{r['ulysses']}xr{r['ring']}xdp{r['dp']} kernel={r['kernel']}: {r['step_time_s']:.3f} s/step, "
            f"{r['tokens_per_s']:,.0f} tokens/s, {r['tflops_per_gpu']:.1f} TFLOP/s per GPU{mfu}{mem}")


# ---------------------------------------------------------------------------------------------
# The search for the longest length (--find_max)


def search_key(args: argparse.Namespace, card: str) -> str:
    """What a --find_max search is about: the card and every argument that changes memory or time."""
    _, model = load_model_config(args.model)
    fields = dict(card=card, model=args.model, strategy=args.strategy, devices=args.devices,
                  ulysses=args.ulysses_degree, ring=args.ring_degree, layout=args.ring_impl, backend=args.backend,
                  precision=args.precision,
                  checkpointing=args.checkpointing or _mode(model.get("activation_checkpointing")),
                  checkpointed_layers=args.checkpointed_layers or model.get("checkpointed_layers"),
                  mlp_chunk_size=args.mlp_chunk_size or model.get("mlp_chunk_size"),
                  compile=bool(model.get("compile_blocks") if args.compile is None else args.compile),
                  offload=bool(model.get("offload_checkpoints") if args.offload is None else args.offload),
                  bucket_view=args.gradient_as_bucket_view, warmup=args.warmup, steps=args.steps)
    return " ".join(f"{k}={v}" for k, v in fields.items())


def next_length(tried: dict[int, dict], start: int, max_seq_len: int, resolution: int = 0) -> int | None:
    """The length to try next (None: the search is over): ``start``, then double the longest that
    completed until one fails or passes ``max_seq_len``; with ``resolution``, then halve the gap between
    the longest success and the first failure above it while it is wider than ``resolution`` tokens."""
    longest = max((s for s, o in tried.items() if o["completed"]), default=None)
    first_failed = min((s for s, o in tried.items() if not o["completed"] and (longest is None or s > longest)),
                       default=None)
    if longest is None:
        return start if first_failed is None else None
    if first_failed is None:
        return 2 * longest if 2 * longest <= max_seq_len else None
    if resolution and first_failed - longest > resolution:
        middle = (longest + first_failed) // 2 // resolution * resolution
        return middle if longest < middle < first_failed else None
    return None


def predicted_launch_s(tried: dict[int, dict], seq_len: int, steps: int) -> tuple[float, int] | None:
    """(seconds of ``steps`` steps at ``seq_len``, the length it is predicted from): the longest shorter
    length that completed, its step time x (length ratio)^2 per step (the attention's scaling, an
    upper bound where the linear work still counts)."""
    shorter = [s for s, o in tried.items() if o["completed"] and s < seq_len]
    if not shorter:
        return None
    base = max(shorter)
    return steps * tried[base]["step_time_s"] * (seq_len / base) ** 2, base


def _outcome(record: dict) -> dict:
    """What the search keeps of one length's record."""
    keys = ("completed", "cause", "error", "step_time_s", "peak_mem_gib", "peak_host_rss_gib", "offload_host_gib",
            "launched", "date")
    return {k: record.get(k) for k in keys}


def _load_state(path: str) -> dict:
    if not os.path.exists(path):
        return {"searches": {}}
    with open(path) as f:
        return json.load(f)


def _save_state(path: str, state: dict) -> None:
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path + ".tmp", "w") as f:
        json.dump(state, f, indent=1, default=str)
    os.replace(path + ".tmp", path)


def _not_launched(args: argparse.Namespace, seq_len: int, seconds: float, base: int) -> dict:
    return dict(seq_len=seq_len, strategy=args.strategy, backend=args.backend, completed=False, oom=False,
                cause="time", launched=False, predicted_launch_s=seconds,
                error=f"not launched: {args.warmup + args.steps} steps predicted to take {seconds:.0f} s (from "
                      f"S={base}, x (length ratio)^2) > --launch_timeout {args.launch_timeout:.0f} s")


def find_max_summary(args: argparse.Namespace, card: str, key: str, tried: dict[int, dict]) -> dict:
    longest = max((s for s, o in tried.items() if o["completed"]), default=None)
    failed = [s for s, o in tried.items() if not o["completed"] and (longest is None or s > longest)]
    first = min(failed, default=None)
    nxt = next_length(tried, args.seq_len[0], args.max_seq_len, args.find_max_resolution)
    stopped_by = None if nxt is not None else "failure" if first is not None else "max_seq_len"
    return dict(name="train_find_max", date=datetime.datetime.now().isoformat(timespec="seconds"), card=card,
                torch=torch.__version__, command=common.command_line(), model=args.model, strategy=args.strategy,
                checkpointing=key.split("checkpointing=")[1].split()[0], devices=args.devices, search=key,
                longest_completed=longest, tried=list(tried), first_failed=first,
                first_failure=tried[first]["error"] if first is not None else None,
                failure_cause=tried[first]["cause"] if first is not None else None,
                stopped_by=stopped_by, next_seq_len=nxt, max_seq_len=args.max_seq_len,
                resolution=args.find_max_resolution or None, state_file=args.find_max_state,
                results={str(s): tried[s] for s in sorted(tried)})


def sweep(args: argparse.Namespace) -> list[dict]:
    """The given lengths; with --find_max the search after them (all in this call), or, with
    --find_max_state, the one next length of the search kept in that file."""
    if "RANK" in os.environ or "LOCAL_RANK" in os.environ:
        raise SystemExit(f"run {sys.argv[0]} with python, not torchrun: it starts a Lightning launch per length")
    card = _card(args)
    key = search_key(args, card)
    state = _load_state(args.find_max_state) if args.find_max_state else None
    tried = {int(s): o for s, o in state["searches"].get(key, {}).items()} if state else {}
    queue = [(s, False) for s in ([] if tried else args.seq_len[:1] if state else args.seq_len)]
    records = []
    with tempfile.TemporaryDirectory(prefix="bench_train_") as workdir:
        while True:
            if not queue and args.find_max and not (state and records):
                nxt = next_length(tried, args.seq_len[0], args.max_seq_len, args.find_max_resolution)
                queue += [(nxt, True)] if nxt is not None else []
            if not queue:
                break
            seq_len, searched = queue.pop(0)
            started = datetime.datetime.now().isoformat(timespec="seconds")
            predicted = predicted_launch_s(tried, seq_len, args.warmup + args.steps) if searched else None
            if predicted is not None and predicted[0] > args.launch_timeout:
                raw = _not_launched(args, seq_len, *predicted)
            else:
                raw = {**launch(args, seq_len, workdir), "launched": True}
            record = finish_record(args, raw, started)
            print(describe(record), flush=True)
            common.append_record(args.out, record)
            records.append(record)
            tried[seq_len] = _outcome(record)
            if state is not None:
                state["searches"][key] = {str(s): o for s, o in tried.items()}
                _save_state(args.find_max_state, state)
    if args.find_max:
        summary = find_max_summary(args, card, key, tried)
        first = summary["first_failed"]
        print(f"find_max: longest completed {summary['longest_completed']} tokens"
              + (f"; {first} failed ({summary['failure_cause']}): {summary['first_failure'][:200]}" if first else "")
              + (f"; next call probes {summary['next_seq_len']}" if summary["next_seq_len"] else
                 f"; stopped at --max_seq_len {args.max_seq_len}" if summary["stopped_by"] == "max_seq_len" else ""),
              flush=True)
        common.append_record(args.out, summary)
        records.append(summary)
    return records


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.worker:
        return worker(args.worker)
    sweep(args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
