"""Lightning runs of a tiny float64 language model under the ulysses_ring strategies, and the
single-process reference they are compared with (plain PyTorch, plain attention, no lightning_sp)."""
from __future__ import annotations

import contextlib
import random
from unittest import mock

import lightning as pl
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, Dataset, DistributedSampler

import lightning_sp
from attention_cases import reference_attention
from lightning_sp.loss import cross_entropy

VOCAB, DIM, IGNORE, MAX_POS = 11, 8, -100, 96
LR, MOMENTUM = 0.5, 0.5


class TinyLM(pl.LightningModule):
    """embedding + position embedding (by global position_ids) -> q/k/v -> causal attention -> head."""

    def __init__(self, heads: int = 4, seed: int = 0, reference: bool = False):
        super().__init__()
        torch.manual_seed(seed)
        self.num_heads, self.reference = heads, reference
        self.embed = nn.Embedding(VOCAB, DIM)
        self.pos = nn.Embedding(MAX_POS, DIM)
        self.qkv = nn.Linear(DIM, 3 * DIM)
        self.attn = lightning_sp.LongContextAttention()  # mesh=None: the strategy binds it
        self.head = nn.Linear(DIM, VOCAB)
        self.double()
        self.record: list[dict] = []

    def forward(self, input_ids, position_ids, cu_seqlens=None, max_seqlen=None, doc_ids=None):
        x = self.embed(input_ids) + self.pos(position_ids)
        q, k, v = self.qkv(x).unflatten(-1, (3, self.num_heads, DIM // self.num_heads)).unbind(-3)
        if self.reference:  # plain float64 attention over the whole sequence (documents masked)
            y = reference_attention(q, k, v, causal=True, scale=(DIM // self.num_heads) ** -0.5, doc_ids=doc_ids)
        elif cu_seqlens is not None:  # packed: (1, T) -> (T, h, d)
            y = self.attn(q[0], k[0], v[0], causal=True, cu_seqlens=cu_seqlens, max_seqlen=max_seqlen)[None]
        else:
            y = self.attn(q, k, v, causal=True)
        return self.head(x + torch.tanh(y.flatten(-2)))

    def _loss(self, batch):
        logits = self(batch["input_ids"], batch["position_ids"], batch.get("cu_seqlens"), batch.get("max_seqlen"))
        return cross_entropy(logits, batch["labels"], ignore_index=IGNORE)

    def training_step(self, batch, batch_idx):
        out = self._loss(batch)
        self.log("train_loss", out.mean)
        self.record.append({"mean": out.mean.item(), "idx": batch["idx"].tolist(), "local": tuple(batch["input_ids"].shape),
                            "positions": batch["position_ids"].reshape(-1).tolist(), "dtype": str(out.loss.dtype),
                            "labels": batch["labels"].reshape(-1).tolist()})
        return out.loss

    def validation_step(self, batch, batch_idx):
        self.log("val_loss", self._loss(batch).mean)

    def predict_step(self, batch, batch_idx):
        logits = self(batch["input_ids"], batch["position_ids"], batch.get("cu_seqlens"), batch.get("max_seqlen"))
        full = self.trainer.strategy.gather_sequence(logits, batch["shard_info"])
        return {"idx": batch["idx"], "local": tuple(logits.shape), "logits": full}

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=LR, momentum=MOMENTUM)


class TokenData(Dataset):
    """Sequences of ``seq`` tokens; some labels are ignore_index (padding inside the data), so ranks and
    samples hold different numbers of valid tokens."""

    def __init__(self, n: int, seq: int, seed: int = 1):
        g = torch.Generator().manual_seed(seed)
        self.ids = torch.randint(1, VOCAB, (n, seq), generator=g)
        self.labels = self.ids.clone()
        self.labels[torch.rand(n, seq, generator=g) < 0.3] = IGNORE

    def __len__(self):
        return len(self.ids)

    def __getitem__(self, i):
        return {"input_ids": self.ids[i], "labels": self.labels[i], "idx": i}


class PackedData(Dataset):
    """Rows of packed documents (batch size 1) with their global cu_seqlens."""

    def __init__(self, n: int, seed: int = 2):
        g = torch.Generator().manual_seed(seed)
        self.rows = []
        for _ in range(n):
            lengths = torch.randint(1, 12, (int(torch.randint(2, 5, (1,), generator=g)),), generator=g)
            cu = torch.cat([torch.zeros(1, dtype=torch.int64), lengths.cumsum(0)])
            ids = torch.randint(1, VOCAB, (int(cu[-1]),), generator=g)
            self.rows.append((ids, cu))

    def __len__(self):
        return len(self.rows)

    def __getitem__(self, i):
        ids, cu = self.rows[i]
        return {"input_ids": ids, "labels": ids.clone(), "cu_seqlens": cu, "idx": i}


def make_data(kind: str, n: int, seq: int = 13):
    return PackedData(n) if kind == "packed" else TokenData(n, seq)


# --------------------------------------------------------------------------------------------------
# the reference: one process, plain PyTorch


def expected_order(n: int, dp: int, batch: int, epochs: int = 1) -> list[list[list[int]]]:
    """Per step, per dp rank, the sample indices Lightning's DistributedSampler(dp) hands out."""
    steps = []
    for epoch in range(epochs):
        per_rank = []
        for r in range(dp):
            s = DistributedSampler(range(n), num_replicas=dp, rank=r, shuffle=True, seed=0)
            s.set_epoch(epoch)
            order = list(s)
            per_rank.append([order[i:i + batch] for i in range(0, len(order), batch)])
        steps += [list(step) for step in zip(*per_rank)]
    return steps


def reference_batch(data, indices):
    """The global batch of one step, labels shifted (not across documents), positions 0.. per sequence."""
    if isinstance(data, PackedData):  # the rows of all data-parallel ranks, packed into one
        ids = torch.cat([data.rows[i][0] for i in indices])
        lengths = torch.cat([data.rows[i][1].diff() for i in indices])
        cu = torch.cat([torch.zeros(1, dtype=torch.int64), lengths.cumsum(0)])
        labels = torch.full_like(ids, IGNORE)
        doc = torch.repeat_interleave(torch.arange(len(cu) - 1), cu[1:] - cu[:-1])
        same_doc = doc[1:] == doc[:-1]
        labels[:-1][same_doc] = ids[1:][same_doc]
        pos = torch.arange(len(ids)) - cu[doc]
        return ids[None], labels[None], pos[None], doc
    ids = torch.stack([data.ids[i] for i in indices])
    labels = torch.cat([torch.stack([data.labels[i] for i in indices])[:, 1:],
                        torch.full((len(indices), 1), IGNORE)], dim=1)
    return ids, labels, torch.arange(ids.shape[1]).expand_as(ids), None


def reference_run(data, steps: list[list[int]], heads: int = 4, accumulate: int = 1):
    """Train the reference model on the given global batches (``accumulate`` micro-batches per optimizer
    step, each micro-batch's token mean weighted 1/accumulate); returns (losses, params before, after)."""
    model = TinyLM(heads=heads, reference=True)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    opt = torch.optim.SGD(model.parameters(), lr=LR, momentum=MOMENTUM)
    losses = []
    for micro, indices in enumerate(steps):
        ids, labels, pos, doc = reference_batch(data, indices)
        logits = model(ids, pos, doc_ids=doc)
        loss = F.cross_entropy(logits.flatten(0, 1), labels.flatten(), ignore_index=IGNORE)
        (loss / accumulate).backward()
        if (micro + 1) % accumulate == 0:
            opt.step()
            opt.zero_grad()
        losses.append(loss.item())
    return losses, before, {k: v.detach().clone() for k, v in model.state_dict().items()}


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.double() - b.double()).norm() / b.double().norm().clamp_min(1e-300)).item()


# --------------------------------------------------------------------------------------------------
# jobs that run on every rank of a dist_harness.World


def _trainer(strategy, max_steps=-1, precision="32-true", **kw):
    return pl.Trainer(accelerator="cpu", devices=dist.get_world_size(), strategy=strategy,
                      max_steps=max_steps, max_epochs=kw.pop("max_epochs", 1), precision=precision, logger=False,
                      enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                      num_sanity_val_steps=0, **kw)


def make_strategy(ulysses, ring, layout, fsdp=False, **kw):
    cls = lightning_sp.UlyssesRingFSDPStrategy if fsdp else lightning_sp.UlyssesRingStrategy
    return cls(ulysses_degree=ulysses, ring_degree=ring, ring_impl=layout, **kw)


def _state(model) -> dict:
    """The full (unsharded) parameters, on every rank."""
    from torch.distributed.tensor import DTensor
    return {k: (v.full_tensor() if isinstance(v, DTensor) else v).detach().double().clone()
            for k, v in model.state_dict().items()}


class SaveAtEnd(pl.Callback):
    """Save a checkpoint after the last optimizer step, inside the loop (as ModelCheckpoint does)."""

    def __init__(self, path):
        self.path = path

    def on_train_batch_end(self, trainer, *args):
        if trainer.global_step == trainer.max_steps:
            trainer.save_checkpoint(self.path)


_LAST_DDP_GROUP = [None]  # the process group the last fit's DistributedDataParallel reduced over


class DDPGroupSeen(pl.Callback):
    """Keeps the group of the DistributedDataParallel module while it trains (teardown unwraps it)."""

    def on_train_start(self, trainer, *args):
        _LAST_DDP_GROUP[:] = [getattr(trainer.strategy.model, "process_group", None)]


def fit_job(ulysses, ring, layout, *, data="dense", n=8, batch=2, seq=13, max_steps=-1, max_epochs=1,
            fsdp=False, precision="32-true", save=None, resume=None, strategy="object", accumulate=1,
            gradient_group=False, **strategy_kw):
    """Fit TinyLM; returns what this rank saw and the final parameters. ``gradient_group``: the
    high-priority world group the strategy asks for (NCCL only, ``mesh.priority_world_group``) is
    stood in for by a separate gloo group over all ranks; the result says whether DDP reduced over it."""
    stand_in = dist.new_group(backend="gloo") if gradient_group else None
    model = TinyLM()
    strat = make_strategy(ulysses, ring, layout, fsdp, **strategy_kw) if strategy == "object" else strategy
    callbacks = [SaveAtEnd(save)] if save else []
    callbacks.append(DDPGroupSeen())
    trainer = _trainer(strat, max_steps=max_steps, precision=precision, max_epochs=max_epochs, callbacks=callbacks,
                       accumulate_grad_batches=accumulate)
    with mock.patch.object(lightning_sp.mesh, "priority_world_group", lambda: stand_in) if gradient_group \
            else contextlib.nullcontext():
        trainer.fit(model, DataLoader(make_data(data, n, seq), batch_size=batch), ckpt_path=resume)
    mesh = trainer.strategy.sp_mesh
    return {"record": model.record, "params": _state(model), "sp_rank": mesh.sp_rank, "dp_rank": mesh.dp_rank,
            "degrees": (mesh.dp_size, mesh.ring_size, mesh.ulysses_size), "layout": trainer.strategy.ring_impl,
            "device_mesh_seen": model.device_mesh is mesh.device_mesh, "bound": model.attn.mesh is mesh,
            "head_groups": model.attn.head_groups,
            "reduced_over_stand_in": gradient_group and _LAST_DDP_GROUP[0] is stand_in}


def priority_group_on_gloo():
    from lightning_sp.mesh import priority_world_group
    return priority_world_group()


def predict_job(ulysses, ring, layout, *, data="dense", n=4, seq=13):
    """Predict and validate with the same sharding; returns gathered logits and the validation loss."""
    model = TinyLM()
    trainer = _trainer(make_strategy(ulysses, ring, layout))
    ds = make_data(data, n, seq)
    preds = trainer.predict(model, DataLoader(ds, batch_size=1))
    val = trainer.validate(model, DataLoader(ds, batch_size=n if data == "dense" else 1), verbose=False)
    return {"preds": preds, "val_loss": val[0]["val_loss"]}


def error_job(case: str):
    """Run a misconfigured fit; returns the error this rank raised (type and message), or None."""
    model, loader_kw, trainer_kw, strat_kw = TinyLM(), {}, {}, {}
    ds = make_data("dense", 8)
    u, r = 2, 2
    if case == "degrees":
        u, r = 3, "auto"
    elif case == "heads":
        model, u, r = TinyLM(heads=6), 4, 1
    elif case == "seq_len":
        strat_kw["pad_to_multiple"] = False
    elif case == "world_sampler":  # a user sampler that shards over all ranks
        loader_kw["sampler"] = DistributedSampler(ds, num_replicas=dist.get_world_size(), rank=dist.get_rank())
    elif case == "different_samples":  # every rank reads its own samples: caught by the opt-in check
        loader_kw["sampler"] = [dist.get_rank() % len(ds), (dist.get_rank() + 1) % len(ds)]
        trainer_kw["use_distributed_sampler"] = False
        strat_kw["check_identical_samples"] = True
    elif case == "not_dict":
        ds = torch.utils.data.TensorDataset(ds.ids)
    try:
        _trainer(make_strategy(u, r, "zigzag", **strat_kw), max_steps=1, **trainer_kw).fit(
            model, DataLoader(ds, batch_size=2, **loader_kw))
    except Exception as err:  # noqa: BLE001 -- the test compares what every rank raised
        return f"{type(err).__name__}: {err}"
    return None


def fsdp_configure_on_cuda():
    """configure_ddp of the FSDP strategy, its root device said to be a GPU: whether the model got sharded."""
    from torch.distributed.fsdp import FSDPModule

    class OnCuda(lightning_sp.UlyssesRingFSDPStrategy):
        root_device = property(lambda self: torch.device("cuda", 0))

    strategy = OnCuda(ulysses_degree=2, ring_degree=2)
    strategy._sp_mesh = lightning_sp.build_mesh(lightning_sp.SPConfig(2, 2, world_size=dist.get_world_size()), "cpu")
    strategy.model = TinyLM()
    strategy.configure_ddp()
    return isinstance(strategy.model, FSDPModule)


class BadBatchLM(TinyLM):
    """TinyLM whose second training batch is spoiled on some ranks by a batch hook (as a user's
    on_before_batch_transfer could): cut short, a key dropped, or cut on one rank only."""

    def __init__(self, case: str):
        super().__init__()
        self.case, self.training_batches = case, 0

    def on_before_batch_transfer(self, batch, dataloader_idx):
        if not self.trainer.training:
            return batch
        self.training_batches += 1
        rank = dist.get_rank()
        if self.training_batches != 2:
            return batch
        if self.case == "short" and rank in (0, 1):  # the first data-parallel group: 6 tokens, not a multiple of 4
            return {**batch, "input_ids": batch["input_ids"][:, :6], "labels": batch["labels"][:, :6]}
        if self.case == "missing_key" and rank == 1:
            return {k: v for k, v in batch.items() if k != "labels"}
        if self.case == "shapes" and rank == 2:
            return {**batch, "input_ids": batch["input_ids"][:, :9], "labels": batch["labels"][:, :9]}
        return batch


def bad_batch_job(case: str):
    """Fit until the spoiled second batch; returns (error or None, when it was raised, steps trained)."""
    import time

    ulysses, ring, seq, strat_kw = (2, 1, 16, {"pad_to_multiple": False}) if case == "short" else (2, 2, 13, {})
    model = BadBatchLM(case)
    trainer = _trainer(make_strategy(ulysses, ring, "zigzag", **strat_kw), max_steps=3)
    try:
        trainer.fit(model, DataLoader(make_data("dense", 12, seq), batch_size=2))
    except Exception as err:  # noqa: BLE001 -- the test compares what every rank raised
        return f"{type(err).__name__}: {err}", time.time(), len(model.record)
    return None, time.time(), len(model.record)


class DrawingLM(TinyLM):
    """TinyLM that draws from the torch and Python generators at every training step."""

    def __init__(self):
        super().__init__()
        self.draws = []

    def training_step(self, batch, batch_idx):
        self.draws.append((torch.rand(2).tolist(), random.random()))
        return super().training_step(batch, batch_idx)


def rng_job(max_steps: int, save=None, resume=None):
    """Fit with every rank's generators seeded apart; returns the draws of each step."""
    model = DrawingLM()
    torch.manual_seed(1000 + dist.get_rank())
    random.seed(1000 + dist.get_rank())
    trainer = _trainer(make_strategy(2, 2, "zigzag"), max_steps=max_steps, callbacks=[SaveAtEnd(save)] if save else [])
    trainer.fit(model, DataLoader(make_data("dense", 12), batch_size=2), ckpt_path=resume)
    return model.draws


def recipe_model_factory(*overrides):
    """The model of conf/ as recipes/train.py builds it: a Hydra ``_partial_`` factory."""
    from pathlib import Path

    from hydra import compose, initialize_config_dir
    from hydra.utils import instantiate

    with initialize_config_dir(str(Path(__file__).resolve().parents[1] / "conf"), version_base="1.3"):
        cfg = compose("train", overrides=["model=tiny", *overrides])
    return instantiate(cfg.model)


def auto_degrees_from_factory_job():
    """``strategy="ulysses_ring"`` (auto degrees) and a CausalLM that builds the recipe's model, with
    2 attention heads, in configure_model; returns the mesh and whether a step trained."""
    from lightning_sp.app.data import LongRangeTask
    from lightning_sp.app.lm import CausalLM

    module = CausalLM(recipe_model_factory("model.config.num_heads=2", "model.config.num_kv_heads=1"))
    trainer = _trainer("ulysses_ring", max_steps=1)
    trainer.fit(module, DataLoader(LongRangeTask("copy", seq_len=32, num_samples=8, alphabet=4), batch_size=2))
    mesh = trainer.strategy.sp_mesh
    return (mesh.dp_size, mesh.ring_size, mesh.ulysses_size), bool(torch.isfinite(trainer.callback_metrics["train/loss"]))
