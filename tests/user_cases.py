"""A user's own LightningModule around a tiny Hugging Face Llama (float64, no downloads), as the
README teaches it, and its single-process float64 reference (plain PyTorch cross entropy, plain
attention, one document at a time)."""
from __future__ import annotations

import lightning as pl
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch.utils.data import DataLoader

import lightning_sp
import strategy_cases as C

LR, MOMENTUM = 0.5, 0.5


def hf_llama(seed: int = 0, layers: int = 2):
    """A tiny Hugging Face Llama in float64: 4 query heads of 4, 2 key/value heads, RoPE."""
    import transformers

    torch.manual_seed(seed)
    config = transformers.LlamaConfig(vocab_size=C.VOCAB, hidden_size=16, intermediate_size=32,
                                      num_hidden_layers=layers, num_attention_heads=4, num_key_value_heads=2,
                                      max_position_embeddings=C.MAX_POS, tie_word_embeddings=False,
                                      attn_implementation="eager")
    return transformers.LlamaForCausalLM(config).double()


class HFUserLM(pl.LightningModule):
    """What a user writes: swap the attention, then Hugging Face's own loss on the whole batch.

    ``call``: ``"batch"`` calls ``self.model(**batch)``; ``"no_position_ids"`` forgets the positions.
    ``swap=False`` forgets ``swap_attention``."""

    def __init__(self, swap: bool = True, call: str = "batch"):
        super().__init__()
        self.model = hf_llama()
        if swap:
            lightning_sp.swap_attention(self.model)
        self.call = call
        self.steps = 0

    def training_step(self, batch, batch_idx):
        self.steps += 1
        if self.call == "no_position_ids":
            return self.model(input_ids=batch["input_ids"], labels=batch["labels"]).loss
        return self.model(**batch).loss

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=LR, momentum=MOMENTUM)


def _fit(module, strategy, data, n, batch, max_steps):
    trainer = C._trainer(strategy, max_steps=max_steps)
    trainer.fit(module, DataLoader(C.make_data(data, n), batch_size=batch))
    return trainer


def hf_loss_job(ulysses, ring, layout, *, data="dense", n=8, batch=2, max_steps=3):
    """Fit HFUserLM under the ulysses_ring strategy; returns the final parameters."""
    module = HFUserLM()
    _fit(module, C.make_strategy(ulysses, ring, layout), data, n, batch, max_steps)
    return {k: v.detach().clone() for k, v in module.model.state_dict().items()}


def error_job(case: str):
    """A user's mistake under ulysses 2 x ring 2; returns (error or None, training steps begun)."""
    strategy_kw, module = {}, None
    if case == "no_swap":
        module = HFUserLM(swap=False)
    elif case == "no_position_ids":
        module = HFUserLM(call="no_position_ids")
    elif case == "cuda_backend":
        module, strategy_kw = HFUserLM(), {"backend": "flash"}
    try:
        _fit(module, C.make_strategy(2, 2, "zigzag", **strategy_kw), "dense", 8, 2, 2)
    except Exception as err:  # noqa: BLE001 -- the test compares what every rank raised
        return f"{type(err).__name__}: {err}", module.steps
    return None, module.steps


class AttentionFree(pl.LightningModule):
    """A model without attention (each token on its own): the strategy's opt-out lets it train."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.embed = torch.nn.Embedding(C.VOCAB, 8, dtype=torch.float64)
        self.head = torch.nn.Linear(8, C.VOCAB, dtype=torch.float64)

    def training_step(self, batch, batch_idx):
        return lightning_sp.loss.cross_entropy(self.head(self.embed(batch["input_ids"])), batch["labels"]).loss

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=LR)


def attention_free_job(require: bool):
    """Fit AttentionFree with require_sp_attention=require; returns the error or the final head weight."""
    module = AttentionFree()
    try:
        _fit(module, C.make_strategy(2, 2, "zigzag", require_sp_attention=require), "dense", 8, 2, 2)
    except Exception as err:  # noqa: BLE001
        return f"{type(err).__name__}: {err}"
    return module.head.weight.detach().clone()


class DDPUserLM(C.TinyLM):
    """TinyLM (plain attention) written for ulysses_ring, made strategy-independent by
    ``lightning_sp.prepared_batch`` at the top of its step (labels shifted, positions)."""

    def __init__(self, helper: bool):
        super().__init__(reference=True)
        self.helper = helper

    def training_step(self, batch, batch_idx):
        if self.helper:
            batch = lightning_sp.prepared_batch(batch, ignore_index=C.IGNORE)
        else:  # what a module that relied on the strategy's preparation saw under DDP
            batch = {**batch, "position_ids": torch.arange(batch["input_ids"].shape[1]).expand_as(batch["input_ids"])}
        return super().training_step(batch, batch_idx)


def ddp_job(helper: bool, n=8, batch=1, max_steps=2):
    """Fit DDPUserLM under Lightning's own ``strategy="ddp"``; returns its final parameters."""
    module = DDPUserLM(helper)
    trainer = C._trainer("ddp", max_steps=max_steps)
    trainer.fit(module, DataLoader(C.make_data("dense", n), batch_size=batch))
    assert trainer.world_size == dist.get_world_size()
    return C._state(module)


# --------------------------------------------------------------------------------------------------
# the reference: one process, the model's own (unswapped, eager) attention, float64 cross entropy


def reference_params(data: str, order, max_steps: int) -> dict:
    """Train hf_llama on the global batches of ``order`` (one step each): token mean of float64
    cross entropy over the whole batch, each packed document run as a sequence of its own."""
    model = hf_llama()
    opt = torch.optim.SGD(model.parameters(), lr=LR, momentum=MOMENTUM)
    ds = C.make_data(data, max(sum(order, [])) + 1)
    for indices in order[:max_steps]:
        ids, labels, _, doc = C.reference_batch(ds, indices)
        if doc is None:
            pieces = [(ids, labels)]
        else:
            pieces = [(ids[:, doc == d], labels[:, doc == d]) for d in doc.unique()]
        total = sum(F.cross_entropy(model(input_ids=i).logits.flatten(0, 1), lab.flatten(), ignore_index=C.IGNORE,
                                    reduction="sum") for i, lab in pieces)
        count = sum(int((lab != C.IGNORE).sum()) for _, lab in pieces)
        (total / count).backward()
        opt.step()
        opt.zero_grad()
    return {k: v.detach().clone() for k, v in model.state_dict().items()}
