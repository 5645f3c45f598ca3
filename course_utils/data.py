"""Tokenize → pack → DataLoader, for pretraining.

Packing: instead of padding every short document to the context length (wasting
compute on pad tokens), we concatenate ``<|bos|> doc <|eos|>`` for all documents
into one long stream and cut it into blocks of ``block_size`` tokens. Every token
then carries loss; the EOS between documents teaches the model where texts end.

The order in which blocks are visited is a pure function of ``(seed, step)``
(:class:`StepBatchSampler`), so a run resumed at step k sees exactly the batches
an uninterrupted run would have seen.
"""

from __future__ import annotations

from collections.abc import Sequence

import datasets
import torch
from datasets import Dataset
from torch.utils.data import DataLoader, Sampler

from .errors import DataError
from .tokenizer import _checked_texts


def tokenize_and_pack(records: Sequence, tokenizer, block_size: int) -> Dataset:
    """Return a ``datasets.Dataset`` with one column ``input_ids`` of ``block_size`` tokens per row."""
    if block_size < 2:
        raise DataError(f"block_size must be >= 2 (got {block_size})")
    if tokenizer.bos_token_id is None or tokenizer.eos_token_id is None:
        raise DataError("the tokenizer needs BOS and EOS tokens to mark document boundaries when packing")
    texts = _checked_texts(records)  # clear error naming the bad record, before any work
    bos, eos = tokenizer.bos_token_id, tokenizer.eos_token_id

    def tokenize(batch):
        ids = tokenizer(batch["text"], add_special_tokens=False)["input_ids"]
        return {"input_ids": [[bos, *x, eos] for x in ids]}

    def pack(batch):
        stream = [t for doc in batch["input_ids"] for t in doc]
        n_blocks = len(stream) // block_size  # the tail shorter than a block is dropped
        return {"input_ids": [stream[i * block_size : (i + 1) * block_size] for i in range(n_blocks)]}

    bars_were_on = datasets.is_progress_bar_enabled()
    datasets.disable_progress_bars()  # both maps take well under a second at course sizes
    try:
        ds = Dataset.from_dict({"text": texts})
        ds = ds.map(tokenize, batched=True, remove_columns=["text"])
        # batch_size=None packs the whole corpus as one stream (fine for course-sized corpora)
        ds = ds.map(pack, batched=True, batch_size=None)
    finally:
        if bars_were_on:
            datasets.enable_progress_bars()
    if len(ds) == 0:
        raise DataError(f"the corpus is shorter than one block of {block_size} tokens; add text or lower block_size")
    return ds.with_format("torch")


def packed_ids(ds) -> torch.Tensor:
    """All rows of a packed dataset as one (N, block_size) tensor (course datasets fit in memory)."""
    if isinstance(ds, torch.Tensor):
        return ds
    ids = ds.with_format("torch")[:]["input_ids"]
    return ids if isinstance(ids, torch.Tensor) else torch.stack(list(ids))


class StepBatchSampler(Sampler[list[int]]):
    """Yields the row indices of micro-batches ``start, start+1, ..., stop-1``.

    Micro-batch ``i`` lives in epoch ``i // batches_per_epoch``; each epoch shuffles
    with its own seeded generator, so batch ``i`` never depends on what ran before.
    The last incomplete batch of an epoch is dropped (all batches have equal size).
    """

    def __init__(self, num_rows: int, batch_size: int, seed: int, start: int = 0, stop: int | None = None):
        if batch_size > num_rows:
            raise DataError(f"batch_size={batch_size} is larger than the dataset ({num_rows} rows)")
        self.num_rows, self.batch_size, self.seed = num_rows, batch_size, seed
        self.start, self.stop = start, stop
        self.batches_per_epoch = num_rows // batch_size
        self._perm_epoch, self._perm = -1, None

    def indices(self, i: int) -> list[int]:
        epoch, pos = divmod(i, self.batches_per_epoch)
        if epoch != self._perm_epoch:
            g = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
            self._perm, self._perm_epoch = self._permutation(g), epoch
        return self._perm[pos * self.batch_size : (pos + 1) * self.batch_size].tolist()

    def _permutation(self, g: torch.Generator) -> torch.Tensor:
        """The order of the rows in one epoch."""
        return torch.randperm(self.num_rows, generator=g)

    def __iter__(self):
        i = self.start
        while self.stop is None or i < self.stop:
            yield self.indices(i)
            i += 1

    def __len__(self):
        if self.stop is None:
            raise TypeError("an endless sampler has no length")
        return max(0, self.stop - self.start)


class LengthGroupedStepSampler(StepBatchSampler):
    """A :class:`StepBatchSampler` whose micro-batches hold rows of similar length (less padding).

    Each epoch shuffles the rows, cuts the order into windows of ``window`` batches, sorts each window by
    length and shuffles the order of the batches cut from all windows: batches stay random in content and
    order, but a batch of short rows is no longer padded to the length of one long row (transformers'
    ``group_by_length`` does the same). ``lengths[i]`` is the padded length row ``i`` would need.
    """

    def __init__(self, lengths: list[int], batch_size: int, seed: int, window: int = 50, start: int = 0,
                 stop: int | None = None):
        if window < 1:
            raise DataError(f"window must be >= 1 batch, got {window}")
        super().__init__(len(lengths), batch_size, seed, start, stop)
        self.lengths, self.window = torch.as_tensor(lengths), window

    def _permutation(self, g: torch.Generator) -> torch.Tensor:
        order = torch.randperm(self.num_rows, generator=g)
        span = self.window * self.batch_size
        chunks = [c[torch.argsort(self.lengths[c], descending=True, stable=True)] for c in order.split(span)]
        order = torch.cat(chunks)
        usable = self.batches_per_epoch * self.batch_size  # the rows of an incomplete last batch stay at the end
        batches = order[:usable].view(self.batches_per_epoch, self.batch_size)
        batches = batches[torch.randperm(self.batches_per_epoch, generator=g)]
        return torch.cat([batches.reshape(-1), order[usable:]])


def step_sampler(lengths: list[int], batch_size: int, seed: int, group_by_length: bool = True) -> StepBatchSampler:
    """The micro-batches of a padded-batch loop (SFT, RM, DPO): length-grouped (:class:`LengthGroupedStepSampler`)
    or randomly mixed. ``lengths[i]`` is the padded length row ``i`` needs."""
    if group_by_length:
        return LengthGroupedStepSampler(lengths, batch_size, seed)
    return StepBatchSampler(len(lengths), batch_size, seed)


class _Rows(torch.utils.data.Dataset):
    """Hands a whole micro-batch to the DataLoader in one indexing call (fast for in-memory tensors)."""

    def __init__(self, input_ids: torch.Tensor):
        self.input_ids = input_ids

    def __len__(self):
        return len(self.input_ids)

    def __getitem__(self, idx):
        return {"input_ids": self.input_ids[idx]}


def make_dataloader(ds: Dataset, batch_size: int, seed: int, start: int = 0, stop: int | None = None) -> DataLoader:
    """DataLoader over micro-batches ``start..stop-1`` of a packed dataset (deterministic order)."""
    ids = packed_ids(ds)
    sampler = StepBatchSampler(len(ids), batch_size, seed, start, stop)
    # batch_size=None + a sampler yielding index lists: each item is already a batch
    return DataLoader(_Rows(ids), sampler=sampler, batch_size=None)
