"""The model side of the strategies: how many attention heads it has, binding its attention layers,
and whether its kernel backend runs on the run's device.

Heads are read before the model exists where it is built in ``configure_model``: a LightningModule
that holds a model factory (a ``functools.partial``, as Hydra's ``_partial_: true`` makes, e.g.
``partial(LlamaForCausalLM, config=LlamaConfig(num_heads=32))``) has them in the factory's
arguments, so the ``"auto"`` degrees can be chosen in ``setup_environment``.
"""
from __future__ import annotations

import functools
import math

import torch
from torch import nn

from ..core.attention import LongContextAttention
from ..core.attention.hybrid import SequenceContext
from ..core.errors import SPConfigError
from ..core.kernels import backends, get_kernel
from ..core.mesh import SPMesh

HEAD_ATTRIBUTES = ("num_attention_heads", "num_heads", "n_heads", "n_head")


def _heads_of(owner) -> set[int]:
    found = set()
    for attr in HEAD_ATTRIBUTES:
        value = getattr(owner, attr, None)
        if isinstance(value, int) and not isinstance(value, bool) and value > 0:
            found.add(value)
    return found


def _factory_heads(factory: functools.partial) -> set[int]:
    """Heads named in a factory's arguments: head-count keywords, or configs (and config-holding
    arguments) among its arguments."""
    found = {v for k, v in factory.keywords.items()
             if k in HEAD_ATTRIBUTES and isinstance(v, int) and not isinstance(v, bool) and v > 0}
    for value in (*factory.args, *factory.keywords.values()):
        if isinstance(value, functools.partial):
            found |= _factory_heads(value)
        elif not isinstance(value, (int, float, str, bool, type(None))):
            found |= _heads_of(value) | _heads_of(getattr(value, "config", None))
    return found


def find_attention_heads(module: nn.Module | None) -> int | None:
    """The query heads of a module's attention, without building anything: the greatest common
    divisor of the head counts of its submodules and their ``config``, and of the model factories
    (``functools.partial``) its submodules hold as attributes; None where none is found."""
    found: set[int] = set()
    for sub in (module.modules() if module is not None else ()):
        found |= _heads_of(sub) | _heads_of(getattr(sub, "config", None))
        for value in vars(sub).values():
            if isinstance(value, functools.partial):
                found |= _factory_heads(value)
    return math.gcd(*found) if found else None


def bind_attention(module: nn.Module, mesh: SPMesh, require: bool = True,
                   context: SequenceContext | None = None) -> int:
    """Bind every :class:`LongContextAttention` of ``module`` that has no mesh of its own to ``mesh``
    and its config's layout, backend and head groups (a layer bound by an earlier strategy is bound
    again); a layer bound by the user to an incompatible mesh is an error naming the fix. Every layer
    reads the packing of a batch whose caller passes it no ``cu_seqlens`` from ``context`` (the
    strategy's :class:`SequenceContext`). Returns the number of layers found.

    With ``require`` and a sequence split over several ranks, a module without any such layer is an
    error naming ``lightning_sp.swap_attention``: its own attention would see only this rank's shard.
    """
    config = mesh.config
    found = 0
    for name, layer in module.named_modules():
        if not isinstance(layer, LongContextAttention):
            continue
        found += 1
        if layer.mesh is None or getattr(layer, "_sp_bound_by_strategy", False):
            layer.bind(mesh, ring_impl=config.layout, backend=config.backend, head_groups=config.head_groups)
            layer._sp_bound_by_strategy = True  # so that the next strategy may bind it again
        elif layer.ring_impl != config.layout or layer.mesh.sp_size != mesh.sp_size:
            raise SPConfigError(
                f"attention layer {name!r} is bound to its own mesh ({layer.mesh.describe()}, layout "
                f"{layer.ring_impl!r}) but the strategy shards batches with layout {config.layout!r} over "
                f"{mesh.sp_size} ranks; construct it with mesh=None so the strategy binds it")
        if context is not None:
            layer.sequence_context = context
    if not found and require and mesh.sp_size > 1:
        raise SPConfigError(
            f"call lightning_sp.swap_attention(model) on the model (in the LightningModule's __init__ or "
            f"configure_model), or use lightning_sp.LongContextAttention in its attention layers: "
            f"{type(module).__name__} has no LongContextAttention, so with each sequence split over "
            f"{mesh.sp_size} ranks (ulysses {config.ulysses_degree} x ring {config.ring_degree}) its own attention "
            f"would see only this rank's shard of the sequence; a model without attention layers (or one that "
            f"calls lightning_sp's attention functions with trainer.strategy.sp_mesh itself) passes "
            f"require_sp_attention=False to the strategy")
    return found


def check_backend_device(backend: str | None, device: torch.device) -> None:
    """A backend that runs on CUDA GPUs only (``fa4``, ``cudnn``, ``flash``, ``efficient``) asked
    for on another device is an error naming the ones that run there."""
    if backend in (None, "auto"):
        return
    kernel = get_kernel(backend)
    if kernel.device_type not in (None, device.type):
        others = [name for name in backends() if name == "auto" or get_kernel(name).device_type in (None, device.type)]
        raise SPConfigError(f"backend {backend!r} runs on {kernel.device_type} only, but this run's device is "
                            f"{device.type}; choose one of {', '.join(others)} (or run on {kernel.device_type})")
