"""The Lightning integration: the ``ulysses_ring`` strategies, batch preparation and resumable loading."""
from lightning.pytorch.strategies import StrategyRegistry

from .batch import ShardInfo, gather_sequence, prepare_batch, prepared_batch
from .fsdp import UlyssesRingFSDPStrategy
from .loading import ResumableLoader
from .strategy import UlyssesRingStrategy


def register_strategies(registry=StrategyRegistry) -> None:
    """Register ``ulysses_ring``, ``ulysses``, ``ring`` and ``ulysses_ring_fsdp`` (safe to repeat)."""
    UlyssesRingStrategy.register_strategies(registry)
    UlyssesRingFSDPStrategy.register_strategies(registry)


__all__ = ["ResumableLoader", "ShardInfo", "UlyssesRingFSDPStrategy", "UlyssesRingStrategy", "gather_sequence",
           "prepare_batch", "prepared_batch", "register_strategies"]
