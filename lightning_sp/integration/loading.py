"""Resumable loading: a training dataloader whose position in the epoch goes into checkpoints."""
from __future__ import annotations

from collections.abc import Mapping


def is_sized(loader) -> bool:
    """Whether ``len(loader)`` works (a map-style dataset's loader)."""
    try:
        return len(loader) >= 0
    except (TypeError, NotImplementedError):
        return False


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
