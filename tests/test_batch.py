"""Batch preparation as a pure function: one process (what CausalLM does under DDP) and index maths
of other ranks (mesh coordinates without process groups). The collective agreement on every batch
is tested on 4 ranks in test_strategy.py."""
from __future__ import annotations

import pytest
import torch
from lightning.fabric.utilities.apply_func import move_data_to_device

from lightning_sp import SPConfigError
from lightning_sp.core.mesh import rank_coordinates
from lightning_sp.integration.batch import SHARD_INFO, ShardInfo, gather_sequence, prepare_batch

IGNORE = -100


def test_one_process_shifts_labels_and_sets_positions_without_padding():
    ids = torch.arange(1, 16).view(3, 5)
    local, info = prepare_batch({"input_ids": ids, "labels": ids.clone(), "idx": [7, 8, 9]})
    assert torch.equal(local["input_ids"], ids) and local["idx"] == [7, 8, 9]
    assert torch.equal(local["labels"], torch.cat([ids[:, 1:], torch.full((3, 1), IGNORE)], 1))
    assert torch.equal(local["position_ids"], torch.arange(5).expand(3, 5))
    assert local[SHARD_INFO] is info and (info.seq_len, info.padded_len, info.layout) == (5, 5, "contiguous")
    assert info.mesh.sp_size == 1 and "cu_seqlens" not in local


def test_plain_labels_of_packed_documents_never_cross_a_document_in_one_process():
    cu = torch.tensor([0, 3, 3, 7, 9])  # an empty document too
    ids = torch.arange(10, 19)
    local, info = prepare_batch({"input_ids": ids[None], "labels": ids[None].clone(), "cu_seqlens": cu})
    assert local["labels"][0].tolist() == [11, 12, IGNORE, 14, 15, 16, IGNORE, 18, IGNORE]
    assert local["position_ids"][0].tolist() == [0, 1, 2, 0, 1, 2, 3, 0, 1]
    assert local["cu_seqlens"].tolist() == [0, 3, 7, 9] and local["max_seqlen"] == 4
    assert info.packed is not None and info.seq_len == 9


def test_shift_labels_false_leaves_labels_as_they_are():
    ids = torch.arange(1, 7)[None]
    labels = torch.tensor([[5, IGNORE, 3, 2, 1, 0]])
    local, _ = prepare_batch({"input_ids": ids, "labels": labels, "cu_seqlens": torch.tensor([0, 2, 6])},
                             shift_labels=False)
    assert torch.equal(local["labels"], labels)


@pytest.mark.parametrize("layout", ["contiguous", "zigzag", "stripe"])
@pytest.mark.parametrize("packed", [False, True])
def test_the_ranks_shards_reassemble_the_prepared_sequence(layout, packed):
    """Over a ring 2 x ulysses 2 group every token is held once: the shards of all ranks, put back
    where shard_info says, are the one-process preparation (padding aside)."""
    ids = torch.arange(1, 12)[None]
    batch = {"input_ids": ids, "labels": ids.clone()}
    if packed:
        batch["cu_seqlens"] = torch.tensor([0, 4, 11])
    whole, _ = prepare_batch(batch)
    got = {k: torch.full((11,), -1) for k in ("input_ids", "labels", "position_ids")}
    for sp_rank in range(4):
        local, info = prepare_batch(batch, rank_coordinates(2, 2, sp_rank // 2, sp_rank % 2), layout=layout,
                                    agree=False)
        if packed:
            index = info.packed.token_index
        else:
            from lightning_sp.core.layout import local_indices
            index = local_indices(info.padded_len, info.mesh, layout)
            index = torch.where(index < info.seq_len, index, -1)
        for k in got:
            keep = index >= 0
            got[k][index[keep]] = local[k][0][keep]
    for k in got:
        assert torch.equal(got[k], whole[k][0]), k


def test_gather_sequence_in_one_process_drops_nothing_but_padding():
    ids = torch.arange(1, 6)[None]
    local, info = prepare_batch({"input_ids": ids}, layout="contiguous")
    assert torch.equal(gather_sequence(local["input_ids"] * 2, info), ids * 2)
    with pytest.raises(SPConfigError, match="needs the ShardInfo of a prepared batch"):
        gather_sequence(ids, None)


def test_a_prepared_batch_survives_lightnings_device_transfer():
    """ShardInfo is not a dataclass, which Lightning's transfer would rebuild (and a frozen one refuse)."""
    local, info = prepare_batch({"input_ids": torch.arange(4)[None], "cu_seqlens": torch.tensor([0, 1, 4])})
    moved = move_data_to_device(local, torch.device("cpu"))
    assert moved[SHARD_INFO] is info and isinstance(info, ShardInfo)


@pytest.mark.parametrize("batch,kw,match", [
    ((torch.zeros(2, 4),), {}, "needs batches that are dicts.*got tuple"),
    ({"tokens": torch.zeros(2, 4)}, {}, r"none of the shard keys.*it has \['tokens'\].*shard_keys"),
    ({"input_ids": torch.zeros(2, 4), "labels": torch.zeros(2, 5)}, {}, "different sequence lengths"),
    ({"input_ids": torch.zeros(2, 4), "cu_seqlens": torch.tensor([0, 4])}, {}, "must have batch size 1"),
    ({"input_ids": torch.zeros(1, 4), "cu_seqlens": torch.tensor([0, 3])}, {}, "cu_seqlens ends at 3 but"),
    ({"input_ids": torch.zeros(1, 4), "cu_seqlens": torch.tensor([1, 4])}, {}, "starting at 0"),
    ({"input_ids": torch.zeros(1, 5)}, {"layout": "zigzag", "pad_to_multiple": False},
     "sequence length 5 is not divisible by 2.*pad the sequence to 6 tokens"),
    ({"input_ids": torch.zeros(1, 5), SHARD_INFO: None}, {}, "prepared already"),
])
def test_bad_batches_say_what_to_fix(batch, kw, match):
    with pytest.raises(SPConfigError, match=match):
        prepare_batch(batch, **kw)


def test_custom_shard_keys_and_padding_fills():
    """Keys beyond the defaults are split too; padding holds ignore_index for labels, counts on for
    positions and is 0 elsewhere."""
    batch = {"input_ids": torch.arange(1, 6)[None], "labels": torch.arange(1, 6)[None],
             "loss_mask": torch.ones(1, 5, dtype=torch.bool)}
    local, info = prepare_batch(batch, rank_coordinates(1, 2, 0, 1), layout="contiguous", ignore_index=-1,
                                shard_keys=("input_ids", "labels", "loss_mask"), agree=False)
    assert info.padded_len == 6  # ulysses rank 1 holds tokens 3..5, the last one padding
    assert local["input_ids"].tolist() == [[4, 5, 0]] and local["labels"].tolist() == [[5, -1, -1]]
    assert local["position_ids"].tolist() == [[3, 4, 5]] and local["loss_mask"].tolist() == [[True, True, False]]
