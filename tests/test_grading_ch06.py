"""Chapter 06 (PPO) grading bites: references pass, common mistakes fail and say why
(solution 100% and exercise 0 are checked for every chapter in test_grading.py)."""

import pytest
import torch
import torch.nn.functional as F

from course_utils import grading
from grading_asserts import chapter_tests

pytestmark = pytest.mark.usefixtures("one_thread")  # small tensors: threads only add overhead


# --- references (what the solution notebook has) -----------------------------------------------------

def gather_logprobs(logits, tokens, mask):
    log_p = F.log_softmax(logits.float(), dim=-1)  # (B, T, V)
    return log_p.gather(-1, tokens.long().unsqueeze(-1)).squeeze(-1) * mask  # (B, T)


def _last_real(mask):
    return (mask * torch.arange(mask.size(1))).argmax(1)  # (B,)


def kl_shaped_rewards(scores, logprobs, ref_logprobs, mask, beta):
    rewards = -beta * (logprobs - ref_logprobs) * mask
    rewards[torch.arange(mask.size(0)), _last_real(mask)] += scores
    return rewards


def gae(rewards, values, mask, gamma, lam):
    B, T = rewards.shape
    advantages = torch.zeros(B, T)
    next_adv, next_value = torch.zeros(B), torch.zeros(B)
    for t in reversed(range(T)):
        delta = rewards[:, t] + gamma * next_value - values[:, t]
        next_adv = (delta + gamma * lam * next_adv) * mask[:, t]
        next_value = values[:, t] * mask[:, t]
        advantages[:, t] = next_adv
    return advantages, (advantages + values) * mask


def _mean(x, mask):
    return (x * mask).sum() / mask.sum()


def clipped_policy_loss(logprobs, old_logprobs, advantages, mask, clip=0.2):
    ratio = torch.exp((logprobs - old_logprobs) * mask)
    surrogate = torch.minimum(ratio * advantages, torch.clamp(ratio, 1 - clip, 1 + clip) * advantages)
    return -_mean(surrogate, mask)


def clipped_value_loss(values, old_values, returns, mask, clip=0.2):
    v_clipped = old_values + torch.clamp(values - old_values, -clip, clip)
    return 0.5 * _mean(torch.maximum((values - returns) ** 2, (v_clipped - returns) ** 2), mask)


REFERENCES = {"6.1": (gather_logprobs,), "6.2": (kl_shaped_rewards,), "6.3": (gae,), "6.4": (clipped_policy_loss,),
              "6.5": (clipped_value_loss,)}


# --- common mistakes -----------------------------------------------------------------------------------

def logprobs_raw_logits(logits, tokens, mask):
    return logits.float().gather(-1, tokens.unsqueeze(-1)).squeeze(-1) * mask


def logprobs_softmax_then_log(logits, tokens, mask):
    return torch.log(F.softmax(logits.float(), -1)).gather(-1, tokens.unsqueeze(-1)).squeeze(-1) * mask


def logprobs_naive_logsumexp(logits, tokens, mask):
    x = logits.float()
    log_p = x - torch.log(torch.exp(x).sum(-1, keepdim=True))
    return log_p.gather(-1, tokens.unsqueeze(-1)).squeeze(-1) * mask


def logprobs_shifted(logits, tokens, mask):  # shifts once more, as for a full sequence
    log_p = F.log_softmax(logits[:, :-1].float(), -1)
    return log_p.gather(-1, tokens[:, 1:].unsqueeze(-1)).squeeze(-1) * mask[:, 1:]


def logprobs_shifted_padded(logits, tokens, mask):
    return F.pad(logprobs_shifted(logits, tokens, mask), (0, 1))


def logprobs_no_mask(logits, tokens, mask):
    return F.log_softmax(logits.float(), -1).gather(-1, tokens.unsqueeze(-1)).squeeze(-1)


def logprobs_time_dim(logits, tokens, mask):
    return F.log_softmax(logits.float(), 1).gather(-1, tokens.unsqueeze(-1)).squeeze(-1) * mask


def logprobs_in_bf16(logits, tokens, mask):
    return F.log_softmax(logits, -1).gather(-1, tokens.unsqueeze(-1)).squeeze(-1).float() * mask


def logprobs_unsqueezed(logits, tokens, mask):
    return F.log_softmax(logits.float(), -1).gather(-1, tokens.unsqueeze(-1)) * mask.unsqueeze(-1)


def logprobs_detached(logits, tokens, mask):
    return gather_logprobs(logits.detach(), tokens, mask)


def logprobs_in_place(logits, tokens, mask):
    logits -= logits.logsumexp(-1, keepdim=True)
    return logits.float().gather(-1, tokens.unsqueeze(-1)).squeeze(-1) * mask


def rewards_score_everywhere(scores, logprobs, ref_logprobs, mask, beta):
    return (-beta * (logprobs - ref_logprobs) + scores[:, None]) * mask


def rewards_score_last_column(scores, logprobs, ref_logprobs, mask, beta):
    rewards = -beta * (logprobs - ref_logprobs) * mask
    rewards[:, -1] += scores
    return rewards


def rewards_kl_sign(scores, logprobs, ref_logprobs, mask, beta):
    return kl_shaped_rewards(scores, ref_logprobs, logprobs, mask, beta)


def rewards_no_beta(scores, logprobs, ref_logprobs, mask, beta):
    return kl_shaped_rewards(scores, logprobs, ref_logprobs, mask, 1.0)


def rewards_score_replaces_kl(scores, logprobs, ref_logprobs, mask, beta):
    rewards = -beta * (logprobs - ref_logprobs) * mask
    rewards[torch.arange(mask.size(0)), _last_real(mask)] = scores
    return rewards


def rewards_unmasked(scores, logprobs, ref_logprobs, mask, beta):
    rewards = -beta * (logprobs - ref_logprobs)
    rewards[torch.arange(mask.size(0)), _last_real(mask)] += scores
    return rewards


def rewards_sequence_kl_on_last(scores, logprobs, ref_logprobs, mask, beta):
    rewards = torch.zeros_like(logprobs)
    kl = ((logprobs - ref_logprobs) * mask).sum(1)
    rewards[torch.arange(mask.size(0)), _last_real(mask)] = scores - beta * kl
    return rewards


def rewards_and_kl(scores, logprobs, ref_logprobs, mask, beta):  # rl.kl_shaped_rewards' return
    return kl_shaped_rewards(scores, logprobs, ref_logprobs, mask, beta), (logprobs - ref_logprobs) * mask


def gae_across_padding(rewards, values, mask, gamma, lam):  # the textbook loop, blind to the mask
    B, T = rewards.shape
    advantages, last = torch.zeros(B, T), torch.zeros(B)
    for t in reversed(range(T)):
        next_value = values[:, t + 1] if t + 1 < T else torch.zeros(B)
        delta = rewards[:, t] + gamma * next_value - values[:, t]
        last = delta + gamma * lam * last
        advantages[:, t] = last
    return advantages * mask, (advantages + values) * mask


def gae_swapped(rewards, values, mask, gamma, lam):
    return gae(rewards, values, mask, lam, gamma)


def gae_returns_are_advantages(rewards, values, mask, gamma, lam):
    advantages, _ = gae(rewards, values, mask, gamma, lam)
    return advantages, advantages


def gae_returns_reward_to_go(rewards, values, mask, gamma, lam):
    advantages, _ = gae(rewards, values, mask, gamma, lam)
    returns, running = torch.zeros_like(rewards), torch.zeros(rewards.size(0))
    for t in reversed(range(rewards.size(1))):
        running = rewards[:, t] + gamma * running
        returns[:, t] = running
    return advantages, returns * mask


def gae_padding_not_zero(rewards, values, mask, gamma, lam):
    advantages, returns = gae(rewards, values, mask, gamma, lam)
    return advantages, advantages + values


def gae_trace_without_gamma(rewards, values, mask, gamma, lam):
    B, T = rewards.shape
    advantages = torch.zeros(B, T)
    next_adv, next_value = torch.zeros(B), torch.zeros(B)
    for t in reversed(range(T)):
        delta = rewards[:, t] + gamma * next_value - values[:, t]
        next_adv = (delta + lam * next_adv) * mask[:, t]
        next_value = values[:, t] * mask[:, t]
        advantages[:, t] = next_adv
    return advantages, (advantages + values) * mask


def gae_td_only(rewards, values, mask, gamma, lam):
    return gae(rewards, values, mask, gamma, 0.0)


def policy_no_minus(logprobs, old_logprobs, advantages, mask, clip=0.2):
    return -clipped_policy_loss(logprobs, old_logprobs, advantages, mask, clip)


def policy_max(logprobs, old_logprobs, advantages, mask, clip=0.2):
    ratio = torch.exp((logprobs - old_logprobs) * mask)
    return _mean(torch.minimum(-ratio * advantages, -torch.clamp(ratio, 1 - clip, 1 + clip) * advantages), mask)


def policy_clip_without_min(logprobs, old_logprobs, advantages, mask, clip=0.2):
    ratio = torch.exp((logprobs - old_logprobs) * mask)
    return -_mean(torch.clamp(ratio, 1 - clip, 1 + clip) * advantages, mask)


def policy_unclipped(logprobs, old_logprobs, advantages, mask, clip=0.2):
    return -_mean(torch.exp((logprobs - old_logprobs) * mask) * advantages, mask)


def policy_mean_over_padding(logprobs, old_logprobs, advantages, mask, clip=0.2):
    ratio = torch.exp(logprobs - old_logprobs)
    return -torch.minimum(ratio * advantages, torch.clamp(ratio, 1 - clip, 1 + clip) * advantages).mean()


def policy_per_sequence_mean(logprobs, old_logprobs, advantages, mask, clip=0.2):
    ratio = torch.exp((logprobs - old_logprobs) * mask)
    surrogate = torch.minimum(ratio * advantages, torch.clamp(ratio, 1 - clip, 1 + clip) * advantages)
    return -((surrogate * mask).sum(1) / mask.sum(1)).mean()


def policy_ratio_of_logprobs(logprobs, old_logprobs, advantages, mask, clip=0.2):
    ratio = logprobs / old_logprobs
    return -_mean(torch.minimum(ratio * advantages, torch.clamp(ratio, 1 - clip, 1 + clip) * advantages), mask)


def policy_fixed_clip(logprobs, old_logprobs, advantages, mask, clip=0.2):
    return clipped_policy_loss(logprobs, old_logprobs, advantages, mask, 0.2)


def policy_detached_ratio(logprobs, old_logprobs, advantages, mask, clip=0.2):  # right value, no gradient
    return clipped_policy_loss(logprobs.detach(), old_logprobs, advantages, mask, clip) + 0 * logprobs.sum()


def value_unclipped(values, old_values, returns, mask, clip=0.2):
    return 0.5 * _mean((values - returns) ** 2, mask)


def value_clip_around_returns(values, old_values, returns, mask, clip=0.2):
    v_clipped = returns + torch.clamp(values - returns, -clip, clip)
    return 0.5 * _mean(torch.maximum((values - returns) ** 2, (v_clipped - returns) ** 2), mask)


def value_min(values, old_values, returns, mask, clip=0.2):
    v_clipped = old_values + torch.clamp(values - old_values, -clip, clip)
    return 0.5 * _mean(torch.minimum((values - returns) ** 2, (v_clipped - returns) ** 2), mask)


def value_no_half(values, old_values, returns, mask, clip=0.2):
    return 2 * clipped_value_loss(values, old_values, returns, mask, clip)


def value_clipped_term_only(values, old_values, returns, mask, clip=0.2):
    v_clipped = old_values + torch.clamp(values - old_values, -clip, clip)
    return 0.5 * _mean((v_clipped - returns) ** 2, mask)


def value_mean_over_padding(values, old_values, returns, mask, clip=0.2):
    v_clipped = old_values + torch.clamp(values - old_values, -clip, clip)
    return 0.5 * torch.maximum((values - returns) ** 2, (v_clipped - returns) ** 2).mean()


def value_ratio_clip(values, old_values, returns, mask, clip=0.2):
    v_clipped = torch.clamp(values / old_values, 1 - clip, 1 + clip) * old_values
    return 0.5 * _mean(torch.maximum((values - returns) ** 2, (v_clipped - returns) ** 2), mask)


def value_returns_item(values, old_values, returns, mask, clip=0.2):
    return torch.tensor(clipped_value_loss(values, old_values, returns, mask, clip).item())


# (task, functions with the mistake, words the message must contain)
WRONG = [
    ("6.1", (logprobs_raw_logits,), "raw logits"),
    ("6.1", (logprobs_softmax_then_log,), "softmax, then log"),
    ("6.1", (logprobs_naive_logsumexp,), "overflows"),
    ("6.1", (logprobs_shifted,), "Do not shift again"),
    ("6.1", (logprobs_shifted_padded,), "Do not shift again"),
    ("6.1", (logprobs_no_mask,), "multiply by the mask"),
    ("6.1", (logprobs_time_dim,), "over TIME"),
    ("6.1", (logprobs_in_bf16,), "in bf16"),
    ("6.1", (logprobs_unsqueezed,), "squeeze(-1)"),
    ("6.1", (logprobs_detached,), "no gradient"),
    ("6.1", (logprobs_in_place,), "changed one of its inputs"),
    ("6.2", (rewards_score_everywhere,), "EVERY token"),
    ("6.2", (rewards_score_last_column,), "last column"),
    ("6.2", (rewards_kl_sign,), "KL sign reversed"),
    ("6.2", (rewards_no_beta,), "β is missing"),
    ("6.2", (rewards_score_replaces_kl,), "PLUS its own"),
    ("6.2", (rewards_unmasked,), "multiply by the mask"),
    ("6.2", (rewards_sequence_kl_on_last,), "whole sequence's KL"),
    ("6.2", (rewards_and_kl,), "alone"),
    ("6.3", (gae_across_padding,), "bootstrapped across the padding"),
    ("6.3", (gae_swapped,), "γ and λ swapped"),
    ("6.3", (gae_returns_are_advantages,), "your returns are the advantages"),
    ("6.3", (gae_returns_reward_to_go,), "discounted sums of rewards"),
    ("6.3", (gae_padding_not_zero,), "multiply by the mask"),
    ("6.3", (gae_trace_without_gamma,), "γ·λ"),
    ("6.3", (gae_td_only,), "one-step TD errors"),
    ("6.4", (policy_no_minus,), "MINUS"),
    ("6.4", (policy_max,), "max instead of min"),
    ("6.4", (policy_clip_without_min,), "took no min"),
    ("6.4", (policy_unclipped,), "no clipping"),
    ("6.4", (policy_mean_over_padding,), "real tokens only"),
    ("6.4", (policy_per_sequence_mean,), "averaged each sequence"),
    ("6.4", (policy_ratio_of_logprobs,), "not a ratio of log-probs"),
    ("6.4", (policy_fixed_clip,), "whatever clip says"),
    ("6.4", (policy_detached_ratio,), "gradient"),
    ("6.5", (value_unclipped,), "no clipping"),
    ("6.5", (value_clip_around_returns,), "around the returns"),
    ("6.5", (value_min,), "min instead of max"),
    ("6.5", (value_no_half,), "HALF"),
    ("6.5", (value_clipped_term_only,), "only the clipped term"),
    ("6.5", (value_mean_over_padding,), "real tokens only"),
    ("6.5", (value_ratio_clip,), "not as a ratio"),
    ("6.5", (value_returns_item,), "without gradients"),
]


(test_common_mistake_fails_and_names_it, test_reference_passes,
 test_every_task_has_a_wrong_variant_and_tiers_are_valid) = chapter_tests("06", WRONG, REFERENCES)


def test_an_untouched_stub_is_not_implemented():
    def gae(rewards, values, mask, gamma, lam):
        raise NotImplementedError("task 6.3: not implemented yet")

    row = grading.check("6.3", gae)[0]
    assert row.status == "not implemented" and row.earned == 0 and "write gae first" in row.message


def test_the_cases_hold_garbage_where_the_mask_is_0():
    """Padding that holds zeros would hide every 'forgot the mask' mistake."""
    from course_utils.grading.ch06 import _gae_cases, _policy_cases, _reward_cases

    for _, _, logprobs, _, mask, _ in _reward_cases():
        assert (logprobs[mask == 0] != 0).all()
    for _, _, values, mask, _, _ in _gae_cases():
        assert (values[mask == 0] != 0).all()
    for _, _, _, advantages, mask, _ in _policy_cases():
        assert (advantages[mask == 0] != 0).all()


def test_failure_shows_the_call_and_expected_vs_got():
    row = grading.check("6.2", rewards_score_last_column)[0]
    assert "mask=[[1, 1, 1, 1, 1], [1, 1, 1, 0, 0], [1, 0, 0, 0, 0]]" in row.message and "beta=0.1" in row.message
    row = grading.check("6.1", logprobs_softmax_then_log)[0]
    assert "-150" in row.message and "-inf" in row.message
    row = grading.check("6.4", policy_no_minus)[0]
    assert "clip=0.2" in row.message and "expected" in row.message and "got" in row.message


def test_checks_are_fast():
    import time

    for task_id, fns in REFERENCES.items():
        t0 = time.monotonic()
        grading.check(task_id, *fns)
        assert time.monotonic() - t0 < 1.0, task_id
