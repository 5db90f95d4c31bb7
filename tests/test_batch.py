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
@pytest.mark.parametrize("packed", [None, "work", "spread"])
def test_the_ranks_shards_reassemble_the_prepared_sequence(layout, packed):
    """Over a ring 2 x ulysses 2 group every token is held once: the shards of all ranks, put back
    where shard_info says, are the one-process preparation (padding aside); packed documents placed
    by work or spread with the layout."""
    ids = torch.arange(1, 12)[None]
    batch = {"input_ids": ids, "labels": ids.clone()}
    if packed:
        batch["cu_seqlens"] = torch.tensor([0, 4, 11])
    whole, _ = prepare_batch(batch)
    got = {k: torch.full((11,), -1) for k in ("input_ids", "labels", "position_ids")}
    for sp_rank in range(4):
        local, info = prepare_batch(batch, rank_coordinates(2, 2, sp_rank // 2, sp_rank % 2), layout=layout,
                                    agree=False, document_placement=packed)
        assert (info.placement is not None) == (packed == "work") and (info.packed is not None) == (packed == "spread")
        index = info.token_index
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


def test_what_hugging_faces_loss_reads():
    """shift_labels is the prepared labels; num_items_in_batch their valid count over the world,
    divided by the world size (one process here: the count); a batch without labels gets neither."""
    ids = torch.arange(1, 13).view(2, 6)
    labels = ids.clone()
    labels[0, 2] = IGNORE
    local, _ = prepare_batch({"input_ids": ids, "labels": labels})
    assert local["shift_labels"] is local["labels"]
    assert local["num_items_in_batch"].dtype == torch.float64 and float(local["num_items_in_batch"]) == 9.0
    # index maths of rank 1 of ulysses 2 (no agreement): its shard of the shifted labels, this batch's count / 2
    local, _ = prepare_batch({"input_ids": ids, "labels": labels}, rank_coordinates(1, 2, 0, 1), layout="contiguous",
                             agree=False)
    assert torch.equal(local["shift_labels"], local["labels"]) and local["labels"].shape == (2, 3)
    assert float(local["num_items_in_batch"]) == 4.5
    local, _ = prepare_batch({"input_ids": ids, "labels": labels}, shift_labels=False)
    assert torch.equal(local["shift_labels"], labels) and float(local["num_items_in_batch"]) == 11.0
    local, _ = prepare_batch({"input_ids": ids})
    assert "shift_labels" not in local and "num_items_in_batch" not in local


def test_packed_batches_carry_hugging_faces_attention_arguments():
    ids = torch.arange(1, 10)[None]
    local, _ = prepare_batch({"input_ids": ids, "labels": ids.clone(), "cu_seqlens": torch.tensor([0, 4, 9])})
    assert local["cu_seq_lens_q"] is local["cu_seqlens"] and local["cu_seq_lens_k"] is local["cu_seqlens"]
    assert local["max_length_q"] == local["max_length_k"] == local["max_seqlen"] == 5
    assert float(local["num_items_in_batch"]) == 7.0  # each document's last token predicts nothing


@pytest.mark.parametrize("key", ["shift_labels", "num_items_in_batch"])
def test_what_preparation_makes_must_not_come_in(key):
    batch = {"input_ids": torch.zeros(1, 4, dtype=torch.long), "labels": torch.zeros(1, 4, dtype=torch.long),
             key: torch.zeros(1, 4, dtype=torch.long)}
    with pytest.raises(SPConfigError, match=rf"already has \['{key}'\], which batch preparation makes from 'labels'"):
        prepare_batch(batch)


def test_prepared_batch_prepares_once():
    """lightning_sp.prepared_batch: a prepared batch as it is, any other prepared for this process."""
    import lightning_sp

    ids = torch.arange(1, 6)[None]
    local = lightning_sp.prepared_batch({"input_ids": ids, "labels": ids.clone()}, ignore_index=-1)
    assert local["labels"].tolist() == [[2, 3, 4, 5, -1]] and local["position_ids"].tolist() == [[0, 1, 2, 3, 4]]
    assert lightning_sp.prepared_batch(local) is local


@pytest.mark.parametrize("packed", [False, True])
def test_a_hugging_face_model_takes_the_prepared_batch_whole(packed):
    """model(**batch) with every entry of a prepared batch (shard_info, cu_seqlens, an index, ...):
    Hugging Face's own loss on it equals the token mean of float64 cross entropy, packed documents
    each on their own."""
    transformers = pytest.importorskip("transformers")
    import copy

    import torch.nn.functional as F

    import lightning_sp

    torch.manual_seed(0)
    config = transformers.LlamaConfig(vocab_size=16, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                      num_attention_heads=4, num_key_value_heads=2, attn_implementation="eager")
    model = transformers.LlamaForCausalLM(config).double()
    ids = torch.randint(0, 16, (1 if packed else 2, 10))
    labels = ids.clone()
    labels[0, 3] = IGNORE
    batch = {"input_ids": ids, "labels": labels, "idx": torch.tensor([4])}
    docs = [(0, 10)]
    if packed:
        batch["cu_seqlens"], docs = torch.tensor([0, 4, 10]), [(0, 4), (4, 10)]
    local, _ = prepare_batch(batch)
    swapped = transformers.LlamaForCausalLM(copy.deepcopy(config)).double()  # swapping switches its config
    lightning_sp.swap_attention(swapped, ring_impl="contiguous")
    swapped.load_state_dict(model.state_dict())
    got = swapped(**local).loss
    total, count = 0.0, 0
    for a, b in docs:  # the reference: each document alone, its labels shifted within it
        logits = model(input_ids=ids[:, a:b]).logits
        target = torch.cat([labels[:, a + 1:b], torch.full((ids.shape[0], 1), IGNORE)], 1)
        total = total + F.cross_entropy(logits.flatten(0, 1), target.flatten(), ignore_index=IGNORE, reduction="sum")
        count += int((target != IGNORE).sum())
    assert abs(got.item() - (total / count).item()) < 1e-6 * (total / count).item()


# ---------------------------------------------------------------------------------------------- Hugging Face's
# packed-batch convention: one row whose position_ids restart at 0 for each document, no cu_seqlens


@pytest.mark.parametrize("starts_ignored", [False, True])
def test_positions_that_restart_at_zero_are_packed_documents(starts_ignored):
    """The documents come from the restarts (1-token ones included); the labels, unshifted, with or
    without -100 at each document's first token (DataCollatorWithFlattening's separator), are shifted
    so that no position predicts the next document's first token; the positions stay as given."""
    from lightning_sp.integration.batch import documents_from_positions

    pos = torch.tensor([[0, 1, 2, 0, 0, 1, 0, 1, 2, 3]])
    ids = torch.arange(10, 20)[None]
    labels = ids.clone()
    if starts_ignored:
        labels[pos == 0] = IGNORE
    assert documents_from_positions(pos).tolist() == [0, 3, 4, 6, 10]
    local, info = prepare_batch({"input_ids": ids, "labels": labels, "position_ids": pos})
    assert info.packed is not None and info.seq_len == 10
    assert local["cu_seqlens"].tolist() == [0, 3, 4, 6, 10] and local["max_seqlen"] == 4
    assert local["cu_seq_lens_q"] is local["cu_seqlens"]
    assert local["labels"][0].tolist() == [11, 12, IGNORE, IGNORE, 15, IGNORE, 17, 18, 19, IGNORE]
    assert torch.equal(local["position_ids"], pos) and float(local["num_items_in_batch"]) == 6.0
    # the same batch with its cu_seqlens given: the same preparation
    explicit, _ = prepare_batch({"input_ids": ids, "labels": labels, "cu_seqlens": torch.tensor([0, 3, 4, 6, 10])})
    for key in ("labels", "position_ids", "cu_seqlens"):
        assert torch.equal(local[key], explicit[key]), key


def test_the_data_collator_with_flattening_gives_packed_documents():
    transformers = pytest.importorskip("transformers")
    from lightning_sp.integration.batch import documents_from_positions

    docs = [{"input_ids": [5, 6, 7]}, {"input_ids": [8]}, {"input_ids": [9, 10, 11, 12, 13]}]
    batch = transformers.DataCollatorWithFlattening(return_tensors="pt")(docs)
    assert documents_from_positions(batch["position_ids"]).tolist() == [0, 3, 4, 9]
    local, _ = prepare_batch(dict(batch))
    assert local["labels"][0].tolist() == [6, 7, IGNORE, IGNORE, 10, 11, 12, 13, IGNORE]


@pytest.mark.parametrize("layout,placement", [("contiguous", "spread"), ("zigzag", "spread"), ("stripe", "spread"),
                                              ("zigzag", "work")])
def test_restarting_positions_are_sharded_like_explicit_documents(layout, placement):
    """On every rank of ring 2 x ulysses 2 (index maths): the same local batch as with cu_seqlens."""
    lengths = [1, 7, 2, 1, 5]
    pos = torch.cat([torch.arange(n) for n in lengths])[None]
    cu = torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()])
    ids = torch.arange(1, 17)[None]
    for sp_rank in range(4):
        mesh = rank_coordinates(2, 2, sp_rank // 2, sp_rank % 2)
        implicit, _ = prepare_batch({"input_ids": ids, "labels": ids.clone(), "position_ids": pos}, mesh,
                                    layout=layout, agree=False, document_placement=placement)
        explicit, _ = prepare_batch({"input_ids": ids, "labels": ids.clone(), "cu_seqlens": cu}, mesh,
                                    layout=layout, agree=False, document_placement=placement)
        for key in ("input_ids", "labels", "position_ids", "cu_seqlens"):
            assert torch.equal(implicit[key], explicit[key]), (sp_rank, key)


def test_packed_documents_are_placed_by_work_by_default():
    """Over a ring of 2 x ulysses 2 (index maths): short documents whole on one ring rank, the one
    long document split; each rank's cu_seqlens are its ring rank's pieces (then its filler), the
    positions within documents, padding ignored by the loss. A ring of one rank spreads (nothing to place)."""
    lengths = [3, 2, 16, 2, 1, 2, 2]
    cu = torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()])
    ids = torch.arange(1, int(cu[-1]) + 1)[None]
    doc_of = torch.repeat_interleave(torch.arange(len(lengths)), torch.tensor(lengths))
    ranks_of = {}
    for sp_rank in range(4):
        local, info = prepare_batch({"input_ids": ids, "labels": ids.clone(), "cu_seqlens": cu},
                                    rank_coordinates(2, 2, sp_rank // 2, sp_rank % 2), agree=False)
        P, ring_rank = info.placement, sp_rank // 2
        assert P is not None and info.packed is None and (info.seq_len, info.padded_len) == (28, 2 * P.tokens_per_rank)
        cu_local = local["cu_seqlens"].tolist()
        assert cu_local[:len(P.cu_seqlens[ring_rank])] == P.cu_seqlens[ring_rank].tolist()
        assert cu_local[-1] == P.tokens_per_rank and local["cu_seq_lens_q"] is local["cu_seqlens"]
        assert local["max_seqlen"] == local["max_length_k"] == max(b - a for a, b in zip(cu_local[:-1], cu_local[1:]))
        index = info.token_index
        assert local["input_ids"].shape == (1, P.tokens_per_rank // 2)
        for tok, lab, pos in zip(index.tolist(), local["labels"][0].tolist(), local["position_ids"][0].tolist()):
            if tok < 0:
                assert lab == IGNORE
                continue
            doc = int(doc_of[tok])
            ranks_of.setdefault(doc, set()).add(ring_rank)
            assert pos == tok - int(cu[doc])
    assert all(len(ranks_of[d]) == 1 for d in range(len(lengths)) if d != 2) and ranks_of[2] == {0, 1}, ranks_of
    _, info = prepare_batch({"input_ids": ids, "cu_seqlens": cu}, rank_coordinates(1, 4, 0, 1), agree=False)
    assert info.placement is None and info.packed is not None


def test_document_placement_errors_name_the_fix():
    batch = {"input_ids": torch.arange(6)[None], "cu_seqlens": torch.tensor([0, 2, 6])}
    with pytest.raises(SPConfigError, match=r"unknown document_placement 'zigzag'; choose 'work' .* or 'spread'"):
        prepare_batch(batch, document_placement="zigzag")
    mesh = rank_coordinates(2, 1, 0).with_config(transport="copy_engine")
    with pytest.raises(SPConfigError, match=r"transport 'copy_engine' cannot carry .* document_placement='spread'"):
        prepare_batch(batch, mesh, agree=False)
    _, info = prepare_batch(batch, mesh, agree=False, document_placement="spread")
    assert info.packed is not None


def test_positions_without_a_restart_stay_dense():
    from lightning_sp.integration.batch import documents_from_positions

    assert documents_from_positions(torch.tensor([[3, 4, 5, 6]])) is None
    assert documents_from_positions(torch.arange(6).expand(2, 6)) is None
    local, info = prepare_batch({"input_ids": torch.arange(6)[None], "position_ids": torch.tensor([[4, 5, 6, 7, 8, 9]])})
    assert info.packed is None and "cu_seqlens" not in local


@pytest.mark.parametrize("pos,match", [
    ([[0, 1, 0, 1], [0, 1, 2, 3]], r"restart at 0 inside a row .* the batch has 2 rows .*pack the documents"),
    ([[0, 1, 3, 0, 1]], r"position 2 holds 3 after 1; each document's positions must count 0, 1, 2"),
    ([[5, 6, 0, 1]], r"position 0 holds 5 after nothing"),
])
def test_positions_that_are_neither_dense_nor_packed_say_what_to_fix(pos, match):
    pos = torch.tensor(pos)
    with pytest.raises(SPConfigError, match=match):
        prepare_batch({"input_ids": torch.zeros_like(pos), "position_ids": pos})
