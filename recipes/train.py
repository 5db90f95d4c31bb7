"""Train a causal LM with sequence parallelism: `python recipes/train.py [group=option ...] [key=value ...]`.

The configuration lives in conf/ (see docs/recipes.md). Lightning's launcher starts the
trainer's processes: each re-runs this script with the same overrides and joins the run directory.
Resume with `ckpt_path=<file>` or `ckpt_path=last` (conf/train.yaml).
"""
from __future__ import annotations

from pathlib import Path

import hydra
import lightning as L
import torch
from hydra.utils import instantiate
from lightning.pytorch.plugins.environments import SLURMEnvironment
from omegaconf import DictConfig, OmegaConf
from torch.utils.data import DataLoader


def build(cfg: DictConfig):
    """(trainer, module, datamodule) from a composed config."""
    datamodule = instantiate(cfg.data)
    module = instantiate(cfg.module, model=instantiate(cfg.model))
    trainer_cfg = OmegaConf.to_container(cfg.trainer, resolve=True)
    # trainer.callbacks: named entries (conf/trainer/default.yaml; null drops one) or a plain list
    callbacks = trainer_cfg.pop("callbacks", None) or []
    callbacks = [instantiate(c) for c in (callbacks.values() if isinstance(callbacks, dict) else callbacks) if c]
    trainer = instantiate(trainer_cfg, strategy=instantiate(cfg.strategy), callbacks=callbacks)
    return trainer, module, datamodule


def resume_path(cfg: DictConfig, trainer: L.Trainer) -> str | None:
    """``cfg.ckpt_path`` (a file, ``last`` or null), except in a requeued SLURM job: there None, so that
    Lightning resumes from the job's own newest ``hpc_ckpt_<n>.ckpt``, written after the file the first
    job started from (with a path given, Lightning would start from that file again)."""
    if SLURMEnvironment.detect() and any(Path(trainer.default_root_dir).glob("hpc_ckpt_*.ckpt")):
        return None
    return cfg.ckpt_path


def prompt_batch(datamodule) -> dict:
    """The first training sample, cut before its first answer (the first labelled token after at least
    one token of prompt), as a prediction batch."""
    sample = datamodule.train[0]
    answer = 1 + int((sample["labels"][1:] != -100).nonzero()[0])
    return {"input_ids": sample["input_ids"][None, :answer], "prompt_length": answer,
            "answer": int(sample["labels"][answer])}


@hydra.main(version_base="1.3", config_path="../conf", config_name="train")
def main(cfg: DictConfig) -> float:
    L.seed_everything(cfg.seed, workers=True)
    trainer, module, datamodule = build(cfg)
    trainer.fit(module, datamodule, ckpt_path=resume_path(cfg, trainer))
    loss = float(trainer.callback_metrics.get("train/loss", torch.tensor(float("nan"))))
    if cfg.predict_after_fit:
        batch = prompt_batch(datamodule)
        answer = batch.pop("answer")
        logits = trainer.predict(module, DataLoader([batch], batch_size=None))[0]
        if trainer.is_global_zero:
            print(f"predicted next token {int(logits.argmax())}, expected {answer}")
    return loss


if __name__ == "__main__":
    main()
