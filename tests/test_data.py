"""Synthetic long-range tasks, byte tokenizer, packed text and its collate."""
from __future__ import annotations

import json

import pytest
import torch

from lightning_sp import SPConfigError
from lightning_sp.data import ByteTokenizer, LMDataModule, LongRangeTask, PackedText, collate
from lightning_sp.integration.batch import prepare_batch


def test_copy_task_answers_repeat_the_first_half():
    sample = LongRangeTask("copy", seq_len=20, alphabet=4, seed=3)[7]
    ids, labels = sample["input_ids"], sample["labels"]
    assert ids[0] == ByteTokenizer.BOS and ids[10] == ByteTokenizer.SEP  # n = (20 - 2) // 2 = 9 symbols
    assert torch.equal(ids[1:10], ids[11:20]) and torch.equal(labels[11:20], ids[11:20])
    assert (labels[:11] == -100).all()
    assert torch.equal(LongRangeTask("copy", seq_len=20, alphabet=4, seed=3)[7]["input_ids"], ids), "deterministic"


def test_recall_answers_are_the_values_stored_with_the_keys():
    task = LongRangeTask("recall", seq_len=40, alphabet=10)
    ids, labels = task[0]["input_ids"].tolist(), task[0]["labels"]
    n = task.num_pairs
    memory = dict(zip(ids[1:2 * n + 1:2], ids[2:2 * n + 2:2]))
    assert len(memory) == n, "keys are distinct"
    answered = (labels != -100).nonzero().flatten().tolist()
    assert len(answered) == task.num_queries
    for t in answered:
        assert memory[ids[t - 1]] == ids[t] == labels[t]


def test_packed_text_keeps_documents_apart(tmp_path):
    path = tmp_path / "docs.jsonl"
    texts = ["first document", "b", "the third one, longer than the others"]
    path.write_text("\n".join(json.dumps({"text": t}) for t in texts))
    data = PackedText([path], seq_len=16)
    tok = ByteTokenizer()
    stream = torch.cat([torch.tensor(tok.encode(t)) for t in texts])
    assert len(data) == len(stream) // 16
    batch = collate([data[0], data[1]])
    assert batch["input_ids"].shape == (1, 32) and torch.equal(batch["input_ids"][0], stream[:32])
    # boundaries: document starts (0, 16, 19 in the stream) and the row cut at 16
    assert batch["cu_seqlens"].tolist() == [0, 16, 19, 32]
    assert torch.equal(batch["labels"], batch["input_ids"]), "labels are the tokens; preparation shifts them"
    assert tok.decode(batch["input_ids"][0, 16:19]) == "b"
    # prepared for training: each token's label is the next token of its own piece, never the next one's
    prepared, _ = prepare_batch(batch)
    want = torch.cat([stream[1:32], torch.tensor([-100])])
    want[[15, 18, 31]] = -100  # the last token of each piece (16, 19 and 32 are where the next ones start)
    assert torch.equal(prepared["labels"][0], want)
    assert prepared["position_ids"][0].tolist() == [*range(16), *range(3), *range(13)]


def test_text_files_split_on_blank_lines(tmp_path):
    (tmp_path / "a.txt").write_text("one\n\ntwo\nlines\n\n\nthree")
    data = PackedText([tmp_path / "a.txt"], seq_len=4)
    assert ByteTokenizer().decode(data.stream) == "onetwo\nlinesthr"  # 5 rows of 4 of the 23 tokens
    assert int((data.stream == ByteTokenizer.BOS).sum()) == 3


def test_bad_data_settings_say_what_to_fix(tmp_path):
    with pytest.raises(SPConfigError, match="unknown task 'sort'"):
        LongRangeTask("sort")
    with pytest.raises(SPConfigError, match="does not exist"):
        PackedText([tmp_path / "missing.jsonl"])
    (tmp_path / "x.jsonl").write_text(json.dumps({"body": "hi"}))
    with pytest.raises(SPConfigError, match="set text_key"):
        PackedText([tmp_path / "x.jsonl"])
    with pytest.raises(SPConfigError, match="fewer than one row"):
        PackedText([tmp_path / "x.jsonl"], seq_len=64, text_key="body")
    with pytest.raises(SPConfigError, match="batch_size"):
        LMDataModule(LongRangeTask(), batch_size=0)
