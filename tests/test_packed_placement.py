"""Packed batches whose documents are placed on the ring ranks by causal work (the default
``document_placement="work"``): ``gather_sequence`` undoes the placement exactly on 2 and 4 gloo
ranks (ring x ulysses splits); our Llama with a sliding-window layer before a global one, on a
placement balanced for full causal work, gives one process's logits and gradients (float64); an
attention layer bound to a sequence context that holds a placement attends over it only causally
and only for the prepared batch's ``cu_seqlens``; a layer bound by hand (no context) given the
placed batch's ``cu_seqlens`` attends over the placement they carry (float64, 2 and 4 ranks), and
non-causal attention over padded spread documents fails on every rank; copy_engine refuses
documents that span ranks. Training over a placement against one process:
tests/test_strategy.py (TinyLM) and tests/test_hf_packing.py (Hugging Face models, both packed
conventions, a sliding window on every layer)."""
from __future__ import annotations

import copy

import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F

import lightning_sp
from lightning_sp import SPConfigError
from lightning_sp.app.models.llama import LlamaConfig, LlamaForCausalLM
from lightning_sp.core.attention.hybrid import SequenceContext
from lightning_sp.core.attention.placed import count_sent_bytes
from lightning_sp.core.mesh import rank_coordinates, single_process_mesh
from lightning_sp.integration.batch import DEFAULT_SHARD_KEYS, gather_sequence, prepare_batch
from lightning_sp.integration.binding import bind_attention
from lightning_sp.loss import exact_token_loss

TIMEOUT = 120
TOL = 1e-9
LENGTHS = [3, 2, 16, 2, 1, 2, 2, 9]  # short documents whole on a ring rank, the long one split


def _batch():
    cu = torch.tensor([0, *torch.tensor(LENGTHS).cumsum(0).tolist()])
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(1, 50, (1, int(cu[-1])), generator=g)
    return {"input_ids": ids, "labels": ids.clone(), "cu_seqlens": cu,
            "features": torch.randn(1, int(cu[-1]), 3, dtype=torch.float64, generator=g)}


def gather_job(ulysses: int, ring: int):
    """On every rank: prepare the batch over the mesh, gather every shard key back; whether each
    equals the one-process preparation (and the placement was used)."""
    config = lightning_sp.SPConfig(ulysses_degree=ulysses, ring_degree=ring, world_size=dist.get_world_size())
    mesh = lightning_sp.build_mesh(config, device_type="cpu")
    batch = _batch()
    whole, _ = prepare_batch(batch, shard_keys=(*DEFAULT_SHARD_KEYS, "features"))
    local, info = prepare_batch(batch, mesh, shard_keys=(*DEFAULT_SHARD_KEYS, "features"))
    same = {k: torch.equal(gather_sequence(local[k], info), whole[k])
            for k in ("input_ids", "labels", "position_ids", "features")}
    return info.placement is not None, same


@pytest.mark.parametrize("world,ulysses,ring", [(2, 1, 2), (4, 2, 2), (4, 1, 4)])
def test_gather_sequence_undoes_the_placement(worlds, world, ulysses, ring):
    for placed, same in worlds(world).run(gather_job, ulysses, ring, timeout=TIMEOUT):
        assert placed and all(same.values()), same


def rel(a, b) -> float:
    return ((a - b).norm() / b.norm().clamp_min(1e-300)).item()


def _logits_and_grads(model, batch, world: int = 1):
    """Logits of the batch and the parameters' gradients of the world's token-mean loss (this
    rank's share of it, gradients averaged over the world as DDP does)."""
    model.zero_grad()
    logits = model.logits(model(batch["input_ids"], batch["position_ids"], batch["cu_seqlens"], batch["max_seqlen"]))
    labels = batch["labels"]
    loss_sum = F.cross_entropy(logits.flatten(0, 1), labels.flatten(), ignore_index=-100, reduction="sum")
    exact_token_loss(loss_sum, (labels != -100).sum()).loss.backward()
    grads = {}
    for name, p in model.named_parameters():
        if world > 1:
            dist.all_reduce(p.grad)
        grads[name] = p.grad / world
    return logits.detach(), grads


def mixed_window_job(ulysses: int, ring: int):
    """On every rank: our Llama (layer 0 a sliding window of 5, layer 1 global) on this rank's part
    of a placed batch against the same model in one process; the largest relative error, and the
    bytes the placed exchange sent."""
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=50, hidden_size=32, intermediate_size=48, num_layers=2, num_heads=4,
                         num_kv_heads=2, init_std=0.2, sliding_window=5,
                         layer_types=["sliding_attention", "full_attention"])
    model = LlamaForCausalLM(config).double()
    batch = _batch()
    del batch["features"]
    want, want_grads = _logits_and_grads(copy.deepcopy(model), prepare_batch(batch)[0])
    mesh = lightning_sp.build_mesh(lightning_sp.SPConfig(ulysses_degree=ulysses, ring_degree=ring,
                                                         world_size=dist.get_world_size()), device_type="cpu")
    local, info = prepare_batch(batch, mesh)
    context = SequenceContext()  # what the strategy does for every batch
    context.set(local["position_ids"], local["cu_seqlens"], local["max_seqlen"], info.placement)
    bind_attention(lightning_sp.swap_attention(model), mesh, context=context)
    with count_sent_bytes() as sent:
        logits, grads = _logits_and_grads(model, local, dist.get_world_size())
    errors = [rel(gather_sequence(logits, info), want)] + [rel(grads[n], g) for n, g in want_grads.items()]
    return max(errors), sum(n for *_, n in sent)


@pytest.mark.parametrize("ulysses,ring", [(2, 2), (1, 4)])
def test_sliding_and_global_layers_over_a_placement_match_one_process(worlds, ulysses, ring):
    for error, sent in worlds(4).run(mixed_window_job, ulysses, ring, timeout=TIMEOUT):
        assert error < TOL and sent > 0, (error, sent)


def _context(ring: int = 2):
    """A sequence context holding ring rank 0's part of a placed batch (index maths, no world)."""
    local, info = prepare_batch(_batch(), rank_coordinates(ring, 1, 0), agree=False)
    context = SequenceContext()
    context.set(local["position_ids"], local["cu_seqlens"], local["max_seqlen"], info.placement)
    return context, local


def test_a_layer_over_a_placement_is_causal_and_takes_the_prepared_packing_only():
    context, local = _context()
    layer = lightning_sp.LongContextAttention()
    layer.sequence_context = context
    q = torch.zeros(local["input_ids"].shape[1], 2, 4, dtype=torch.float64)
    with pytest.raises(SPConfigError, match=r"attention that is not causal over a batch whose documents are placed "
                                            r"by work .*document_placement='spread'"):
        layer(q, q, q, causal=False, cu_seqlens=local["cu_seqlens"])
    other = torch.tensor([0, q.shape[0]], dtype=torch.int32)
    with pytest.raises(SPConfigError, match=r"attention was called with cu_seqlens that are not those of "
                                            r"the batch the strategy prepared .*pass cu_seqlens=batch\['cu_seqlens'\]"
                                            r".*document_placement='spread'"):
        layer(q, q, q, causal=True, cu_seqlens=other)
    mesh = rank_coordinates(2, 1, 0)
    assert context.placed(local["cu_seqlens"].clone(), None, mesh) is context.placement  # equal values
    assert context.placed(None, local["position_ids"], mesh) is context.placement  # Hugging Face's convention
    context.set(None)
    assert context.placement is None and context.placed(None, None, mesh) is None


def user_bound_job(ulysses: int, ring: int, ring_impl: str):
    """On every rank: a LongContextAttention bound to the mesh by hand (no strategy, no sequence
    context) given the cu_seqlens of prepare_batch's placed batch; the largest relative error of
    the output and of dq, dk, dv against one process, float64."""
    torch.manual_seed(0)
    mesh = lightning_sp.build_mesh(lightning_sp.SPConfig(ulysses_degree=ulysses, ring_degree=ring,
                                                         world_size=dist.get_world_size()), device_type="cpu")
    batch = _batch()
    N, keys = batch["input_ids"].shape[1], ("q", "k", "v", "dout")
    batch.update({name: torch.randn(1, N, 4, 8, dtype=torch.float64) for name in keys})
    full = [batch[name][0].clone().requires_grad_(name != "dout") for name in keys]
    want = lightning_sp.packed_long_context_attention(full[:3], single_process_mesh(), "zigzag", causal=True,
                                                      cu_seqlens=batch["cu_seqlens"])
    want.backward(full[3])
    local, info = prepare_batch(batch, mesh, shard_keys=("input_ids", *keys))
    q, k, v = (local[name][0].clone().requires_grad_() for name in keys[:3])
    layer = lightning_sp.LongContextAttention(mesh, ring_impl=ring_impl)
    out = layer(q, k, v, causal=True, cu_seqlens=local["cu_seqlens"])
    out.backward(local["dout"][0])
    got = [out.detach(), q.grad, k.grad, v.grad]
    return info.placement is not None, max(rel(gather_sequence(g, info, dim=0), w)
                                           for g, w in zip(got, [want.detach(), *(x.grad for x in full[:3])]))


@pytest.mark.parametrize("world,ulysses,ring,ring_impl", [(2, 1, 2, "contiguous"), (4, 2, 2, "zigzag")])
def test_a_user_bound_layer_attends_over_the_placement_its_cu_seqlens_carry(worlds, world, ulysses, ring, ring_impl):
    for placed, error in worlds(world).run(user_bound_job, ulysses, ring, ring_impl, timeout=TIMEOUT):
        assert placed and error < TOL, error


def padded_spread_job():
    """On every rank: non-causal attention given the cu_seqlens of a batch spread with padded
    documents; the error it raised."""
    mesh = lightning_sp.build_mesh(lightning_sp.SPConfig(ring_degree=2, world_size=2), device_type="cpu")
    local, _ = prepare_batch(_batch(), mesh, document_placement="spread")
    q = torch.zeros(local["input_ids"].shape[1], 2, 4, dtype=torch.float64)
    try:
        lightning_sp.LongContextAttention(mesh)(q, q, q, causal=False, cu_seqlens=local["cu_seqlens"])
    except SPConfigError as err:
        return str(err)
    return None


def test_non_causal_attention_over_padded_spread_documents_raises_on_every_rank(worlds):
    for message in worlds(2).run(padded_spread_job, timeout=TIMEOUT):
        assert message is not None and "lengths [3, 2, 2, 1, 2, 2, 9]" in message and "multiple of 4" in message, message


def test_copy_engine_refuses_documents_that_span_ranks():
    from lightning_sp.core.attention.placed import check_placement
    from lightning_sp.core.placement import place_documents

    mesh = rank_coordinates(2, 1, 0).with_config(transport="copy_engine")
    placement = place_documents(torch.tensor([0, 16]), 2)  # one document, over both ring ranks
    with pytest.raises(SPConfigError, match=r"'copy_engine' cannot send .* use transport 'auto' or 'nccl', or lay the "
                                            r"documents out .*\(document_placement='spread', layout.shard_documents\)"):
        check_placement(placement, mesh, placement.tokens_per_rank, True, (None, None))


def test_the_record_of_a_placed_cu_seqlens_lives_as_long_as_the_tensor():
    import gc

    from lightning_sp.core.packing import _records, recorded_packing

    before = len(_records)
    local, info = prepare_batch(_batch(), rank_coordinates(2, 1, 0), agree=False)
    assert recorded_packing(local["cu_seqlens"]) is info.placement
    assert recorded_packing(local["cu_seqlens"].detach()) is info.placement  # e.g. a recomputation's inputs
    assert recorded_packing(local["cu_seqlens"].clone()) is None  # the same values in another batch mean nothing
    del local, info
    gc.collect()
    assert len(_records) == before
