"""A LightningModule for causal-LM training and sequence-parallel prefill.

It trains :class:`lightning_sp.models.LlamaForCausalLM` or a Hugging Face causal LM with the exact
token-mean loss, whatever the sharding and padding, and logs the loss, tokens/s (the batches' own
tokens, padding left out) and MFU (the attention of packed documents counted document by document). Batches
are the dicts of :mod:`lightning_sp.data`: ``input_ids``, ``labels`` aligned with the inputs and, for
packed documents, global ``cu_seqlens``. Each step works on a batch prepared by
:func:`lightning_sp.integration.batch.prepare_batch` (labels shifted, global ``position_ids``, local
``cu_seqlens``): a sequence-parallel strategy prepares batches itself (they carry ``shard_info``);
under any other strategy this module prepares them for one process.
"""
from __future__ import annotations

import math
import time
from typing import Callable

import lightning as L
import torch
import torch.distributed as dist
from torch import nn

from ..core.attention import LongContextAttention
from ..core.errors import SPConfigError
from ..core.loss import TokenLoss, exact_token_loss
from ..integration.batch import SHARD_INFO, prepared_batch
from .models import swap_attention
from .models.config import attended_keys
from .models.hf import attention_layers, causal_lm_logits, causal_lm_loss_sum, is_hf_model, layer_window

# dense bf16 peak of one device, for MFU when peak_tflops is not given
PEAK_TFLOPS = {"H100": 989.0, "H200": 989.0, "A100": 312.0, "B200": 2250.0}


def _world() -> int:
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


class CausalLM(L.LightningModule):
    """Causal-LM training with the exact loss.

    ``model`` is a module or a zero-argument callable that builds one (a Hydra ``_partial_``), kept as
    ``model_factory`` and called in ``configure_model`` so that large models can be created under the
    strategy's init context. When the strategy is sequence-parallel (it has an ``sp_config``) the
    model's attention is swapped for :class:`LongContextAttention` there, for the strategy to bind;
    otherwise it keeps its own attention.
    """

    def __init__(self, model: nn.Module | Callable[[], nn.Module], lr: float = 1e-3, weight_decay: float = 0.0,
                 betas: tuple[float, float] = (0.9, 0.95), warmup_steps: int = 0, min_lr_ratio: float = 0.1,
                 ignore_index: int = -100, peak_tflops: float | None = None):
        super().__init__()
        self.save_hyperparameters(ignore=["model"])
        if isinstance(model, nn.Module):
            self.model = model
        elif callable(model):
            self.model_factory = model
        else:
            raise SPConfigError(f"model must be an nn.Module or a callable building one, got {type(model).__name__}")
        self._step_start = None

    # -- model ---------------------------------------------------------------------------------
    def configure_model(self) -> None:
        if not hasattr(self, "model"):
            self.model = self.model_factory()
        if self._sequence_parallel() and not any(isinstance(m, LongContextAttention) for m in self.model.modules()):
            swap_attention(self.model)  # the strategy binds the mesh, layout and backend

    def _sequence_parallel(self) -> bool:
        """Whether the strategy splits sequences (it carries a sequence-parallel configuration)."""
        return self._trainer is not None and getattr(self.trainer.strategy, "sp_config", None) is not None

    # -- batches -------------------------------------------------------------------------------
    def prepare_batch(self, batch: dict) -> dict:
        """This rank's part of the batch: as the strategy prepared it, else prepared here for one
        process (labels shifted, position_ids, packed cu_seqlens)."""
        return prepared_batch(batch, ignore_index=self.hparams.ignore_index)

    def forward(self, batch: dict) -> torch.Tensor:
        """Final hidden states (our decoder) or logits (a Hugging Face model) of this rank's tokens."""
        if is_hf_model(self.model):
            return causal_lm_logits(self.model, batch)
        return self.model(batch["input_ids"], batch.get("position_ids"), batch.get("cu_seqlens"),
                          batch.get("max_seqlen"))

    def loss(self, batch: dict) -> TokenLoss:
        """The exact token-mean loss of the global batch (see :mod:`lightning_sp.loss`)."""
        labels = batch["labels"]
        if is_hf_model(self.model):
            total = causal_lm_loss_sum(self.model, batch, self.hparams.ignore_index)
        else:
            # self.forward, not self(...): under FSDP a second call of the root module's hooks would
            # reshard the (tied) LM head before loss_sum uses it
            total, _ = self.model.loss_sum(self.forward(batch), labels, self.hparams.ignore_index)
        return exact_token_loss(total, (labels != self.hparams.ignore_index).sum())

    # -- training ------------------------------------------------------------------------------
    def on_train_batch_start(self, batch, batch_idx):
        self._step_start = time.perf_counter()

    def training_step(self, batch, batch_idx):
        batch = self.prepare_batch(batch)
        out = self.loss(batch)
        info = batch[SHARD_INFO]
        # the sequences a sequence-parallel group trains on: a packed row's documents, else its rows
        self._sequences = info.document_lengths or [info.seq_len] * batch["input_ids"].shape[0]
        self._tokens = sum(self._sequences) * (_world() // info.mesh.sp_size)  # real tokens, all groups
        self.log("train/loss", out.mean, prog_bar=True, batch_size=int(out.num_tokens))
        return out.loss

    def on_train_batch_end(self, outputs, batch, batch_idx):
        if self._step_start is None:
            return
        seconds = time.perf_counter() - self._step_start
        tokens_per_s = self._tokens / seconds
        self.log("train/tokens_per_s", tokens_per_s, prog_bar=True, rank_zero_only=True)
        peak = self.hparams.peak_tflops or _device_peak_tflops(self.device)
        flops = _flops_per_token(self.model, self._sequences)
        if peak and flops:
            self.log("train/mfu", tokens_per_s * flops / (peak * 1e12 * _world()), prog_bar=True, rank_zero_only=True)

    def validation_step(self, batch, batch_idx):
        out = self.loss(self.prepare_batch(batch))
        self.log("val/loss", out.mean, prog_bar=True, batch_size=int(out.num_tokens))

    def configure_optimizers(self):
        hp = self.hparams
        decay = [p for p in self.parameters() if p.dim() >= 2]
        other = [p for p in self.parameters() if p.dim() < 2]
        # not fused=True: Lightning's mixed-precision plugin refuses gradient clipping with it
        opt = torch.optim.AdamW([{"params": decay, "weight_decay": hp.weight_decay},
                                 {"params": other, "weight_decay": 0.0}], lr=hp.lr, betas=tuple(hp.betas))
        total = self.trainer.max_steps if self.trainer.max_steps > 0 else None

        def schedule(step):
            if step < hp.warmup_steps:
                return (step + 1) / hp.warmup_steps
            if not total:
                return 1.0
            progress = min(1.0, (step - hp.warmup_steps) / max(1, total - hp.warmup_steps))
            return hp.min_lr_ratio + (1 - hp.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress))

        sched = torch.optim.lr_scheduler.LambdaLR(opt, schedule)
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}

    # -- inference -----------------------------------------------------------------------------
    def predict_step(self, batch, batch_idx=0):
        """Next-token logits after each prompt, (batch, vocab), identical on every rank.

        ``batch["prompt_length"]`` (an int) is the unpadded prompt length; it defaults to the length
        of ``input_ids`` when the batch was not sharded.
        """
        length = int(batch.get("prompt_length", batch["input_ids"].shape[-1]))
        batch = self.prepare_batch(batch)
        with torch.no_grad():
            out = self.forward(batch)  # see loss()
        pos = batch["position_ids"].expand(batch["input_ids"].shape)
        mine = pos[0] == length - 1  # the last prompt token, held by exactly one rank of the group
        if is_hf_model(self.model):
            logits = out[:, mine].sum(1)
        else:
            logits = self.model.logits(out[:, mine]).sum(1)
        mesh = batch[SHARD_INFO].mesh
        if mesh.sp_size > 1:
            dist.all_reduce(logits, group=mesh.sp_group)
        return logits


def _flops_per_token(model, sequences: list[int]) -> float | None:
    """Training FLOPs per token over ``sequences`` (their lengths; a packed row's documents attend
    only within themselves): each sequence's FLOPs per token weighted by its tokens, so attention
    counts the sum of the squared lengths, not the square of their sum."""
    config = getattr(model, "config", None)
    if hasattr(config, "flops_per_token"):
        per_token = config.flops_per_token
    elif config is not None and hasattr(config, "num_hidden_layers"):  # a Hugging Face config
        n = sum(p.numel() for p in model.parameters()) - config.vocab_size * config.hidden_size
        windows = [layer_window(layer, config) for layer in attention_layers(model)]
        heads = config.num_attention_heads
        width = heads * (getattr(config, "head_dim", None) or config.hidden_size // heads)

        def per_token(seq_len):  # 6 N and each layer's causal attention, within its sliding window if any
            return 6 * n + 12 * width * sum(attended_keys(seq_len, w) for w in windows)
    else:
        return None
    return sum(length * per_token(length) for length in sequences) / max(sum(sequences), 1)


def _device_peak_tflops(device) -> float | None:
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    return next((v for k, v in PEAK_TFLOPS.items() if k in name), None)
