"""The ``ulysses_ring_fsdp`` strategy: the ``ulysses_ring`` strategy with FSDP2 in place of DDP.

It subclasses :class:`~lightning_sp.integration.strategy.UlyssesRingStrategy` and so Lightning's
``DDPStrategy``, which starts the processes and the process group; where DDP wraps the model
(``configure_ddp``) this one applies ``fully_shard``, and its checkpoints are distributed (see
:mod:`.checkpoint`). Lightning's ``ModelParallelStrategy`` is not the base: Lightning refuses
``precision="64-true"`` and ``"16-mixed"`` for any instance of it, it requires ``configure_model``
to apply the parallelism itself and builds its own (data, tensor)-parallel mesh, and it creates
the model on the CPU (other initial weights than on the device).
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from lightning.pytorch.core.optimizer import LightningOptimizer
from typing_extensions import override

from ..core.mesh import SPMesh
from .checkpoint import CHECKPOINT_KEY, load_distributed, rng_state, save_distributed
from .strategy import UlyssesRingStrategy


def fully_shard_model(model: torch.nn.Module, mesh: SPMesh, reshard_after_forward: bool = True) -> torch.nn.Module:
    """``fully_shard`` every trainable block of each ``nn.ModuleList``, then the whole model, over the
    flattened dp x sequence mesh; a model that applied ``fully_shard`` itself is left as it is."""
    from torch.distributed.fsdp import FSDPModule, fully_shard

    if any(isinstance(m, FSDPModule) for m in model.modules()):
        return model
    device_mesh = mesh.device_mesh
    flat = device_mesh._flatten("dp_sp") if device_mesh is not None and device_mesh.ndim > 1 else device_mesh
    kwargs = dict(mesh=flat, reshard_after_forward=reshard_after_forward)
    for module in list(model.modules()):
        if isinstance(module, torch.nn.ModuleList):
            for block in module:
                if any(p.requires_grad for p in block.parameters()):
                    fully_shard(block, **kwargs)
    fully_shard(model, **kwargs)
    return model


class UlyssesRingFSDPStrategy(UlyssesRingStrategy):
    """The ``ulysses_ring`` strategy with FSDP2: parameters sharded over the flattened dp x sequence mesh.

    Unless the model already applied ``fully_shard`` itself (in ``configure_model``, with
    ``self.device_mesh``), every block of each ``nn.ModuleList`` and then the LightningModule are
    wrapped with ``fully_shard`` when fitting. Gradients are reduce-scattered with the average over
    all ranks, as in DDP. Checkpoints are distributed (one folder, a shard per rank, via
    torch.distributed.checkpoint), loadable on another world size.

    Args:
        reshard_after_forward: passed to ``fully_shard``.
        *args, **kwargs: those of :class:`~lightning_sp.integration.strategy.UlyssesRingStrategy`.
    """

    strategy_name = "ulysses_ring_fsdp"

    def __init__(self, *args: Any, reshard_after_forward: bool = True, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.reshard_after_forward = reshard_after_forward

    @classmethod
    @override
    def register_strategies(cls, strategy_registry) -> None:
        """``ulysses_ring_fsdp``."""
        strategy_registry.register("ulysses_ring_fsdp", cls, override=True,
                                   description="Ulysses x ring sequence parallelism with FSDP2 over the dp x sequence mesh")

    @override
    def configure_ddp(self) -> None:
        """Shard the model with FSDP2 where the DDP strategy wraps it in DistributedDataParallel."""
        self.model = fully_shard_model(self.model, self.sp_mesh, self.reshard_after_forward)

    # fully_shard changes the module in place (self.model is the LightningModule), so Lightning would
    # call a step directly, skipping the forward hooks in which FSDP2 gathers the parameters: the
    # steps of a sharded model go through its forward.
    def _step(self, name: str, context, *args: Any, **kwargs: Any) -> Any:
        from torch.distributed.fsdp import FSDPModule

        if not isinstance(self.model, FSDPModule):
            return getattr(super(), name)(*args, **kwargs)
        with context():
            return self._forward_redirection(self.model, self.lightning_module, name, *args, **kwargs)

    @override
    def training_step(self, *args: Any, **kwargs: Any) -> Any:
        return self._step("training_step", self.precision_plugin.train_step_context, *args, **kwargs)

    @override
    def validation_step(self, *args: Any, **kwargs: Any) -> Any:
        return self._step("validation_step", self.precision_plugin.val_step_context, *args, **kwargs)

    @override
    def test_step(self, *args: Any, **kwargs: Any) -> Any:
        return self._step("test_step", self.precision_plugin.test_step_context, *args, **kwargs)

    @override
    def predict_step(self, *args: Any, **kwargs: Any) -> Any:
        return self._step("predict_step", self.precision_plugin.predict_step_context, *args, **kwargs)

    # ------------------------------------------------------------------ distributed checkpoints
    @property
    @override
    def restore_checkpoint_after_setup(self) -> bool:
        return True  # the shards load into the sharded model

    @property
    @override
    def lightning_restore_optimizer(self) -> bool:
        return False  # load_checkpoint loads the optimizer states

    @override
    def lightning_module_state_dict(self) -> dict[str, Any]:
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

        return get_model_state_dict(self.model, options=StateDictOptions(cpu_offload=True))

    @override
    def optimizer_state(self, optimizer) -> dict[str, Any]:
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict

        if isinstance(optimizer, LightningOptimizer):
            optimizer = optimizer._optimizer
        return get_optimizer_state_dict(self.model, optimizer, options=StateDictOptions(cpu_offload=True))

    @override
    def load_model_state_dict(self, checkpoint, strict: bool = True) -> None:
        """Nothing to do: load_checkpoint loaded the model's shards."""

    @override
    def load_optimizer_state_dict(self, checkpoint) -> None:
        """Nothing to do: load_checkpoint loaded the optimizer states."""

    @override
    def save_checkpoint(self, checkpoint: dict, filepath, storage_options=None) -> None:
        if storage_options is not None:
            raise TypeError(f"{type(self).__name__}.save_checkpoint(..., storage_options=...) is not supported: "
                            f"distributed checkpoints are written by torch.distributed.checkpoint, not a CheckpointIO")
        checkpoint[CHECKPOINT_KEY] = rng_state(self.sp_mesh, self.root_device)
        save_distributed(checkpoint, Path(self.broadcast(filepath)), self.is_global_zero)

    @override
    def load_checkpoint(self, checkpoint_path, weights_only=None) -> dict:
        path = Path(self.broadcast(checkpoint_path))
        checkpoint = load_distributed(path, self.model, self.optimizers, strict=self.lightning_module.strict_loading)
        self._rng_to_restore = checkpoint.get(CHECKPOINT_KEY)
        return checkpoint
