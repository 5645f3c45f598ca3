"""Checks for chapter 06 — PPO (近端策略优化) for RLHF (强化学习优化): log-probs of the sampled
tokens, KL-shaped rewards (KL 惩罚), GAE (广义优势估计), and PPO's clipped policy and value losses.

The references are the course library's own, in :mod:`course_utils.rl`: ``token_logprobs``,
``kl_shaped_rewards``, ``gae``, ``clipped_policy_loss`` and ``clipped_value_loss`` (the learner returns the
loss alone, without the diagnostics dict). Every input is a right-padded (B, T) batch of response tokens
with a float 0/1 ``mask``; where the mask is 0 the inputs hold garbage on purpose (a model outputs
something at every position), which a correct function ignores.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .. import rl
from .core import Failure, close as _close, mistake_notes as _notes, show as _show, task, unchanged


def _mask(lengths: list[int], T: int) -> torch.Tensor:
    return (torch.arange(T)[None, :] < torch.tensor(lengths)[:, None]).float()  # (B, T), right padding


def _tensor(call: str, got, shape: tuple, what: str, why: str = "") -> None:
    if isinstance(got, (tuple, list)) and got and torch.is_tensor(got[0]):
        why = why or (f" (you returned a {type(got).__name__} of {len(got)}: course_utils.rl's version also returns "
                      "diagnostics, this task wants the one tensor alone)")
    if not torch.is_tensor(got) or tuple(got.shape) != shape:
        raise Failure(f"{call}: expected a tensor of shape {shape} ({what}), got "
                      f"{tuple(got.shape) if torch.is_tensor(got) else type(got).__name__}{why}")


def _per_token_note(got, expected, mask, candidates) -> str:
    """Wrong only where mask is 0, or the notes of the mistakes that give the learner's values on the real tokens."""
    real = mask.bool()
    if _close(got[real], expected[real]):
        return ("\nthe real tokens are right, but positions where mask is 0 (padding) are not 0: multiply by the "
                "mask (or torch.where(mask.bool(), x, 0.0)) before returning")
    return _notes(got, candidates, lambda a, b: _close(a[real], b[real]))


def _scalar_loss(call: str, got, expected: torch.Tensor, candidates) -> None:
    _tensor(call, got, (), "the mean loss, 0-dim")
    if not torch.isfinite(got.detach()):
        raise Failure(f"{call}:\nexpected {expected.item():.5f}\ngot      {got.item()}")
    if not _close(got.detach(), expected):
        note = _notes(got.detach().float(), candidates, _close)
        raise Failure(f"{call}:\nexpected {expected.item():.5f}\ngot      {got.item():.5f}{note}")
    if not got.requires_grad:
        raise Failure(f"{call} returned a loss without gradients (.detach(), .item(), torch.tensor(...) or "
                      "torch.no_grad() inside?): PPO calls loss.backward() on it")


def _same_grad(call: str, got_grad, expected_grad, wrt: str) -> None:
    if got_grad is None or not torch.allclose(got_grad, expected_grad, atol=1e-6, rtol=1e-4):
        raise Failure(f"{call}: the value is right, but the gradient with respect to {wrt} is wrong (a .detach() "
                      f"in the wrong place?):\nexpected {_show(expected_grad, 4)}\ngot      "
                      f"{_show(got_grad, 4) if got_grad is not None else None}")


def _masked_mean(x, m):
    return (x * m).sum() / m.sum()


# --- 6.1: log π of the sampled tokens ----------------------------------------------------------------


def gather_logprobs_reference(logits, tokens, mask) -> torch.Tensor:
    return rl.token_logprobs(logits, tokens, mask)  # (B, T), float32


def _logprob_cases():
    """(description, logits (B, T, V), tokens (B, T), mask (B, T)); padded tokens are id 0."""
    g = torch.Generator().manual_seed(61)

    def case(lengths, T, V, scale=3.0):
        mask = _mask(lengths, T)
        tokens = torch.randint(1, V, (len(lengths), T), generator=g) * mask.long()
        return scale * torch.randn(len(lengths), T, V, generator=g), tokens, mask

    yield ("3 rows of lengths 6, 3, 1", *case([6, 3, 1], 6, 11))
    yield ("2 rows without padding", *case([5, 5], 5, 7))
    yield ("1 row of one token", *case([1], 4, 9))
    logits, tokens, mask = case([5, 4], 5, 10, scale=2.0)
    logits[0, 1, tokens[0, 1]] = -150.0  # probability about e^-150: below float32's smallest number
    logits[1, 2, tokens[1, 2]] = 120.0  # exp(120) is above float32's largest number
    yield "extreme logits: a token at -150, another at +120", logits, tokens, mask
    logits, tokens, mask = case([7, 5, 2], 7, 50, scale=4.0)
    yield "bf16 logits (as a model in bf16 returns them)", logits.to(torch.bfloat16), tokens, mask


def _logprob_mistakes(logits, tokens, mask):
    lf, idx = logits.float(), tokens.long().unsqueeze(-1)

    def pick(x):
        return x.gather(-1, idx).squeeze(-1)

    def shifted(side, shift_mask):
        s = F.log_softmax(lf[:, :-1], -1).gather(-1, idx[:, 1:]).squeeze(-1)  # (B, T-1)
        s = F.pad(s, (1, 0) if side == "left" else (0, 1))
        return s * F.pad(mask[:, 1:], (1, 0) if side == "left" else (0, 1)) if shift_mask else s

    shift_note = ("logits and tokens arrive aligned: logits[:, t] is the distribution of tokens[:, t] (the shift "
                  "by one happened when the logits were sliced at P-1 … -1). Do not shift again")
    return [
        (lambda: pick(lf), "you gathered raw logits: a logit becomes a log-probability only after log_softmax "
         "(log π = logit − logsumexp over the vocabulary)"),
        (lambda: pick(F.softmax(lf, -1)), "those are probabilities: gather from F.log_softmax(logits, dim=-1)"),
        (lambda: pick(F.log_softmax(lf, 1)), "log_softmax over dim=1 normalises over TIME; the distribution is over "
         "the vocabulary, dim=-1"),
        (lambda: pick(torch.log(F.softmax(lf, -1))), "softmax, then log: a probability below about 1e-45 rounds to 0 "
         "in float32 and log(0) = -inf. F.log_softmax computes the log directly and stays finite"),
        (lambda: pick(lf - torch.log(torch.exp(lf).sum(-1, keepdim=True))), "exp(logits) overflows float32 above "
         "about 88 (inf, then -inf or nan): use F.log_softmax (or torch.logsumexp), which subtract the max first"),
        (lambda: pick(F.log_softmax(logits, -1)).float(), "you computed log_softmax in bf16: its 8 bits of mantissa "
         "round log-probs by up to a few hundredths, and PPO's ratio exp(new − old) amplifies that noise. Cast "
         "first: F.log_softmax(logits.float(), dim=-1)"),
        *[(lambda a=side, b=shift_mask: shifted(a, b), shift_note)
          for side in ("left", "right") for shift_mask in (False, True)],
    ]


@task("06", "6.1", "gather_logprobs", "log π of the sampled tokens: log_softmax, gather, mask", "warm-up",
      hint="F.log_softmax(logits.float(), dim=-1) is (B, T, V); .gather(-1, tokens.unsqueeze(-1)).squeeze(-1) picks "
           "each token's entry, (B, T); multiply by the mask so padding is 0")
def check_gather_logprobs(gather_logprobs):
    for desc, logits, tokens, mask in _logprob_cases():
        B, T, V = logits.shape
        originals = logits.clone(), tokens.clone(), mask.clone()
        call = (f"gather_logprobs(logits: {tuple(logits.shape)}{' bf16' if logits.dtype == torch.bfloat16 else ''}, "
                f"tokens={tokens.tolist()}, mask={mask.int().tolist()}) ({desc})")
        got = gather_logprobs(logits, tokens, mask)
        unchanged(call, (logits, tokens, mask), originals)
        expected = gather_logprobs_reference(logits, tokens, mask)
        why = ""
        if torch.is_tensor(got) and tuple(got.shape) == (B, T, 1):
            why = " (gather keeps the last dim: .squeeze(-1))"
        elif torch.is_tensor(got) and tuple(got.shape) == (B, T - 1):
            why = "\n" + _logprob_mistakes(logits, tokens, mask)[-1][1]
        _tensor(call, got, (B, T), "B, T", why)
        if not _close(got.detach(), expected):
            note = _per_token_note(got.detach(), expected, mask, _logprob_mistakes(logits, tokens, mask))
            raise Failure(f"{call}:\nexpected {_show(expected)}\ngot      {_show(got.detach())}{note}")
    desc, logits, tokens, mask = next(_logprob_cases())
    leaf, ref_leaf = logits.clone().requires_grad_(), logits.clone().requires_grad_()
    got = gather_logprobs(leaf, tokens, mask)
    call = f"gather_logprobs(logits: {tuple(logits.shape)} with requires_grad=True, ...) ({desc})"
    if not got.requires_grad:
        raise Failure(f"{call}: the values are right but carry no gradient (.detach(), .item() or torch.no_grad() "
                      "inside?): PPO's loss is built on these log-probs")
    got.sum().backward()
    gather_logprobs_reference(ref_leaf, tokens, mask).sum().backward()
    _same_grad(call, leaf.grad, ref_leaf.grad, "the logits")


# --- 6.2: per-token rewards with a KL penalty -----------------------------------------------------------


def kl_shaped_rewards_reference(scores, logprobs, ref_logprobs, mask, beta) -> torch.Tensor:
    return rl.kl_shaped_rewards(scores, logprobs, ref_logprobs, mask, beta)[0]  # (B, T)


def _reward_cases():
    """(description, scores (B,), logprobs, ref_logprobs (B, T) with garbage on padding, mask, beta)."""
    g = torch.Generator().manual_seed(62)
    for desc, lengths, T, beta in [("3 rows of lengths 5, 3, 1, β = 0.1", [5, 3, 1], 5, 0.1),
                                   ("4 rows, β = 0.05", [2, 6, 4, 1], 6, 0.05),
                                   ("1 row of one token, β = 0.2", [1], 3, 0.2),
                                   ("5 rows, β = 0.5", [8, 3, 7, 1, 5], 8, 0.5)]:
        B = len(lengths)
        logprobs = -2.0 * torch.rand(B, T, generator=g)
        ref_logprobs = logprobs + 0.5 * torch.randn(B, T, generator=g)
        yield desc, 2.0 * torch.randn(B, generator=g), logprobs, ref_logprobs, _mask(lengths, T), beta


def _reward_mistakes(scores, logprobs, ref_logprobs, mask, beta):
    B, T = mask.shape
    rows, kl = torch.arange(B), logprobs - ref_logprobs
    last = (mask * torch.arange(T)).argmax(1)

    def plus_score(base, at, replace=False):
        out = base.clone()
        out[rows, at] = scores if replace else out[rows, at] + scores
        return out

    return [
        (lambda: -beta * kl + scores[:, None], "you added the score to EVERY token; the reward model scores the "
         "whole response once, so its score goes on the last real token only"),
        (lambda: plus_score(-beta * kl, torch.full((B,), T - 1)), "you added the score in the last column "
         "(position -1): with right padding that is padding for every shorter row. Put it at each row's last "
         "REAL token, the largest t with mask 1"),
        (lambda: plus_score(-beta * kl, torch.zeros(B, dtype=torch.long)), "you added the score to the FIRST token; "
         "it belongs to the last real one, where the response (the episode) ends"),
        (lambda: plus_score(beta * kl, last), "KL sign reversed: the penalty is −β·(log π − log π_ref), which is "
         "negative where the policy makes a token likelier than the reference does"),
        (lambda: plus_score(-kl, last), "β is missing: the KL term is −β·(log π − log π_ref)"),
        (lambda: plus_score(-beta * kl, last, replace=True), "the last real token gets the score PLUS its own "
         "−β·KL term; you replaced the penalty there with the score (use +=)"),
        (lambda: plus_score(torch.zeros_like(kl), last) - beta * (kl * mask).sum(1, keepdim=True) * F.one_hot(
            last, T), "you put the whole sequence's KL on the last token; here every token pays its own "
         "−β·(log π − log π_ref), so GAE sees where the drift from the reference happened"),
    ]


@task("06", "6.2", "kl_shaped_rewards", "Per-token rewards: −β·KL on every token, the RM score on the last", "core",
      hint="kl = (logprobs - ref_logprobs) * mask; rewards = -beta * kl; then add scores[b] at row b's last real "
           "token, last = (mask * torch.arange(T)).argmax(1) (or mask.sum(1) - 1 with right padding): "
           "rewards[torch.arange(B), last] += scores. Padding stays 0")
def check_kl_shaped_rewards(kl_shaped_rewards):
    for desc, scores, logprobs, ref_logprobs, mask, beta in _reward_cases():
        originals = scores.clone(), logprobs.clone(), ref_logprobs.clone(), mask.clone()
        call = (f"kl_shaped_rewards(scores={_show(scores)}, logprobs={_show(logprobs)}, "
                f"ref_logprobs={_show(ref_logprobs)}, mask={mask.int().tolist()}, beta={beta}) ({desc})")
        got = kl_shaped_rewards(scores, logprobs, ref_logprobs, mask, beta)
        unchanged(call, (scores, logprobs, ref_logprobs, mask), originals)
        expected = kl_shaped_rewards_reference(scores, logprobs, ref_logprobs, mask, beta)
        _tensor(call, got, tuple(mask.shape), "B, T: one reward per token")
        if not _close(got, expected):
            note = _per_token_note(got, expected, mask, _reward_mistakes(scores, logprobs, ref_logprobs, mask, beta))
            raise Failure(f"{call}:\nexpected {_show(expected)}\ngot      {_show(got)}{note}")


# --- 6.3: generalised advantage estimation -------------------------------------------------------------


def gae_reference(rewards, values, mask, gamma, lam) -> tuple[torch.Tensor, torch.Tensor]:
    return rl.gae(rewards, values, mask, gamma, lam)


def _gae_cases():
    """(description, rewards (0 on padding), values (garbage on padding), mask, gamma, lam)."""
    g = torch.Generator().manual_seed(63)
    for desc, lengths, T, gamma, lam in [("3 rows of lengths 5, 3, 1, γ = 0.9, λ = 0.8", [5, 3, 1], 5, 0.9, 0.8),
                                         ("4 rows, γ = 1, λ = 0.95 (RLHF's usual setting)", [6, 2, 4, 5], 6, 1.0, 0.95),
                                         ("λ = 0: one-step TD errors", [4, 2], 4, 0.95, 0.0),
                                         ("λ = 1: Monte-Carlo returns", [4, 3], 4, 0.9, 1.0),
                                         ("5 rows, γ = 0.99, λ = 0.9", [8, 1, 5, 7, 3], 8, 0.99, 0.9)]:
        mask = _mask(lengths, T)
        rewards = torch.randn(len(lengths), T, generator=g).mul(0.5) * mask
        values = torch.randn(len(lengths), T, generator=g)  # a value head outputs something at every position
        yield desc, rewards, values, mask, gamma, lam


def _gae_loop(rewards, values, mask, gamma, lam, *, mask_values=True, mask_advantages=True, td_gamma=True,
              trace_gamma=True) -> torch.Tensor:
    """GAE with one of the usual mistakes switched on (all flags True: the right answer)."""
    B, T = rewards.shape
    adv, next_adv, next_value = torch.zeros(B, T), torch.zeros(B), torch.zeros(B)
    for t in reversed(range(T)):
        delta = rewards[:, t] + (gamma if td_gamma else 1.0) * next_value - values[:, t]
        next_adv = delta + (gamma if trace_gamma else 1.0) * lam * next_adv
        if mask_advantages:
            next_adv = next_adv * mask[:, t]
        next_value = values[:, t] * mask[:, t] if mask_values else values[:, t]
        adv[:, t] = next_adv
    return adv


def _advantage_mistakes(rewards, values, mask, gamma, lam):
    across = ("you bootstrapped across the padding: the episode ends at a row's last real token, so V after it is 0 "
              "and nothing flows back from padded positions (the value head's outputs there are garbage)")
    return [
        (lambda: _gae_loop(rewards, values, mask, gamma, lam, mask_values=False, mask_advantages=False), across),
        (lambda: _gae_loop(rewards, values, mask, gamma, lam, mask_values=False), across),
        (lambda: rl.gae(rewards, values, mask, lam, gamma)[0], "γ and λ swapped: δ_t = r_t + γ·V_{t+1} − V_t and "
         "A_t = δ_t + γ·λ·A_{t+1}"),
        (lambda: _gae_loop(rewards, values, mask, gamma, lam, td_gamma=False), "γ is missing in δ_t: "
         "δ_t = r_t + γ·V_{t+1} − V_t"),
        (lambda: _gae_loop(rewards, values, mask, gamma, lam, trace_gamma=False), "the recursion discounts by γ·λ: "
         "A_t = δ_t + γ·λ·A_{t+1} (you used λ alone)"),
        (lambda: rl.gae(rewards, values, mask, gamma, 1.0)[0], "your advantages are the λ = 1 ones (Monte-Carlo "
         "return − V_t): use lam"),
        (lambda: rl.gae(rewards, values, mask, gamma, 0.0)[0], "your advantages are the one-step TD errors δ_t "
         "(λ = 0): add γ·λ·A_{t+1}, walking backwards in time"),
    ]


def _discounted_reward_to_go(rewards, mask, gamma):
    out, running = torch.zeros_like(rewards), torch.zeros(rewards.size(0))
    for t in reversed(range(rewards.size(1))):
        running = (rewards[:, t] + gamma * running) * mask[:, t]
        out[:, t] = running
    return out


@task("06", "6.3", "gae", "GAE: advantages by a backward recursion, and the value targets", "core",
      hint="walk t from T-1 down to 0 with next_value = next_adv = 0: delta = r[:, t] + gamma * next_value - "
           "V[:, t]; next_adv = (delta + gamma * lam * next_adv) * mask[:, t]; next_value = V[:, t] * mask[:, t]; "
           "store next_adv. Returns are (advantages + values) * mask")
def check_gae(gae):
    for desc, rewards, values, mask, gamma, lam in _gae_cases():
        originals = rewards.clone(), values.clone(), mask.clone()
        call = (f"gae(rewards={_show(rewards)}, values={_show(values)}, mask={mask.int().tolist()}, "
                f"gamma={gamma}, lam={lam}) ({desc})")
        got = gae(rewards, values, mask, gamma, lam)
        unchanged(call, (rewards, values, mask), originals)
        if not (isinstance(got, (tuple, list)) and len(got) == 2):
            raise Failure(f"{call}: expected a pair (advantages, returns), got {type(got).__name__}")
        adv, ret = got
        exp_adv, exp_ret = gae_reference(rewards, values, mask, gamma, lam)
        _tensor(call + " → advantages", adv, tuple(mask.shape), "B, T")
        _tensor(call + " → returns", ret, tuple(mask.shape), "B, T")
        if not _close(adv, exp_adv):
            note = _per_token_note(adv, exp_adv, mask, _advantage_mistakes(rewards, values, mask, gamma, lam))
            raise Failure(f"{call}: wrong advantages\nexpected {_show(exp_adv)}\ngot      {_show(adv)}{note}")
        if not _close(ret, exp_ret):
            note = _per_token_note(ret, exp_ret, mask, [
                (lambda: exp_adv, "your returns are the advantages; the value head's target is A_t + V_t"),
                (lambda: exp_adv - values, "the value target is A_t + V_t (you subtracted V_t)"),
                (lambda: _discounted_reward_to_go(rewards, mask, gamma), "your returns are the discounted sums of "
                 "rewards; the value target that goes with GAE is A_t + V_t (the λ-return), which equals that sum "
                 "only at λ = 1"),
            ])
            raise Failure(f"{call}: right advantages, wrong returns\nexpected {_show(exp_ret)}\n"
                          f"got      {_show(ret)}{note}")


# --- 6.4: PPO's clipped policy loss ---------------------------------------------------------------------


def clipped_policy_loss_reference(logprobs, old_logprobs, advantages, mask, clip) -> torch.Tensor:
    return rl.clipped_policy_loss(logprobs, old_logprobs, advantages, mask, clip)[0]  # ()


def _policy_cases():
    """(description, logprobs, old_logprobs, advantages (garbage on padding), mask, clip)."""
    g = torch.Generator().manual_seed(64)

    def case(lengths, T, spread):
        B = len(lengths)
        old = -3.0 * torch.rand(B, T, generator=g)
        return old + spread * torch.randn(B, T, generator=g), old, torch.randn(B, T, generator=g), _mask(lengths, T)

    yield ("3 rows of lengths 5, 3, 1, ratios in and out of 1 ± 0.2", *case([5, 3, 1], 5, 0.4), 0.2)
    yield ("4 rows, clip 0.1", *case([6, 2, 4, 5], 6, 0.25), 0.1)
    old = torch.tensor([[-1.0, -2.0, -0.5, -1.5, -3.0, -1.0]])
    logprobs = old + torch.log(torch.tensor([[1.5, 0.5, 1.5, 0.5, 1.1, 0.9]]))
    yield ("one row: ratios 1.5, 0.5, 1.5, 0.5, 1.1, 0.9 against advantages +1, +1, −1, −1, +2, −2", logprobs, old,
           torch.tensor([[1.0, 1.0, -1.0, -1.0, 2.0, -2.0]]), torch.ones(1, 6), 0.2)
    logprobs, _, advantages, mask = case([4, 2, 3], 4, 0.0)
    yield "ratio 1 everywhere (the first minibatch)", logprobs, logprobs.clone(), advantages, mask, 0.2
    yield ("6 rows, clip 0.3", *case([8, 1, 5, 7, 3, 8], 8, 0.5), 0.3)


def _policy_mistakes(logprobs, old_logprobs, advantages, mask, clip):
    m = mask
    ratio = torch.exp((logprobs - old_logprobs) * m)
    A = advantages

    def surrogate(r, c=clip):
        return torch.minimum(r * A, torch.clamp(r, 1 - c, 1 + c) * A)

    padding = ("average over the real tokens only: (x * mask).sum() / mask.sum(); padded positions are no "
               "actions and their values are garbage")
    return [
        (lambda: _masked_mean(surrogate(ratio), m), "PPO maximises the clipped surrogate, so the loss to minimise "
         "is MINUS it: −min(ρ·A, clip(ρ)·A)"),
        (lambda: -_masked_mean(torch.maximum(ratio * A, torch.clamp(ratio, 1 - clip, 1 + clip) * A), m),
         "max instead of min: the surrogate is the pessimistic bound min(ρ·A, clip(ρ, 1−ε, 1+ε)·A) (min(-x, -y) "
         "of the negated terms is -max, the same mistake)"),
        (lambda: -_masked_mean(torch.clamp(ratio, 1 - clip, 1 + clip) * A, m), "you clipped the ratio but took no "
         "min with the unclipped term: where the update made a token worse (A > 0 and ρ < 1−ε, or A < 0 and "
         "ρ > 1+ε) the min keeps the full, unclipped penalty and its gradient"),
        (lambda: -_masked_mean(ratio * A, m), "no clipping: the loss is −min(ρ·A, clip(ρ, 1−ε, 1+ε)·A)"),
        (lambda: -_masked_mean(surrogate(ratio, 0.2), m), "you clipped at 0.2 whatever clip says: use "
         "1 − clip and 1 + clip"),
        (lambda: -(surrogate(ratio) * m).mean(), padding),
        (lambda: -surrogate(torch.exp(logprobs - old_logprobs)).mean(), padding),
        (lambda: -((surrogate(ratio) * m).sum(1) / m.sum(1)).mean(), "you averaged each sequence, then the "
         "sequences: a token of a short response then weighs more. The loss is the mean over all real tokens of "
         "the batch, (x * mask).sum() / mask.sum()"),
        (lambda: -_masked_mean(surrogate(logprobs / old_logprobs), m), "the ratio is π/π_old = "
         "exp(log π − log π_old), not a ratio of log-probs"),
        (lambda: -_masked_mean(surrogate(torch.exp((old_logprobs - logprobs) * m)), m), "the ratio is upside down: "
         "ρ = π/π_old = exp(logprobs − old_logprobs)"),
        (lambda: -_masked_mean(surrogate((logprobs - old_logprobs) * m), m), "ρ is a ratio of probabilities: "
         "exp(logprobs − old_logprobs), not the difference of log-probs"),
    ]


@task("06", "6.4", "clipped_policy_loss", "PPO's clipped surrogate loss, averaged over real tokens", "core",
      hint="ratio = exp(logprobs - old_logprobs); loss per token = -min(ratio * A, clamp(ratio, 1 - clip, 1 + clip) "
           "* A); return (loss * mask).sum() / mask.sum(), a 0-dim tensor with gradients")
def check_clipped_policy_loss(clipped_policy_loss):
    _check_loss_with_gradient("clipped_policy_loss", clipped_policy_loss, clipped_policy_loss_reference,
                              _policy_mistakes, _policy_cases(), ("logprobs", "old_logprobs", "advantages"))


def _check_loss_with_gradient(label: str, fn, reference, mistakes, cases, names: tuple) -> None:
    """6.4 and 6.5: ``fn(x, a, b, mask, clip)`` must equal ``reference`` in value and in its gradient w.r.t. x
    (the first input, ``names[0]``), leave its inputs unchanged, and each wrong value is matched to its mistake."""
    for desc, x, a, b, mask, clip in cases:
        originals = x.clone(), a.clone(), b.clone(), mask.clone()
        leaf = x.clone().requires_grad_()
        call = (f"{label}({names[0]}={_show(x)}, {names[1]}={_show(a)}, {names[2]}={_show(b)}, "
                f"mask={mask.int().tolist()}, clip={clip}) ({desc})")
        got = fn(leaf, a, b, mask, clip)
        unchanged(call, (leaf, a, b, mask), originals)
        ref_leaf = x.clone().requires_grad_()
        expected = reference(ref_leaf, a, b, mask, clip)
        _scalar_loss(call, got, expected.detach(), mistakes(x, a, b, mask, clip))
        got.backward()
        expected.backward()
        _same_grad(call, leaf.grad, ref_leaf.grad, names[0])


# --- 6.5 (stretch): the clipped value loss -------------------------------------------------------------


def clipped_value_loss_reference(values, old_values, returns, mask, clip) -> torch.Tensor:
    return rl.clipped_value_loss(values, old_values, returns, mask, clip)[0]  # ()


def _value_cases():
    """(description, values, old_values, returns (garbage on padding), mask, clip)."""
    g = torch.Generator().manual_seed(65)

    def case(lengths, T, spread):
        B = len(lengths)
        old = torch.randn(B, T, generator=g)
        return old + spread * torch.randn(B, T, generator=g), old, torch.randn(B, T, generator=g), _mask(lengths, T)

    old = torch.tensor([[0.0, 0.0, 0.0, 0.0, 1.0]])
    yield ("one row: V moved 0.5 towards and away from the return, and 0.1", torch.tensor([[0.5, -0.5, 0.5, 0.1, 1.1]]),
           old, torch.tensor([[1.0, 1.0, -1.0, 1.0, 3.0]]), torch.ones(1, 5), 0.2)
    yield ("3 rows of lengths 5, 3, 1, clip 0.2", *case([5, 3, 1], 5, 0.4), 0.2)
    yield ("4 rows, clip 0.5", *case([6, 2, 4, 5], 6, 0.8), 0.5)
    values, _, returns, mask = case([4, 1, 3], 4, 0.0)
    yield "values equal to the old values (the first minibatch)", values, values.clone(), returns, mask, 0.2
    yield ("6 rows, clip 0.3", *case([8, 1, 5, 7, 3, 8], 8, 0.5), 0.3)


def _value_mistakes(values, old_values, returns, mask, clip):
    m, V, R = mask, values, returns
    v_clipped = old_values + torch.clamp(V - old_values, -clip, clip)
    plain, clipped = (V - R) ** 2, (v_clipped - R) ** 2
    around_returns = R + torch.clamp(V - R, -clip, clip)
    return [
        (lambda: 0.5 * _masked_mean(plain, m), "no clipping: the loss is ½·max((V − R)², (V_clip − R)²) with "
         "V_clip = V_old + clip(V − V_old, −ε, ε). (If you clipped V around the returns instead, the max undoes it: "
         "clip(V − R, −ε, ε)² is never above (V − R)². The clip keeps V near the OLD values, the ones the "
         "advantages were computed with)"),
        (lambda: 0.5 * _masked_mean((around_returns - R) ** 2, m), "you clipped V around the returns; the clip "
         "keeps V near the OLD values: V_clip = V_old + clip(V − V_old, −ε, ε), then the max with the plain loss"),
        (lambda: 0.5 * _masked_mean(torch.minimum(plain, clipped), m), "min instead of max: like the policy loss, "
         "the value loss takes the pessimistic (larger) of the two"),
        (lambda: 0.5 * _masked_mean(clipped, m), "only the clipped term: take the max with the unclipped "
         "(V − R)², so a value that moved away from the return is still pulled back"),
        (lambda: _masked_mean(torch.maximum(plain, clipped), m), "the loss is HALF the squared error: "
         "0.5 * max(...)"),
        (lambda: 0.5 * _masked_mean(torch.maximum(plain, (torch.clamp(V / old_values, 1 - clip, 1 + clip) * old_values
                                                        - R) ** 2), m),
         "V is clipped in absolute terms, V_old ± ε, not as a ratio V/V_old in 1 ± ε"),
        (lambda: 0.5 * _masked_mean(torch.maximum(plain, (old_values + torch.clamp(V - old_values, -0.2, 0.2) - R) ** 2),
                                    m), "you clipped at 0.2 whatever clip says: V_old ± clip"),
        (lambda: 0.5 * (torch.maximum(plain, clipped) * m).mean(), "average over the real tokens only: "
         "(x * mask).sum() / mask.sum()"),
        (lambda: 0.5 * torch.maximum(plain, clipped).mean(), "average over the real tokens only: "
         "(x * mask).sum() / mask.sum(); the returns on padding are garbage"),
    ]


@task("06", "6.5", "clipped_value_loss", "PPO's clipped value loss around the old values", "stretch",
      hint="v_clipped = old_values + clamp(values - old_values, -clip, clip); per token 0.5 * max((values - "
           "returns)**2, (v_clipped - returns)**2); return its mean over the real tokens, (x * mask).sum() / "
           "mask.sum()")
def check_clipped_value_loss(clipped_value_loss):
    _check_loss_with_gradient("clipped_value_loss", clipped_value_loss, clipped_value_loss_reference,
                              _value_mistakes, _value_cases(), ("values", "old_values", "returns"))
