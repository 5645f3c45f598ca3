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
    ids = ppo._prompt_ids(tokenizer, PROMPTS, "chatml")
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
    assert isinstance(ppo.PPOConfig().kl_controller(), rl.FixedKL)


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
