"""The ``ulysses_ring`` strategy: DDP whose ranks also split every sequence.

What it adds to data parallelism, in the order a batch meets it:

* ``setup_environment`` resolves the :class:`~lightning_sp.core.config.SPConfig` (``"auto"`` degrees
  from the model's attention heads, read without building the model, see :mod:`.binding`) and
  builds the dp x ring x ulysses :class:`~lightning_sp.core.mesh.SPMesh`; ``setup`` binds every unbound
  :class:`~lightning_sp.core.attention.LongContextAttention` of the model to it (a model without
  one, whose own attention would see only its shard, is an error naming ``swap_attention``);
* the distributed sampler shards over the data-parallel dimension only, so every rank of a
  sequence-parallel group trains on the same samples;
* ``batch_to_device`` prepares every batch with :func:`~lightning_sp.integration.batch.prepare_batch`
  (labels shifted on the full sequence, global ``position_ids``, padding, this rank's tokens, and
  ``shift_labels`` / ``num_items_in_batch`` for Hugging Face's loss), the ranks agreeing that every
  batch is valid; the attention layers learn the batch's packed documents from the strategy's
  :class:`~lightning_sp.core.attention.hybrid.SequenceContext`, so a model called with only
  ``input_ids`` and ``position_ids`` (Hugging Face's packed convention) attends within documents;
  packed documents are placed on the ring ranks by causal work (``document_placement="work"``, the
  default: short documents whole on one rank, the layers attend over that placement) or split over
  every ring rank with the layout (``"spread"``);
* gradients are averaged over all world ranks, as DDP does; :mod:`lightning_sp.core.loss` makes the
  loss exact. The strategy never rescales a loss.
"""
from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from lightning.pytorch.strategies import DDPStrategy
from lightning.pytorch.utilities.rank_zero import rank_zero_info
from typing_extensions import override

from ..core import mesh as mesh_module
from ..core.attention.hybrid import SequenceContext
from ..core.config import SPConfig
from ..core.errors import SPConfigError
from ..core.mesh import SPMesh, build_mesh
from .agreement import raise_if_any, sampler_problem
from .batch import DEFAULT_SHARD_KEYS, ShardInfo, gather_sequence, prepare_batch
from .binding import bind_attention, check_backend_device, find_attention_heads
from .checkpoint import CHECKPOINT_KEY, restore_rng_state, rng_state
from .loading import ResumableLoader, is_sized


def _is_degree(value) -> bool:
    return value == "auto" or (isinstance(value, int) and not isinstance(value, bool) and value >= 1)


class UlyssesRingStrategy(DDPStrategy):
    """DDP whose ranks also split every sequence: Ulysses within a node, ring across nodes.

    Args:
        ulysses_degree: ranks of one Ulysses (all-to-all) group, or ``"auto"``: the largest degree that
            divides the devices of a node and the model's attention heads.
        ring_degree: ranks of one ring, or ``"auto"``: all remaining ranks (data parallelism 1).
        ring_impl: the token layout of the ring, one of ``lightning_sp.layout.LAYOUTS``.
        backend: attention kernel backend bound into the model's attention layers (None keeps theirs);
            an unknown name is an error here, a CUDA-only one (``fa4``, ``cudnn``, ``flash``,
            ``efficient``) on a CPU run an error in ``setup_environment``.
        shift_labels: make ``labels[t] = labels[t + 1]`` on the full sequence before sharding (the last
            position, and in packed batches each document's last token, gets ``ignore_index``).
        ignore_index: label value of positions the loss ignores (shifting and padding use it).
        shard_keys: batch keys split along the sequence (dim 1; dim 0 for 1-D tensors); other keys pass
            through unchanged. Default: input_ids, labels, position_ids, attention_mask when present.
        attention_heads: query heads of the model's attention, for ``"auto"`` and the early check;
            None reads ``num_attention_heads``/``num_heads``/``n_heads``/``n_head`` from the model, its
            config, or the config given to the model factory of a module that builds it in ``configure_model``.
        check_identical_samples: check on every batch that all ranks of a sequence-parallel group
            received the same token values (the keys and shapes are always checked).
        pad_to_multiple: pad sequences to the layout's multiple (else such a sequence is an error).
        transport: how the ring and the all-to-all move data between ranks (``lightning_sp.comm``):
            ``auto`` (today torch.distributed, see the module's doc), ``nccl``, or ``copy_engine``
            (the GPUs' copy engines within a node); None takes ``lightning_sp.comm``'s default (``auto``,
            or the ``LIGHTNING_SP_TRANSPORT`` environment variable), read when the strategy is made.
        document_placement: where a packed batch's documents go over a ring of several ranks:
            ``"work"`` (default) places them by causal work, each short document whole on one ring rank
            and only long ones split over as few ranks as the balance needs, so the ring carries only
            those (attention over the batch must be causal); ``"spread"`` splits every document over
            every ring rank with ``ring_impl``. See :mod:`lightning_sp.core.placement`.
        head_groups: how many head groups the layers' Ulysses all-to-all is split into, so that one group's
            communication overlaps another's attention (``"auto"`` or an int; None keeps theirs, see
            ``lightning_sp.attention.ulysses.choose_head_groups``).
        require_sp_attention: when sequences are split over several ranks, a model without any
            :class:`~lightning_sp.core.attention.LongContextAttention` fails at setup (its own
            attention would see only this rank's shard), naming ``lightning_sp.swap_attention``.
            False: the model has no attention layers, or calls lightning_sp's attention functions
            with ``trainer.strategy.sp_mesh`` itself.
        **kwargs: passed to :class:`~lightning.pytorch.strategies.DDPStrategy`. Without a
            ``process_group`` there, gradients are reduced over a high-priority NCCL copy of the world
            group (``lightning_sp.mesh.priority_world_group``) when the backend is NCCL.
    """

    strategy_name = "ulysses_ring"

    @classmethod
    @override
    def register_strategies(cls, strategy_registry) -> None:
        """``ulysses_ring``, ``ulysses`` (ring degree 1) and ``ring`` (ulysses degree 1)."""
        strategy_registry.register("ulysses_ring", cls, override=True,
                                   description="Ulysses within a node x ring across nodes x data parallelism (DDP)")
        strategy_registry.register("ulysses", cls, override=True, ring_degree=1,
                                   description="Ulysses sequence parallelism (ring degree 1) x data parallelism (DDP)")
        strategy_registry.register("ring", cls, override=True, ulysses_degree=1,
                                   description="Ring sequence parallelism over all ranks (ulysses degree 1)")

    def __init__(self, ulysses_degree: int | str = "auto", ring_degree: int | str = "auto", ring_impl: str = "zigzag",
                 backend: str | None = None, shift_labels: bool = True, ignore_index: int = -100,
                 shard_keys=None, attention_heads: int | None = None, check_identical_samples: bool = False,
                 pad_to_multiple: bool = True, transport: str | None = None, head_groups: int | str | None = None,
                 require_sp_attention: bool = True, document_placement: str = "work", **kwargs: Any) -> None:
        for name, value in (("ulysses_degree", ulysses_degree), ("ring_degree", ring_degree)):
            if not _is_degree(value):
                raise SPConfigError(f"{name} must be a positive int or 'auto', got {value!r}")
        # the choices other than the degrees, validated now (before any process starts); the world
        # size and so the degrees are known in setup_environment, where sp_config is resolved
        self._choices = SPConfig(layout=ring_impl, backend=backend, head_groups=head_groups, transport=transport,
                                 document_placement=document_placement)
        super().__init__(**kwargs)
        self.ulysses_degree, self.ring_degree = ulysses_degree, ring_degree
        self.shift_labels, self.ignore_index = shift_labels, ignore_index
        self.shard_keys = tuple(DEFAULT_SHARD_KEYS if shard_keys is None else shard_keys)
        self.attention_heads = attention_heads
        self.check_identical_samples = check_identical_samples
        self.pad_to_multiple = pad_to_multiple
        self.require_sp_attention = require_sp_attention
        self.sp_config: SPConfig | None = None  # the resolved configuration, from setup_environment on
        self._sp_mesh: SPMesh | None = None
        self._rng_to_restore: dict | None = None
        self.sequence_context = SequenceContext()  # the prepared batch's packing, read by the bound layers

    # ------------------------------------------------------------------ configuration and mesh
    @property
    def ring_impl(self) -> str:
        """The ring's token layout (canonical name)."""
        return self._choices.layout

    @property
    def backend(self) -> str | None:
        """The kernel backend bound into the attention layers (None: each keeps its own)."""
        return self._choices.backend

    @property
    def head_groups(self) -> int | str | None:
        """The head groups bound into the attention layers (None: each keeps its own)."""
        return self._choices.head_groups

    @property
    def document_placement(self) -> str:
        """Where packed documents go: ``work`` or ``spread``."""
        return self._choices.document_placement

    @property
    def sp_mesh(self) -> SPMesh:
        """This rank's dp x ring x ulysses mesh (from setup_environment on)."""
        if self._sp_mesh is None:
            raise RuntimeError("the sequence-parallel mesh is built in setup_environment(); it does not exist yet")
        return self._sp_mesh

    @property
    def dp_rank(self) -> int:
        """This rank's index along the data-parallel dimension (shard iterable datasets by it)."""
        return self.sp_mesh.dp_rank

    @property
    def dp_size(self) -> int:
        """The data-parallel degree (shard iterable datasets by it)."""
        return self.sp_mesh.dp_size

    def resolve_config(self, world_size: int, node_devices: int, attention_heads: int | None = None) -> SPConfig:
        """The configuration for ``world_size`` ranks with ``node_devices`` per node: explicit degrees
        validated, ``"auto"`` ones chosen (Ulysses within a node as far as the heads allow)."""
        choices = self._choices
        config = SPConfig.resolve(world_size, self.ulysses_degree, self.ring_degree, node_devices=node_devices,
                                  attention_heads=attention_heads, layout=choices.layout, backend=choices.backend,
                                  head_groups=choices.head_groups, transport=choices.transport,
                                  document_placement=choices.document_placement)
        if "auto" in (self.ulysses_degree, self.ring_degree):
            rank_zero_info(f"{type(self).__name__}: auto degrees for {world_size} ranks ({node_devices} per node, "
                           f"{attention_heads or 'unknown'} attention heads): ulysses {config.ulysses_degree}, "
                           f"ring {config.ring_degree}, data parallel {config.dp_size}")
        return config

    @override
    def setup_environment(self) -> None:
        super().setup_environment()  # joins or creates the default process group
        # the configuration and its mesh, before configure_model (which sees LightningModule.device_mesh)
        heads = self.attention_heads if self.attention_heads is not None else find_attention_heads(self.lightning_module)
        self.sp_config = self.resolve_config(self.world_size, self.num_processes, heads)
        check_backend_device(self.sp_config.backend, self.root_device)
        self._sp_mesh = build_mesh(self.sp_config, device_type=self.root_device.type)
        if self.lightning_module is not None:
            self.lightning_module._device_mesh = self._sp_mesh.device_mesh
        rank_zero_info(f"{type(self).__name__}: {self.sp_config.describe()}")

    @override
    def setup(self, trainer) -> None:
        bind_attention(self.lightning_module, self.sp_mesh, require=self.require_sp_attention,
                       context=self.sequence_context)
        super().setup(trainer)

    @override
    def _setup_model(self, model: torch.nn.Module) -> torch.nn.Module:
        # With NCCL, DDP reduces gradients over a high-priority copy of the world group, as the ring
        # and Ulysses transfers do (mesh.priority_world_group). Its all-reduces start while attention
        # kernels hold every SM: from a normal-priority stream one rank's all-reduce got SMs only
        # after its attention kernel ended while the other's spun beside its own, slowing it.
        if "process_group" not in self._ddp_kwargs:
            group = mesh_module.priority_world_group()
            if group is not None:
                self._ddp_kwargs = {**self._ddp_kwargs, "process_group": group}
        return super()._setup_model(model)

    # ------------------------------------------------------------------ data
    @property
    @override
    def distributed_sampler_kwargs(self) -> dict[str, Any]:
        return {"num_replicas": self.dp_size, "rank": self.dp_rank}

    @override
    def process_dataloader(self, dataloader: object) -> object:
        raise_if_any(sampler_problem(dataloader, self.dp_size, self.dp_rank))
        dataloader = super().process_dataloader(dataloader)
        trainer = self.lightning_module.trainer if self.lightning_module is not None else None
        if trainer is not None and trainer.training and is_sized(dataloader):
            return ResumableLoader(dataloader)
        return dataloader

    @override
    def batch_to_device(self, batch: Any, device=None, dataloader_idx: int = 0) -> Any:
        batch = super().batch_to_device(batch, device, dataloader_idx)  # user hooks see the full sequence
        return self.shard_batch(batch)

    def shard_batch(self, batch: Mapping) -> dict:
        """This rank's part of a batch of full sequences (collective: the ranks agree it is valid);
        ``batch["shard_info"]`` of the result is what :meth:`gather_sequence` needs."""
        local, info = prepare_batch(batch, self.sp_mesh, shift_labels=self.shift_labels,
                                    ignore_index=self.ignore_index, shard_keys=self.shard_keys,
                                    pad_to_multiple=self.pad_to_multiple, check_identical=self.check_identical_samples)
        self.sequence_context.set(local.get("position_ids"), local.get("cu_seqlens"), local.get("max_seqlen"),
                                  info.placement)
        return local

    def gather_sequence(self, x_local: torch.Tensor, shard_info: ShardInfo, dim: int = 1) -> torch.Tensor:
        """Collective over the sequence-parallel group: the full-sequence ``x`` of a prepared batch in
        original order, padding dropped (for predict outputs): pass ``batch["shard_info"]``."""
        return gather_sequence(x_local, shard_info, dim=dim)

    @override
    def teardown(self) -> None:
        self.sequence_context.set(None)  # calls after the fit are not on its last batch
        super().teardown()

    # ------------------------------------------------------------------ checkpoints
    @override
    def save_checkpoint(self, checkpoint: dict, filepath, storage_options=None) -> None:
        checkpoint[CHECKPOINT_KEY] = rng_state(self.sp_mesh, self.root_device)
        super().save_checkpoint(checkpoint, filepath, storage_options)

    @override
    def load_checkpoint(self, checkpoint_path, weights_only=None) -> dict:
        # the checkpoint holds Python RNG state, which torch.load's weights_only mode refuses
        checkpoint = super().load_checkpoint(checkpoint_path, weights_only=False if weights_only is None else weights_only)
        self._rng_to_restore = checkpoint.get(CHECKPOINT_KEY)
        return checkpoint

    @override
    def on_train_batch_start(self, batch: Any, batch_idx: int) -> None:
        super().on_train_batch_start(batch, batch_idx)
        # at the first batch after a resume, not at on_train_start: starting the dataloader draws its
        # seed from torch's generator, which the uninterrupted run did before the checkpoint
        state, self._rng_to_restore = self._rng_to_restore, None
        if state:  # every rank continues rank 0's streams, so a sequence-parallel group draws alike
            restore_rng_state(state, self.root_device)
