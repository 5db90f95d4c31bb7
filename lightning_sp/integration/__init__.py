"""The Lightning integration: the ``ulysses_ring`` strategies, batch preparation and resumable loading."""
from .strategy import UlyssesRingFSDPStrategy, UlyssesRingStrategy, register_strategies

__all__ = ["UlyssesRingFSDPStrategy", "UlyssesRingStrategy", "register_strategies"]
