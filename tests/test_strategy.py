"""The ulysses_ring strategies: Lightning runs in a 4-process gloo world against a single-process run.

Every run trains a tiny float64 LM for a few optimizer steps; its parameters must equal, within 1e-9
relative, those of plain single-process training on the same global batches (token-mean loss,
labels shifted, plain attention), and every rank must have held only its shard.
"""
from __future__ import annotations

import importlib
import re

import pytest
import torch

import lightning_sp
import strategy_cases as C
from dist_harness import World
from lightning_sp import SPConfigError, SPMesh
from lightning_sp import layout as L
from lightning_sp.integration.batch import prepare_batch

TOL = 1e-9
TIMEOUT = 180
LAYOUTS = ("contiguous", "zigzag", "stripe")


def _coords(dp, ring, ulysses, sp_rank) -> SPMesh:
    """Index maths of another rank (no process group)."""
    config = lightning_sp.SPConfig(ulysses_degree=ulysses, ring_degree=ring, world_size=dp * ring * ulysses)
    return SPMesh(config=config, ring_rank=sp_rank // ulysses, ulysses_rank=sp_rank % ulysses)


def check_run(results, ulysses, ring, layout, *, n, batch, steps, data="dense", seq=13, tol=TOL, epochs=1):
    """Shards, sample assignment, losses and final parameters against the single-process reference."""
    world = len(results)
    dp = world // (ulysses * ring)
    order = C.expected_order(n, dp, batch, epochs)[:steps]
    ds = C.make_data(data, n, seq)
    losses, _, ref = C.reference_run(ds, [sum(step, []) for step in order])
    for rank, res in enumerate(results):
        assert res["degrees"] == (dp, ring, ulysses) and res["layout"] == L.canonical_layout(layout)
        assert res["bound"] and res["device_mesh_seen"], "attention bound to the strategy's mesh, mesh visible"
        assert len(res["record"]) == steps
        for step, rec in enumerate(res["record"]):
            assert rec["idx"] == order[step][res["dp_rank"]], "data-parallel sampling only"
            assert abs(rec["mean"] - losses[step]) <= tol * abs(losses[step]), (step, rec["mean"], losses[step])
            if data == "dense":  # this rank held only its shard: its share of tokens, at its global positions
                padded = -(-seq // L.layout_multiple(layout, _coords(dp, ring, ulysses, 0))) * \
                    L.layout_multiple(layout, _coords(dp, ring, ulysses, 0))
                local = L.local_indices(padded, _coords(dp, ring, ulysses, res["sp_rank"]), layout).tolist()
                assert rec["local"] == (batch, padded // (ulysses * ring))
                assert rec["positions"] == local * batch
        for k, v in ref.items():
            err = C.rel_err(res["params"][k], v)
            assert err < tol, f"rank {rank}: parameter {k} differs from the single-process run by {err:.3g}"
    return losses


# ---------------------------------------------------------------------------------------------- no world


def test_registered_names_and_reimport():
    from lightning.pytorch import Trainer
    from lightning.pytorch.strategies import StrategyRegistry
    importlib.reload(lightning_sp)  # re-import safe
    for name in ("ulysses_ring", "ulysses", "ring", "ulysses_ring_fsdp"):
        assert name in StrategyRegistry
    assert StrategyRegistry["ring"]["init_params"] == {"ulysses_degree": 1}
    assert StrategyRegistry["ulysses"]["init_params"] == {"ring_degree": 1}
    trainer = Trainer(strategy="ulysses_ring", accelerator="cpu", devices=1, logger=False)
    assert type(trainer.strategy).__name__ == "UlyssesRingStrategy"
    assert isinstance(StrategyRegistry.get("ulysses_ring_fsdp"), lightning_sp.UlyssesRingFSDPStrategy)


@pytest.mark.parametrize("world,node,heads,ulysses,ring,expected", [
    (8, 4, 32, "auto", "auto", (4, 2)),   # ulysses within the node, ring across
    (8, 4, 2, "auto", "auto", (2, 4)),    # heads limit ulysses
    (8, 4, None, "auto", "auto", (4, 2)),
    (8, 8, 12, "auto", 1, (4, 1)),        # "ulysses" preset: the rest is data parallel
    (8, 4, 32, 1, "auto", (1, 8)),        # "ring" preset
    (8, 4, 32, 2, 2, (2, 2)),
    (4, 4, 8, "auto", 2, (2, 2)),
])
def test_auto_degrees(world, node, heads, ulysses, ring, expected):
    strategy = lightning_sp.UlyssesRingStrategy(ulysses_degree=ulysses, ring_degree=ring, ring_impl="stripe")
    config = strategy.resolve_config(world, node, heads)
    assert (config.ulysses_degree, config.ring_degree, config.world_size, config.layout) == (*expected, world, "stripe")


def test_attention_heads_are_read_from_a_model_factory():
    """Before configure_model builds the model: from the config given to the recipe's _partial_
    factory (our LlamaConfig: num_heads; a Hugging Face config: num_attention_heads), or a keyword."""
    import functools

    from lightning_sp.app.lm import CausalLM
    from lightning_sp.integration.binding import find_attention_heads

    assert find_attention_heads(CausalLM(C.recipe_model_factory())) == 4
    eight = C.recipe_model_factory("model.config.num_heads=8", "model.config.num_kv_heads=2")
    assert find_attention_heads(CausalLM(eight)) == 8
    assert find_attention_heads(CausalLM(functools.partial(torch.nn.MultiheadAttention, 12, num_heads=6))) == 6
    assert find_attention_heads(CausalLM(functools.partial(C.TinyLM, heads=2))) is None  # no head-count name
    assert find_attention_heads(C.TinyLM(heads=2)) == 2  # a built model: its num_heads
    transformers = pytest.importorskip("transformers")
    config = transformers.LlamaConfig(num_attention_heads=12, num_key_value_heads=4, hidden_size=48)
    assert find_attention_heads(CausalLM(functools.partial(transformers.LlamaForCausalLM, config))) == 12


@pytest.mark.parametrize("kwargs,match", [
    (dict(ulysses_degree=3), "does not divide the world size 8"),
    (dict(ulysses_degree=2, ring_degree=3), "does not divide the world size 8"),
    (dict(ulysses_degree=8, ring_degree=1), "query heads are not divisible by the ulysses degree 8"),
])
def test_degree_errors(kwargs, match):
    with pytest.raises(SPConfigError, match=match):
        lightning_sp.UlyssesRingStrategy(**kwargs).resolve_config(8, 8, 4)


def test_constructor_errors():
    with pytest.raises(SPConfigError, match="unknown layout 'ziggzag'"):
        lightning_sp.UlyssesRingStrategy(ring_impl="ziggzag")
    with pytest.raises(SPConfigError, match="positive int or 'auto'"):
        lightning_sp.UlyssesRingStrategy(ulysses_degree=0)
    with pytest.raises(SPConfigError, match="head_groups must be a positive int, 'auto' or None, got 0"):
        lightning_sp.UlyssesRingStrategy(head_groups=0)
    with pytest.raises(SPConfigError, match="unknown document_placement 'zigzag'; choose 'work'"):
        lightning_sp.UlyssesRingFSDPStrategy(document_placement="zigzag")
    assert lightning_sp.UlyssesRingStrategy().document_placement == "work"


@pytest.mark.parametrize("layout", LAYOUTS)
def test_batch_preparation_dense(layout):
    """Shift on the full sequence, pad to the multiple (labels with ignore_index), same permutation for all keys."""
    ids = torch.arange(2 * 11).view(2, 11) + 1
    mask = torch.ones_like(ids)
    batch = {"input_ids": ids, "labels": ids.clone(), "attention_mask": mask, "idx": torch.tensor([5, 6])}
    parts = []
    for sp_rank in range(4):
        out, _ = prepare_batch(batch, _coords(1, 2, 2, sp_rank), layout=layout, agree=False)  # index maths only
        assert out["idx"] is batch["idx"], "other keys pass through unchanged"
        parts.append(out)
    multiple = L.layout_multiple(layout, _coords(1, 2, 2, 0))
    padded = -(-11 // multiple) * multiple
    assert padded > 11 and all(p["input_ids"].shape == (2, padded // 4) for p in parts)
    order = torch.cat([L.local_indices(padded, _coords(1, 2, 2, r), layout) for r in range(4)])
    full = {k: torch.empty(2, padded, dtype=torch.long) for k in ("input_ids", "labels", "position_ids", "attention_mask")}
    for k in full:
        full[k][:, order] = torch.cat([p[k] for p in parts], dim=1)
    assert torch.equal(full["input_ids"][:, :11], ids) and bool((full["input_ids"][:, 11:] == 0).all())
    assert torch.equal(full["labels"][:, :10], ids[:, 1:]) and bool((full["labels"][:, 10:] == C.IGNORE).all())
    assert torch.equal(full["position_ids"], torch.arange(padded).expand(2, -1))
    assert bool((full["attention_mask"][:, :11] == 1).all()) and bool((full["attention_mask"][:, 11:] == 0).all())


@pytest.mark.parametrize("placement", ["work", "spread"])
def test_batch_preparation_packed(placement):
    """Packed documents: local cu_seqlens, within-document positions, no label crosses a document end."""
    cu = torch.tensor([0, 3, 8, 9])
    ids = torch.arange(1, 10)
    seen_labels, seen_tokens = {}, 0
    for sp_rank in range(4):
        out, info = prepare_batch({"input_ids": ids[None], "labels": ids[None].clone(), "cu_seqlens": cu},
                                  _coords(1, 2, 2, sp_rank), layout="zigzag", agree=False,
                                  document_placement=placement)
        assert out["shard_info"] is info and info.seq_len == 9
        if placement == "spread":
            packed = info.packed
            assert info.padded_len == len(packed.slot_to_token)
            assert torch.equal(out["cu_seqlens"], packed.cu_seqlens) and out["max_seqlen"] == packed.max_seqlen
        else:
            assert info.placement is not None and info.padded_len == 2 * info.placement.tokens_per_rank
        for tok, lab, pos in zip(info.token_index.tolist(), out["labels"][0].tolist(), out["position_ids"][0].tolist()):
            if tok >= 0:
                seen_labels[tok] = lab
                doc = int((cu[1:] <= tok).sum())
                assert pos == tok - int(cu[doc])
                seen_tokens += 1
            else:
                assert lab == C.IGNORE
    assert seen_tokens == 9
    assert [seen_labels[t] for t in range(9)] == [2, 3, C.IGNORE, 5, 6, 7, 8, C.IGNORE, C.IGNORE]


def test_exact_loss_single_process():
    logits = torch.randn(2, 5, 7, dtype=torch.float64)
    labels = torch.tensor([[1, 2, -100, 3, 4], [-100, -100, 5, 6, 0]])
    out = lightning_sp.loss.cross_entropy(logits, labels)
    ref = torch.nn.functional.cross_entropy(logits.flatten(0, 1), labels.flatten())
    assert torch.allclose(out.loss, ref) and torch.allclose(out.mean, ref) and int(out.num_tokens) == 7
    empty = lightning_sp.loss.cross_entropy(logits, torch.full_like(labels, -100))
    assert float(empty.loss) == 0.0


# ---------------------------------------------------------------------------------------------- 4 ranks


SPLITS = [(u, r, layout) for u, r in ((2, 2), (4, 1), (1, 4)) for layout in LAYOUTS]
DP_SPLITS = [(u, r, layout) for u, r in ((1, 2), (2, 1)) for layout in LAYOUTS]


@pytest.mark.parametrize("ulysses,ring,layout", SPLITS)
def test_matches_single_process(world4, ulysses, ring, layout):
    results = world4.run(C.fit_job, ulysses, ring, layout, n=8, batch=2, max_steps=3, timeout=TIMEOUT)
    check_run(results, ulysses, ring, layout, n=8, batch=2, steps=3)


def test_head_groups_bound_by_the_strategy(world4):
    """head_groups=1 (auto would be 2 for TinyLM's 2 heads per Ulysses rank) reaches the layers; same result."""
    results = world4.run(C.fit_job, 2, 2, "zigzag", n=8, batch=2, max_steps=2, head_groups=1, timeout=TIMEOUT)
    assert [res["head_groups"] for res in results] == [1] * 4
    check_run(results, 2, 2, "zigzag", n=8, batch=2, steps=2)


def test_gradients_reduced_over_the_priority_world_group(world4):
    """With NCCL the strategy hands DDP a high-priority world group (``mesh.priority_world_group``);
    a separate gloo group stands in for it here: DDP reduces over it and training is unchanged. With
    gloo itself there is no such group (None) and DDP keeps the default group."""
    results = world4.run(C.fit_job, 2, 1, "zigzag", n=12, batch=2, max_steps=2, gradient_group=True, timeout=TIMEOUT)
    assert [res["reduced_over_stand_in"] for res in results] == [True] * 4
    check_run(results, 2, 1, "zigzag", n=12, batch=2, steps=2)
    assert world4.run(C.priority_group_on_gloo, timeout=TIMEOUT) == [None] * 4


@pytest.mark.parametrize("ulysses,ring,layout", DP_SPLITS)
def test_matches_single_process_with_data_parallel(world4, ulysses, ring, layout):
    results = world4.run(C.fit_job, ulysses, ring, layout, n=12, batch=2, max_steps=3, timeout=TIMEOUT)
    check_run(results, ulysses, ring, layout, n=12, batch=2, steps=3)


@pytest.mark.parametrize("ulysses,ring,layout,placement,fsdp", [
    (2, 2, "zigzag", "work", False), (1, 4, "stripe", "work", False), (1, 2, "zigzag", "work", False),  # the default
    (2, 2, "zigzag", "work", True),
    (2, 2, "zigzag", "spread", False), (1, 4, "stripe", "spread", False),
    (4, 1, "contiguous", "work", False),  # a ring of one rank: nothing to place
])
def test_packed_documents(world4, ulysses, ring, layout, placement, fsdp):
    """Packed rows (documents of 1 to 11 tokens, dp 2 for the ring of 2) train like one process,
    with the documents placed by work or spread over every ring rank."""
    results = world4.run(C.fit_job, ulysses, ring, layout, data="packed", n=6, batch=1, max_steps=3, fsdp=fsdp,
                         document_placement=placement, timeout=TIMEOUT)
    check_run(results, ulysses, ring, layout, n=6, batch=1, steps=3, data="packed")


@pytest.mark.parametrize("ulysses,ring,layout", [(2, 2, "zigzag"), (1, 2, "stripe")])
def test_fsdp_matches_single_process(world4, ulysses, ring, layout):
    n = 8 if ulysses * ring == 4 else 12
    results = world4.run(C.fit_job, ulysses, ring, layout, fsdp=True, n=n, batch=2, max_steps=3, timeout=TIMEOUT)
    check_run(results, ulysses, ring, layout, n=n, batch=2, steps=3)


@pytest.mark.parametrize("name,degrees", [("ring", (1, 4, 1)), ("ulysses", (1, 1, 4)), ("ulysses_ring", (1, 1, 4))])
def test_strategy_by_name(world4, name, degrees):
    """Trainer(strategy=name) after `import lightning_sp`; auto degrees from the model's 4 heads."""
    results = world4.run(C.fit_job, None, None, "zigzag", strategy=name, n=8, batch=2, max_steps=2, timeout=TIMEOUT)
    assert results[0]["degrees"] == degrees
    check_run(results, degrees[2], degrees[1], "zigzag", n=8, batch=2, steps=2)


@pytest.mark.parametrize("precision,fsdp", [("bf16-mixed", False), ("bf16-true", False), ("bf16-mixed", True)])
def test_bf16(world4, precision, fsdp):
    """bf16 runs follow the float64 single-process losses to bf16 accuracy."""
    results = world4.run(C.fit_job, 2, 2, "zigzag", fsdp=fsdp, precision=precision, n=8, batch=2, max_steps=3,
                         timeout=TIMEOUT)
    order = [sum(step, []) for step in C.expected_order(8, 1, 2)[:3]]
    losses, before, after = C.reference_run(C.make_data("dense", 8), order)
    for res in results:
        got = [rec["mean"] for rec in res["record"]]
        assert all(abs(g - r) < 3e-2 * r for g, r in zip(got, losses)), (got, losses)
        if precision == "bf16-mixed":  # float64 parameters, bf16 compute: the updates agree to bf16 accuracy
            for k in after:
                err = C.rel_err(res["params"][k] - before[k], after[k] - before[k])
                assert err < 5e-2, f"{k}: update differs by {err:.3g}"
        assert all(torch.equal(res["params"][k], results[0]["params"][k]) for k in after), "replicas agree"


@pytest.mark.parametrize("data", ["dense", "packed"])
def test_predict_and_validate(world4, data):
    results = world4.run(C.predict_job, 2, 2, "zigzag", data=data, n=4, timeout=TIMEOUT)
    ds = C.make_data(data, 4)
    model = C.TinyLM(reference=True)
    val_losses = []
    for i, pred in enumerate(results[0]["preds"]):
        ids, labels, pos, doc = C.reference_batch(ds, [i])
        ref = model(ids, pos, doc_ids=doc).detach()
        val_losses.append((torch.nn.functional.cross_entropy(ref.flatten(0, 1), labels.flatten(), reduction="sum"),
                           int((labels != C.IGNORE).sum())))
        for res in results:  # every rank of the group returns the full sequence, in the original order
            got = res["preds"][i]
            assert got["idx"].tolist() == [i]
            assert got["local"][1] < ids.shape[1], "each rank computed only its shard"
            assert C.rel_err(got["logits"], ref) < TOL
    if data == "dense":  # one validation batch of all samples: the global token mean
        ref_val = sum(s for s, _ in val_losses) / sum(n for _, n in val_losses)
        assert all(abs(res["val_loss"] - ref_val) < TOL * ref_val for res in results)


def test_auto_degrees_from_a_model_built_in_configure_model(world4):
    """The recipe's factory gives 2 heads: auto picks ulysses 2 x ring 2 on 4 ranks (not 4 x 1,
    which 2 heads cannot split), before the model exists, and the step trains."""
    assert world4.run(C.auto_degrees_from_factory_job, timeout=TIMEOUT) == [((1, 2, 2), True)] * 4


def test_gradient_accumulation(world4):
    """accumulate_grad_batches=2: each micro-batch's global token mean weighted 1/2 (as lightning_sp.loss documents)."""
    results = world4.run(C.fit_job, 2, 2, "zigzag", n=8, batch=2, max_steps=2, accumulate=2, timeout=TIMEOUT)
    order = [sum(step, []) for step in C.expected_order(8, 1, 2)]
    losses, _, ref = C.reference_run(C.make_data("dense", 8), order, accumulate=2)
    for res in results:
        assert [rec["idx"] for rec in res["record"]] == order
        assert [rec["mean"] for rec in res["record"]] == pytest.approx(losses, rel=TOL)
        assert all(C.rel_err(res["params"][k], ref[k]) < TOL for k in ref)


def test_resume_with_another_split(world4, tmp_path):
    """Save mid-epoch under (ulysses 2, ring 2), resume under (ulysses 4, ring 1): same losses and parameters."""
    path = str(tmp_path / "sp.ckpt")
    first = world4.run(C.fit_job, 2, 2, "zigzag", n=8, batch=2, max_steps=2, save=path, timeout=TIMEOUT)
    second = world4.run(C.fit_job, 4, 1, "stripe", n=8, batch=2, max_steps=4, resume=path, timeout=TIMEOUT)
    order = [sum(step, []) for step in C.expected_order(8, 1, 2)]
    losses, _, ref = C.reference_run(C.make_data("dense", 8), order)
    for res in second:
        assert [rec["idx"] for rec in res["record"]] == order[2:], "resumed at the next batch of the epoch"
        assert all(abs(rec["mean"] - r) <= TOL * r for rec, r in zip(res["record"], losses[2:]))
        assert all(C.rel_err(res["params"][k], ref[k]) < TOL for k in ref)
    assert [rec["mean"] for rec in first[0]["record"]] == pytest.approx(losses[:2], rel=TOL)


def test_fsdp_resume_with_another_split(world4, tmp_path):
    """Distributed checkpoint (a folder of shards) under (2, 2), resumed under (1, 4) with FSDP."""
    path = str(tmp_path / "fsdp.ckpt")
    world4.run(C.fit_job, 2, 2, "zigzag", fsdp=True, n=8, batch=2, max_steps=2, save=path, timeout=TIMEOUT)
    assert (tmp_path / "fsdp.ckpt").is_dir()
    second = world4.run(C.fit_job, 1, 4, "contiguous", fsdp=True, n=8, batch=2, max_steps=4, resume=path,
                        timeout=TIMEOUT)
    order = [sum(step, []) for step in C.expected_order(8, 1, 2)]
    losses, _, ref = C.reference_run(C.make_data("dense", 8), order)
    for res in second:
        assert [rec["idx"] for rec in res["record"]] == order[2:]
        assert all(abs(rec["mean"] - r) <= TOL * r for rec, r in zip(res["record"], losses[2:]))
        assert all(C.rel_err(res["params"][k], ref[k]) < TOL for k in ref)


@pytest.mark.parametrize("case,match", [
    ("degrees", "ulysses_degree x ring_degree = 3 x 1 = 3 does not divide the world size 4"),
    ("heads", "6 query heads are not divisible by the ulysses degree 4"),
    ("seq_len", "sequence length 13 is not divisible by 8.*pad the sequence to 16 tokens"),
    ("world_sampler", "shards over num_replicas=4.*num_replicas=trainer.strategy.dp_size \\(1\\)"),
    ("different_samples", "received different samples.*dp_rank / dp_size"),
    ("not_dict", "needs batches that are dicts"),
])
def test_configuration_errors(world4, case, match):
    """Raised on every rank, identically, before any collective could hang."""
    errors = world4.run(C.error_job, case, timeout=TIMEOUT)
    assert errors[0] is not None and errors[0].startswith("SPConfigError")
    assert all(e == errors[0] for e in errors), errors
    assert re.search(match, errors[0]), errors[0]
    # the world is still usable afterwards
    results = world4.run(C.fit_job, 2, 2, "zigzag", n=8, batch=2, max_steps=1, timeout=TIMEOUT)
    check_run(results, 2, 2, "zigzag", n=8, batch=2, steps=1)


@pytest.mark.parametrize("case,match", [
    ("short", r"^SPConfigError: rank 0: sequence length 6 is not divisible by 4.*pad the sequence to 8 tokens"),
    ("missing_key", r"group 0 hold batches with different keys.*rank 0: input_ids \(2, 13\) int64, labels \(2, 13\) "
                    r"int64; rank 1: input_ids \(2, 13\) int64; .*dp_rank / dp_size"),
    ("shapes", r"group 0 hold batches with different keys, shapes.*rank 2: input_ids \(2, 9\) int64.*dp_rank / dp_size"),
])
def test_a_bad_batch_at_a_later_step_fails_every_rank_at_once(world4, case, match):
    """The second batch is spoiled on some ranks only (too short for the layout without padding, a
    key dropped on one rank, another length on one rank): every rank raises the same error at that
    batch, together, instead of waiting in a collective the others never join."""
    results = world4.run(C.bad_batch_job, case, timeout=TIMEOUT)
    errors, times, steps = zip(*results)
    assert errors[0] is not None and all(e == errors[0] for e in errors), errors
    assert re.search(match, errors[0]), errors[0]
    assert steps == (1,) * 4, "the first batch trained, the second failed"
    assert max(times) - min(times) < 5, f"the ranks raised {max(times) - min(times):.1f} s apart"


def test_resume_continues_rank_0s_random_streams(world4, tmp_path):
    """Every rank's torch and Python generators start apart; after a resume every rank draws what
    rank 0 drew at those steps in an uninterrupted run."""
    path = str(tmp_path / "rng.ckpt")
    whole = world4.run(C.rng_job, 4, timeout=TIMEOUT)
    assert whole[0] != whole[1], "the ranks' streams differ to begin with"
    world4.run(C.rng_job, 2, save=path, timeout=TIMEOUT)
    resumed = world4.run(C.rng_job, 4, resume=path, timeout=TIMEOUT)
    assert resumed == [whole[0][2:]] * 4


@pytest.mark.slow
def test_fsdp_resume_on_another_world_size(world4, tmp_path):
    """FSDP distributed checkpoint from 4 ranks (ulysses 2 x ring 2) resumed on 2 ranks (ring 2), dp 1 both."""
    path = str(tmp_path / "fsdp4.ckpt")
    world4.run(C.fit_job, 2, 2, "zigzag", fsdp=True, n=8, batch=2, max_steps=2, save=path, timeout=TIMEOUT)
    world2 = World(2)
    world2.start()
    try:
        second = world2.run(C.fit_job, 1, 2, "zigzag", fsdp=True, n=8, batch=2, max_steps=4, resume=path,
                            timeout=TIMEOUT)
    finally:
        world2.stop()
    order = [sum(step, []) for step in C.expected_order(8, 1, 2)]
    losses, _, ref = C.reference_run(C.make_data("dense", 8), order)
    for res in second:
        assert res["degrees"] == (1, 2, 1)
        assert [rec["idx"] for rec in res["record"]] == order[2:]
        assert all(abs(rec["mean"] - r) <= TOL * r for rec, r in zip(res["record"], losses[2:]))
        assert all(C.rel_err(res["params"][k], ref[k]) < TOL for k in ref)


def test_fsdp_strategy_shards_instead_of_registering_ddp_comm_hooks_on_cuda(world4):
    """On CUDA, DDPStrategy.configure_ddp asserts the model is DistributedDataParallel before it
    registers comm hooks; the FSDP strategy's configure_ddp shards the model with FSDP2 instead."""
    assert world4.run(C.fsdp_configure_on_cuda, timeout=TIMEOUT) == [True] * 4
