"""course_utils.ppo: rollouts that agree with generate, a frozen reference, NaN scores dropped, PPO that learns."""

from __future__ import annotations

import copy
import random
from dataclasses import replace

import pytest
import torch

from course_utils import ppo, rl
from course_utils.chat import pad_ids
from course_utils.errors import ConfigError, DataError
from course_utils.world import rl_prompts

pytestmark = pytest.mark.usefixtures("one_thread")

PROMPTS = [r["prompt"] for r in rl_prompts(0, 8)]


def _policy_and_ref(tokenizer, seed: int = 0):
    from course_utils.model import build_model, make_config
    from course_utils.profiles import ModelSize

    size = ModelSize(hidden_size=32, num_layers=2, num_heads=2, intermediate_size=64, context_length=128)
    lm = build_model(make_config(size, tokenizer), seed=seed)
    return ppo.PolicyWithValue(lm), ppo.frozen(copy.deepcopy(lm))


def _length_score(prompts, responses):
    return [float(len(r)) for r in responses]


def test_response_mask_stops_after_the_first_eos():
    eos = 2
    responses = torch.tensor([[5, 6, 2, 0, 0], [2, 0, 0, 0, 0], [5, 6, 7, 8, 9], [5, 2, 6, 2, 0]])
    mask, stopped = ppo.response_mask(responses, eos)
    assert mask.tolist() == [[1, 1, 1, 0, 0], [1, 0, 0, 0, 0], [1, 1, 1, 1, 1], [1, 1, 0, 0, 0]]
    assert stopped.tolist() == [True, True, False, True]


def test_forward_log_probs_equal_the_ones_generate_sampled_with(tokenizer):
    """The log-probs PPO recomputes for the sampled tokens are the ones generate sampled them with: aligned one
    position back (logits at t give token t+1), padding skipped. A one-position slip would fail this."""
    policy, _ = _policy_and_ref(tokenizer)
    with torch.no_grad():  # a fresh tiny model is nearly uniform whatever the positions; sharpen it
        for name, p in policy.lm.named_parameters():
            p.mul_(8.0 if "q_proj" in name or "k_proj" in name else 3.0 if "embed" in name else 1.0)
    pad, eos = tokenizer.pad_token_id, tokenizer.eos_token_id
    ids = ppo.prompt_ids(tokenizer, PROMPTS, "chatml")
    prompt, attn = pad_ids(ids, pad, "left")
    P = prompt.size(1)
    assert min(map(len, ids)) < P, "prompts of equal length would not test the padding"
    torch.manual_seed(0)
    with torch.no_grad():
        out = policy.lm.generate(input_ids=prompt, attention_mask=attn, do_sample=True, top_k=0, max_new_tokens=6,
                                 eos_token_id=eos, pad_token_id=pad, return_dict_in_generate=True, output_logits=True)
        responses = out.sequences[:, P:]
        mask, _ = ppo.response_mask(responses, eos)
        sampled_with = rl.token_logprobs(torch.stack(out.logits, 1), responses, mask)
        seq, full_attn = out.sequences, torch.cat([attn, mask.long()], 1)
        logits, _ = ppo._logprobs_and_values(policy, seq, full_attn, P)
        ours = rl.token_logprobs(logits, responses, mask)
        plain = rl.token_logprobs(policy.lm(input_ids=seq, attention_mask=full_attn).logits[:, P - 1 : -1],
                                  responses, mask)
    assert torch.allclose(ours, sampled_with, atol=1e-4)
    assert (ours[mask.bool()] - ours[mask.bool()].mean()).abs().max() > 0.5  # the sharpened model is not uniform
    shifted = rl.token_logprobs(logits[:, :-1], responses[:, 1:], mask[:, 1:])  # one position off
    assert (shifted - sampled_with[:, 1:]).abs().max() > 0.1
    # RoPE sees only position *differences*: positions counted from the padding shift a whole row alike
    assert torch.allclose(plain, ours, atol=1e-4)


def test_reference_stays_bit_identical_and_the_first_ratio_is_one(tokenizer):
    policy, ref = _policy_and_ref(tokenizer)
    before_ref = {k: v.clone() for k, v in ref.state_dict().items()}
    before_policy = {k: v.clone() for k, v in policy.lm.state_dict().items()}
    cfg = ppo.PPOConfig(rollout_batch=8, minibatch=8, ppo_epochs=1, max_new_tokens=6, lr=1e-3)
    opt = torch.optim.AdamW(policy.parameters(), lr=cfg.lr)
    buffer = ppo.rollout(policy, ref, tokenizer, PROMPTS, _length_score, cfg, beta=0.1)
    first = ppo.ppo_update(policy, opt, buffer, cfg, random.Random(0))
    assert first["approx_kl"] < 1e-10 and first["clip_fraction"] == 0.0  # nothing changed before the first step
    for _ in range(2):
        buffer = ppo.rollout(policy, ref, tokenizer, PROMPTS, _length_score, cfg, beta=0.1)
        ppo.ppo_update(policy, opt, buffer, replace(cfg, ppo_epochs=2, minibatch=4), random.Random(1))
    assert all(torch.equal(v, before_ref[k]) for k, v in ref.state_dict().items())
    assert not all(torch.equal(v, before_policy[k]) for k, v in policy.lm.state_dict().items())
    assert not any(p.requires_grad for p in ref.parameters()) and not ref.training


def test_nan_scores_are_dropped_and_counted(tokenizer):
    policy, ref = _policy_and_ref(tokenizer)
    cfg = ppo.PPOConfig(rollout_batch=8, minibatch=4, max_new_tokens=4)

    def half_nan(prompts, responses):
        return [float("nan") if i % 2 else 1.0 for i in range(len(responses))]

    buffer = ppo.rollout(policy, ref, tokenizer, PROMPTS, half_nan, cfg, beta=0.1)
    assert buffer["stats"]["nan_scores"] == 4 and buffer["seq"].size(0) == 4 and buffer["kept"] == [0, 2, 4, 6]
    assert torch.isfinite(buffer["advantages"]).all()
    stopped = [tokenizer.eos_token_id in row for row in buffer["responses"].tolist()]
    assert buffer["stats"]["truncated"] >= 4 - sum(stopped)
    with pytest.raises(DataError, match="every score"):
        ppo.rollout(policy, ref, tokenizer, PROMPTS, lambda p, r: [float("nan")] * len(r), cfg, beta=0.1)
    with pytest.raises(DataError, match="returned"):
        ppo.rollout(policy, ref, tokenizer, PROMPTS, lambda p, r: [1.0], cfg, beta=0.1)


def test_ppo_learns_what_the_score_rewards(tokenizer):
    """Reward = how many letters 'e' the response holds: a random tiny model must learn to write more of them."""
    policy, ref = _policy_and_ref(tokenizer, seed=3)
    cfg = ppo.PPOConfig(rollout_batch=16, minibatch=8, ppo_epochs=2, max_new_tokens=8, lr=3e-3, kl_beta=0.0)
    opt = torch.optim.AdamW(policy.parameters(), lr=cfg.lr)
    prompts = [r["prompt"] for r in rl_prompts(1, 16)]
    g, rng = torch.Generator().manual_seed(0), random.Random(0)
    scores = []
    for _ in range(25):
        buffer = ppo.rollout(policy, ref, tokenizer, prompts, lambda p, r: [x.count("e") for x in r], cfg, 0.0, g)
        scores.append(buffer["stats"]["score"])
        ppo.ppo_update(policy, opt, buffer, cfg, rng)
    assert sum(scores[-5:]) / 5 > 1.5 * sum(scores[:5]) / 5 + 0.5, scores


def test_config_validation():
    ppo.PPOConfig().validate()
    for bad in (dict(minibatch=64, rollout_batch=8), dict(clip=0.0), dict(kl_beta=-1.0), dict(ppo_epochs=0)):
        with pytest.raises(ConfigError):
            replace(ppo.PPOConfig(), **bad).validate()
    assert isinstance(ppo.PPOConfig(kl_target=6.0).kl_controller(), rl.AdaptiveKL)
    assert isinstance(ppo.PPOConfig(kl_target=0.0).kl_controller(), rl.FixedKL)


def test_log_probs_follow_the_sampling_temperature(tokenizer):
    policy, ref = _policy_and_ref(tokenizer)
    hot = ppo.PPOConfig(rollout_batch=8, minibatch=8, ppo_epochs=1, max_new_tokens=4, temperature=2.0)
    buffer = ppo.rollout(policy, ref, tokenizer, PROMPTS, _length_score, hot, beta=0.1)
    with torch.no_grad():
        logits, _ = ppo._logprobs_and_values(policy, buffer["seq"], buffer["attn"], buffer["P"])  # T = 1
    at_one = rl.token_logprobs(logits, buffer["responses"], buffer["mask"])
    at_two = rl.token_logprobs(logits / 2.0, buffer["responses"], buffer["mask"])
    assert torch.allclose(buffer["logprobs"], at_two, atol=1e-5)
    assert not torch.allclose(buffer["logprobs"], at_one, atol=1e-3)


def test_value_head_has_its_own_learning_rate(tokenizer):
    policy, _ = _policy_and_ref(tokenizer)
    cfg = ppo.PPOConfig(lr=2e-5, value_lr_mult=10.0)
    opt = ppo.make_optimizer(policy, cfg)
    body, head = opt.param_groups
    assert body["lr"] == 2e-5 and head["lr"] == pytest.approx(2e-4)
    grouped = [id(p) for g in opt.param_groups for p in g["params"]]
    assert sorted(grouped) == sorted(id(p) for p in policy.parameters()) and len(set(grouped)) == len(grouped)
    assert {id(p) for p in head["params"]} == {id(p) for p in policy.value_head.parameters()}


def test_a_response_cut_without_eos_loses_the_penalty(tokenizer):
    policy, ref = _policy_and_ref(tokenizer)
    cfg = ppo.PPOConfig(rollout_batch=8, minibatch=8, max_new_tokens=3, no_eos_penalty=2.5)
    buffer = ppo.rollout(policy, ref, tokenizer, PROMPTS, lambda p, r: [1.0] * len(r), cfg, beta=0.0)
    cut = ~(buffer["responses"] == tokenizer.eos_token_id).any(1)  # a random tiny model rarely says EOS in 3 tokens
    assert buffer["stats"]["truncated"] == int(cut.sum()) > 0
    assert buffer["scores"].tolist() == [1.0 - 2.5 * float(c) for c in cut.tolist()]
    assert buffer["stats"]["score"] == 1.0  # the logged score is the scorer's own, before the penalty


def test_reward_normaliser_uses_the_policys_own_samples(tokenizer):
    policy, _ = _policy_and_ref(tokenizer)
    cfg = ppo.PPOConfig(max_new_tokens=5)
    seen = []

    def score(prompts, texts):
        seen.extend(texts)
        return [float(len(t)) for t in texts]

    mean, std = ppo.reward_normaliser(policy, tokenizer, PROMPTS, score, cfg, torch.Generator().manual_seed(0))
    lengths = torch.tensor([float(len(t)) for t in seen])
    assert len(seen) == len(PROMPTS) and mean == pytest.approx(lengths.mean().item())
    assert std == pytest.approx(lengths.std().item())


def test_ppo_stage_runs_end_to_end_in_smoke(tmp_path):
    """The stage builds its inputs (SFT model, RM) if missing, trains, keeps the reference frozen, judges, saves."""
    from course_utils.stages import load_model_dir

    m = ppo.main(ppo.PPOConfig.for_profile("smoke", progress=False), out_dir=tmp_path / "ppo", log=lambda *_: None)
    assert m["reference_unchanged"] and m["steps"] == 3 and len(m["history"]) == 3
    row = m["history"][-1]
    for key in ("rm_score", "true_score", "kl", "beta", "entropy", "clip_fraction", "value_loss",
                "explained_variance", "approx_kl", "truncated", "empty", "nan_scores"):
        assert key in row and row[key] == row[key], key  # present and not NaN
    assert m["counts"]["responses"] == 3 * 8 and m["reward_norm"]["std"] > 0
    c = m["comparison"]["policies"]
    assert set(c) == {"sft", "ppo"} and c["sft"]["kl"] == 0.0 and 0.0 <= c["ppo"]["vs_baseline"]["win_rate"] <= 1.0
    lm, _ = load_model_dir(tmp_path / "ppo" / "final")
    assert lm.config.model_type == "llama"
    with pytest.raises(ConfigError, match="reward"):
        ppo.PPOConfig.for_profile("smoke", reward="oracle").validate()


def test_ppo_on_the_gold_reward_uses_the_true_scorer(tmp_path):
    m = ppo.main(ppo.PPOConfig.for_profile("smoke", progress=False, reward="gold", steps=1), out_dir=tmp_path / "ppo",
                 log=lambda *_: None)
    row = m["history"][0]
    assert 0.0 <= row["rm_score"] <= 1.0 and row["rm_score"] == pytest.approx(row["true_score"])


def test_empty_answers_are_counted_and_still_trained_on(tokenizer):
    """An answer that is only EOS is a real action (stop at once): counted as empty, kept, with a finite advantage."""
    policy, ref = _policy_and_ref(tokenizer)
    eos = tokenizer.eos_token_id
    real_generate = policy.lm.generate

    def stops_at_once_on_even_rows(**kwargs):
        out = real_generate(**kwargs)
        out[::2, kwargs["input_ids"].size(1)] = eos
        return out

    policy.lm.generate = stops_at_once_on_even_rows
    cfg = ppo.PPOConfig(rollout_batch=8, minibatch=4, max_new_tokens=4)
    buffer = ppo.rollout(policy, ref, tokenizer, PROMPTS, _length_score, cfg, beta=0.1)
    assert buffer["stats"]["empty"] >= 4 and all(t == "" for t in buffer["texts"][::2])
    assert buffer["mask"][::2].sum(1).tolist() == [1.0] * 4  # the EOS token alone
    assert torch.isfinite(buffer["advantages"]).all() and buffer["seq"].size(0) == 8
