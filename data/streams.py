"""What a training step reads: deterministic example streams, packed pretraining text, and the
instruction datasets as (stream, held-out batches).
Every rank of a torchrun gets its own share of each global batch.

`d` below is engineering.distributed.Dist or the trainer's engineering.rundir.Run (anything with
.rank and .world_size); this file imports nothing from outside data/.
"""
import os

import torch

from data import TASK_IDS, TASK_NAMES
from data.format import collate, encode_example
from data.records import load_records



class ExampleStream:
    """An endless stream over `examples` (each a dict of lists or tensors), reshuffled every epoch
    with seed + epoch. Global batch i = stream positions [i*B, (i+1)*B); rank r of W reads the r-th
    slice, so one process with batch B sees exactly what W ranks see together -- and a resumed run
    continues at batch i with no state but i."""

    def __init__(self, examples: list, collate, seed: int):
        if not examples:
            raise ValueError("empty dataset: no examples to train on")
        self.examples, self.collate, self.seed, self._perms = examples, collate, seed, {}

    def _order(self, epoch):
        if epoch not in self._perms:
            g = torch.Generator().manual_seed(self.seed + epoch)
            self._perms = {epoch: torch.randperm(len(self.examples), generator=g).tolist()}
        return self._perms[epoch]

    def batch(self, index: int, batch_size: int, d) -> dict:
        per_rank = batch_size // d.world_size
        start = index * batch_size + d.rank * per_rank
        items = []
        for pos in range(start, start + per_rank):
            items.append(self.example(*divmod(pos, len(self.examples))))
        return self.collate(items)

    def example(self, epoch: int, offset: int):
        """The example at `offset` of epoch `epoch`'s order."""
        return self.examples[self._order(epoch)[offset]]


def pack_corpus(token_ids: list, seq_len: int) -> list:
    """Cut one long token stream into chunks of seq_len + 1
    (inputs = chunk[:-1], targets = chunk[1:])."""
    n = (len(token_ids) - 1) // seq_len
    if n < 1:
        raise ValueError(f"corpus has {len(token_ids)} tokens: "
                         f"too short for one sequence of {seq_len}")
    return [torch.tensor(token_ids[i * seq_len : (i + 1) * seq_len + 1]) for i in range(n)]


class PackedCorpusStream(ExampleStream):
    """Pretraining text as an endless stream of seq_len + 1 chunks, packed anew every epoch: the
    documents are shuffled and cut into chunks again, so each fact is read after other text each
    time. (Packed once, the toy base memorised every chunk after its fixed neighbours -- train loss
    0.06, held-out 1.30 -- and completed only 38 % of the facts it had read when their sentence was
    begun for it, "Grouru lives in" -> its town, where chance is 10 %; repacked, 90-91 %:
    evaluation/recall.py.)"""

    def __init__(self, documents: list, seq_len: int, seed: int):
        if not documents:
            raise ValueError("empty corpus: no documents to pretrain on")
        # documents: token-id lists. Every epoch has as many chunks (pack_corpus refuses too short a
        # corpus); the base stream holds only their count, as the chunks are cut anew every epoch.
        self.documents, self.seq_len, self.seed, self._chunks = documents, seq_len, seed, {}
        n_chunks = len(self._epoch_chunks(0))
        super().__init__(range(n_chunks), collate_packed, seed)

    def _epoch_chunks(self, epoch):
        if epoch not in self._chunks:
            # a seed of its own: the chunk order uses seed + epoch
            g = torch.Generator().manual_seed(2**32 + self.seed + epoch)
            order = torch.randperm(len(self.documents), generator=g).tolist()
            self._chunks = {epoch: pack_corpus([i for k in order for i in self.documents[k]],
                                               self.seq_len)}
        return self._chunks[epoch]

    def example(self, epoch: int, offset: int):
        return self._epoch_chunks(epoch)[self._order(epoch)[offset]]


def split_corpus(documents: list, seq_len: int, val_share: int = 50):
    """(training documents, held-out chunks): the last 1/val_share of the documents (token-id lists)
    are held out, at least one and at least one chunk's worth of tokens, packed once."""
    if len(documents) < 2:
        raise ValueError(f"corpus has {len(documents)} document(s): "
                         f"too few to hold some out and train on the rest")
    n_val = max(1, len(documents) // val_share)
    while sum(map(len, documents[-n_val:])) <= seq_len and n_val < len(documents) - 1:
        n_val += 1
    return documents[:-n_val], pack_corpus([i for doc in documents[-n_val:] for i in doc], seq_len)


def collate_packed(chunks: list) -> dict:
    stacked = torch.stack(chunks)  # [B, T+1]
    tokens, targets = stacked[:, :-1], stacked[:, 1:]  # [B, T]
    return {"tokens": tokens, "targets": targets, "mask": torch.ones_like(tokens, dtype=torch.bool),
            "task": torch.full((len(chunks),), -1)}


def sft_examples(records: list, tokenizer, max_len: int, where: str) -> list:
    """Records -> encoded examples (data.format.encode_example);
    a malformed record names its position."""
    if not records:
        raise ValueError(f"{where}: no examples")
    out = []
    for i, record in enumerate(records):
        try:
            out.append(encode_example(tokenizer, record, max_len))
        except ValueError as e:
            raise ValueError(f"{where}: example {i}: {e}") from None
    return out


HELD_OUT_LIMIT = 256  # held-out examples a run evaluates on (the first ones of the val split)


def val_batches_of(examples: list, collate, batch_size: int, d,
                   limit: int = HELD_OUT_LIMIT) -> list:
    """Fixed held-out batches, each rank its own interleaved share -- the same number of examples on
    every rank, so every rank runs the same number of forwards
    (FSDP's collectives would otherwise hang)."""
    n = min(len(examples), limit) // d.world_size * d.world_size
    mine = examples[:n][d.rank :: d.world_size]
    return [collate(mine[i : i + batch_size]) for i in range(0, len(mine), batch_size)]


def instruction_data(name: str, data_dir: str, tokenizer, seq_len: int, batch_size: int,
                     seed: int, d, path: str = None, task: str = None):
    """(training records, ExampleStream over them, held-out batches or None) for instruction data: a
    synthetic-world set (the only ones with a val split), a real dataset name (from the hub, or from
    `path`, a local copy: --data-path), or a local file in our record schema (`task` labels records
    that have none)."""
    if path and name in TASK_NAMES + ("pooled", "pooled-natural", "corpus"):
        raise ValueError(f"--data-path {path}: only for the real datasets "
                         f"(alpaca-small, beavertails, truthfulqa, real-pooled); "
                         f"--data {name} is the synthetic world in --data-dir {data_dir}")
    if task and not os.path.exists(name):
        raise ValueError(f"--task {task}: only for --data FILE "
                         f"(a local record file without 'task' fields); "
                         f"--data {name} is labelled already")
    records = load_records(name, data_dir, "train", path=path,
                           task=TASK_IDS[task] if task else None)
    stream = ExampleStream(sft_examples(records, tokenizer, seq_len, name), collate, seed)
    val_examples = held_out_examples(name, data_dir, tokenizer, seq_len)
    val = None if val_examples is None else val_batches_of(val_examples, collate, batch_size, d)
    return records, stream, val


def held_out_examples(name: str, data_dir: str, tokenizer, seq_len: int):
    """The encoded val split of a synthetic-world set (the only sets with one), else None."""
    if name not in TASK_NAMES + ("pooled", "pooled-natural"):
        return None
    return sft_examples(load_records(name, data_dir, "val"), tokenizer, seq_len, name)
