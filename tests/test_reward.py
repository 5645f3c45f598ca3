"""Stage 3 — reward modeling: pooling, Bradley–Terry loss, cleaning, metrics, and the stage end to end.

Hermetic: the session tokenizer from ``conftest.py`` (trained in-process on the smoke world), tiny random
Llamas, the tiny world's preference pairs; nothing is downloaded.

* the course's loss equals TRL ``RewardTrainer.compute_loss`` on TRL's own batch, with and without a margin,
  and the course's encoding/collation builds the very batch TRL builds;
* ``last_token_rewards`` (the pooling written out) equals transformers' ``*ForSequenceClassification`` for
  right, left and mixed padding, and padding never changes a reward;
* ``clean_pairs`` removes exactly the duplicates and ties the world injected (the truth is in ``meta``);
* the metrics agree with scikit-learn / scipy and with answers computed by hand.
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from course_utils import reward as R
from course_utils.chat import Encoded, encode, pad_batch
from course_utils.errors import ConfigError, DataError
from course_utils.world import preference_pairs

ATOL = 1e-5


pytestmark = pytest.mark.usefixtures("one_thread")  # small tensors: threads only add overhead


def _causal_lm(tokenizer, seed: int = 0, context_length: int = 64):
    from course_utils.model import build_model, make_config
    from course_utils.profiles import ModelSize

    size = ModelSize(hidden_size=32, num_layers=2, num_heads=2, intermediate_size=64, context_length=context_length)
    return build_model(make_config(size, tokenizer), seed=seed)


def _spread_head(rm, seed: int = 1, std: float = 3.0):
    """A random score head gives nearly equal rewards (loss ≈ log 2 whatever the pooling); spread them so a
    wrong pooling, a swapped half or a dropped margin changes the numbers."""
    with torch.no_grad(), torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        rm.score.weight.normal_(0.0, std)
    return rm.eval()


def _rm(tokenizer, context_length: int = 64):
    return _spread_head(R.reward_model_from(_causal_lm(tokenizer, context_length=context_length), tokenizer))


def _short_rows(tokenizer, cfg, n: int, pool: int = 40) -> list[dict]:
    """``n`` distinct non-tie world rows whose both sides fit ``cfg.max_length`` untruncated."""
    out = []
    for row in preference_pairs(0, pool, "train"):
        if row["meta"]["is_tie"]:
            continue
        c, r = (encode([{"role": "user", "content": row["prompt"]}, {"role": "assistant", "content": row[s]}],
                         tokenizer, cfg.chat_format) for s in ("chosen", "rejected"))
        if max(len(c.input_ids), len(r.input_ids)) <= cfg.max_length:
            out.append(row)
        if len(out) == n:
            return out
    raise AssertionError("not enough short rows in the pool")


def _reference_reward(model, ids: list[int]) -> float:
    """transformers' own pooling on one unpadded sequence (no mask, nothing to pool around)."""
    with torch.no_grad():
        return float(model(input_ids=torch.tensor([ids])).logits[0, 0])


# --- 1. the loss equals TRL RewardTrainer's -------------------------------------------------------------

TRL_MAX_LENGTH = 128
MARGIN_SCALE = 0.5


@pytest.fixture(scope="module", params=["plain", "margin"])
def trl_setup(request, tokenizer, tmp_path_factory):
    from datasets import Dataset
    from trl import RewardConfig as TRLRewardConfig
    from trl import RewardTrainer

    with_margin = request.param == "margin"
    cfg = R.RewardConfig.for_profile("smoke", progress=False, max_length=TRL_MAX_LENGTH,
                                     margin_scale=MARGIN_SCALE if with_margin else 0.0)
    rows = _short_rows(tokenizer, cfg, 4)
    model = _rm(tokenizer, context_length=TRL_MAX_LENGTH)
    # TRL's conversational, explicit-prompt preference format; TRL renders it with the tokenizer's chat template
    data = [{"prompt": [{"role": "user", "content": r["prompt"]}],
             "chosen": [{"role": "assistant", "content": r["chosen"]}],
             "rejected": [{"role": "assistant", "content": r["rejected"]}]} for r in rows]
    if with_margin:
        for d, r in zip(data, rows):
            d["margin"] = R.pair_margin(r, MARGIN_SCALE)
    args = TRLRewardConfig(
        output_dir=str(tmp_path_factory.mktemp(f"trl_rm_{request.param}")),
        report_to="none",
        save_strategy="no",
        max_steps=1,
        per_device_train_batch_size=len(rows),
        use_cpu=True,
        bf16=False,  # TRL defaults bf16=True; keep fp32 for a 1e-5 comparison
        gradient_checkpointing=False,  # TRL defaults it to True
        max_length=TRL_MAX_LENGTH,
        center_rewards_coefficient=None,  # the default; an extra term the course's loss does not have
        dataset_num_proc=None,
        seed=0,
    )
    trainer = RewardTrainer(model=model, args=args, train_dataset=Dataset.from_list(data), processing_class=tokenizer)
    batch = next(iter(trainer.get_train_dataloader()))
    model.eval()
    pairs, dropped = R.encode_pairs(rows, tokenizer, cfg)
    assert dropped == 0 and len(trainer.train_dataset) == len(rows)
    return with_margin, model, trainer, batch, pairs


def test_trl_builds_the_batch_the_course_builds(trl_setup, tokenizer):
    with_margin, _, trainer, batch, pairs = trl_setup
    # the same token ids, row by row: TRL's chat-template rendering = the course's ChatML encoding
    for ex, (c, r, m) in zip(trainer.train_dataset, pairs):
        assert ex["chosen_ids"] == c.input_ids and ex["rejected_ids"] == r.input_ids
        if with_margin:
            assert ex["margin"] == pytest.approx(m) and m > 0
    # TRL's layout is the course's: B chosen rows, then the B rejected rows of the same pairs, padded right
    assert set(batch) == ({"input_ids", "attention_mask", "margin"} if with_margin else {"input_ids", "attention_mask"})
    ids, mask = batch["input_ids"], batch["attention_mask"]
    assert (mask == 0).any() and (ids[mask == 0] == tokenizer.pad_token_id).all()
    assert (mask[:, 0] == 1).all()  # right padding: every row starts with a real token
    real = [tuple(ids[i][mask[i] == 1].tolist()) for i in range(ids.size(0))]
    expected = {(tuple(c.input_ids), tuple(r.input_ids)): m for c, r, m in pairs}
    B = len(pairs)
    for i in range(B):
        assert (real[i], real[B + i]) in expected, f"rows {i} and {B + i} of TRL's batch are not one pair"
        if with_margin:
            assert float(batch["margin"][i]) == pytest.approx(expected[(real[i], real[B + i])])
    course = R.collate_pairs(pairs, tokenizer.pad_token_id)
    assert set(course) == {"input_ids", "attention_mask", "margin"}
    assert course["input_ids"].shape == ids.shape  # same padded length


def test_pairwise_loss_equals_trl_reward_trainer(trl_setup):
    with_margin, model, trainer, batch, pairs = trl_setup
    with torch.no_grad():
        trl_loss = trainer.compute_loss(model, dict(batch)).float()
        rc, rr = R.last_token_rewards(model, batch["input_ids"], batch["attention_mask"]).chunk(2)
        ours = R.pairwise_loss(rc, rr, batch.get("margin"))
        # the course's own data path on the same rows (a different row order; the mean does not care)
        s, n = R.loss_sum(model, R.collate_pairs(pairs, model.config.pad_token_id))
    assert abs(trl_loss.item() - math.log(2)) > 0.05, "rewards too close to each other: the test would not bite"
    assert abs(ours.item() - trl_loss.item()) < ATOL, (ours.item(), trl_loss.item())
    assert int(n) == len(pairs)
    assert abs((s / n).item() - trl_loss.item()) < ATOL, ((s / n).item(), trl_loss.item())
    # the comparison can tell: the halves swapped, or the margin left out, give another number
    with torch.no_grad():
        swapped = R.pairwise_loss(rr, rc, batch.get("margin"))
    assert abs(swapped.item() - trl_loss.item()) > 1e-2
    if with_margin:
        assert abs(R.pairwise_loss(rc, rr).item() - trl_loss.item()) > 1e-3


# --- 2. the pooling: last real token, whatever the padding ----------------------------------------------


@pytest.fixture(scope="module")
def pooled(tokenizer):
    cfg = R.RewardConfig.for_profile("smoke", progress=False)
    rows = [r for r in preference_pairs(0, 12, "train") if not r["meta"]["is_tie"]]
    pairs, _ = R.encode_pairs(rows, tokenizer, cfg)
    seqs = [p[0].input_ids for p in pairs[:3]] + [p[1].input_ids for p in pairs[:3]]
    assert len({len(s) for s in seqs}) > 2, "need sequences of several lengths"
    model = _rm(tokenizer)
    return model, seqs, [_reference_reward(model, s) for s in seqs]


def _pad(seqs: list[list[int]], pad_id: int, sides: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
    T = max(map(len, seqs))
    ids, mask = [], []
    for s, side in zip(seqs, sides):
        n = T - len(s)
        ids.append(s + [pad_id] * n if side == "right" else [pad_id] * n + s)
        mask.append([1] * len(s) + [0] * n if side == "right" else [0] * n + [1] * len(s))
    return torch.tensor(ids), torch.tensor(mask)


@pytest.mark.parametrize("padding", ["right", "left", "mixed"])
def test_last_token_rewards_equal_transformers_pooling(pooled, tokenizer, padding):
    model, seqs, reference = pooled
    sides = {"right": ["right"] * len(seqs), "left": ["left"] * len(seqs),
             "mixed": ["right", "left"] * (len(seqs) // 2)}[padding]
    ids, mask = _pad(seqs, tokenizer.pad_token_id, sides)
    assert (mask == 0).any()
    with torch.no_grad():
        ours = R.last_token_rewards(model, ids, mask)
        hf = model(input_ids=ids, attention_mask=mask).logits.squeeze(-1)
    assert ours.shape == (len(seqs),) and ours.dtype == torch.float32
    torch.testing.assert_close(ours, hf, atol=ATOL, rtol=0)
    # padding never changes a reward: each equals the reward of the sequence alone
    torch.testing.assert_close(ours, torch.tensor(reference), atol=ATOL, rtol=0)
    # the test can tell: naive pooling at the last position reads padding in right-padded rows
    with torch.no_grad():
        hidden = model.base_model(input_ids=ids, attention_mask=mask).last_hidden_state
        naive = model.score(hidden[:, -1]).squeeze(-1)
    if padding != "left":
        assert (naive - hf).abs().max() > 1e-3


def test_right_and_left_padded_batches_give_the_same_rewards(pooled, tokenizer):
    model, seqs, _ = pooled
    pad = tokenizer.pad_token_id
    encoded = [Encoded(s, list(s)) for s in seqs]  # labels unused
    with torch.no_grad():
        right, left = (R.last_token_rewards(model, b["input_ids"], b["attention_mask"])
                       for b in (pad_batch(encoded, pad, "right"), pad_batch(encoded, pad, "left")))
    torch.testing.assert_close(right, left, atol=ATOL, rtol=0)


def test_reward_scores_batches_by_length_and_returns_rewards_in_input_order(tokenizer):
    cfg = R.RewardConfig.for_profile("smoke", progress=False)
    rows = [r for r in preference_pairs(0, 30, "train") if R.fits(r, tokenizer, cfg)][:9]
    prompts = [r["prompt"] for r in rows] * 2
    responses = [r["chosen"] for r in rows] + [r["rejected"] for r in rows]
    model = _rm(tokenizer)
    with torch.no_grad():
        alone = [R.reward_scores(model, tokenizer, [p], [r], cfg)[0] for p, r in zip(prompts, responses)]
    lengths = [len(encode([{"role": "user", "content": p}, {"role": "assistant", "content": r}], tokenizer,
                          cfg.chat_format, cfg.max_length).input_ids) for p, r in zip(prompts, responses)]
    assert lengths != sorted(lengths), "the inputs must not already be in length order"
    batched = R.reward_scores(model, tokenizer, prompts, responses, cfg, batch_size=4)
    assert batched == pytest.approx(alone, abs=ATOL)


def test_last_token_index():
    mask = torch.tensor([[1, 1, 0, 0], [0, 0, 1, 1], [1, 1, 1, 1], [0, 1, 0, 0], [1, 0, 0, 0]])
    assert R.last_token_index(mask).tolist() == [1, 3, 3, 1, 0]
    assert R.last_token_index(mask.bool()).tolist() == [1, 3, 3, 1, 0]
    with pytest.raises(DataError, match="all zeros"):
        R.last_token_index(torch.tensor([[1, 1, 0], [0, 0, 0]]))
    with pytest.raises(ConfigError, match="batch, time"):
        R.last_token_index(torch.tensor([1, 1, 0]))


def test_reward_model_from_keeps_the_backbone_and_seeds_the_head(tokenizer):
    lm = _causal_lm(tokenizer)
    before = {k: v.clone() for k, v in lm.state_dict().items()}
    rng = torch.random.get_rng_state()
    rm = R.reward_model_from(lm, tokenizer, seed=3)
    assert torch.equal(rng, torch.random.get_rng_state()), "building the head must not consume the global RNG"
    assert rm.config.num_labels == 1 and rm.config.pad_token_id == tokenizer.pad_token_id
    assert rm.score.weight.shape == (1, lm.config.hidden_size) and rm.score.bias is None
    backbone = {k: v for k, v in rm.state_dict().items() if not k.startswith("score.")}
    assert backbone and all(torch.equal(v, before[k]) for k, v in backbone.items())
    assert torch.equal(rm.score.weight, R.reward_model_from(lm, tokenizer, seed=3).score.weight)
    assert not torch.equal(rm.score.weight, R.reward_model_from(lm, tokenizer, seed=4).score.weight)
    with torch.no_grad():  # a copy, not the same tensors: training the RM leaves the SFT model as it was
        next(rm.base_model.parameters()).add_(1.0)
    assert all(torch.equal(v, before[k]) for k, v in lm.state_dict().items())


def test_collate_pairs_layout():
    a, b, c, d = (Encoded(ids, ids) for ids in ([5, 6, 7], [8, 9], [10], [11, 12, 13, 14]))
    batch = R.collate_pairs([(a, b, 0.5), (c, d, 0.0)], pad_id=0)
    assert set(batch) == {"input_ids", "attention_mask", "margin"}
    assert batch["input_ids"].tolist() == [[5, 6, 7, 0], [10, 0, 0, 0], [8, 9, 0, 0], [11, 12, 13, 14]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1, 0], [1, 0, 0, 0], [1, 1, 0, 0], [1, 1, 1, 1]]
    assert batch["margin"].tolist() == [0.5, 0.0] and batch["margin"].dtype == torch.float32


def test_lm_term_is_the_backbones_own_causal_lm_loss(tokenizer):
    """The regulariser equals transformers' causal-LM loss of the model the RM was built from, on the chosen rows."""
    cfg = R.RewardConfig.for_profile("smoke", progress=False)
    lm = _causal_lm(tokenizer)
    rm = _spread_head(R.reward_model_from(lm, tokenizer))
    pairs, _ = R.encode_pairs(_short_rows(tokenizer, cfg, 4), tokenizer, cfg)
    batch = R.collate_pairs(pairs, tokenizer.pad_token_id, lm_labels=True)
    B = len(pairs)
    assert torch.equal(batch["chosen_labels"], pad_batch([p[0] for p in pairs], tokenizer.pad_token_id)["labels"])
    with torch.no_grad():
        ranking, n = R.loss_sum(rm, batch)
        both, _ = R.loss_sum(rm, batch, lm_coef=0.5)
        want = lm.eval()(input_ids=batch["input_ids"][:B], attention_mask=batch["attention_mask"][:B],
                         labels=batch["chosen_labels"]).loss
    assert int(n) == B and want.item() > 1.0
    assert (both - ranking).item() == pytest.approx(0.5 * B * want.item(), rel=1e-5)
    rm.config.tied_lm_head = False  # an untied LM head was dropped with the LM: nothing to compute it with
    with pytest.raises(ConfigError, match="tie_word_embeddings"):
        R.loss_sum(rm, batch, lm_coef=0.5)


# --- 3. Bradley–Terry ------------------------------------------------------------------------------------


def test_pairwise_loss_is_minus_log_sigmoid_of_the_difference():
    d = torch.tensor([-3.0, -0.5, 0.0, 0.7, 4.0], dtype=torch.float64)
    rc, rr = d + 1.3, torch.full_like(d, 1.3)  # only the difference matters
    expected = -torch.log(torch.sigmoid(d))
    torch.testing.assert_close(R.pairwise_loss(rc, rr, reduction="none"), expected)
    torch.testing.assert_close(R.pairwise_loss(rc, rr), expected.mean())
    torch.testing.assert_close(R.pairwise_loss(rc, rr, reduction="sum"), expected.sum())
    assert R.pairwise_loss(torch.tensor([0.2]), torch.tensor([0.2])).item() == pytest.approx(math.log(2))
    # log-odds identity: loss(a, b) − loss(b, a) = −(a − b)
    forward, backward = R.pairwise_loss(rc, rr, reduction="none"), R.pairwise_loss(rr, rc, reduction="none")
    torch.testing.assert_close(forward - backward, -d)


def test_pairwise_loss_is_finite_far_from_zero():
    rc = torch.tensor([-200.0, 200.0], requires_grad=True)
    rr = torch.zeros(2)
    loss = R.pairwise_loss(rc, rr, reduction="none")
    assert torch.isfinite(loss).all()
    assert loss[0].item() == pytest.approx(200.0, abs=1e-3) and loss[1].item() == pytest.approx(0.0, abs=1e-6)
    loss.sum().backward()
    assert torch.isfinite(rc.grad).all() and rc.grad.tolist() == pytest.approx([-1.0, 0.0], abs=1e-6)
    assert torch.isinf(-torch.log(torch.sigmoid(torch.tensor(-200.0))))  # what the docstring warns about


def test_pairwise_loss_margin():
    rc, rr = torch.tensor([1.0, 0.5, -2.0]), torch.tensor([0.0, 0.7, -1.0])
    margin = torch.tensor([0.5, 0.0, 2.0])
    with_margin = R.pairwise_loss(rc, rr, margin, reduction="none")
    torch.testing.assert_close(with_margin, -F.logsigmoid(rc - rr - margin))
    torch.testing.assert_close(with_margin, R.pairwise_loss(rc - margin, rr, reduction="none"))  # the bar is raised
    torch.testing.assert_close(R.pairwise_loss(rc, rr, torch.zeros(3)), R.pairwise_loss(rc, rr))
    no_margin = R.pairwise_loss(rc, rr, reduction="none")
    assert (with_margin[margin > 0] > no_margin[margin > 0]).all() and with_margin[1] == no_margin[1]


def test_pairwise_loss_shape_mismatch_is_an_error():
    with pytest.raises(ConfigError, match="differ in shape"):
        R.pairwise_loss(torch.zeros(3), torch.zeros(4))
    with pytest.raises(ConfigError, match="differ in shape"):  # (B,) − (B, 1) would broadcast to (B, B)
        R.pairwise_loss(torch.zeros(3), torch.zeros(3, 1))


# --- 4. cleaning ----------------------------------------------------------------------------------------

KEYS = ("prompt", "chosen", "rejected")


def _norm(text: str) -> tuple:
    return tuple("".join(ch if ch.isalnum() or ch == "_" or ch.isspace() else " " for ch in text.casefold()).split())


def _truth(rows: list[dict]) -> tuple[set[str], dict]:
    """(ids a correct cleaner removes, counts by reason), from the world's ``meta`` and plain string comparison."""
    removed, counts, seen_exact, seen_near = set(), {r: 0 for r in R.REASONS}, set(), set()
    for row in rows:
        exact = tuple(row[k] for k in KEYS)
        near = tuple(_norm(row[k]) for k in KEYS)
        injected = bool(row["meta"]["duplicate_of"])
        if injected or near in seen_near:  # injected, or a chance repeat of an earlier row of the world
            assert near in seen_near, f"{row['id']} repeats nothing earlier"
            counts["exact duplicate" if exact in seen_exact else "near duplicate"] += 1
            removed.add(row["id"])
        elif row["meta"]["is_tie"]:
            counts["tie"] += 1
            removed.add(row["id"])
        seen_exact.add(exact)
        seen_near.add(near)
    return removed, counts


def test_clean_pairs_removes_exactly_the_injected_duplicates_and_ties():
    rows = preference_pairs(0, 400, "train", duplicate_rate=0.1, tie_rate=0.1)
    kept, removed = R.clean_pairs(rows)
    kept_ids = {r["id"] for r in kept}
    injected = {r["id"] for r in rows if r["meta"]["duplicate_of"]}
    ties = {r["id"] for r in rows if r["meta"]["is_tie"]}
    assert len(injected) > 20 and len(ties) > 20
    assert not injected & kept_ids, "every injected duplicate (exact or near) is removed"
    assert not ties & kept_ids, "every tie is removed"
    truth_removed, truth_counts = _truth(rows)
    assert removed == truth_counts
    assert kept_ids == {r["id"] for r in rows} - truth_removed
    # an original non-tie row goes only when it repeats an earlier row word for word (a chance repeat)
    chance = {r["id"] for r in rows if r["id"] not in kept_ids} - injected - ties
    assert len(chance) <= 2
    assert removed["exact duplicate"] > 0 and removed["near duplicate"] > 0
    assert [r["id"] for r in kept] == [r["id"] for r in rows if r["id"] in kept_ids], "order is kept"
    assert len(kept) + sum(removed.values()) == len(rows)


def test_is_tie_flag_or_equal_ratings():
    assert R.is_tie({"tie": True})
    assert R.is_tie({"meta": {"is_tie": True}})
    assert R.is_tie({"meta": {"score_chosen": 1.0, "score_rejected": 1.0}})
    assert not R.is_tie({"meta": {"score_chosen": 1.0, "score_rejected": 0.5}})
    assert not R.is_tie({"meta": None}) and not R.is_tie({})


BAD_ROWS = [
    ({"prompt": "Where is Pip?", "chosen": "In Mossbrook."}, "missing side"),
    ({"prompt": "Where is Pip?", "chosen": None, "rejected": "No."}, "missing side"),
    ({"prompt": "  ", "chosen": "In Mossbrook.", "rejected": "No."}, "missing side"),
    (None, "missing side"),
    ({"prompt": "Where is Pip?", "chosen": ["In Mossbrook."], "rejected": "No."}, "not a string"),
    ({"prompt": 7, "chosen": "In Mossbrook.", "rejected": "No."}, "not a string"),
    ({"prompt": "Where is Pip?", "chosen": "Pip lives  in\nMossbrook.", "rejected": " Pip lives in Mossbrook. "},
     "identical sides"),
]


@pytest.fixture(scope="module")
def good_rows() -> list[dict]:
    """Clean world rows: no duplicate, no tie."""
    rows = preference_pairs(0, 40, "train")
    removed, _ = _truth(rows)
    return [r for r in rows if r["id"] not in removed][:8]


@pytest.mark.parametrize("bad,reason", BAD_ROWS, ids=[r for _, r in BAD_ROWS])
def test_malformed_row_is_named_or_dropped(bad, reason, good_rows):
    good = good_rows[:4]
    rows = good[:2] + [bad] + good[2:]
    assert R.check_pair(bad) == reason
    with pytest.raises(DataError, match=f"preference row 2: {reason}"):
        R.clean_pairs(rows, errors="raise")
    kept, removed = R.clean_pairs(rows, errors="drop")
    assert kept == good and removed == {r: int(r == reason) for r in R.REASONS}


def test_all_malformed_rows_are_counted_by_reason(good_rows):
    good = good_rows[:5]
    rows = [x for pair in zip(good, [b for b, _ in BAD_ROWS]) for x in pair] + [b for b, _ in BAD_ROWS[5:]]
    kept, removed = R.clean_pairs(rows)
    assert kept == good
    expected = {r: sum(reason == r for _, reason in BAD_ROWS) for r in R.REASONS}
    assert removed == expected
    with pytest.raises(ConfigError, match="errors"):
        R.clean_pairs(good, errors="skip")


def test_p_chosen_drops_exactly_the_rows_below_the_threshold(good_rows):
    good = good_rows
    rows = good[:3] + [good[1]] + good[3:]  # a duplicate early on: p is indexed by input row, not by kept row
    p = [0.9, 0.05, 0.2, 0.9, 0.19999, 0.5, 0.21, 0.0, 1.0]
    kept, removed = R.clean_pairs(rows, p_chosen=p, threshold=0.2)
    expected = [r for r, x in zip(rows, p) if x >= 0.2]
    expected.remove(good[1])  # its p says keep, but it repeats row 1 (which p drops)
    assert kept == expected == [good[0], good[2], good[4], good[5], good[7]]
    assert removed["likely flipped label"] == 3 and removed["exact duplicate"] == 1  # rows 1, 4, 7 and row 3
    kept, removed = R.clean_pairs(good, p_chosen=[0.45] * 4 + [0.55] * 4, threshold=0.5)
    assert kept == good[4:] and removed["likely flipped label"] == 4
    with pytest.raises(ConfigError, match="p_chosen has 7 values for 8 rows"):
        R.clean_pairs(good, p_chosen=[0.5] * 7)


def test_length_bias_counts_the_longer_side():
    rows = [{"chosen": "aaaa", "rejected": "a"}, {"chosen": "a", "rejected": "aa"},
            {"chosen": "aaa", "rejected": "a"}, {"chosen": "ab", "rejected": "cd"}]
    assert R.length_bias(rows) == {"pairs": 4, "unequal_length": 3, "chosen_longer": pytest.approx(2 / 3)}


# --- 5. metrics -----------------------------------------------------------------------------------------


def _tau_b(x: list[float], y: list[float]) -> float:
    """Kendall τ-b by counting pairs: (concordant − discordant) / sqrt((n0 − ties_x)(n0 − ties_y))."""
    n = len(x)
    conc = disc = ties_x = ties_y = 0
    for i in range(n):
        for j in range(i + 1, n):
            dx, dy = x[i] - x[j], y[i] - y[j]
            ties_x += dx == 0
            ties_y += dy == 0
            conc += dx * dy > 0
            disc += dx * dy < 0
    n0 = n * (n - 1) // 2
    return (conc - disc) / math.sqrt((n0 - ties_x) * (n0 - ties_y))


def _auc_by_hand(pos: list[float], neg: list[float]) -> float:
    """Mann–Whitney: the share of (positive, negative) pairs ordered right, ties counting half."""
    return sum((p > q) + 0.5 * (p == q) for p in pos for q in neg) / (len(pos) * len(neg))


def test_kendall_tau_matches_counting_including_ties():
    x = [1.0, 2.0, 2.0, 3.0, 5.0, 4.0, 4.0, 0.5]
    y = [0.0, 1.0, 1.0, 1.0, 3.0, 2.0, 2.5, 0.0]
    assert R.kendall_tau(x, y) == pytest.approx(_tau_b(x, y), abs=1e-12)
    assert R.kendall_tau(x, x) == pytest.approx(1.0) and R.kendall_tau(x, [-v for v in x]) == pytest.approx(-1.0)
    assert math.isnan(R.kendall_tau(x, [1.0] * len(x)))


def test_calibration_known_answer():
    p = [0.05, 0.15, 0.1, 0.95, 1.0, 0.5, 0.55]
    won = [False, True, False, True, True, True, False]
    table = R.calibration(p, won)
    assert [row["bin"] for row in table] == [(0.0, 0.1), (0.1, 0.2), (0.5, 0.6), (0.9, 1.0)]
    assert [row["n"] for row in table] == [1, 2, 2, 2]  # 0.1 opens its bin; 1.0 closes the last
    assert [row["predicted"] for row in table] == pytest.approx([0.05, 0.125, 0.525, 0.975])
    assert [row["observed"] for row in table] == pytest.approx([0.0, 0.5, 0.5, 1.0])
    coarse = R.calibration(p, won, bins=2)
    assert [(row["n"], row["observed"]) for row in coarse] == [(3, pytest.approx(1 / 3)), (4, pytest.approx(0.75))]
    # |0.05-0| + 2|0.125-0.5| + 2|0.525-0.5| + 2|0.975-1| over 7 predictions
    assert R.calibration_error(table) == pytest.approx((0.05 + 0.75 + 0.05 + 0.05) / 7)
    hedging = R.calibration([0.6] * 10, [True] * 9 + [False])  # right 90% of the time but says 60%
    assert R.calibration_error(hedging) == pytest.approx(0.3)
    with pytest.raises(DataError):
        R.calibration_error([])


@pytest.fixture(scope="module")
def evaluated(tokenizer):
    # max_length=256: the smoke default (64) crashes evaluate, see test_evaluate_with_responses_longer_than_the_context
    cfg = R.RewardConfig.for_profile("smoke", progress=False, max_length=256)
    rows = preference_pairs(0, 24, "test")
    model = _rm(tokenizer)
    return cfg, rows, model, R.evaluate(model, tokenizer, rows, cfg)


def test_evaluate_metrics_match_sklearn_scipy_and_counting(evaluated, tokenizer):
    from scipy.stats import kendalltau
    from sklearn.metrics import roc_auc_score

    cfg, rows, model, ev = evaluated
    rc, rr = ev["rewards_chosen"], ev["rewards_rejected"]
    assert ev["pairs"] == len(rows) == len(rc) == len(rr)
    # the rewards are the RM's rewards of each (prompt, response) alone
    for i in (0, len(rows) // 2, len(rows) - 1):
        for side, got in (("chosen", rc[i]), ("rejected", rr[i])):
            enc = encode([{"role": "user", "content": rows[i]["prompt"]},
                            {"role": "assistant", "content": rows[i][side]}], tokenizer, cfg.chat_format)
            assert got == pytest.approx(_reference_reward(model, enc.input_ids), abs=ATOL)
    margins = [c - r for c, r in zip(rc, rr)]
    assert 0.0 < ev["accuracy"] < 1.0, "a degenerate accuracy would not test anything"
    assert ev["accuracy"] == pytest.approx(sum(m > 0 for m in margins) / len(rows))
    assert ev["mean_margin"] == pytest.approx(sum(margins) / len(rows), abs=1e-6)
    labels = [1] * len(rows) + [0] * len(rows)
    assert ev["roc_auc"] == pytest.approx(roc_auc_score(labels, rc + rr), abs=1e-12)
    assert ev["roc_auc"] == pytest.approx(_auc_by_hand(rc, rr), abs=1e-12)
    lengths = [len(r["chosen"]) for r in rows] + [len(r["rejected"]) for r in rows]
    assert ev["reward_length_tau"] == pytest.approx(kendalltau(rc + rr, lengths).statistic, abs=1e-12)
    assert ev["reward_length_tau"] == pytest.approx(_tau_b(rc + rr, lengths), abs=1e-9)


def test_evaluate_calibration_and_kendall_tau(evaluated):
    cfg, rows, _, ev = evaluated
    table = ev["calibration"]
    assert sum(row["n"] for row in table) == 2 * len(rows)  # each pair once in each order
    for row in table:
        lo, hi = row["bin"]
        assert lo <= row["predicted"] <= hi and 0.0 <= row["observed"] <= 1.0
    # symmetric: P(first wins) = p with outcome "won" and 1 − p with outcome "lost"
    p = [1 / (1 + math.exp(-(c - r))) for c, r in zip(ev["rewards_chosen"], ev["rewards_rejected"])]
    by_hand = R.calibration(p + [1 - x for x in p], [True] * len(p) + [False] * len(p))
    assert [(row["bin"], row["n"]) for row in table] == [(row["bin"], row["n"]) for row in by_hand]
    for got, want in zip(table, by_hand):
        assert got["predicted"] == pytest.approx(want["predicted"], abs=1e-5) and got["observed"] == want["observed"]
    assert [row["n"] for row in table] == [row["n"] for row in reversed(table)]  # mirror bins hold mirror pairs
    assert ev["tau_prompts"] == cfg.tau_prompts and ev["tau_responses"] >= 2 * cfg.tau_prompts
    assert -1.0 <= ev["kendall_tau"] <= 1.0 and -1.0 <= ev["kendall_tau_within_prompt"] <= 1.0


def test_evaluate_counts_equal_rewards_as_not_correct(evaluated, tokenizer):
    cfg, rows, model, _ = evaluated
    same = [{**r, "rejected": r["chosen"]} for r in rows[:2]]  # equal rewards: P = 0.5, margin 0, not "correct"
    ev = R.evaluate(model, tokenizer, same, cfg, tau=False)
    assert ev["accuracy"] == 0.0 and ev["mean_margin"] == pytest.approx(0.0, abs=1e-6)
    assert ev["roc_auc"] == pytest.approx(0.5) and "kendall_tau" not in ev


def test_evaluate_skips_and_counts_responses_longer_than_the_context(tokenizer):
    cfg = R.RewardConfig.for_profile("smoke", progress=False)  # max_length 64: some world responses are longer
    rows = preference_pairs(0, 16, "test")
    too_long = sum(not R.fits(r, tokenizer, cfg) for r in rows)
    assert 0 < too_long < len(rows)
    ev = R.evaluate(_rm(tokenizer), tokenizer, rows, cfg, tau=False)
    assert ev["skipped_too_long"] == too_long and ev["pairs"] == len(rows) - too_long
    assert len(ev["rewards_chosen"]) == ev["pairs"]


# --- 6. the stage end to end ----------------------------------------------------------------------------


def _train_loss(model, tokenizer, pairs) -> float:
    with torch.no_grad():
        s, n = R.loss_sum(model.eval(), R.collate_pairs(pairs, tokenizer.pad_token_id))
    return (s / n).item()


def test_reward_stage_end_to_end_smoke(tmp_path, tokenizer):
    from transformers import AutoModelForSequenceClassification

    # max_length=256 instead of the smoke default 64: see test_reward_stage_with_the_smoke_defaults
    cfg = R.RewardConfig.for_profile("smoke", progress=False, max_length=256)
    sft = _causal_lm(tokenizer)
    sft_state = {k: v.clone() for k, v in sft.state_dict().items()}
    lines = []
    out = R.main(cfg, out_dir=tmp_path / "rm", sft=(sft, tokenizer), log=lines.append)

    assert {"before", "after", "removed", "rows", "kept", "flipped_left_after_cleaning", "dropped_too_long",
            "length_bias", "steps", "final_train_loss", "history", "seconds", "checkpoint", "config"} <= set(out)
    for ev in (out["before"], out["after"]):
        assert {"pairs", "accuracy", "mean_margin", "roc_auc", "calibration", "calibration_error", "rewards_chosen",
                "rewards_rejected", "reward_length_tau", "kendall_tau", "kendall_tau_within_prompt"} <= set(ev)
        assert ev["pairs"] == cfg.eval_pairs
    assert out["steps"] == cfg.max_steps and [h["step"] for h in out["history"]] == [4, 8, 12]
    assert all(math.isfinite(h["loss"]) for h in out["history"])
    assert any("cleaning" in line for line in lines)

    # cleaning: the injected duplicates and ties are gone, and counted
    train_rows, _ = R.build_pairs(cfg)
    assert out["rows"] == len(train_rows) == 200
    _, truth = _truth(train_rows)
    removed = out["removed"]
    assert removed["exact duplicate"] + removed["near duplicate"] > 0 and removed["tie"] > 0
    assert {k: removed[k] for k in R.REASONS if k != "likely flipped label"} == \
        {k: v for k, v in truth.items() if k != "likely flipped label"}
    assert out["kept"] == out["rows"] - sum(removed.values())
    assert out["flipped_left_after_cleaning"] <= sum(r["meta"]["flipped"] for r in train_rows)

    # the SFT model is untouched; the checkpoint is the trained RM
    assert all(torch.equal(v, sft_state[k]) for k, v in sft.state_dict().items())
    rm = AutoModelForSequenceClassification.from_pretrained(out["checkpoint"]).eval()
    test_rows = preference_pairs(0, cfg.eval_pairs, "test")
    again = R.reward_scores(rm, tokenizer, [r["prompt"] for r in test_rows], [r["chosen"] for r in test_rows], cfg)
    assert again == pytest.approx(out["after"]["rewards_chosen"], abs=ATOL)

    # training lowered the loss on the (clean) training pairs
    kept, _ = R.clean_pairs(train_rows)
    pairs, _ = R.encode_pairs(kept, tokenizer, cfg)
    start = R.reward_model_from(sft, tokenizer, cfg.seed)  # what main started from
    before, after = _train_loss(start, tokenizer, pairs), _train_loss(rm, tokenizer, pairs)
    assert after < before - 1e-3, (before, after)


def test_reward_stage_with_the_smoke_defaults(tmp_path, tokenizer):
    out = R.main(R.RewardConfig.for_profile("smoke", progress=False, noise_filter=False), out_dir=tmp_path / "rm",
                 sft=(_causal_lm(tokenizer), tokenizer), log=lambda *_: None)
    assert out["dropped_too_long"] > 0 and out["after"]["skipped_too_long"] > 0
    assert out["after"]["pairs"] + out["after"]["skipped_too_long"] == 32  # the smoke preset's eval_pairs


def test_rm_stage_has_a_default_folder(tmp_path, monkeypatch):
    from course_utils.stages import stage_dir

    monkeypatch.setenv("LLM_COURSE_RUNS", str(tmp_path))
    assert stage_dir("rm", "smoke") == tmp_path / "smoke" / "rm"  # where main() saves without an out_dir


def test_config_validation():
    R.RewardConfig.for_profile("smoke").validate()
    for bad in (dict(chat_format="vicuna"), dict(tie_rate=1.5), dict(noise_threshold=0.5),
                dict(margin_scale=-1.0), dict(batch_size=0), dict(max_pairs=-1), dict(lm_coef=-0.1)):
        with pytest.raises(ConfigError):
            R.RewardConfig.for_profile("smoke", **bad).validate()


def test_max_pairs_takes_the_first_rows_of_the_same_stream():
    full, test = R.build_pairs(R.RewardConfig.for_profile("smoke"))
    few, test_few = R.build_pairs(R.RewardConfig.for_profile("smoke", max_pairs=50))
    assert len(full) == 200 and len(few) == 50
    assert [r["id"] for r in few] == [r["id"] for r in full[:50]] and few[7]["chosen"] == full[7]["chosen"]
    assert test_few == test  # the held-out pairs do not depend on it


def test_gpu_profile_reads_hh_rlhf_rows_through_the_same_code(monkeypatch, tokenizer):
    """The gpu path without a network: hub loading is replaced by hh-rlhf-shaped rows through the real mapper."""
    from course_utils import hub_data

    def fake_hub(kind, name, split, limit, errors="raise"):
        assert kind == "hh_rlhf" and name == "Anthropic/hh-rlhf"
        raw = [{"chosen": f"\n\nHuman: what is {i} plus 1?\n\nAssistant: {i} plus 1 is {i + 1}.",
                "rejected": f"\n\nHuman: what is {i} plus 1?\n\nAssistant: go away."} for i in range(6)]
        return hub_data.map_hh_rlhf(raw, split, errors)

    monkeypatch.setattr(hub_data, "load_hub_dataset", fake_hub)
    cfg = R.RewardConfig.for_profile("gpu", eval_pairs=6, max_length=64, progress=False)
    train_rows, test_rows = R.build_pairs(cfg)
    assert len(train_rows) == len(test_rows) == 6 and train_rows[0]["prompt"] == "what is 0 plus 1?"
    kept, removed = R.clean_pairs(train_rows)
    assert len(kept) == 6 and not any(removed.values())  # hh-rlhf ratings 1 vs 0: no ties
    ev = R.evaluate(_rm(tokenizer), tokenizer, test_rows, cfg)
    assert ev["pairs"] == 6 and "kendall_tau" not in ev  # real data has no ground-truth scorer
    assert ev["accuracy_by_pair_type"] == {}  # nor quality labels


def test_gpu_smoke_reward_model_path_runs_on_cpu(make_model, tokenizer, monkeypatch):
    """gpu-smoke's reward-model check with the hh-rlhf download replaced by the sample rows."""
    import datasets

    from course_utils.gpu_smoke import rm_smoke
    from course_utils.io import read_jsonl

    samples = read_jsonl("tests/data/hub_samples/hh_rlhf.jsonl")
    tag = lambda text, i: text.replace("Human: ", f"Human: ({i}) ", 1)  # noqa: E731 (distinct rows: no duplicates)
    rows = [{k: tag(v, i) for k, v in samples[i % len(samples)].items()} for i in range(48)]
    monkeypatch.setattr(datasets, "load_dataset", lambda name, split: list(rows))
    model = make_model(context_length=256)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    torch.manual_seed(0)
    out = rm_smoke(model, tokenizer, steps=8, n_rows=64, eval_pairs=8, lr=3e-3, max_length=256,
                   batch_size=4, grad_accum=1)
    assert out["steps"] == 8 and out["loss_after"] < out["loss_before"]
    assert out["pairs"] > 0 and 0.0 <= out["accuracy"] <= 1.0  # (the stand-in loader ignores the row limit)
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())  # the base is untouched

    from course_utils.gpu_smoke import rlhf_smoke  # chapters 06-07 on the same stand-in hh-rlhf rows

    x = rlhf_smoke(model, tokenizer, out["model"], steps=2, n_prompts=48, rollout_batch=4, minibatch=2,
                   max_new_tokens=6)
    assert x["ppo_steps"] == 2 and x["reference_unchanged"] and x["counts"]["responses"] == 8
    assert x["dpo_steps"] == 2 and x["dpo_loss_first"] == pytest.approx(math.log(2), abs=1e-3)
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())


def test_stage_without_cleaning_still_drops_and_counts_malformed_rows(tmp_path, tokenizer, monkeypatch):
    real = R.build_pairs

    def with_bad_rows(cfg):
        train, test = real(cfg)
        bad = [{**train[0], "rejected": None}, {**train[1], "chosen": 7}, {**train[2], "rejected": train[2]["chosen"]}]
        return train + bad, test

    monkeypatch.setattr(R, "build_pairs", with_bad_rows)
    cfg = R.RewardConfig.for_profile("smoke", progress=False, clean=False, max_length=256)
    out = R.main(cfg, out_dir=tmp_path / "rm", sft=(_causal_lm(tokenizer), tokenizer), log=lambda *_: None)
    assert out["rows"] == 203 and out["kept"] == 200
    assert {k: v for k, v in out["removed"].items() if v} == {"missing side": 1, "not a string": 1, "identical sides": 1}
