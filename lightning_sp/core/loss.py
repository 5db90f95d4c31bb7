"""The exact token-mean loss under sequence and data parallelism.

Every rank holds a shard of some sequences, and the shards hold different numbers of valid (not
ignored) tokens. Averaging per-rank token means would weight tokens unequally. Instead each rank
returns

    loss_r = (sum of its token losses) x world_size / (valid tokens over the whole world)

and the strategy averages gradients over all world_size ranks, as DDP does, so the averaged
gradient is exactly the gradient of the global token mean, as on one device with the whole
(data-parallel) batch, whatever the padding. ``mean`` is that global token mean, the number to log.

With ``accumulate_grad_batches=k`` Lightning divides each micro-batch loss by k, so the step
follows the mean of the k micro-batches' global token means (every micro-batch weighted equally,
not every token); with equal valid-token counts per micro-batch the two coincide.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist
import torch.nn.functional as F


@dataclass(frozen=True)
class TokenLoss:
    """``loss``: what ``training_step`` returns (differentiable, this rank's share, see the module
    docstring). ``mean``: the global token mean, detached, identical on every rank, for logging.
    ``num_tokens``: the global number of valid tokens."""

    loss: torch.Tensor
    mean: torch.Tensor
    num_tokens: torch.Tensor


def _world(group) -> int:
    if dist.is_available() and dist.is_initialized():
        return dist.get_world_size(group)
    return 1


def exact_token_loss(loss_sum: torch.Tensor, num_valid, group=None) -> TokenLoss:
    """Turn this rank's token-loss sum and valid-token count into the exact loss.

    ``group`` is the group gradients are averaged over (default: the whole world, as DDP and the
    ``ulysses_ring`` strategies do). One all-reduce of two numbers; nothing flows back through it.
    """
    world = _world(group)
    stats = torch.stack([loss_sum.detach().to(torch.float64),
                         torch.as_tensor(num_valid, device=loss_sum.device).to(torch.float64)])
    if world > 1:
        dist.all_reduce(stats, group=group)
    total = stats[1].clamp_min(1.0)  # no valid token anywhere: the loss is 0, not NaN
    loss = loss_sum * (world / total).to(loss_sum.dtype)
    return TokenLoss(loss=loss, mean=(stats[0] / total).to(loss_sum.dtype), num_tokens=stats[1].to(torch.int64))


def cross_entropy(logits: torch.Tensor, labels: torch.Tensor, ignore_index: int = -100, group=None) -> TokenLoss:
    """Exact token-mean cross entropy of this rank's ``logits (..., vocab)`` against ``labels (...)``.

    Labels equal to ``ignore_index`` (padding, label shifting, document ends) count nowhere.
    Half-precision logits are upcast to float32 for the loss; float64 stays float64.
    """
    if logits.shape[:-1] != labels.shape:
        raise ValueError(f"logits {tuple(logits.shape)} do not match labels {tuple(labels.shape)}; expected logits "
                         f"of shape labels.shape + (vocab,); under sequence parallelism labels under a key other than "
                         f"'labels' are split like the inputs only when the strategy's shard_keys name it")
    logits = logits.to(torch.promote_types(logits.dtype, torch.float32))
    loss_sum = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), labels.reshape(-1),
                               ignore_index=ignore_index, reduction="sum")
    return exact_token_loss(loss_sum, (labels != ignore_index).sum(), group)
