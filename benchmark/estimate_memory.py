"""Estimate the GPU memory of a training step of a conf/model shape, on a CPU, without computing.

    python benchmark/estimate_memory.py --model llama_1b --tokens_per_gpu 65536 262144 \\
        --checkpointing none full except_attention --mlp_chunk_size 0 16384

One forward + backward of ``LlamaForCausalLM`` (its own local attention, one process, bf16 autocast)
runs under ``FakeTensorMode``: shapes and dtypes only, no data, so the 1B shape at 512K tokens takes
seconds. Every tensor an op creates is tracked until its storage dies; ``activations`` is the peak of
those live bytes (saved activations, recomputation, gradients as the backward creates them, the
chunked loss). The parameters and the optimizer come on top, per GPU (fp32 weights, AdamW's two
states): ``ddp`` adds the parameters, Adam and DDP's gradient buckets (4 x 4 bytes per parameter;
the gradients themselves are among the activations, unless ``--gradient_as_bucket_view`` makes them
views of the buckets); ``fsdp`` the same sharded over ``--world`` GPUs plus the unsharded embedding
and two layers, and each parameter's full gradient is dropped once accumulated (FSDP reduce-scatters
a layer's gradients and frees them; the shards are in the states).

``--offload`` adds full checkpointing with ``offload_checkpoints``: the same step runs with the model's
own offload hooks forced on (``CheckpointOffload(force=True)``: host pieces, prefetch one layer ahead),
the host pieces counted apart as ``host`` (per GPU; a node holds that x its GPUs), everything else as
the GPU's. The copies are taken as done when issued (on a GPU a layer input is freed once its copy
ends, long before the next layer's forward does at these lengths).

``--longest`` finds, per mode, the longest sequence whose predicted peak fits ``--gpu_gib`` less
``--reserve_gib`` on each of ``--world`` GPUs (sequence parallel over all of them: a GPU holds the
sequence / world tokens), to 1/64, and prints it with the host memory it needs.

Not modelled: Ulysses' all-to-all buffers and the gathered attention output (under sequence
parallelism add about 4 bytes x heads x head_dim per token and layer with except_attention, and a few
GiB of transient buffers at 256K tokens per GPU), the attention kernel's workspace (FA4/cuDNN keep
what torch's CPU flash kernel keeps: q, k, v, out, lse), the allocator's fragmentation and the CUDA
context (~0.5 GiB). Treat the totals as lower bounds with a few GiB of slack.
"""
from __future__ import annotations

import argparse
import contextlib
import os
import sys

import torch
from torch._subclasses.fake_tensor import FakeTensorMode
from torch.multiprocessing.reductions import StorageWeakRef
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
sys.path.insert(1, os.path.dirname(HERE))  # lightning_sp, uninstalled
from benchmark_train import MODELS, load_model_config  # noqa: E402

GIB = 2 ** 30


class LiveBytes(TorchDispatchMode):
    """Peak bytes of the storages that ops create, each counted until it is freed: on the GPU, or
    on the host for those created under ``on_host``."""

    def __init__(self):
        super().__init__()
        self.live: dict[int, tuple[StorageWeakRef, int, bool]] = {}
        self.now = self.peak = self.host_now = self.host_peak = 0
        self.host = False

    @contextlib.contextmanager
    def on_host(self):
        self.host = True
        try:
            yield
        finally:
            self.host = False

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in tree_leaves(out):
            if isinstance(t, torch.Tensor):
                ref = StorageWeakRef(t.untyped_storage())
                old = self.live.get(ref.cdata)
                if old is not None and old[0].expired():  # freed, its address reused
                    self._add(-old[1], old[2])
                    old = None
                if old is None:
                    self.live[ref.cdata] = (ref, t.untyped_storage().nbytes(), self.host)
                    self._add(t.untyped_storage().nbytes(), self.host)
        # the freed storages are swept out only when a new peak may be reached (the count without the
        # sweep is an upper bound): the same peaks, without a walk over every live storage per op
        if self.now > self.peak or self.host_now > self.host_peak:
            for key in [k for k, (ref, _, _) in self.live.items() if ref.expired()]:
                _, nbytes, host = self.live.pop(key)
                self._add(-nbytes, host)
            self.peak, self.host_peak = max(self.peak, self.now), max(self.host_peak, self.host_now)
        return out

    def _add(self, nbytes: int, host: bool) -> None:
        if host:
            self.host_now += nbytes
        else:
            self.now += nbytes


def activation_peak(config_kwargs: dict, model_kwargs: dict, tokens: int) -> int:
    """Peak GPU bytes of the activations of one training step (see the module's docstring)."""
    return memory_peaks(config_kwargs, model_kwargs, tokens)[0]


def memory_peaks(config_kwargs: dict, model_kwargs: dict, tokens: int, keep_grads: bool = True) -> tuple[int, int]:
    """(peak GPU bytes, peak host bytes) of one training step's activations; with
    ``offload_checkpoints`` in ``model_kwargs`` the model's offload runs forced, its host pieces
    counted as host bytes. ``keep_grads=False`` drops each parameter's gradient once accumulated
    (FSDP reduce-scatters a layer's gradients and frees them; its shards are in the states)."""
    from lightning_sp.app.models import LlamaConfig, LlamaForCausalLM
    from lightning_sp.app.models.offload import CheckpointOffload

    class HostCounted(CheckpointOffload):
        def _copy_out(self, t):
            with live.on_host():
                return super()._copy_out(t)

    config = LlamaConfig(**config_kwargs)
    live = LiveBytes()
    with FakeTensorMode():
        model = LlamaForCausalLM(config, **model_kwargs)
        if model.checkpoint_offload is not None:
            model.checkpoint_offload = HostCounted(force=True)
        if not keep_grads:
            for param in model.parameters():
                param.register_post_accumulate_grad_hook(lambda q: setattr(q, "grad", None))
        ids = torch.randint(0, config.vocab_size, (1, tokens))
        with live:
            with torch.autocast("cpu", dtype=torch.bfloat16):
                total, count = model.loss_sum(model(ids), ids)
            (total / count).backward()
    return live.peak, live.host_peak


def states_bytes(n_params: int, config, strategy: str, world: int) -> float:
    """Parameters, gradients (DDP buckets) and AdamW states per GPU, fp32."""
    if strategy == "ddp":
        return 16.0 * n_params
    layer = (n_params - config.vocab_size * config.hidden_size) / config.num_layers
    return 16.0 * n_params / world + 4.0 * (config.vocab_size * config.hidden_size + 2 * layer)


def longest(config_kwargs: dict, model_kwargs: dict, states: float, budget: float, keep_grads: bool,
            start: int = 65536) -> tuple[int, float, float] | None:
    """(tokens per GPU, GPU bytes, host bytes per GPU) of the longest shard whose predicted peak
    (activations + ``states``) fits ``budget`` bytes, to 1/64, in multiples of 1024 tokens; None if
    not even 1024 tokens fit. The peak grows linearly with the tokens (chunked MLP and loss, a flash
    attention): a line through ``start`` (halved until it fits) and twice it gives the length, which
    is then checked, and moved by 1/64 until it fits and 1/64 more does not."""
    peaks = {}

    def total(tokens: int) -> tuple[float, float]:
        if tokens not in peaks:
            gpu, host = memory_peaks(config_kwargs, model_kwargs, tokens, keep_grads)
            peaks[tokens] = (gpu + states, host)
        return peaks[tokens]

    while total(start)[0] > budget and start > 1024:
        start //= 2
    (a, _), (b, _) = total(start), total(2 * start)
    if a > budget:
        return None
    tokens = max(start, int(start + (budget - a) * start / max(b - a, 1)) // 1024 * 1024)
    step = max(tokens // 64 // 1024 * 1024, 1024)
    while total(tokens)[0] > budget and tokens - step >= start:
        tokens -= step
    while total(tokens + step)[0] <= budget:
        tokens += step
    return tokens, *total(tokens)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", choices=MODELS, default="llama_1b")
    p.add_argument("--tokens_per_gpu", type=int, nargs="+", default=[65536, 262144],
                   help="tokens each GPU holds: the sequence length / (ulysses x ring), or the length under ddp")
    p.add_argument("--checkpointing", nargs="+", choices=("none", "full", "except_attention"),
                   default=["none", "full", "except_attention"])
    p.add_argument("--offload", action="store_true",
                   help="also full checkpointing with offload_checkpoints (the layer inputs in host memory)")
    p.add_argument("--mlp_chunk_size", type=int, nargs="+", default=[0], help="0 = no chunking")
    p.add_argument("--strategy", choices=("ddp", "fsdp"), default="ddp",
                   help="how the states are held (fsdp: also the gradients of a layer are freed once reduced)")
    p.add_argument("--world", type=int, default=2, help="GPUs the FSDP states are sharded over")
    p.add_argument("--gradient_as_bucket_view", action="store_true",
                   help="ddp: the gradients are views of DDP's buckets (counted in the states), not tensors of "
                        "their own")
    p.add_argument("--longest", action="store_true",
                   help="instead of --tokens_per_gpu: the longest sequence over --world GPUs, per mode")
    p.add_argument("--gpu_gib", type=float, default=79.0, help="--longest: memory of one GPU (an 80 GB H100: 79)")
    p.add_argument("--reserve_gib", type=float, default=4.0,
                   help="--longest: left free for what is not modelled (CUDA context, allocator, Ulysses buffers)")
    args = p.parse_args(argv)
    from lightning_sp.app.models import LlamaConfig

    config_kwargs, model_kwargs = load_model_config(args.model)
    config = LlamaConfig(**config_kwargs)
    states = states_bytes(config.num_params(), config, args.strategy, args.world)
    keep_grads = args.strategy == "ddp" and not args.gradient_as_bucket_view
    modes = [(m, False) for m in args.checkpointing] + ([("full", True)] if args.offload else [])
    print(f"{args.model}: {config.num_params() / 1e9:.3f}B parameters; states per GPU ({args.strategy}"
          f"{'' if args.strategy == 'ddp' else f' over {args.world}'}): {states / GIB:.1f} GiB")
    if args.longest:
        budget = (args.gpu_gib - args.reserve_gib) * GIB
        print(f"longest sequence over {args.world} GPU{'s' * (args.world > 1)} of {args.gpu_gib:g} GiB "
              f"({args.reserve_gib:g} GiB kept free):")
        for (mode, offload), chunk in ((m, c) for m in modes for c in args.mlp_chunk_size):
            kw = dict(model_kwargs, activation_checkpointing=mode, mlp_chunk_size=chunk or None,
                      offload_checkpoints=offload)
            tag = f"{mode}{'+offload' if offload else ''}, mlp chunk {chunk or '-'}"
            best = longest(config_kwargs, kw, states, budget, keep_grads)
            if best is None:
                print(f"  {tag}: not even 1024 tokens per GPU", flush=True)
                continue
            tokens, gpu, host = best
            print(f"  {tag}: {tokens * args.world:,} tokens ({tokens:,} per GPU), {gpu / GIB:.1f} GiB per GPU"
                  + (f", host {host / GIB:.1f} GiB per GPU ({host * args.world / GIB:,.0f} GiB for the {args.world})"
                     if offload and args.world > 1 else f", host {host / GIB:.1f} GiB" if offload else ""), flush=True)
        return 0
    print(f"{'tokens/GPU':>10} {'checkpointing':>17} {'mlp chunk':>9} {'activations':>12} {'total':>8} {'host':>9}")
    for tokens in args.tokens_per_gpu:
        for mode, offload in modes:
            for chunk in args.mlp_chunk_size:
                kw = dict(model_kwargs, activation_checkpointing=mode, mlp_chunk_size=chunk or None,
                          offload_checkpoints=offload)
                peak, host = memory_peaks(config_kwargs, kw, tokens, keep_grads)
                label = mode + ("+offload" if offload else "")
                print(f"{tokens:>10} {label:>17} {chunk or '-':>9} {peak / GIB:>8.1f} GiB "
                      f"{(peak + states) / GIB:>5.1f} GiB {f'{host / GIB:.1f} GiB' if offload else '-':>9}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
