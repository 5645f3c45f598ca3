import json
import random

import pytest
import torch

from course_utils.data import (LengthGroupedStepSampler, StepBatchSampler, make_dataloader, packed_ids, step_sampler,
                               tokenize_and_pack)
from course_utils.errors import DataError
from course_utils.io import read_jsonl, write_jsonl


def test_packing_makes_full_blocks_with_document_markers(packed, tokenizer, corpus):
    train, _ = packed
    ids = packed_ids(train)
    assert ids.shape[1] == 32 and ids.dtype == torch.long
    stream = ids.flatten().tolist()
    assert stream[0] == tokenizer.bos_token_id
    # one BOS and one EOS per document (minus the dropped tail)
    n_docs = len(corpus[0])
    assert n_docs - 2 <= stream.count(tokenizer.bos_token_id) <= n_docs
    first_doc = tokenizer(corpus[0][0]["text"], add_special_tokens=False)["input_ids"]
    assert stream[1 : 1 + len(first_doc)] == first_doc
    assert stream[1 + len(first_doc)] == tokenizer.eos_token_id


def test_corpus_too_short_for_a_block(tokenizer):
    with pytest.raises(DataError, match="shorter than one block"):
        tokenize_and_pack([{"text": "tiny"}], tokenizer, 512)


@pytest.mark.parametrize("bad", [None, "", 5])
def test_bad_record_named_before_any_work(tokenizer, bad):
    with pytest.raises(DataError, match="record 2"):
        tokenize_and_pack([{"text": "a b"}, {"text": "c d"}, {"text": bad}], tokenizer, 4)


def test_sampler_is_a_pure_function_of_the_step():
    full = list(StepBatchSampler(100, 8, seed=3, start=0, stop=40))
    tail = list(StepBatchSampler(100, 8, seed=3, start=17, stop=40))
    assert full[17:] == tail  # resuming at micro-batch 17 replays exactly the same rows
    per_epoch = 100 // 8
    epoch0 = [i for b in full[:per_epoch] for i in b]
    assert len(set(epoch0)) == len(epoch0)  # no row twice within an epoch
    assert full[:per_epoch] != full[per_epoch : 2 * per_epoch]  # each epoch reshuffles
    assert list(StepBatchSampler(100, 8, seed=4, stop=3)) != full[:3]


def test_length_grouped_batches_hold_similar_lengths():
    lengths = [random.Random(i).randint(10, 90) for i in range(1000)]
    plain = StepBatchSampler(1000, 16, seed=1)
    grouped = LengthGroupedStepSampler(lengths, 16, seed=1, window=20)
    per_epoch = 1000 // 16

    def padded(sampler):  # tokens a batch occupies once padded to its longest row
        return sum(16 * max(lengths[i] for i in sampler.indices(b)) for b in range(per_epoch))

    assert padded(grouped) < 0.7 * padded(plain)
    epoch0 = [i for b in range(per_epoch) for i in grouped.indices(b)]
    assert len(set(epoch0)) == len(epoch0) == per_epoch * 16  # still every row at most once per epoch
    longest = [max(lengths[i] for i in grouped.indices(b)) for b in range(per_epoch)]
    falling = sum(a >= b for a, b in zip(longest, longest[1:])) / (per_epoch - 1)
    assert falling < 0.8  # batch order is shuffled (without it, each window's batches would come longest first)
    again = LengthGroupedStepSampler(lengths, 16, seed=1, window=20, start=7, stop=9)
    assert list(again) == [grouped.indices(7), grouped.indices(8)]  # a pure function of the step, like its parent
    assert grouped.indices(per_epoch) != grouped.indices(0)  # the next epoch regroups
    with pytest.raises(DataError, match="window"):
        LengthGroupedStepSampler(lengths, 16, seed=1, window=0)


def test_step_sampler_groups_by_length_only_when_asked():
    lengths = [(7 * i) % 61 + 3 for i in range(400)]
    grouped, mixed = step_sampler(lengths, 16, seed=2), step_sampler(lengths, 16, seed=2, group_by_length=False)

    def padded(sampler):  # tokens the model computes on: each batch padded to its longest row
        return sum(len(idx) * max(lengths[i] for i in idx) for idx in (sampler.indices(k) for k in range(25)))

    assert padded(grouped) < 0.7 * padded(mixed)
    assert all(mixed.indices(k) == StepBatchSampler(400, 16, seed=2).indices(k) for k in range(25))


def test_dataloader_yields_the_sampled_rows(packed):
    train, _ = packed
    ids = packed_ids(train)
    loader = make_dataloader(train, 4, seed=0, start=5, stop=7)
    batches = [b["input_ids"] for b in loader]
    assert len(batches) == 2 and batches[0].shape == (4, 32)
    idx = StepBatchSampler(len(ids), 4, 0).indices(5)
    assert torch.equal(batches[0], ids[idx])


def test_batch_larger_than_dataset():
    with pytest.raises(DataError, match="larger than the dataset"):
        StepBatchSampler(3, 8, 0)


def test_malformed_jsonl_line_is_named(tmp_path):
    path = tmp_path / "data.jsonl"
    path.write_text('{"text": "ok"}\n{"text": "broken"\n')
    with pytest.raises(DataError, match=r"data.jsonl:2: malformed JSON"):
        read_jsonl(path)
    path.write_text('{"text": "ok"}\n[1, 2]\n')
    with pytest.raises(DataError, match=r"data.jsonl:2: expected a JSON object"):
        read_jsonl(path)


def test_jsonl_write_is_atomic(tmp_path):
    path = tmp_path / "out.jsonl"
    write_jsonl(path, [{"a": 1}])
    with pytest.raises(DataError, match="row 2"):
        write_jsonl(path, [{"a": 2}, "not a dict"])
    assert read_jsonl(path) == [{"a": 1}]  # the old file is untouched
    assert [p.name for p in tmp_path.iterdir()] == ["out.jsonl"]  # no temporary left behind
    assert json.loads(path.read_text()) == {"a": 1}
