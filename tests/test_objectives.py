import pytest
import torch

from course_utils.data import packed_ids
from course_utils.objectives import (
    IGNORE_INDEX, bidirectional_mask, causal_mask, make_batch, mlm_corrupt, prefix_lm_mask, shifted_targets,
    token_loss_sum,
)


def test_mask_shapes_and_values():
    assert torch.equal(causal_mask(3), torch.tensor([[1, 0, 0], [1, 1, 0], [1, 1, 1]], dtype=torch.bool))
    p = prefix_lm_mask(4, 2)
    assert p[0, 1] and not p[1, 2] and not p[0, 2] and p[3, 0]
    assert bidirectional_mask(3).all()


def test_our_loss_equals_transformers_internal_loss(make_model, packed):
    model = make_model()
    x = packed_ids(packed[0])[:4]
    logits = model(input_ids=x).logits
    s, n = token_loss_sum(logits, shifted_targets(x))
    hf = model(input_ids=x, labels=x).loss  # transformers shifts internally
    assert n == x.shape[0] * (x.shape[1] - 1)
    assert torch.allclose(s / n, hf, atol=1e-6)


def test_explicit_causal_4d_mask_equals_default(make_model, packed):
    model = make_model().eval()
    x = packed_ids(packed[0])[:2]
    mask = causal_mask(x.shape[1])[None, None].expand(2, 1, -1, -1)
    assert torch.allclose(model(input_ids=x).logits, model(input_ids=x, attention_mask=mask).logits, atol=1e-6)


def test_causal_lm_never_sees_the_future(make_model, packed):
    model = make_model().eval()
    x = packed_ids(packed[0])[:1].clone()
    y = x.clone()
    y[0, 10] = (y[0, 10] + 1) % 300
    a, b = model(input_ids=x).logits, model(input_ids=y).logits
    assert torch.allclose(a[0, :10], b[0, :10], atol=1e-6) and not torch.allclose(a[0, 10:], b[0, 10:])


def test_prefix_lm_prefix_is_bidirectional_but_suffix_is_hidden(make_model, packed):
    model = make_model().eval()
    T, P = 16, 6
    x = packed_ids(packed[0])[:1, :T].clone()
    mask = prefix_lm_mask(T, P)[None, None]

    def logits(ids):
        return model(input_ids=ids, attention_mask=mask).logits[0]

    base = logits(x)
    later_in_prefix = x.clone()
    later_in_prefix[0, P - 1] = (x[0, P - 1] + 1) % 300
    assert not torch.allclose(base[0], logits(later_in_prefix)[0])  # position 0 sees the whole prefix
    in_suffix = x.clone()
    in_suffix[0, P + 2] = (x[0, P + 2] + 1) % 300
    assert torch.allclose(base[: P + 2], logits(in_suffix)[: P + 2], atol=1e-6)  # nobody sees ahead in the suffix


def test_prefix_batch_has_no_loss_inside_the_prefix(tokenizer):
    x = torch.randint(10, 300, (2, 12))
    b = make_batch("prefix", x, tokenizer, torch.Generator().manual_seed(0))
    m = b["attention_mask"][0, 0]
    P = int(m[0].sum())  # first row of the mask shows the prefix length
    assert (b["labels"][:, : P - 1] == IGNORE_INDEX).all()
    assert torch.equal(b["labels"][:, P - 1 : -1], x[:, P:])


def test_mlm_corruption_follows_80_10_10(tokenizer):
    g = torch.Generator().manual_seed(0)
    x = torch.randint(10, 300, (64, 128))
    x[:, 0] = tokenizer.bos_token_id
    inputs, labels = mlm_corrupt(x, tokenizer.mask_token_id, 320, [tokenizer.bos_token_id], g)
    chosen = labels != IGNORE_INDEX
    assert 0.13 < chosen.float().mean() < 0.17
    assert not chosen[:, 0].any()  # special tokens are never chosen
    assert torch.equal(labels[chosen], x[chosen])
    masked = (inputs == tokenizer.mask_token_id) & chosen
    kept = (inputs == x) & chosen
    assert 0.76 < masked.sum() / chosen.sum() < 0.84
    assert 0.07 < kept.sum() / chosen.sum() < 0.14  # 10% kept (+ random tokens that hit the original)
    assert torch.equal(inputs[~chosen], x[~chosen])


def test_unknown_objective(tokenizer):
    with pytest.raises(ValueError, match="unknown objective"):
        make_batch("span", torch.zeros(1, 4, dtype=torch.long), tokenizer, torch.Generator())
