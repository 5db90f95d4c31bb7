"""What the strategies add to Lightning's checkpoints.

* RNG streams: the checkpoint carries rank 0's torch, Python and CUDA generator states under
  ``checkpoint["lightning_sp"]``; on resume every rank continues rank 0's streams from the first
  training batch on, so the ranks of a sequence-parallel group draw alike (e.g. dropout over one
  sequence) and the draws are those of an uninterrupted run.
* Distributed checkpoints of FSDP2 modules: a folder with each rank's shard of the model and
  optimizer states (torch.distributed.checkpoint, loadable on another world size) and the rest of
  Lightning's checkpoint in ``meta.pt``, the layout Lightning's ``ModelParallelStrategy`` writes.
"""
from __future__ import annotations

import random
from pathlib import Path

import torch

from ..core.errors import SPConfigError
from ..core.mesh import SPMesh

CHECKPOINT_KEY = "lightning_sp"
METADATA_FILE = "meta.pt"


def rng_state(mesh: SPMesh, device: torch.device) -> dict:
    """This rank's RNG streams (saved from global rank 0, which writes the checkpoint) and the mesh."""
    state = {"torch_rng": torch.get_rng_state(), "python_rng": random.getstate(),
             "mesh": {"dp": mesh.dp_size, "ring": mesh.ring_size, "ulysses": mesh.ulysses_size}}
    if device.type == "cuda":
        state["cuda_rng"] = torch.cuda.get_rng_state(device)
    return state


def restore_rng_state(state: dict, device: torch.device) -> None:
    """Continue the streams of :func:`rng_state` on this rank."""
    torch.set_rng_state(state["torch_rng"])
    random.setstate(state["python_rng"])
    if "cuda_rng" in state and device.type == "cuda":
        torch.cuda.set_rng_state(state["cuda_rng"], device)


def save_distributed(checkpoint: dict, path: Path, is_global_zero: bool) -> None:
    """Collective: write ``checkpoint`` (whose ``state_dict`` and ``optimizer_states`` hold sharded
    states) as a folder of shards plus ``meta.pt``."""
    from torch.distributed.checkpoint import save

    if path.is_file():
        path.unlink()
    path.mkdir(parents=True, exist_ok=True)
    shards = {"state_dict": checkpoint.pop("state_dict")}
    shards.update({f"optimizer_{i}": s for i, s in enumerate(checkpoint.pop("optimizer_states", []))})
    save(shards, checkpoint_id=path)
    if is_global_zero:
        torch.save(checkpoint, path / METADATA_FILE)


def load_distributed(path: Path, model: torch.nn.Module, optimizers, strict: bool = True) -> dict:
    """Collective: load a folder of :func:`save_distributed` into ``model`` and ``optimizers`` (as
    sharded now, whatever the world size that wrote it); returns the rest of the checkpoint."""
    from torch.distributed.checkpoint import load
    from torch.distributed.checkpoint.state_dict import (StateDictOptions, get_model_state_dict,
                                                         get_optimizer_state_dict, set_optimizer_state_dict)

    if not (path.is_dir() and (path / METADATA_FILE).is_file()):
        raise SPConfigError(f"{str(path)!r} is not a distributed checkpoint (a folder with {METADATA_FILE}); the "
                            f"ulysses_ring_fsdp strategy writes and reads those: pass the folder it saved")
    state = {"state_dict": get_model_state_dict(model)}
    load(state, checkpoint_id=path)
    model.load_state_dict(state["state_dict"], strict=strict)
    for i, optimizer in enumerate(optimizers):
        key = f"optimizer_{i}"
        state = {key: get_optimizer_state_dict(model, optimizer)}
        load(state, checkpoint_id=path)
        set_optimizer_state_dict(model, optimizer, optim_state_dict=state[key],
                                 options=StateDictOptions(cpu_offload=True))
    return torch.load(path / METADATA_FILE, weights_only=False)
