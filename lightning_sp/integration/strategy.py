"""Lightning strategies for sequence parallelism: ``ulysses_ring`` (DDP) and ``ulysses_ring_fsdp`` (FSDP2).

What they add to data parallelism, in the order a batch meets them:

* ``setup_environment`` builds the dp x ring x ulysses :class:`~lightning_sp.mesh.SPMesh`;
  ``setup`` binds every unbound :class:`~lightning_sp.attention.LongContextAttention` of the model to it.
* the distributed sampler shards over the data-parallel dimension only, so every rank of a
  sequence-parallel group trains on the same samples;
* ``batch_to_device`` shifts labels on the full sequence, builds global ``position_ids``, pads to the
  layout's multiple and keeps this rank's tokens of every shard key (packed documents via
  ``cu_seqlens`` get local ``cu_seqlens``/``max_seqlen`` and within-document positions);
* gradients are averaged over all world ranks, as DDP does; :mod:`lightning_sp.loss` makes the loss
  exact. The strategy never rescales a loss.
"""
from __future__ import annotations

import math
import random
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
from lightning.pytorch.strategies import DDPStrategy, ModelParallelStrategy, StrategyRegistry
from lightning.pytorch.utilities.rank_zero import rank_zero_info
from torch.utils.data import DistributedSampler

from ..core import comm
from ..core import layout as L
from ..core import mesh as mesh_module
from ..core.attention import LongContextAttention
from ..core.attention.ulysses import check_heads
from ..core.errors import SPConfigError
from ..core.mesh import SPMesh, check_degrees, init_sp_mesh

DEFAULT_SHARD_KEYS = ("input_ids", "labels", "position_ids", "attention_mask")
HEAD_ATTRIBUTES = ("num_attention_heads", "num_heads", "n_heads", "n_head")
CHECKPOINT_KEY = "lightning_sp"


@dataclass(frozen=True)
class ShardInfo:
    """How the last batch was laid out: what :meth:`UlyssesRingStrategy.gather_sequence` undoes."""

    seq_len: int  # tokens of the original (unpadded) sequence or packed batch
    padded_len: int
    layout: str
    packed: L.PackedShard | None = None


def _is_degree(value) -> bool:
    return value == "auto" or (isinstance(value, int) and not isinstance(value, bool) and value >= 1)


class UlyssesRingStrategy(DDPStrategy):
    """DDP whose ranks also split every sequence: Ulysses within a node, ring across nodes.

    Args:
        ulysses_degree: ranks of one Ulysses (all-to-all) group, or ``"auto"``: the largest degree that
            divides the devices of a node and the model's attention heads.
        ring_degree: ranks of one ring, or ``"auto"``: all remaining ranks (data parallelism 1).
        ring_impl: the token layout of the ring, one of ``lightning_sp.layout.LAYOUTS``.
        backend: attention kernel backend bound into the model's attention layers (None keeps theirs).
        head_groups: how many head groups the layers' Ulysses all-to-all is split into, so that one group's
            communication overlaps another's attention (``"auto"`` or an int; None keeps theirs, see
            ``lightning_sp.attention.ulysses.choose_head_groups``).
        shift_labels: make ``labels[t] = labels[t + 1]`` on the full sequence before sharding (the last
            position, and in packed batches each document's last token, gets ``ignore_index``).
        ignore_index: label value of positions the loss ignores (shifting and padding use it).
        shard_keys: batch keys split along the sequence (dim 1; dim 0 for 1-D tensors); other keys pass
            through unchanged. Default: input_ids, labels, position_ids, attention_mask when present.
        attention_heads: query heads of the model's attention, for ``"auto"`` and the early check;
            None looks for ``num_attention_heads``/``num_heads``/``n_heads``/``n_head`` in the model.
        check_identical_samples: check on every batch (one all-gather) that all ranks of a
            sequence-parallel group received the same sample.
        pad_to_multiple: pad sequences to the layout's multiple (else such a sequence is an error).
        transport: how the ring and the all-to-all move data between ranks (``lightning_sp.comm``):
            ``auto`` (today torch.distributed, see the module's doc), ``nccl``, or ``copy_engine``
            (the GPUs' copy engines within a node); None keeps ``lightning_sp.comm``'s setting (``auto``, or the
            ``LIGHTNING_SP_TRANSPORT`` environment variable).
        **kwargs: passed to :class:`~lightning.pytorch.strategies.DDPStrategy`. Without a
            ``process_group`` there, gradients are reduced over a high-priority NCCL copy of the world
            group (``lightning_sp.mesh.priority_world_group``) when the backend is NCCL.
    """

    strategy_name = "ulysses_ring"

    def __init__(self, ulysses_degree: int | str = "auto", ring_degree: int | str = "auto", ring_impl: str = "zigzag",
                 backend: str | None = None, shift_labels: bool = True, ignore_index: int = -100,
                 shard_keys=None, attention_heads: int | None = None, check_identical_samples: bool = False,
                 pad_to_multiple: bool = True, transport: str | None = None, head_groups: int | str | None = None,
                 **kwargs: Any) -> None:
        for name, value in (("ulysses_degree", ulysses_degree), ("ring_degree", ring_degree)):
            if not _is_degree(value):
                raise SPConfigError(f"{name} must be a positive int or 'auto', got {value!r}")
        if head_groups is not None and not _is_degree(head_groups):
            raise SPConfigError(f"head_groups must be a positive int, 'auto' or None, got {head_groups!r}")
        super().__init__(**kwargs)
        self.ulysses_degree, self.ring_degree = ulysses_degree, ring_degree
        self.ring_impl = L.canonical_layout(ring_impl)
        self.backend = backend
        self.head_groups = head_groups
        self.shift_labels, self.ignore_index = shift_labels, ignore_index
        self.shard_keys = tuple(DEFAULT_SHARD_KEYS if shard_keys is None else shard_keys)
        self.attention_heads = attention_heads
        self.check_identical_samples = check_identical_samples
        self.pad_to_multiple = pad_to_multiple
        self.transport = None if transport is None else comm.check_transport(transport)
        self._sp_mesh: SPMesh | None = None
        self._checked_stages: set = set()
        self._rng_to_restore: dict | None = None
        self.last_shard: ShardInfo | None = None

    # ------------------------------------------------------------------ mesh
    @property
    def sp_mesh(self) -> SPMesh:
        if self._sp_mesh is None:
            raise RuntimeError("the sequence-parallel mesh is built in setup_environment(); it does not exist yet")
        return self._sp_mesh

    @property
    def dp_rank(self) -> int:
        """This rank's index along the data-parallel dimension (shard iterable datasets by it)."""
        return self.sp_mesh.dp_rank

    @property
    def dp_size(self) -> int:
        return self.sp_mesh.dp_size

    def setup_environment(self) -> None:
        super().setup_environment()  # joins or creates the default process group
        ulysses, ring = self._resolve_degrees(self.world_size, self.num_processes, self._model_heads())
        self._sp_mesh = init_sp_mesh(ulysses, ring, device_type=self.root_device.type)
        if self.transport is not None:
            comm.set_transport(self.transport)
        if self.lightning_module is not None:  # LightningModule.device_mesh, e.g. for configure_model
            self.lightning_module._device_mesh = self._sp_mesh.device_mesh
        rank_zero_info(f"{type(self).__name__}: {self._sp_mesh.describe()}, layout {self.ring_impl!r}")

    def _model_heads(self) -> int | None:
        if self.attention_heads is not None:
            return self.attention_heads
        found = set()
        for module in (self.lightning_module.modules() if self.lightning_module is not None else ()):
            for owner in (module, getattr(module, "config", None)):
                for attr in HEAD_ATTRIBUTES:
                    value = getattr(owner, attr, None)
                    if isinstance(value, int) and not isinstance(value, bool) and value > 0:
                        found.add(value)
        return math.gcd(*found) if found else None

    def _resolve_degrees(self, world: int, node_devices: int, heads: int | None) -> tuple[int, int]:
        """Explicit degrees are validated; "auto" picks Ulysses within a node as far as the heads allow."""
        ulysses, ring = self.ulysses_degree, self.ring_degree
        if ulysses == "auto":
            rest = world if ring == "auto" else world // ring if world % ring == 0 else world
            ulysses = math.gcd(node_devices, rest, heads or node_devices)  # the largest common divisor
        if ring == "auto":
            if world % ulysses:
                check_degrees(world, ulysses, 1)  # raises, naming the fix
            ring = world // ulysses
        check_degrees(world, ulysses, ring)
        if heads is not None:
            check_heads(heads, 1, ulysses)
        if "auto" in (self.ulysses_degree, self.ring_degree):
            rank_zero_info(f"{type(self).__name__}: auto degrees for {world} ranks ({node_devices} per node, "
                           f"{heads or 'unknown'} attention heads): ulysses {ulysses}, ring {ring}, "
                           f"data parallel {world // (ulysses * ring)}")
        return ulysses, ring

    def setup(self, trainer) -> None:
        self._checked_stages.clear()
        self._bind_attention()
        super().setup(trainer)

    def _setup_model(self, model):
        # With NCCL, DDP reduces gradients over a high-priority copy of the world group, as the ring
        # and Ulysses transfers do (mesh.priority_world_group). Its all-reduces start while attention
        # kernels hold every SM: from a normal-priority stream one rank's all-reduce got SMs only
        # after its attention kernel ended while the other's spun beside its own, slowing it.
        if "process_group" not in self._ddp_kwargs:
            group = mesh_module.priority_world_group()
            if group is not None:
                self._ddp_kwargs = {**self._ddp_kwargs, "process_group": group}
        return super()._setup_model(model)

    def _bind_attention(self) -> None:
        mesh = self.sp_mesh
        for name, module in self.lightning_module.named_modules():
            if not isinstance(module, LongContextAttention):
                continue
            if module.mesh is None or getattr(module, "_sp_bound_by_strategy", False):
                module.bind(mesh, ring_impl=self.ring_impl, backend=self.backend, head_groups=self.head_groups)
                module._sp_bound_by_strategy = True
            elif module.ring_impl != self.ring_impl or module.mesh.sp_size != mesh.sp_size:
                raise SPConfigError(
                    f"attention layer {name!r} is bound to its own mesh ({module.mesh.describe()}, layout "
                    f"{module.ring_impl!r}) but the strategy shards batches with layout {self.ring_impl!r} over "
                    f"{mesh.sp_size} ranks; construct it with mesh=None so the strategy binds it")

    # ------------------------------------------------------------------ data
    @property
    def distributed_sampler_kwargs(self) -> dict[str, Any]:
        return {"num_replicas": self.dp_size, "rank": self.dp_rank}

    def process_dataloader(self, dataloader: object) -> object:
        problem = self._sampler_problem(dataloader)
        self._agree(problem)
        trainer = self.lightning_module.trainer if self.lightning_module is not None else None
        if trainer is not None and trainer.training and _sized(dataloader):
            return ResumableLoader(dataloader)
        return dataloader

    def _sampler_problem(self, dataloader) -> str | None:
        for sampler in (getattr(dataloader, "sampler", None),
                        getattr(getattr(dataloader, "batch_sampler", None), "sampler", None)):
            replicas, rank = getattr(sampler, "num_replicas", None), getattr(sampler, "rank", None)
            if isinstance(sampler, DistributedSampler) or (isinstance(replicas, int) and isinstance(rank, int)):
                if (replicas, rank) != (self.dp_size, self.dp_rank):
                    return (f"the dataloader's {type(sampler).__name__} shards over num_replicas={replicas} "
                            f"(rank {rank}), but under sequence parallelism every rank of a sequence-parallel group "
                            f"must get the same samples; shard over the data-parallel dimension only: "
                            f"num_replicas=trainer.strategy.dp_size ({self.dp_size}), "
                            f"rank=trainer.strategy.dp_rank, or leave the sampler to Lightning")
        return None

    def _agree(self, problem: str | None) -> None:
        """Raise the same error on every rank if any rank found a problem (one all-gather, no hang)."""
        problems = [problem]
        if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
            problems = [None] * dist.get_world_size()
            dist.all_gather_object(problems, problem)
        for rank, found in enumerate(problems):
            if found is not None:
                raise SPConfigError(f"rank {rank}: {found}" if len(problems) > 1 else found)

    def batch_to_device(self, batch: Any, device=None, dataloader_idx: int = 0) -> Any:
        batch = super().batch_to_device(batch, device, dataloader_idx)  # user hooks see the full sequence
        stage = self.lightning_module.trainer.state.stage if self.lightning_module is not None else None
        first = stage not in self._checked_stages
        try:
            problem, sharded = None, self.shard_batch(batch)
        except SPConfigError as err:
            if not first:
                raise
            problem, sharded = str(err), None
        if first:  # configuration errors surface on every rank at the first batch of each loop
            self._agree(problem)
            self._checked_stages.add(stage)
        return sharded

    def shard_batch(self, batch: Mapping) -> dict:
        """This rank's part of a batch of full sequences (see the module docstring); records ``last_shard``."""
        if not isinstance(batch, Mapping):
            raise SPConfigError(f"{type(self).__name__} needs batches that are dicts (e.g. with 'input_ids', 'labels'),"
                                f" got {type(batch).__name__}; return a dict from the dataset or collate_fn")
        keys = [k for k in self.shard_keys if k in batch and torch.is_tensor(batch[k])]
        if not keys:
            raise SPConfigError(f"the batch has none of the shard keys {list(self.shard_keys)} (it has "
                                f"{sorted(batch)}); pass shard_keys=[...] naming its sequence tensors")
        if self.check_identical_samples:
            self._check_identical(batch, keys)
        out = dict(batch)
        if "cu_seqlens" in batch:
            return self._shard_packed(out, keys)
        seq_dim = {k: 0 if batch[k].dim() == 1 else 1 for k in keys}
        lengths = {k: batch[k].shape[seq_dim[k]] for k in keys}
        S = lengths[keys[0]]
        if any(n != S for n in lengths.values()):
            raise SPConfigError(f"shard keys have different sequence lengths {lengths}; every shard key needs "
                                f"the same length along dim 1 (dim 0 for 1-D tensors)")
        mesh = self.sp_mesh
        multiple = L.layout_multiple(self.ring_impl, mesh)
        pad = (-S) % multiple
        if pad and not self.pad_to_multiple:
            L.check_seq_len(S, self.ring_impl, mesh)
        if self.shift_labels and "labels" in keys:
            out["labels"] = _shift(out["labels"], seq_dim["labels"], self.ignore_index)
        if "position_ids" not in batch and "input_ids" in keys:
            ids = batch["input_ids"]
            out["position_ids"] = torch.arange(S, device=ids.device).expand(ids.shape[:2] if ids.dim() > 1 else (S,))
            keys.append("position_ids")
            seq_dim["position_ids"] = seq_dim["input_ids"]
        for k in keys:
            x = out[k]
            if pad:  # at the end, where causal attention keeps it from every real token
                fill = {"labels": self.ignore_index, "position_ids": "count"}.get(k, 0)
                x = _pad(x, seq_dim[k], pad, fill)
            out[k] = L.shard(x, mesh, self.ring_impl, dim=seq_dim[k])
        self.last_shard = ShardInfo(S, S + pad, self.ring_impl)
        return out

    def _shard_packed(self, out: dict, keys: list) -> dict:
        cu = torch.as_tensor(out["cu_seqlens"]).to("cpu", torch.int64).flatten()
        seq_dim = {}
        for k in keys:
            x = out[k]
            if x.dim() > 1 and x.shape[0] != 1:
                raise SPConfigError(f"a packed batch (with cu_seqlens) must have batch size 1; {k!r} has shape "
                                    f"{tuple(x.shape)}; pack the documents of a batch into one row")
            seq_dim[k] = x.dim() - 1 if x.dim() == 1 else 1
            if x.shape[seq_dim[k]] != int(cu[-1]):
                raise SPConfigError(f"cu_seqlens ends at {int(cu[-1])} but {k!r} has {x.shape[seq_dim[k]]} tokens; "
                                    f"cu_seqlens must describe the packed sequence")
        packed = L.shard_documents(cu, self.sp_mesh, self.ring_impl)
        if self.shift_labels and "labels" in keys:
            labels = _shift(out["labels"], seq_dim["labels"], self.ignore_index)
            ends = (cu[1:] - 1)[cu[1:] > cu[:-1]].to(labels.device)  # no label crosses a document boundary
            out["labels"] = labels.index_fill(seq_dim["labels"], ends, self.ignore_index)
        device = out[keys[0]].device
        for k in keys:
            fill = self.ignore_index if k == "labels" else 0
            out[k] = packed.shard(out[k], dim=seq_dim[k], pad_value=fill)
        if "position_ids" not in keys:
            out["position_ids"] = packed.position_ids.to(device).view(1, -1)
        out["cu_seqlens"] = packed.cu_seqlens.to(device)
        out["max_seqlen"] = packed.max_seqlen
        self.last_shard = ShardInfo(packed.total_tokens, len(packed.slot_to_token), self.ring_impl, packed)
        return out

    def _check_identical(self, batch: Mapping, keys) -> None:
        """All ranks of each sequence-parallel group must hold the same sample: compare fingerprints."""
        prints = []
        for k in keys:
            x = batch[k].detach().to(torch.float64).flatten()
            weights = torch.arange(1, x.numel() + 1, dtype=torch.float64, device=x.device).remainder(9973) + 1
            prints += [float(x.numel()), float(x.sum()), float((x * weights).sum())]
        mesh = self.sp_mesh
        mine = torch.tensor(prints, dtype=torch.float64)
        gathered = [torch.zeros_like(mine) for _ in range(mesh.world_size)]
        dist.all_gather(gathered, mine.to(self.root_device))  # the whole world, so every rank decides alike
        by_rank = torch.stack([g.cpu() for g in gathered])  # rank order is dp-major: (dp, sp) blocks
        groups = by_rank.view(mesh.dp_size, mesh.sp_size, -1)
        bad = [d for d in range(mesh.dp_size) if not torch.equal(groups[d], groups[d, :1].expand_as(groups[d]))]
        if bad:
            raise SPConfigError(f"ranks of sequence-parallel group(s) {bad} received different samples (keys "
                                f"{list(keys)}); every rank of a group must get the same batch: shard data over "
                                f"trainer.strategy.dp_rank / dp_size only")

    def gather_sequence(self, x_local: torch.Tensor, dim: int = 1) -> torch.Tensor:
        """Collective over the sequence-parallel group: the last batch's full-sequence ``x`` in original
        order, padding dropped (for predict outputs). ``dim`` is the sequence dim (packed: the token dim)."""
        info = self.last_shard
        if info is None:
            raise RuntimeError("gather_sequence() needs a batch sharded by this strategy first")
        if info.packed is not None:
            return info.packed.unshard(x_local, self.sp_mesh, dim=dim)
        full = L.unshard(x_local, self.sp_mesh, info.layout, dim=dim)
        return full.narrow(dim, 0, info.seq_len)

    # ------------------------------------------------------------------ checkpoints
    def _extra_state(self) -> dict:
        """RNG state (of global rank 0, which writes the checkpoint) for an exact resume."""
        state = {"torch_rng": torch.get_rng_state(), "python_rng": random.getstate(),
                 "mesh": {"dp": self.dp_size, "ring": self.sp_mesh.ring_size, "ulysses": self.sp_mesh.ulysses_size}}
        if torch.cuda.is_available() and self.root_device.type == "cuda":
            state["cuda_rng"] = torch.cuda.get_rng_state(self.root_device)
        return state

    def _restore_extra_state(self, checkpoint: Mapping) -> None:
        self._rng_to_restore = checkpoint.get(CHECKPOINT_KEY)

    def on_train_start(self) -> None:
        super().on_train_start()
        state, self._rng_to_restore = self._rng_to_restore, None
        if state:  # every rank continues rank 0's streams, so a sequence-parallel group draws alike
            torch.set_rng_state(state["torch_rng"])
            random.setstate(state["python_rng"])
            if "cuda_rng" in state and self.root_device.type == "cuda":
                torch.cuda.set_rng_state(state["cuda_rng"], self.root_device)

    def save_checkpoint(self, checkpoint: dict, filepath, storage_options=None) -> None:
        checkpoint[CHECKPOINT_KEY] = self._extra_state()
        super().save_checkpoint(checkpoint, filepath, storage_options)

    def load_checkpoint(self, checkpoint_path, weights_only=None) -> dict:
        checkpoint = super().load_checkpoint(checkpoint_path, weights_only=False if weights_only is None else weights_only)
        self._restore_extra_state(checkpoint)
        return checkpoint


def _sized(loader) -> bool:
    try:
        return len(loader) >= 0
    except (TypeError, NotImplementedError):
        return False


def _shift(labels: torch.Tensor, dim: int, ignore_index: int) -> torch.Tensor:
    """labels[t] <- labels[t + 1] along dim; the last position gets ignore_index."""
    tail = labels.narrow(dim, 1, labels.shape[dim] - 1)
    return torch.cat([tail, _pad(tail.narrow(dim, 0, 0), dim, 1, ignore_index)], dim=dim)


def _pad(x: torch.Tensor, dim: int, n: int, fill=0) -> torch.Tensor:
    """Append n positions along dim, filled with ``fill``; ``fill="count"`` continues counting (positions)."""
    if fill == "count":
        last = x.narrow(dim, x.shape[dim] - 1, 1)
        steps = torch.arange(1, n + 1, device=x.device).view([-1 if d == dim else 1 for d in range(x.dim())])
        return torch.cat([x, last + steps], dim=dim)
    shape = list(x.shape)
    shape[dim] = n
    return torch.cat([x, x.new_full(shape, fill)], dim=dim)


class ResumableLoader:
    """A sized training dataloader whose position in the epoch goes into checkpoints.

    Lightning saves the state of loaders with ``state_dict``/``load_state_dict``; on a resume in the
    middle of an epoch the batches already trained on are skipped (drawn again from the same
    epoch's sampler order, nothing computed), so training continues with the next batch. Lightning
    does not prefetch from sized loaders, so the count is exact. Everything else is the wrapped loader's.
    """

    def __init__(self, loader) -> None:
        self.loader = loader
        self._served = 0
        self._skip = 0

    def __iter__(self):
        skip, self._skip = self._skip, 0
        self._served = 0
        for index, batch in enumerate(self.loader):
            if index < skip:
                continue
            self._served = index + 1
            yield batch

    def __len__(self) -> int:
        return len(self.loader)

    def __getattr__(self, name: str):
        if name == "loader":  # not yet set (e.g. while unpickling)
            raise AttributeError(name)
        return getattr(self.loader, name)

    def state_dict(self) -> dict:
        return {"batches_served": self._served}

    def load_state_dict(self, state: Mapping) -> None:
        served = int(state.get("batches_served", 0))
        self._skip = served if served < len(self.loader) else 0  # a finished epoch: start the next afresh


class UlyssesRingFSDPStrategy(UlyssesRingStrategy):
    """The ``ulysses_ring`` strategy with FSDP2: parameters sharded over the flattened dp x sequence mesh.

    Unless the model already applied ``fully_shard`` itself (in ``configure_model``, with
    ``self.device_mesh``), every block of each ``nn.ModuleList`` and then the LightningModule are
    wrapped with ``fully_shard``. Gradients are reduce-scattered with the average over all ranks, as
    in DDP. Checkpoints are distributed (one folder, a shard per rank, via torch.distributed.checkpoint),
    loadable on another world size.
    """

    strategy_name = "ulysses_ring_fsdp"

    def __init__(self, *args, reshard_after_forward: bool = True, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        from lightning.pytorch.strategies.strategy import _ForwardRedirection
        self._forward_redirection = _ForwardRedirection()
        self._reshard_after_forward = reshard_after_forward
        self._save_distributed_checkpoint = True  # read by the ModelParallelStrategy methods below

    def _setup_model(self, model: torch.nn.Module) -> torch.nn.Module:
        from torch.distributed.fsdp import FSDPModule, fully_shard
        if any(isinstance(m, FSDPModule) for m in model.modules()):
            return model
        mesh = self.sp_mesh.device_mesh
        flat = mesh._flatten("dp_sp") if mesh is not None and mesh.ndim > 1 else mesh
        kw = dict(mesh=flat, reshard_after_forward=self._reshard_after_forward)
        for module in list(model.modules()):
            if isinstance(module, torch.nn.ModuleList):
                for block in module:
                    if any(p.requires_grad for p in block.parameters()):
                        fully_shard(block, **kw)
        fully_shard(model, **kw)
        return model

    def _register_ddp_hooks(self) -> None:
        """DDP communication hooks need a DistributedDataParallel module; FSDP2 has its own
        reduce-scatter (DDPStrategy would assert on CUDA)."""

    def training_step(self, *args, **kwargs):
        # FSDP2 gathers parameters in forward hooks of the (in-place wrapped) module: call it through forward
        with self.precision_plugin.train_step_context():
            return self._forward_redirection(self.model, self.lightning_module, "training_step", *args, **kwargs)

    def validation_step(self, *args, **kwargs):
        from torch.distributed.fsdp import FSDPModule
        if not isinstance(self.model, FSDPModule):
            return super().validation_step(*args, **kwargs)
        with self.precision_plugin.val_step_context():
            return self._forward_redirection(self.model, self.lightning_module, "validation_step", *args, **kwargs)

    # distributed checkpoints of FSDP2 modules: Lightning's ModelParallelStrategy implements them
    restore_checkpoint_after_setup = ModelParallelStrategy.restore_checkpoint_after_setup
    lightning_restore_optimizer = ModelParallelStrategy.lightning_restore_optimizer
    lightning_module_state_dict = ModelParallelStrategy.lightning_module_state_dict
    load_model_state_dict = ModelParallelStrategy.load_model_state_dict
    optimizer_state = ModelParallelStrategy.optimizer_state
    load_optimizer_state_dict = ModelParallelStrategy.load_optimizer_state_dict

    def save_checkpoint(self, checkpoint: dict, filepath, storage_options=None) -> None:
        checkpoint[CHECKPOINT_KEY] = self._extra_state()
        ModelParallelStrategy.save_checkpoint(self, checkpoint, filepath, storage_options)

    def load_checkpoint(self, checkpoint_path, weights_only=None) -> dict:
        checkpoint = ModelParallelStrategy.load_checkpoint(self, checkpoint_path, weights_only=False)
        self._restore_extra_state(checkpoint)
        return checkpoint


def register_strategies(registry=StrategyRegistry) -> None:
    """Register ``ulysses_ring``, ``ulysses``, ``ring`` and ``ulysses_ring_fsdp`` (safe to repeat)."""
    registry.register("ulysses_ring", UlyssesRingStrategy, override=True,
                      description="Ulysses within a node x ring across nodes x data parallelism (DDP)")
    registry.register("ulysses", UlyssesRingStrategy, override=True, ring_degree=1,
                      description="Ulysses sequence parallelism (ring degree 1) x data parallelism (DDP)")
    registry.register("ring", UlyssesRingStrategy, override=True, ulysses_degree=1,
                      description="Ring sequence parallelism over all ranks (ulysses degree 1)")
    registry.register("ulysses_ring_fsdp", UlyssesRingFSDPStrategy, override=True,
                      description="Ulysses x ring sequence parallelism with FSDP2 over the dp x sequence mesh")
