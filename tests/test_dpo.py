"""course_utils.dpo: the DPO / IPO losses equal TRL DPOTrainer's on the same batch; bad input is refused."""

from __future__ import annotations

import copy
import math
import tempfile

import pytest
import torch

from course_utils import dpo
from course_utils.errors import ConfigError, DataError
from course_utils.world import preference_pairs

pytestmark = pytest.mark.usefixtures("one_thread")


def _models(tokenizer):
    """A tiny causal LM (the policy, nudged away from its start) and an untouched copy (the reference)."""
    from course_utils.model import build_model, make_config
    from course_utils.profiles import ModelSize

    size = ModelSize(hidden_size=32, num_layers=2, num_heads=2, intermediate_size=64, context_length=128)
    ref = build_model(make_config(size, tokenizer), seed=0).eval()
    policy = copy.deepcopy(ref)
    with torch.no_grad(), torch.random.fork_rng(devices=[]):
        torch.manual_seed(1)
        for p in policy.parameters():
            p.add_(0.3 * torch.randn_like(p))  # otherwise every log-ratio is 0 and every loss log 2
    return policy.eval(), ref


@pytest.fixture(scope="module", params=["sigmoid", "ipo"])
def trl_batch(request, tokenizer):
    from course_utils.trl_runs import dpo_trainer

    policy, ref = _models(tokenizer)
    rows = [r for r in preference_pairs(0, 12, "train") if not r["meta"]["is_tie"]][:4]
    with tempfile.TemporaryDirectory() as tmp:
        trainer = dpo_trainer(policy, ref, tokenizer, rows, tmp, beta=0.5, loss_type=request.param,
                              per_device_train_batch_size=4, max_length=128)
        batch = next(iter(trainer.get_train_dataloader()))
        with torch.no_grad():
            trl_loss = trainer.compute_loss(policy, dict(batch)).item()
    return request.param, policy, ref, batch, trl_loss


def test_dpo_loss_equals_trl(trl_batch):
    loss_type, policy, ref, batch, trl_loss = trl_batch
    ids, mask, completion = batch["input_ids"], batch["attention_mask"], batch["completion_mask"]
    with torch.no_grad():
        pol, n_tokens = dpo.sequence_logprobs(policy, ids, mask, completion)
        ref_lp, _ = dpo.sequence_logprobs(ref, ids, mask, completion)
    (pc, pr), (rc, rr), (nc, nr) = pol.chunk(2), ref_lp.chunk(2), n_tokens.chunk(2)  # TRL: chosen rows first
    out = dpo.dpo_loss(pc, pr, rc, rr, beta=0.5, loss_type=loss_type, chosen_tokens=nc, rejected_tokens=nr)
    assert abs(trl_loss - math.log(2)) > 0.01 or loss_type == "ipo", "log-ratios too small: the test would not bite"
    assert out["losses"].mean().item() == pytest.approx(trl_loss, abs=1e-5)
    # and it can tell: chosen and rejected swapped give another number
    swapped = dpo.dpo_loss(pr, pc, rr, rc, beta=0.5, loss_type=loss_type, chosen_tokens=nr, rejected_tokens=nc)
    assert abs(swapped["losses"].mean().item() - trl_loss) > 1e-3


def test_implicit_rewards_and_accuracy():
    pc, pr = torch.tensor([-10.0, -12.0]), torch.tensor([-11.0, -9.0])
    rc, rr = torch.tensor([-10.5, -11.0]), torch.tensor([-10.0, -10.0])
    out = dpo.dpo_loss(pc, pr, rc, rr, beta=0.1)
    assert out["chosen_rewards"].tolist() == pytest.approx([0.05, -0.1])
    assert out["rejected_rewards"].tolist() == pytest.approx([-0.1, 0.1])
    assert out["margins"].tolist() == pytest.approx([0.15, -0.2]) and out["accuracy"].item() == 0.5
    assert out["losses"].tolist() == pytest.approx([math.log1p(math.exp(-0.15)), math.log1p(math.exp(0.2))])


def test_bad_input_is_refused(tokenizer):
    x = torch.zeros(2)
    with pytest.raises(ConfigError):
        dpo.dpo_loss(x, x, x, x, beta=0.0)
    with pytest.raises(ConfigError):
        dpo.dpo_loss(x, x, x, x, loss_type="ipo")  # no completion lengths
    with pytest.raises(ConfigError):
        dpo.dpo_loss(x, x, x, x, loss_type="kto")
    policy, _ = _models(tokenizer)
    ids = torch.tensor([[1, 5, 6, 7], [1, 5, 6, 7]])
    with pytest.raises(DataError, match="no completion token"):
        dpo.sequence_logprobs(policy, ids, torch.ones_like(ids), torch.tensor([[0, 0, 1, 1], [0, 0, 0, 0]]))


def test_on_policy_pairs_take_the_best_and_worst_finished_answer(tokenizer, monkeypatch):
    """Pairs come from the model's own samples: best and worst by score, cut answers left out, ties give no pair."""
    from course_utils import judge

    answers = {  # per prompt: the 3 samples (text, stopped with EOS?)
        "p0": [("good", True), ("bad", True), ("long and cut", False)],
        "p1": [("same", True), ("same", True), ("same", True)],  # one distinct text: no pair
        "p2": [("ok", True), ("cut", False), ("cut", False)],  # one finished answer: no pair
    }

    def fake_batches(lm, tok, prompts, fmt, max_new_tokens, greedy, seed, batch_size=64):
        k = seed  # the k-th sample of every prompt
        yield 0, {"texts": [answers[p][k][0] for p in prompts],
                  "stopped": torch.tensor([answers[p][k][1] for p in prompts])}

    monkeypatch.setattr(judge, "answer_batches", fake_batches)
    score = {"good": 2.0, "bad": -1.0, "long and cut": 9.0, "same": 1.0, "ok": 1.0, "cut": 5.0}
    rows = [{"prompt": p, "meta": {"family": "x"}} for p in answers]
    pairs, counts = dpo.on_policy_pairs(None, tokenizer, rows, lambda ps, ts: [score[t] for t in ts], samples=3)
    assert [(r["prompt"], r["chosen"], r["rejected"]) for r in pairs] == [("p0", "good", "bad")]
    assert pairs[0]["meta"]["rm_chosen"] == 2.0 and pairs[0]["meta"]["family"] == "x"
    assert counts == {"prompts": 3, "cut": 3, "no_pair": 2, "pairs": 1}


def test_dpo_stage_runs_end_to_end_in_smoke(tmp_path):
    m = dpo.main(dpo.DPOConfig.for_profile("smoke", progress=False), out_dir=tmp_path / "dpo", log=lambda *_: None)
    assert m["reference_unchanged"] and m["steps"] == 4 and m["pairs"] > 0 and m["pair_source"] == "labelled"
    assert m["history"][0]["loss"] == pytest.approx(math.log(2), abs=1e-4)  # policy = reference at the start
    assert {"accuracy", "margin", "chosen_reward", "rejected_reward", "nll"} <= set(m["history"][-1])
    assert set(m["comparison"]["policies"]) == {"sft", "dpo"} and (tmp_path / "dpo" / "final" / "manifest.json").exists()
    for bad in (dict(pairs="mine"), dict(on_policy_samples=1), dict(beta=0.0), dict(nll_coef=-1.0)):
        with pytest.raises(ConfigError):
            dpo.DPOConfig.for_profile("smoke", **bad).validate()


def test_dpo_training_raises_the_implicit_reward_accuracy(tokenizer):
    """A few steps on 16 pairs: the loss falls below log 2 and the chosen side's implicit reward pulls ahead."""
    from course_utils.reward import RewardConfig, encode_pairs

    policy, ref = _models(tokenizer)
    policy = copy.deepcopy(ref).train()
    rows = [r for r in preference_pairs(0, 100, "train") if not r["meta"]["is_tie"]]
    pairs, _ = encode_pairs(rows, tokenizer, RewardConfig(chat_format="chatml", max_length=128))  # drops long ones
    pairs = pairs[:16]
    cfg = dpo.DPOConfig(max_steps=30, batch_size=16, lr=3e-3, warmup_steps=0, beta=0.5, progress=False, log_every=1)
    history = dpo.train(cfg, policy, ref, tokenizer, pairs)["history"]
    assert history[0]["loss"] == pytest.approx(math.log(2), abs=1e-4)
    assert history[-1]["loss"] < 0.5 and history[-1]["accuracy"] > 0.8 and history[-1]["margin"] > 0.5


def test_dpo_batches_follow_group_by_length(tokenizer, monkeypatch):
    from course_utils.reward import RewardConfig, encode_pairs

    rows = [r for r in preference_pairs(0, 200, "train") if not r["meta"]["is_tie"]]
    pairs, _ = encode_pairs(rows, tokenizer, RewardConfig(chat_format="chatml", max_length=128))
    real, spread = dpo.collate, {}
    for group in (True, False):
        seen = []
        monkeypatch.setattr(dpo, "collate", lambda batch, pad: seen.append(
            [max(len(c.input_ids), len(r.input_ids)) for c, r, *_ in batch]) or real(batch, pad))
        policy, ref = _models(tokenizer)
        dpo.train(dpo.DPOConfig(max_steps=6, batch_size=8, warmup_steps=0, progress=False, group_by_length=group),
                  policy, ref, tokenizer, pairs)
        spread[group] = sum(max(b) - min(b) for b in seen) / len(seen)  # padding a batch's shorter rows carry
    assert spread[True] < 0.5 * spread[False], spread
