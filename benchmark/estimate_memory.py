"""Estimate the GPU memory of a training step of a conf/model shape, on a CPU, without computing.

    python benchmark/estimate_memory.py --model llama_1b --tokens_per_gpu 65536 262144 \\
        --checkpointing none full except_attention --mlp_chunk_size 0 16384

One forward + backward of ``LlamaForCausalLM`` (its own local attention, one process, bf16 autocast)
runs under ``FakeTensorMode``: shapes and dtypes only, no data, so the 1B shape at 512K tokens takes
seconds. Every tensor an op creates is tracked until its storage dies; ``activations`` is the peak of
those live bytes (saved activations, recomputation, gradients as the backward creates them, the
chunked loss). The parameters and the optimizer come on top, per GPU (fp32 weights, AdamW's two
states): ``ddp`` adds the parameters, Adam and DDP's gradient buckets (4 x 4 bytes per parameter);
``fsdp`` the same sharded over ``--world`` GPUs plus the unsharded embedding and two layers.

Not modelled: Ulysses' all-to-all buffers and the gathered attention output (under sequence
parallelism add about 4 bytes x heads x head_dim per token and layer with except_attention, and a few
GiB of transient buffers at 256K tokens per GPU), the attention kernel's workspace (FA4/cuDNN keep
what torch's CPU flash kernel keeps: q, k, v, out, lse), the allocator's fragmentation and the CUDA
context (~0.5 GiB). Treat the totals as lower bounds with a few GiB of slack.
"""
from __future__ import annotations

import argparse
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
    """Peak bytes of the storages that ops create, each counted until it is freed."""

    def __init__(self):
        super().__init__()
        self.live: dict[int, tuple[StorageWeakRef, int]] = {}
        self.now = self.peak = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in tree_leaves(out):
            if isinstance(t, torch.Tensor):
                ref = StorageWeakRef(t.untyped_storage())
                if ref.cdata not in self.live:
                    self.live[ref.cdata] = (ref, t.untyped_storage().nbytes())
                    self.now += self.live[ref.cdata][1]
        for key in [k for k, (ref, _) in self.live.items() if ref.expired()]:
            self.now -= self.live.pop(key)[1]
        self.peak = max(self.peak, self.now)
        return out


def activation_peak(config_kwargs: dict, model_kwargs: dict, tokens: int) -> int:
    from lightning_sp.models import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(**config_kwargs)
    with FakeTensorMode():
        model = LlamaForCausalLM(config, **model_kwargs)
        ids = torch.randint(0, config.vocab_size, (1, tokens))
        live = LiveBytes()
        with live:
            with torch.autocast("cpu", dtype=torch.bfloat16):
                total, count = model.loss_sum(model(ids), ids)
            (total / count).backward()
    return live.peak


def states_bytes(n_params: int, config, strategy: str, world: int) -> float:
    """Parameters, gradients (DDP buckets) and AdamW states per GPU, fp32."""
    if strategy == "ddp":
        return 16.0 * n_params
    layer = (n_params - config.vocab_size * config.hidden_size) / config.num_layers
    return 16.0 * n_params / world + 4.0 * (config.vocab_size * config.hidden_size + 2 * layer)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", choices=MODELS, default="llama_1b")
    p.add_argument("--tokens_per_gpu", type=int, nargs="+", default=[65536, 262144],
                   help="tokens each GPU holds: the sequence length / (ulysses x ring), or the length under ddp")
    p.add_argument("--checkpointing", nargs="+", choices=("none", "full", "except_attention"),
                   default=["none", "full", "except_attention"])
    p.add_argument("--mlp_chunk_size", type=int, nargs="+", default=[0], help="0 = no chunking")
    p.add_argument("--strategy", choices=("ddp", "fsdp"), default="ddp", help="how the states are held")
    p.add_argument("--world", type=int, default=2, help="GPUs the FSDP states are sharded over")
    args = p.parse_args(argv)
    from lightning_sp.models import LlamaConfig

    config_kwargs, model_kwargs = load_model_config(args.model)
    config = LlamaConfig(**config_kwargs)
    states = states_bytes(config.num_params(), config, args.strategy, args.world)
    print(f"{args.model}: {config.num_params() / 1e9:.3f}B parameters; states per GPU ({args.strategy}"
          f"{'' if args.strategy == 'ddp' else f' over {args.world}'}): {states / GIB:.1f} GiB")
    print(f"{'tokens/GPU':>10} {'checkpointing':>17} {'mlp chunk':>9} {'activations':>12} {'total':>8}")
    for tokens in args.tokens_per_gpu:
        for mode in args.checkpointing:
            for chunk in args.mlp_chunk_size:
                kw = dict(model_kwargs, activation_checkpointing=mode, mlp_chunk_size=chunk or None)
                peak = activation_peak(config_kwargs, kw, tokens)
                print(f"{tokens:>10} {mode:>17} {chunk or '-':>9} {peak / GIB:>8.1f} GiB "
                      f"{(peak + states) / GIB:>5.1f} GiB", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
