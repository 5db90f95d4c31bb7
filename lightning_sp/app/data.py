"""Data for long-context causal-LM training, no downloads.

* :class:`ByteTokenizer`: bytes 0..255 plus BOS, EOS, SEP.
* :class:`LongRangeTask`: synthetic copy / associative-recall sequences whose answers sit far from
  the tokens they depend on, so under sequence parallelism they depend on tokens held by other ranks.
* :class:`PackedText`: text or JSONL files, tokenized and packed into rows of ``seq_len`` tokens
  whose global ``cu_seqlens`` keep documents from attending to each other.
* :class:`LMDataModule`: the Lightning data module around either.

Samples are dicts with ``input_ids`` and ``labels`` *aligned with the inputs* (label t is token t,
or ``ignore_index`` where no loss is wanted); batch preparation
(:func:`lightning_sp.integration.batch.prepare_batch`) shifts them by one before sequence sharding.
Packed samples also carry ``cu_seqlens``, from which batch preparation keeps every label inside its
document.
"""
from __future__ import annotations

import json
from pathlib import Path

import lightning as L
import torch
from torch.utils.data import DataLoader, Dataset, default_collate

from ..core.errors import SPConfigError

IGNORE_INDEX = -100


class ByteTokenizer:
    """UTF-8 bytes as token ids 0..255; BOS=256, EOS=257, SEP=258."""

    BOS, EOS, SEP = 256, 257, 258
    vocab_size = 259

    def encode(self, text: str, bos: bool = True, eos: bool = True) -> list[int]:
        return [self.BOS] * bos + list(text.encode("utf-8")) + [self.EOS] * eos

    def decode(self, ids) -> str:
        return bytes(int(i) for i in ids if 0 <= int(i) < 256).decode("utf-8", errors="replace")


class LongRangeTask(Dataset):
    """Synthetic sequences of ``seq_len`` tokens whose loss is only on answers that need a far-away token.

    ``copy``: ``BOS x_1..x_n SEP x_1..x_n`` (n = (seq_len - 2) // 2, padded with EOS); the loss is on the
    second copy. ``recall``: ``BOS k_1 v_1 .. k_n v_n SEP q_1 a_1 .. q_m a_m``: distinct keys, the answer
    a_j is the value stored with key q_j; the loss is on the answers. Symbols are the letters from 'a'
    (``alphabet`` of them; recall uses the first half as keys, the second half as values). Sample i is
    the same for every process and every epoch.
    """

    TASKS = ("copy", "recall")

    def __init__(self, task: str = "copy", seq_len: int = 256, num_samples: int = 4096, alphabet: int = 16,
                 num_queries: int | None = None, seed: int = 0):
        if task not in self.TASKS:
            raise SPConfigError(f"unknown task {task!r}; choose one of {', '.join(self.TASKS)}")
        if seq_len < 8:
            raise SPConfigError(f"seq_len={seq_len} is too short for a long-range task; use at least 8")
        if not 2 <= alphabet <= 26 or (task == "recall" and alphabet < 4):
            raise SPConfigError(f"alphabet={alphabet} must be between 2 (4 for recall) and 26 letters")
        self.task, self.seq_len, self.num_samples, self.alphabet, self.seed = task, seq_len, num_samples, alphabet, seed
        pairs = (seq_len - 2) // 4  # recall: context pairs take half of the room, queries the other half
        self.num_pairs = min(pairs, alphabet // 2) if task == "recall" else 0
        self.num_queries = num_queries or pairs
        if task == "recall" and 2 + 2 * self.num_pairs + 2 * self.num_queries > seq_len:
            raise SPConfigError(f"num_queries={num_queries} does not fit in seq_len={seq_len}")

    def __len__(self) -> int:
        return self.num_samples

    def __getitem__(self, i: int) -> dict:
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + i)
        a, tok = ord("a"), ByteTokenizer
        ids = torch.full((self.seq_len,), tok.EOS)
        labels = torch.full((self.seq_len,), IGNORE_INDEX)
        ids[0] = tok.BOS
        if self.task == "copy":
            n = (self.seq_len - 2) // 2
            x = torch.randint(0, self.alphabet, (n,), generator=g) + a
            ids[1:n + 1], ids[n + 1], ids[n + 2:2 * n + 2] = x, tok.SEP, x
            labels[n + 2:2 * n + 2] = x
        else:
            half, n, m = self.alphabet // 2, self.num_pairs, self.num_queries
            keys = torch.randperm(half, generator=g)[:n] + a
            values = torch.randint(half, self.alphabet, (n,), generator=g) + a
            ids[1:2 * n + 1:2], ids[2:2 * n + 2:2], ids[2 * n + 1] = keys, values, tok.SEP
            which = torch.randint(0, n, (m,), generator=g)
            start = 2 * n + 2
            ids[start:start + 2 * m:2], ids[start + 1:start + 2 * m:2] = keys[which], values[which]
            labels[start + 1:start + 2 * m:2] = values[which]
        return {"input_ids": ids, "labels": labels}


def read_documents(paths, text_key: str = "text") -> list[str]:
    """Documents from files: one per JSONL record (its ``text_key`` field), blank-line-separated
    paragraphs of any other text file."""
    if isinstance(paths, (str, Path)):
        paths = [paths]
    docs = []
    for path in map(Path, paths):
        if not path.is_file():
            raise SPConfigError(f"data file {str(path)!r} does not exist; pass paths of .txt or .jsonl files")
        if path.suffix == ".jsonl":
            for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
                if line.strip():
                    record = json.loads(line)
                    if text_key not in record:
                        raise SPConfigError(f"{path}:{n} has no {text_key!r} field (keys: {sorted(record)}); "
                                            f"set text_key to the field holding the text")
                    docs.append(record[text_key])
        else:
            docs += [p.strip() for p in path.read_text(encoding="utf-8").split("\n\n") if p.strip()]
    if not docs:
        raise SPConfigError(f"no documents found in {[str(p) for p in paths]}")
    return docs


class PackedText(Dataset):
    """Byte-tokenized documents packed back to back into rows of ``seq_len`` tokens.

    Each row carries the global ``cu_seqlens`` of its document pieces (a document cut by a row
    boundary continues as a new piece); ``labels`` are the tokens themselves. Batch preparation
    shifts them and ignores the last token of every piece, so that no token is trained to predict
    the next document.
    """

    def __init__(self, paths, seq_len: int = 1024, text_key: str = "text"):
        if seq_len < 2:
            raise SPConfigError(f"seq_len={seq_len} must be at least 2")
        tok = ByteTokenizer()
        docs = [torch.tensor(tok.encode(d)) for d in read_documents(paths, text_key)]
        stream = torch.cat(docs)
        self.seq_len = seq_len
        self.num_rows = len(stream) // seq_len
        if self.num_rows == 0:
            raise SPConfigError(f"the data has {len(stream)} tokens, fewer than one row of seq_len={seq_len}; "
                                f"lower seq_len or add text")
        self.stream = stream[: self.num_rows * seq_len]
        self.doc_starts = torch.tensor([0, *torch.tensor([len(d) for d in docs]).cumsum(0).tolist()[:-1]])

    def __len__(self) -> int:
        return self.num_rows

    def __getitem__(self, i: int) -> dict:
        lo, hi = i * self.seq_len, (i + 1) * self.seq_len
        inner = self.doc_starts[(self.doc_starts > lo) & (self.doc_starts < hi)] - lo
        cu = torch.cat([torch.tensor([0]), inner, torch.tensor([self.seq_len])])
        ids = self.stream[lo:hi].clone()
        return {"input_ids": ids, "labels": ids.clone(), "cu_seqlens": cu}


def collate(samples: list[dict]) -> dict:
    """Stack dense samples into (batch, seq); concatenate packed samples into one row (1, tokens)
    with merged ``cu_seqlens``, the shape the varlen attention takes."""
    if "cu_seqlens" not in samples[0]:
        return default_collate(samples)
    offsets = torch.tensor([0, *[len(s["input_ids"]) for s in samples]]).cumsum(0)
    cu = torch.cat([samples[0]["cu_seqlens"][:1]] + [s["cu_seqlens"][1:] + o for s, o in zip(samples, offsets)])
    return {"input_ids": torch.cat([s["input_ids"] for s in samples])[None],
            "labels": torch.cat([s["labels"] for s in samples])[None], "cu_seqlens": cu}


class LMDataModule(L.LightningDataModule):
    """Serves ``train`` (and optionally ``val``) datasets of the dict samples above.

    Under sequence parallelism every rank of a sequence-parallel group must see the same batch: the
    strategy's ``distributed_sampler_kwargs`` (data-parallel replicas only) make Lightning's
    sampler do that, so this module shuffles with a fixed seed and nothing else.
    """

    def __init__(self, train: Dataset, val: Dataset | None = None, batch_size: int = 1, num_workers: int = 0,
                 shuffle: bool = True):
        super().__init__()
        if not isinstance(batch_size, int) or batch_size < 1:
            raise SPConfigError(f"batch_size must be a positive int, got {batch_size!r}")
        self.train, self.val, self.batch_size, self.num_workers, self.shuffle = train, val, batch_size, num_workers, shuffle

    def _loader(self, dataset, shuffle):
        return DataLoader(dataset, batch_size=self.batch_size, shuffle=shuffle, collate_fn=collate,
                          num_workers=self.num_workers, drop_last=True,
                          generator=torch.Generator().manual_seed(0) if shuffle else None)

    def train_dataloader(self):
        return self._loader(self.train, self.shuffle)

    def val_dataloader(self):
        return [] if self.val is None else self._loader(self.val, False)
