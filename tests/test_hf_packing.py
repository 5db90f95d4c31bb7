"""Hugging Face's packed-batch convention under ``Trainer(strategy="ulysses_ring")``: one row whose
``position_ids`` restart at 0 for each document (what ``DataCollatorWithFlattening`` and TRL's
padding-free packing produce), no ``cu_seqlens``, and a module that calls only
``model(input_ids=..., position_ids=...)``.

On 4 gloo ranks, every (ulysses, ring) split with the documents placed by work (the default over
a ring of several ranks, checked to take the placed path) or spread over every ring rank with each
layout, a tiny Hugging Face Llama and a Mistral-style one with a sliding window (float64, no
downloads) train three optimizer steps; their parameters are compared with one process that runs
each document on its own (the model's own SDPA attention, float64 cross entropy over the labels
shifted within each document). The documents include 1-token ones and ones longer than a rank's
share of the row. Negative cases: layers that do not learn the packing attend across documents and
train differently; positions, or cu_seqlens over a placement, that are not the prepared batch's
fail on every rank naming the fix.
"""
from __future__ import annotations

import re

import lightning as pl
import pytest
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, Dataset

import lightning_sp
import strategy_cases as C
from lightning_sp.core.attention.placed import count_sent_bytes

transformers = pytest.importorskip("transformers")

TIMEOUT = 300
TOL = 1e-9  # float64 everywhere; the distributed run differs by summation order only
HF_TOL = 1e-5  # Hugging Face's causal-LM loss takes the logits in float32
LR, MOMENTUM, IGNORE = 0.5, 0.5, -100
# document lengths of each packed row: 1-token documents, and documents longer than a rank's
# quarter of the row (13 of 24, 12 of 25, 17 of 27)
ROWS = [[1, 13, 3, 1, 6], [9, 1, 1, 12, 2], [5, 17, 1, 4]]
WINDOW = 4


def make_model(kind: str):
    """A tiny float64 Hugging Face causal LM: ``llama`` (global attention) or ``mistral`` (a
    sliding window of WINDOW tokens on every layer). Its own attention is SDPA, float64 throughout
    (Hugging Face's eager attention takes its softmax in float32)."""
    torch.manual_seed(0)
    common = dict(vocab_size=C.VOCAB, hidden_size=16, intermediate_size=32, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=C.MAX_POS,
                  tie_word_embeddings=False, attn_implementation="sdpa")
    if kind == "llama":
        return transformers.LlamaForCausalLM(transformers.LlamaConfig(**common)).double()
    return transformers.MistralForCausalLM(transformers.MistralConfig(sliding_window=WINDOW, **common)).double()


class FlattenedRows(Dataset):
    """Each item one packed row as Hugging Face's collators make it: ``DataCollatorWithFlattening``
    (labels -100 at every document's first token) for even rows, plain ``labels = input_ids`` (as
    TRL's padding-free packing) for odd ones; ``position_ids`` restart at 0 for each document."""

    def __init__(self, with_cu_seqlens: bool = False):
        g = torch.Generator().manual_seed(3)
        self.docs = [[torch.randint(1, C.VOCAB, (n,), generator=g) for n in row] for row in ROWS]
        collate = transformers.DataCollatorWithFlattening(return_tensors="pt")
        self.items = []
        for i, docs in enumerate(self.docs):
            flat = {k: v[0] for k, v in collate([{"input_ids": d.tolist()} for d in docs]).items()}
            if i % 2:
                flat["labels"] = flat["input_ids"].clone()
            if with_cu_seqlens:  # the explicit convention: the documents' global cu_seqlens
                flat["cu_seqlens"] = torch.tensor([0, *torch.tensor([len(d) for d in docs]).cumsum(0).tolist()])
            self.items.append({**flat, "idx": i})

    def __len__(self):
        return len(self.items)

    def __getitem__(self, i):
        return self.items[i]


class PackedUserLM(pl.LightningModule):
    """What a user writes for packed rows: ``model(input_ids=..., position_ids=...)`` and nothing else,
    the loss from the prepared ``labels``.

    ``call="local_positions"`` passes positions that are not the batch's (this rank's 0, 1, 2, ...);
    ``call="batch"`` is Hugging Face's own loss on the whole prepared batch, ``model(**batch).loss``
    (the documents reach attention as ``cu_seq_lens_q``, the loss reads ``shift_labels``);
    ``call="local_documents"`` passes ``cu_seq_lens_q`` that are not the batch's (this rank's tokens
    as one document); ``forget_packing`` unbinds the layers from the strategy's sequence context (so
    they attend across documents), to show that the comparison sees it. ``placed`` records, per
    step, whether the batch was placed by work and the bytes its placed ring exchange sent."""

    def __init__(self, kind: str, call: str = "positions", forget_packing: bool = False):
        super().__init__()
        self.model = make_model(kind)
        lightning_sp.swap_attention(self.model)
        self.call, self.forget_packing = call, forget_packing
        self.seen: list[int] = []
        self.placed: list[tuple[bool, int]] = []

    def on_train_start(self):
        if self.forget_packing:
            for layer in self.modules():
                if isinstance(layer, lightning_sp.LongContextAttention):
                    layer.sequence_context = None

    def training_step(self, batch, batch_idx):
        self.seen += batch["idx"].tolist()
        with count_sent_bytes() as sent:
            loss = self._loss(batch)
        self.placed.append((batch["shard_info"].placement is not None, sum(n for *_, n in sent)))
        return loss

    def _loss(self, batch):
        if self.call == "batch":
            return self.model(**batch).loss
        positions, documents = batch["position_ids"], {}
        if self.call == "local_positions":
            positions = torch.arange(positions.shape[-1]).expand_as(positions)
        if self.call == "local_documents":
            cu = torch.tensor([0, positions.shape[-1]], dtype=torch.int32)
            documents = dict(cu_seq_lens_q=cu, cu_seq_lens_k=cu, max_length_q=positions.shape[-1],
                             max_length_k=positions.shape[-1])
        logits = self.model(input_ids=batch["input_ids"], position_ids=positions, **documents).logits
        return lightning_sp.loss.cross_entropy(logits, batch["labels"], ignore_index=IGNORE).loss

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=LR, momentum=MOMENTUM)


def packed_fit_job(kind, ulysses, ring, layout, *, placement="work", call="positions", forget_packing=False,
                   with_cu_seqlens=False):
    """Fit PackedUserLM under ulysses_ring; returns (error or None, rows trained, final parameters,
    per step: (placed by work, bytes the placed exchange sent))."""
    module = PackedUserLM(kind, call=call, forget_packing=forget_packing)
    trainer = C._trainer(C.make_strategy(ulysses, ring, layout, document_placement=placement), max_steps=len(ROWS))
    try:
        trainer.fit(module, DataLoader(FlattenedRows(with_cu_seqlens), batch_size=1))
    except Exception as err:  # noqa: BLE001 -- the test compares what every rank raised
        return f"{type(err).__name__}: {err}", module.seen, None, module.placed
    return None, module.seen, {k: v.detach().clone() for k, v in module.model.state_dict().items()}, module.placed


def reference_params(kind: str, order: list[int]) -> dict:
    """One process, the model's own (SDPA) attention, each document of a row run on its own: the
    token mean of float64 cross entropy over each row, labels shifted within each document."""
    model = make_model(kind)
    opt = torch.optim.SGD(model.parameters(), lr=LR, momentum=MOMENTUM)
    data = FlattenedRows()
    for i in order:
        labels, total, count, start = data.items[i]["labels"], 0.0, 0, 0
        for doc in data.docs[i]:
            target = torch.cat([labels[start + 1:start + len(doc)], torch.tensor([IGNORE])])
            logits = model(input_ids=doc[None]).logits[0]
            total = total + F.cross_entropy(logits, target, ignore_index=IGNORE, reduction="sum")
            count += int((target != IGNORE).sum())
            start += len(doc)
        (total / count).backward()
        opt.step()
        opt.zero_grad()
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


_REFERENCES: dict = {}


def _reference(kind: str, order: list[int]) -> dict:
    key = (kind, tuple(order))
    if key not in _REFERENCES:
        _REFERENCES[key] = reference_params(kind, order)
    return _REFERENCES[key]


def _max_error(params: dict, ref: dict) -> tuple[float, str]:
    return max((C.rel_err(params[k], v), k) for k, v in ref.items())


LAYOUTS = ("contiguous", "zigzag", "stripe")
# the default placement by work over each ring of several ranks (the layout matters for dense
# batches only), every layout with the documents spread, and every layout over a ring of one rank
CASES = ([(u, r, "zigzag", "work") for u, r in ((1, 4), (2, 2))]
         + [(u, r, layout, "spread") for u, r in ((1, 4), (2, 2)) for layout in LAYOUTS]
         + [(4, 1, layout, "work") for layout in LAYOUTS])


def _check_placed(placed_steps, ring, placement):
    """Every step of a ring of several ranks took the placed path under ``work`` and sent K/V for
    the documents that span ranks (every row has one); none did under ``spread``."""
    by_work = placement == "work" and ring > 1
    assert [p for p, _ in placed_steps] == [by_work] * len(ROWS)
    assert all((sent > 0) == by_work for _, sent in placed_steps), placed_steps


@pytest.mark.parametrize("kind", ["llama", "mistral"])
@pytest.mark.parametrize("ulysses,ring,layout,placement", CASES)
def test_packed_rows_train_like_each_document_alone(worlds, layout, ulysses, ring, placement, kind):
    results = worlds(4).run(packed_fit_job, kind, ulysses, ring, layout, placement=placement, timeout=TIMEOUT)
    errors, seen, _, placed = zip(*results)
    assert errors == (None,) * 4, errors[0]
    assert all(s == seen[0] for s in seen) and sorted(seen[0]) == list(range(len(ROWS)))
    for steps in placed:
        _check_placed(steps, ring, placement)
    ref, start = _reference(kind, seen[0]), make_model(kind).state_dict()
    for rank, (_, _, params, _) in enumerate(results):
        for k, v in ref.items():
            assert not torch.equal(v, start[k]) or "norm" in k, f"{k} did not train"
        err, name = _max_error(params, ref)
        assert err < TOL, f"rank {rank}: {name} differs from one process running each document by {err:.3g}"


@pytest.mark.parametrize("call,with_cu_seqlens,tol", [
    ("batch", False, HF_TOL),  # Hugging Face's own loss, the documents as cu_seq_lens_q
    ("positions", True, TOL),  # rows that carry cu_seqlens, the model called with positions only
])
@pytest.mark.parametrize("layout,ulysses,ring,kind", [("zigzag", 2, 2, "mistral"), ("contiguous", 4, 1, "llama")])
def test_the_explicit_conventions_train_alike(worlds, call, with_cu_seqlens, tol, layout, ulysses, ring, kind):
    results = worlds(4).run(packed_fit_job, kind, ulysses, ring, layout, call=call, with_cu_seqlens=with_cu_seqlens,
                            timeout=TIMEOUT)
    errors, seen, _, placed = zip(*results)
    assert errors == (None,) * 4, errors[0]
    for steps in placed:
        _check_placed(steps, ring, "work")
    ref = _reference(kind, seen[0])
    for rank, (_, _, params, _) in enumerate(results):
        err, name = _max_error(params, ref)
        assert err < tol, f"rank {rank}: {name} differs from one process running each document by {err:.3g}"


@pytest.mark.parametrize("kind", ["llama", "mistral"])
def test_attention_across_documents_is_seen(worlds, kind):
    """The comparison can fail: layers that do not learn the row's packing attend across its
    documents (with the window: those within WINDOW tokens) and end far from the reference."""
    results = worlds(4).run(packed_fit_job, kind, 2, 2, "zigzag", placement="spread", forget_packing=True,
                            timeout=TIMEOUT)
    errors, seen, _, _ = zip(*results)
    assert errors == (None,) * 4, errors[0]
    ref = _reference(kind, seen[0])
    for _, _, params, _ in results:
        assert _max_error(params, ref)[0] > 1e-3


@pytest.mark.parametrize("call,placement,match", [
    pytest.param("local_positions", "spread", r"^SPConfigError: attention was called with position_ids \(1, \d+\) "
                 r"that are not those of the batch the strategy prepared .*pass position_ids=batch\['position_ids'\]",
                 id="positions-spread"),
    pytest.param("local_positions", "work", r"^SPConfigError: attention was called with position_ids \(1, \d+\)",
                 id="positions-work"),
    pytest.param("local_documents", "work", r"^SPConfigError: attention was called with cu_seqlens that are not "
                 r"those of the batch the strategy prepared .*placed on the ring ranks by work .*pass "
                 r"cu_seqlens=batch\['cu_seqlens'\].*document_placement='spread'", id="cu_seqlens-work"),
])
def test_a_packing_that_is_not_the_batchs_fails_on_every_rank(worlds, call, placement, match):
    """Positions, or over a placement cu_seqlens, other than the prepared batch's: the layers cannot
    know where its documents lie, so every rank raises the same error at the first step, naming the fix."""
    results = worlds(4).run(packed_fit_job, "llama", 2, 2, "zigzag", placement=placement, call=call, timeout=TIMEOUT)
    errors = [r[0] for r in results]
    assert errors[0] is not None and all(e == errors[0] for e in errors), errors
    assert re.search(match, errors[0]), errors[0]
    assert all(len(r[1]) == 1 and r[1] == results[0][1] for r in results)  # at the first step
