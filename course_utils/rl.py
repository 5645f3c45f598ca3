"""The arithmetic of RL fine-tuning (强化学习优化), shared by PPO and its relatives.

Every function works on right-padded (batch, time) tensors of *response* tokens with a 0/1 ``mask``
that marks the tokens the policy generated (prompt and padding are 0). Nothing here runs a model:
the PPO loop (chapter 06) calls these on what its models computed, and the tests check each one
against a brute-force or library reference.

* :func:`token_logprobs` -- log π(token) of the tokens that were generated;
* :func:`kl_shaped_rewards` -- the RM's score on the last token, −β·KL(π‖π_ref) on every token;
* :func:`gae` -- generalised advantage estimation (γ, λ) and the returns the value head learns;
* :func:`whiten` -- advantages to mean 0, variance 1 over the real tokens;
* :func:`clipped_policy_loss`, :func:`clipped_value_loss` -- PPO's two losses, with their diagnostics;
* :class:`FixedKL`, :class:`AdaptiveKL` -- the KL coefficient β, fixed or steered towards a target KL;
* :func:`group_advantages`, :func:`rloo_advantages` -- critic-free baselines from several samples per prompt
  (GRPO, RLOO).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from .errors import ConfigError, DataError


def _check_mask(mask: torch.Tensor, *tensors: torch.Tensor) -> torch.Tensor:
    for t in tensors:
        if t.shape != mask.shape:
            raise ConfigError(f"expected shape {tuple(mask.shape)} (like the mask), got {tuple(t.shape)}")
    if bool(((mask != 0) & (mask != 1)).any()):
        raise ConfigError("mask must hold only 0 and 1")
    return mask.to(torch.float32)


def masked_mean(x: torch.Tensor, mask: torch.Tensor, dim: int | None = None) -> torch.Tensor:
    """Mean of ``x`` over the positions where ``mask`` is 1 (all of them, or along ``dim``)."""
    m = _check_mask(mask, x)
    if dim is None:
        n = m.sum()
        if n == 0:
            raise DataError("the mask selects no token: nothing to average")
        return (x * m).sum() / n
    return (x * m).sum(dim) / m.sum(dim).clamp(min=1)


def whiten(x: torch.Tensor, mask: torch.Tensor, shift_mean: bool = True, eps: float = 1e-8) -> torch.Tensor:
    """``x`` scaled to variance 1 (and, with ``shift_mean``, mean 0) over the real tokens; padding becomes 0.

    The variance is the unbiased one over the masked values. PPO whitens advantages per batch so that the
    step size does not depend on the scale of the reward.
    """
    m = _check_mask(mask, x)
    n = m.sum()
    if n < 2:
        raise DataError("whitening needs at least two real tokens")
    mean = (x * m).sum() / n
    var = (((x - mean) * m) ** 2).sum() / (n - 1)
    out = (x - mean) * torch.rsqrt(var + eps)
    if not shift_mean:
        out = out + mean
    return out * m


def token_logprobs(logits: torch.Tensor, tokens: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
    """(B, T) log-probabilities of ``tokens`` under ``logits`` (B, T, V), both already aligned.

    Aligned means ``logits[:, t]`` is the distribution *for* ``tokens[:, t]``: for a causal LM fed
    ``prompt + response``, that is the logits at positions ``P-1 … P+T-2`` and the tokens at ``P … P+T-1``.
    Computed in float32 with ``log_softmax`` (a softmax, then a log, loses small probabilities in bf16).
    Positions where ``mask`` is 0 are set to 0.
    """
    return token_logprobs_and_entropy(logits, tokens, mask)[0]


def token_logprobs_and_entropy(logits: torch.Tensor, tokens: torch.Tensor,
                               mask: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`token_logprobs` and the entropy of each position's distribution, from one ``log_softmax``."""
    if logits.dim() != 3 or tokens.shape != logits.shape[:2]:
        raise ConfigError(f"logits must be (B, T, V) and tokens (B, T); got {tuple(logits.shape)} and "
                          f"{tuple(tokens.shape)}")
    log_p = F.log_softmax(logits.float(), dim=-1)
    out = torch.gather(log_p, 2, tokens.long().unsqueeze(-1)).squeeze(-1)
    entropy = -(log_p.exp() * log_p).sum(-1)
    if mask is None:
        return out, entropy
    m = _check_mask(mask, out)
    return out * m, entropy * m


def kl_shaped_rewards(score: torch.Tensor, logprobs: torch.Tensor, ref_logprobs: torch.Tensor, mask: torch.Tensor,
                      beta: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-token rewards for PPO: −β·(log π − log π_ref) on every generated token, plus the RM's ``score`` on
    the last one. Returns (rewards, per-token KL estimate), both (B, T) and 0 on padding.

    ``log π(y_t) − log π_ref(y_t)`` of the sampled token is an unbiased one-sample estimate of the KL between
    the two next-token distributions; summed over a response it estimates KL(π‖π_ref) of the whole sequence.
    A non-finite score (an RM that returned NaN) is refused here rather than trained on.
    """
    m = _check_mask(mask, logprobs, ref_logprobs)
    if score.shape != mask.shape[:1]:
        raise ConfigError(f"score must be one number per row, shape ({mask.shape[0]},); got {tuple(score.shape)}")
    if not bool(torch.isfinite(score).all()):
        raise DataError(f"{int((~torch.isfinite(score)).sum())} reward-model scores are NaN or infinite")
    if bool((m.sum(1) == 0).any()):
        raise DataError("a row has no generated token: drop empty generations before shaping rewards")
    if beta < 0:
        raise ConfigError(f"beta must be >= 0, got {beta}")
    kl = (logprobs - ref_logprobs) * m
    rewards = -beta * kl
    last = (m * torch.arange(m.size(1), device=m.device)).argmax(1)  # last generated token of each row
    rewards[torch.arange(m.size(0), device=m.device), last] += score.to(rewards.dtype)
    return rewards, kl


def gae(rewards: torch.Tensor, values: torch.Tensor, mask: torch.Tensor, gamma: float = 1.0,
        lam: float = 0.95) -> tuple[torch.Tensor, torch.Tensor]:
    """Generalised advantage estimation on right-padded rows. Returns (advantages, returns), 0 on padding.

    δ_t = r_t + γ·V_{t+1} − V_t (V after the last real token is 0: the episode ends there),
    A_t = δ_t + γλ·A_{t+1}, and the value target is A_t + V_t. λ = 1 gives Monte-Carlo returns minus the
    baseline, λ = 0 one-step TD errors.
    """
    m = _check_mask(mask, rewards, values)
    if not (0.0 <= gamma <= 1.0 and 0.0 <= lam <= 1.0):
        raise ConfigError(f"gamma and lam must be in [0, 1], got {gamma} and {lam}")
    T = rewards.size(1)
    adv = torch.zeros_like(rewards, dtype=torch.float32)
    next_adv = torch.zeros(rewards.size(0), device=rewards.device)
    next_value = torch.zeros(rewards.size(0), device=rewards.device)
    for t in reversed(range(T)):
        delta = rewards[:, t] + gamma * next_value - values[:, t]
        next_adv = (delta + gamma * lam * next_adv) * m[:, t]  # padding after the end carries nothing back
        next_value = values[:, t] * m[:, t]
        adv[:, t] = next_adv
    return adv, (adv + values) * m


def clipped_policy_loss(logprobs: torch.Tensor, old_logprobs: torch.Tensor, advantages: torch.Tensor,
                        mask: torch.Tensor, clip: float = 0.2) -> tuple[torch.Tensor, dict]:
    """PPO's clipped surrogate, −min(ρ·A, clip(ρ, 1−ε, 1+ε)·A) with ρ = π/π_old, averaged over real tokens.

    Diagnostics (no gradient): ``clip_fraction``, the share of tokens whose ratio the clip changed the loss of;
    ``approx_kl``, the mean of ½(log ρ)², a low-variance estimate of KL(π_old‖π) after the update.
    """
    m = _check_mask(mask, logprobs, old_logprobs, advantages)
    if clip <= 0:
        raise ConfigError(f"clip must be > 0, got {clip}")
    log_ratio = (logprobs - old_logprobs) * m
    ratio = torch.exp(log_ratio)
    unclipped = ratio * advantages
    clipped = torch.clamp(ratio, 1.0 - clip, 1.0 + clip) * advantages
    loss = masked_mean(-torch.minimum(unclipped, clipped), m)
    with torch.no_grad():
        stats = {"clip_fraction": masked_mean((clipped < unclipped).float(), m).item(),
                 "approx_kl": masked_mean(0.5 * log_ratio ** 2, m).item()}
    return loss, stats


def clipped_value_loss(values: torch.Tensor, old_values: torch.Tensor, returns: torch.Tensor, mask: torch.Tensor,
                       clip: float = 0.2) -> tuple[torch.Tensor, dict]:
    """½·max((V − R)², (V_clipped − R)²) over real tokens, V_clipped = V_old + clip(V − V_old, ±ε).

    Clipping the value update as well keeps one PPO epoch from moving the critic far from the values that
    the advantages were computed with. Diagnostics: ``value_clip_fraction`` and ``explained_variance``
    (1 − Var(R − V)/Var(R): 1 is a perfect critic, 0 no better than a constant, below 0 worse).
    """
    m = _check_mask(mask, values, old_values, returns)
    if clip <= 0:
        raise ConfigError(f"clip must be > 0, got {clip}")
    v_clipped = old_values + torch.clamp(values - old_values, -clip, clip)
    plain, clipped = (values - returns) ** 2, (v_clipped - returns) ** 2
    loss = 0.5 * masked_mean(torch.maximum(plain, clipped), m)
    with torch.no_grad():
        n = m.sum()
        r_mean = (returns * m).sum() / n
        var_r = (((returns - r_mean) * m) ** 2).sum() / n
        err = (returns - values) * m
        var_err = ((err - err.sum() / n) * m).pow(2).sum() / n
        stats = {"value_clip_fraction": masked_mean((clipped > plain).float(), m).item(),
                 "explained_variance": (1.0 - var_err / var_r).item() if var_r > 0 else float("nan")}
    return loss, stats


@dataclass
class FixedKL:
    """A constant KL coefficient β."""

    beta: float

    def update(self, kl: float, n_steps: int) -> float:
        return self.beta


@dataclass
class AdaptiveKL:
    """β steered towards a target KL (Ziegler et al. 2019): β ← β·(1 + clip(KL/target − 1, ±0.2)·n/horizon).

    Too much KL (the policy drifts from the reference) raises β; too little lowers it. The proportional error
    is clipped to ±20% so one noisy batch cannot swing β far; ``horizon`` (in samples) sets how fast it reacts.
    """

    beta: float
    target: float
    horizon: int = 10_000

    def __post_init__(self):
        if self.beta <= 0 or self.target <= 0 or self.horizon <= 0:
            raise ConfigError("AdaptiveKL needs beta > 0, target > 0 and horizon > 0")

    def update(self, kl: float, n_steps: int) -> float:
        """Feed the mean KL per sequence of the last batch and its number of samples; returns the new β."""
        if not math.isfinite(kl):
            raise DataError(f"KL is {kl}: refusing to update β with it")
        error = max(-0.2, min(0.2, kl / self.target - 1.0))
        self.beta *= 1.0 + error * n_steps / self.horizon
        return self.beta


def _groups(rewards: torch.Tensor, group_size: int) -> torch.Tensor:
    """(prompts, group_size) view of ``group_size`` consecutive rewards per prompt."""
    if group_size < 2 or rewards.dim() != 1 or rewards.numel() % group_size:
        raise ConfigError(f"need a 1-D tensor of groups of {group_size} >= 2 rewards, got shape {tuple(rewards.shape)}")
    return rewards.view(-1, group_size)


def group_advantages(rewards: torch.Tensor, group_size: int, scale: str = "group", eps: float = 1e-4) -> torch.Tensor:
    """GRPO's advantages: each reward minus the mean of its group, divided by a standard deviation.

    ``rewards`` (N,) holds ``group_size`` consecutive completions per prompt. ``scale``: "group" divides by the
    group's (unbiased) standard deviation, "batch" by the whole batch's, "none" not at all (Dr. GRPO: the
    division favours prompts whose completions all score alike). A group whose rewards are all equal gets
    advantage 0: it teaches nothing. The baseline replaces PPO's value head.
    """
    if scale not in ("group", "batch", "none"):
        raise ConfigError(f"scale must be 'group', 'batch' or 'none', got {scale!r}")
    grouped = _groups(rewards, group_size)
    if not bool(torch.isfinite(rewards).all()):
        raise DataError("rewards must be finite")
    centred = (grouped - grouped.mean(1, keepdim=True)).view(-1)
    if scale == "none":
        return centred
    std = grouped.std(1, keepdim=True).expand_as(grouped).reshape(-1) if scale == "group" else rewards.std()
    return centred / (std + eps)


def rloo_advantages(rewards: torch.Tensor, group_size: int) -> torch.Tensor:
    """REINFORCE leave-one-out: each reward minus the mean of the *other* completions of its prompt.

    Unlike the group mean, this baseline does not contain the sample itself, so the estimate stays unbiased;
    it equals ``group_size / (group_size − 1)`` × (reward − group mean).
    """
    grouped = _groups(rewards, group_size)
    others = (grouped.sum(1, keepdim=True) - grouped) / (group_size - 1)
    return (grouped - others).view(-1)
