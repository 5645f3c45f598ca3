"""PPO for a language model, from scratch (chapter 06): rollouts, a value head, KL control, experience replay.

One PPO step:

1. **Rollout** (:func:`rollout`): the policy samples a response to each prompt of a batch; a scorer (the
   reward model, or any function) scores each (prompt, response); the frozen reference model gives the log-prob
   of every sampled token. The batch, with the policy's own log-probs and values, is the *experience buffer*.
2. **Rewards and advantages**: ``rl.kl_shaped_rewards`` (score on the last token, −β·KL on every token),
   ``rl.gae``, advantages whitened.
3. **Replay** (:func:`ppo_update`): several epochs over shuffled minibatches of the buffer, each with PPO's
   clipped policy loss, clipped value loss and an entropy bonus; the clip keeps the reused, slightly stale
   samples from pushing the policy far in one step.
4. **KL control**: β is updated from the measured KL (``rl.AdaptiveKL``) or stays fixed.

The reference model is never trained: :func:`frozen` puts it in eval mode with gradients off, and the tests
check its parameters are bit-identical after training.
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass

import torch
from torch import nn

from . import rl
from .chat import pad_ids, render
from .errors import ConfigError, DataError
from .tokenizer import require_pad_token


@dataclass
class PPOConfig:
    chat_format: str = "chatml"
    # --- rollouts
    rollout_batch: int = 32  # prompts per rollout: the experience buffer
    max_new_tokens: int = 24
    temperature: float = 1.0  # sampling temperature; log-probs are taken at the same temperature
    # --- PPO
    ppo_epochs: int = 2  # passes over each buffer
    minibatch: int = 8  # rows per gradient step
    lr: float = 1e-5
    value_lr_mult: float = 1.0  # > 1: the zero-initialised value head learns faster than the body
    clip: float = 0.2
    vf_clip: float = 0.2
    vf_coef: float = 0.5
    ent_coef: float = 0.0
    gamma: float = 1.0
    lam: float = 0.95
    whiten_advantages: bool = True
    grad_clip: float = 1.0
    # --- KL control
    kl_beta: float = 0.05  # initial β
    kl_target: float = 0.0  # > 0: adaptive β towards this KL per response; 0: β stays fixed
    kl_horizon: int = 10_000

    def validate(self) -> None:
        for name in ("rollout_batch", "max_new_tokens", "ppo_epochs", "minibatch", "kl_horizon"):
            if getattr(self, name) < 1:
                raise ConfigError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.minibatch > self.rollout_batch:
            raise ConfigError(f"minibatch ({self.minibatch}) must not exceed rollout_batch ({self.rollout_batch})")
        if min(self.temperature, self.lr, self.clip, self.vf_clip, self.value_lr_mult) <= 0:
            raise ConfigError("temperature, lr, value_lr_mult, clip and vf_clip must be > 0")
        if self.kl_beta < 0 or self.kl_target < 0:
            raise ConfigError("kl_beta and kl_target must be >= 0")

    def kl_controller(self):
        return rl.AdaptiveKL(self.kl_beta, self.kl_target, self.kl_horizon) if self.kl_target > 0 \
            else rl.FixedKL(self.kl_beta)


class PolicyWithValue(nn.Module):
    """A causal LM plus a value head (hidden → 1) on its last hidden state: actor and critic share a body.

    The value head starts at zero, so the first advantages are the plain (shaped) returns.
    """

    def __init__(self, lm):
        super().__init__()
        self.lm = lm
        self.value_head = nn.Linear(lm.config.hidden_size, 1)
        nn.init.zeros_(self.value_head.weight)
        nn.init.zeros_(self.value_head.bias)
        self.value_head.to(next(lm.parameters()).device)

    def forward(self, input_ids, attention_mask):
        out = self.lm(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids(attention_mask),
                      output_hidden_states=True)
        return out.logits, self.value_head(out.hidden_states[-1].float()).squeeze(-1)


def make_optimizer(policy: PolicyWithValue, cfg: PPOConfig) -> torch.optim.AdamW:
    """AdamW with two groups: the language model at ``lr``, the value head at ``lr × value_lr_mult``."""
    head = list(policy.value_head.parameters())
    ids = {id(p) for p in head}
    body = [p for p in policy.parameters() if p.requires_grad and id(p) not in ids]
    return torch.optim.AdamW([{"params": body, "lr": cfg.lr},
                              {"params": head, "lr": cfg.lr * cfg.value_lr_mult}], weight_decay=0.0)


def frozen(model):
    """The reference model: eval mode, no gradients. Returns it."""
    model.eval()
    for p in model.parameters():
        p.requires_grad_(False)
    return model


def position_ids(attention_mask: torch.Tensor) -> torch.Tensor:
    """Positions that skip left padding, as ``generate`` counts them. With rotary embeddings (the course's Llama)
    a row's attention depends only on position *differences*, so counting from the padding changes nothing;
    with absolute position embeddings (GPT-2) it would, so the forward passes use these either way."""
    return (attention_mask.long().cumsum(-1) - 1).clamp(min=0)


def _prompt_ids(tokenizer, prompts: list[str], fmt: str) -> list[list[int]]:
    texts = [render([{"role": "user", "content": p}], tokenizer, fmt, add_generation_prompt=True)[0] for p in prompts]
    return [tokenizer(t, add_special_tokens=False)["input_ids"] for t in texts]


def response_mask(responses: torch.Tensor, eos_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(mask, stopped): 1 on each generated token up to and including the first EOS, 0 after it.

    ``stopped`` is False for rows that never produced EOS (cut at ``max_new_tokens``).
    """
    is_eos = responses == eos_id
    stopped = is_eos.any(1)
    never = torch.full_like(stopped, responses.size(1), dtype=torch.long)
    first = torch.where(stopped, is_eos.float().argmax(1), never)
    mask = (torch.arange(responses.size(1), device=responses.device)[None, :] <= first[:, None]).float()
    return mask, stopped


def _logprobs_and_values(policy: PolicyWithValue, seq: torch.Tensor, attn: torch.Tensor, P: int,
                         temperature: float = 1.0):
    logits, values = policy(seq, attn)
    # the logits at position t give the distribution of token t+1: responses start at P. The tokens were sampled
    # from softmax(logits / T), so that is the distribution whose log-probs PPO's ratios compare.
    return logits[:, P - 1 : -1] / temperature, values[:, P - 1 : -1]


@torch.no_grad()
def rollout(policy: PolicyWithValue, ref_lm, tokenizer, prompts: list[str], score_fn, cfg: PPOConfig, beta: float,
            generator: torch.Generator | None = None) -> dict:
    """Sample, score and shape one batch: the experience buffer of one PPO step.

    ``score_fn(prompts, responses) -> list[float]`` scores the decoded responses (the reward model, in the
    course). Rows whose score is not finite are dropped and counted (``nan_scores``) instead of trained on.
    With a ``generator``, sampling is seeded from it (through torch's global seed, which ``generate`` uses).
    """
    device = next(policy.parameters()).device
    pad, eos = require_pad_token(tokenizer), tokenizer.eos_token_id
    ids = _prompt_ids(tokenizer, prompts, cfg.chat_format)
    prompt, prompt_attn = (t.to(device) for t in pad_ids(ids, pad, "left"))
    P = prompt.size(1)
    policy.eval()
    if generator is not None:
        torch.manual_seed(int(torch.randint(0, 2**31 - 1, (1,), generator=generator)))
    gen = policy.lm.generate(input_ids=prompt, attention_mask=prompt_attn, do_sample=True, top_k=0, top_p=1.0,
                             temperature=cfg.temperature, max_new_tokens=cfg.max_new_tokens, eos_token_id=eos,
                             pad_token_id=pad)
    responses = gen[:, P:]
    if responses.size(1) == 0:
        raise DataError("the policy generated no token at all")
    mask, stopped = response_mask(responses, eos)
    texts = [tokenizer.decode([t for t, m in zip(row, mrow) if m and t != eos], skip_special_tokens=True).strip()
             for row, mrow in zip(responses.tolist(), mask.tolist())]
    scores = torch.tensor([float(s) for s in score_fn(prompts, texts)], device=device)
    if scores.shape != (len(prompts),):
        raise DataError(f"score_fn returned {scores.numel()} scores for {len(prompts)} responses")
    keep = torch.isfinite(scores)
    stats = {"empty": sum(not t for t in texts), "truncated": int((~stopped).sum()), "nan_scores": int((~keep).sum())}
    if not bool(keep.any()):
        raise DataError("every score of the batch is NaN or infinite: nothing to learn from")
    idx = keep.nonzero().squeeze(1)
    seq = torch.cat([prompt, responses], 1)[idx]
    attn = torch.cat([prompt_attn, mask.long()], 1)[idx]
    mask, responses, scores = mask[idx], responses[idx], scores[idx]
    logits, values = _logprobs_and_values(policy, seq, attn, P, cfg.temperature)
    logprobs = rl.token_logprobs(logits, responses, mask)
    ref_logits = ref_lm(input_ids=seq, attention_mask=attn, position_ids=position_ids(attn)).logits[:, P - 1 : -1]
    ref_logits = ref_logits / cfg.temperature
    ref_logprobs = rl.token_logprobs(ref_logits, responses, mask)
    rewards, kl = rl.kl_shaped_rewards(scores, logprobs, ref_logprobs, mask, beta)
    values = values * mask
    advantages, returns = rl.gae(rewards, values, mask, cfg.gamma, cfg.lam)
    if cfg.whiten_advantages and mask.sum() > 1:
        advantages = rl.whiten(advantages, mask)
    stats.update(score=scores.mean().item(), kl=kl.sum(1).mean().item(),
                 response_tokens=mask.sum(1).mean().item())
    return {"seq": seq, "attn": attn, "P": P, "responses": responses, "mask": mask, "logprobs": logprobs,
            "values": values, "advantages": advantages, "returns": returns, "scores": scores,
            "texts": [texts[i] for i in idx.tolist()], "kept": idx.tolist(), "stats": stats}


def ppo_update(policy: PolicyWithValue, optimizer, buffer: dict, cfg: PPOConfig, rng: random.Random) -> dict:
    """``cfg.ppo_epochs`` passes over the buffer in shuffled minibatches; returns the mean diagnostics."""
    policy.train()
    n, P = buffer["seq"].size(0), buffer["P"]
    logs = []
    for _ in range(cfg.ppo_epochs):
        order = list(range(n))
        rng.shuffle(order)
        for start in range(0, n, cfg.minibatch):
            b = torch.tensor(order[start : start + cfg.minibatch], device=buffer["seq"].device)
            mask = buffer["mask"][b]
            logits, values = _logprobs_and_values(policy, buffer["seq"][b], buffer["attn"][b], P, cfg.temperature)
            logprobs, entropy = rl.token_logprobs_and_entropy(logits, buffer["responses"][b], mask)
            pg_loss, pg = rl.clipped_policy_loss(logprobs, buffer["logprobs"][b], buffer["advantages"][b], mask,
                                                 cfg.clip)
            vf_loss, vf = rl.clipped_value_loss(values * mask, buffer["values"][b], buffer["returns"][b], mask,
                                                cfg.vf_clip)
            entropy = rl.masked_mean(entropy, mask)
            loss = pg_loss + cfg.vf_coef * vf_loss - cfg.ent_coef * entropy
            if not torch.isfinite(loss):
                raise DataError(f"PPO loss is {loss.item()}: stopping before it reaches the weights")
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(policy.parameters(), cfg.grad_clip)
            optimizer.step()
            logs.append({"policy_loss": pg_loss.item(), "value_loss": vf_loss.item(), "entropy": entropy.item(),
                         **pg, **vf})
    return {k: sum(x[k] for x in logs if not math.isnan(x[k])) / max(1, sum(not math.isnan(x[k]) for x in logs))
            for k in logs[0]}
