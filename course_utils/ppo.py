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

The stage (:func:`main`, ``llm-course ppo``) normalises the RM's scores on the SFT model's own samples
(:func:`reward_normaliser`), runs :func:`train`, and judges the result against the SFT model on held-out prompts
(``judge.py``); :func:`plot_history` draws the rewards and KL of a run.
"""

from __future__ import annotations

import math
import random
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import torch
from torch import nn

from . import rl
from .chat import pad_ids, render
from .checkpoint import parameters_digest
from .errors import ConfigError, DataError
from .profiles import get_profile
from .report import smooth
from .tokenizer import require_pad_token


@dataclass
class PPOConfig:
    # --- the stage
    profile: str = "tiny"
    seed: int = 0  # prompt order, sampling, minibatch order
    steps: int = 200  # PPO steps: one rollout + ppo_epochs passes over it each
    reward: str = "rm"  # "rm": the learned reward model; "gold": the tiny world's true scorer (an oracle, to compare)
    reward_norm: bool = True  # standardise scores with their mean/std on the SFT model's own samples (measured once)
    eval_prompts: int = 200  # held-out prompts for the comparison with the SFT model
    eval_samples: int = 4  # sampled answers per held-out prompt and policy
    log_every: int = 10
    progress: bool = True
    chat_format: str = "chatml"
    # --- rollouts
    rollout_batch: int = 32  # prompts per rollout: the experience buffer
    max_new_tokens: int = 24
    temperature: float = 1.0  # sampling temperature; log-probs are taken at the same temperature
    # --- PPO
    ppo_epochs: int = 2  # passes over each buffer
    minibatch: int = 8  # rows per gradient step
    lr: float = 3e-5
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
    kl_beta: float = 1.0  # initial β (per nat of KL, in units of the normalised reward)
    kl_target: float = 0.5  # > 0: adaptive β towards this KL per response (nats); 0: β stays fixed at kl_beta
    kl_horizon: int = 500  # samples over which β can change by about ±20%
    # --- rewards
    no_eos_penalty: float = 1.0  # subtracted from the score of a response cut at max_new_tokens without EOS

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
        if self.kl_target > 0 and self.kl_beta == 0:
            raise ConfigError("the adaptive KL controller (kl_target > 0) needs kl_beta > 0 to start from; "
                              "for no KL penalty set kl_beta=0 and kl_target=0")
        if self.reward not in ("rm", "gold"):
            raise ConfigError(f"reward must be 'rm' or 'gold', got {self.reward!r}")
        if self.steps < 1 or self.eval_prompts < 1 or self.eval_samples < 1:
            raise ConfigError("steps, eval_prompts and eval_samples must be >= 1")

    @classmethod
    def for_profile(cls, profile: str | None = None, **overrides) -> "PPOConfig":
        p = get_profile(profile)
        return replace(replace(cls(profile=p.name, seed=p.seed), **PRESETS[p.name]), **overrides)

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


def prompt_ids(tokenizer, prompts: list, fmt: str) -> list[list[int]]:
    """Token ids of each prompt rendered in ``fmt`` and ending with the assistant's header, ready to generate.
    A prompt is a user message (str) or a whole conversation so far (a list of {"role", "content"})."""
    texts = [render([{"role": "user", "content": p}] if isinstance(p, str) else p, tokenizer, fmt,
                    add_generation_prompt=True)[0] for p in prompts]
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
def sample(lm, tokenizer, prompts: list, fmt: str = "chatml", max_new_tokens: int = 24, temperature: float = 1.0,
           greedy: bool = False) -> dict:
    """Responses to ``prompts`` from a causal LM, with everything PPO needs to score them again.

    Returns {"prompt", "prompt_attn", "responses", "mask", "stopped", "texts"}: left-padded prompts, the generated
    tokens (B, T), the :func:`response_mask` (up to and including the first EOS), whether each row stopped, and
    the decoded texts. Sampling is plain ancestral sampling at ``temperature`` (no top-k, no top-p), which is the
    distribution whose log-probs PPO computes; ``greedy`` takes the arg-max instead.
    """
    device = next(lm.parameters()).device
    pad, eos = require_pad_token(tokenizer), tokenizer.eos_token_id
    prompt, prompt_attn = (t.to(device) for t in pad_ids(prompt_ids(tokenizer, prompts, fmt), pad, "left"))
    lm.eval()
    knobs = dict(do_sample=False) if greedy else dict(do_sample=True, top_k=0, top_p=1.0, temperature=temperature)
    gen = lm.generate(input_ids=prompt, attention_mask=prompt_attn, max_new_tokens=max_new_tokens, eos_token_id=eos,
                      pad_token_id=pad, **knobs)
    responses = gen[:, prompt.size(1):]
    if responses.size(1) == 0:
        raise DataError("the policy generated no token at all")
    mask, stopped = response_mask(responses, eos)
    texts = [tokenizer.decode([t for t, m in zip(row, mrow) if m and t != eos], skip_special_tokens=True).strip()
             for row, mrow in zip(responses.tolist(), mask.tolist())]
    return {"prompt": prompt, "prompt_attn": prompt_attn, "responses": responses, "mask": mask, "stopped": stopped,
            "texts": texts}


def _seed_sampling(generator: torch.Generator | None) -> None:
    """``generate`` samples with torch's global RNG: seed it from ``generator`` (if any) so runs repeat."""
    if generator is not None:
        torch.manual_seed(int(torch.randint(0, 2**31 - 1, (1,), generator=generator)))


@torch.no_grad()
def sequence_kl(lm, ref_lm, batch: dict, temperature: float = 1.0) -> torch.Tensor:
    """(B,) Σ_t log π(y_t) − log π_ref(y_t) over each sampled response of :func:`sample`: a one-sample
    estimate of KL(π‖π_ref) per response."""
    seq = torch.cat([batch["prompt"], batch["responses"]], 1)
    attn = torch.cat([batch["prompt_attn"], batch["mask"].long()], 1)
    P, out = batch["prompt"].size(1), []
    for model in (lm, ref_lm):
        logits = model(input_ids=seq, attention_mask=attn, position_ids=position_ids(attn)).logits[:, P - 1 : -1]
        out.append(rl.token_logprobs(logits / temperature, batch["responses"], batch["mask"]))
    return (out[0] - out[1]).sum(1)


@torch.no_grad()
def rollout(policy: PolicyWithValue, ref_lm, tokenizer, prompts: list[str], score_fn, cfg: PPOConfig, beta: float,
            generator: torch.Generator | None = None) -> dict:
    """Sample, score and shape one batch: the experience buffer of one PPO step.

    ``score_fn(prompts, responses) -> list[float]`` scores the decoded responses (the reward model, in the
    course). Rows whose score is not finite are dropped and counted (``nan_scores``) instead of trained on.
    A response cut at ``max_new_tokens`` without EOS loses ``cfg.no_eos_penalty`` from its score.
    With a ``generator``, sampling is seeded from it (through torch's global seed, which ``generate`` uses).
    """
    _seed_sampling(generator)
    batch = sample(policy.lm, tokenizer, prompts, cfg.chat_format, cfg.max_new_tokens, cfg.temperature)
    prompt, prompt_attn, responses = batch["prompt"], batch["prompt_attn"], batch["responses"]
    mask, stopped, texts, P = batch["mask"], batch["stopped"], batch["texts"], prompt.size(1)
    device = prompt.device
    scores = torch.tensor([float(s) for s in score_fn(prompts, texts)], device=device)
    if scores.shape != (len(prompts),):
        raise DataError(f"score_fn returned {scores.numel()} scores for {len(prompts)} responses")
    raw_scores = scores.clone()
    scores = scores - cfg.no_eos_penalty * (~stopped).float()
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
    stats.update(score=raw_scores[idx].mean().item(), reward=scores.mean().item(), kl=kl.sum(1).mean().item(),
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


PRESETS = {
    "smoke": dict(steps=3, rollout_batch=8, minibatch=4, max_new_tokens=12, eval_prompts=8, eval_samples=1,
                  log_every=1),
    # measured in notebook 06 and the pipeline report (README: chapter 06); the true score levels off by step ~100
    # of the 200 default steps, so the tiny course stops at 150
    "tiny": dict(steps=150),
    "gpu": dict(steps=200, rollout_batch=64, minibatch=16, max_new_tokens=128, lr=1e-6, eval_prompts=200,
                eval_samples=1),
}


# --- the training loop --------------------------------------------------------------------------------


def reward_normaliser(policy: PolicyWithValue, tokenizer, prompts: list[str], score_fn, cfg: PPOConfig,
                      generator: torch.Generator | None = None) -> tuple[float, float]:
    """(mean, std) of ``score_fn`` over the policy's own samples for ``prompts``, measured before training.

    An RM's scale is arbitrary (the Bradley–Terry loss only sees differences); subtracting the SFT model's mean
    and dividing by its std makes 0 mean "as good as SFT" and puts the RM score and β·KL in known units.
    """
    _seed_sampling(generator)
    batch = sample(policy.lm, tokenizer, prompts, cfg.chat_format, cfg.max_new_tokens, cfg.temperature)
    scores = torch.tensor([float(s) for s in score_fn(prompts, batch["texts"])])
    scores = scores[torch.isfinite(scores)]
    if scores.numel() < 2:
        raise DataError("fewer than two finite scores: cannot normalise the reward")
    return scores.mean().item(), max(scores.std().item(), 1e-6)


def train(cfg: PPOConfig, policy: PolicyWithValue, ref_lm, tokenizer, rows: list[dict], score_fn, gold_fn=None,
          tracker=None, log=print) -> dict:
    """``cfg.steps`` PPO steps on prompts drawn from ``rows`` (dicts with a "prompt"). Returns the history.

    ``score_fn(prompts, texts)`` is the reward being optimised; ``gold_fn(rows, texts)``, where the world has one,
    is the true score, logged next to it and never trained on: the two curves show over-optimisation.
    """
    from tqdm import tqdm

    cfg.validate()
    g, rng = torch.Generator().manual_seed(cfg.seed), random.Random(cfg.seed)
    mean, std = 0.0, 1.0
    if cfg.reward_norm:
        calib = [r["prompt"] for r in rng.sample(rows, min(len(rows), max(64, cfg.rollout_batch)))]
        mean, std = reward_normaliser(policy, tokenizer, calib, score_fn, cfg, g)
        log(f"  reward normalisation on the SFT model's samples: mean {mean:+.3f}, std {std:.3f}")

    def normalised(prompts, texts):
        return [(float(s) - mean) / std for s in score_fn(prompts, texts)]

    ctl, opt = cfg.kl_controller(), make_optimizer(policy, cfg)
    history, counts, t0 = [], {"empty": 0, "truncated": 0, "nan_scores": 0, "responses": 0}, time.perf_counter()
    bar = tqdm(range(cfg.steps), desc="PPO", ncols=100, disable=not cfg.progress)
    for step in bar:
        batch_rows = [rows[rng.randrange(len(rows))] for _ in range(cfg.rollout_batch)]
        beta = ctl.beta
        buf = rollout(policy, ref_lm, tokenizer, [r["prompt"] for r in batch_rows], normalised, cfg, beta, g)
        diag = ppo_update(policy, opt, buf, cfg, rng)
        ctl.update(buf["stats"]["kl"], len(buf["kept"]))
        st = buf["stats"]
        for k in ("empty", "truncated", "nan_scores"):
            counts[k] += st[k]
        counts["responses"] += cfg.rollout_batch
        row = {"step": step + 1, "rm_score": st["score"] * std + mean,  # in the scorer's own units
               "reward": st["reward"], "kl": st["kl"], "beta": beta, "response_tokens": st["response_tokens"],
               "truncated": st["truncated"], "empty": st["empty"], "nan_scores": st["nan_scores"], **diag}
        if gold_fn is not None:
            kept = [batch_rows[i] for i in buf["kept"]]
            row["true_score"] = sum(gold_fn(kept, buf["texts"])) / len(kept)
        history.append(row)
        if tracker is not None:
            tracker.log({k: v for k, v in row.items() if k != "step"}, step=step + 1)
        bar.set_postfix(rm=f"{row['rm_score']:.2f}", kl=f"{row['kl']:.2f}", beta=f"{beta:.3f}")
        if cfg.log_every and ((step + 1) % cfg.log_every == 0 or step == 0):
            tqdm.write(history_line(row))
    settled = [r["kl"] for r in history[len(history) // 4 :]]  # after warm-up: the first quarter of the steps
    return {"history": history, "counts": counts, "steps": cfg.steps, "seconds": time.perf_counter() - t0,
            "reward_norm": {"mean": mean, "std": std}, "final_beta": ctl.beta,
            "kl_after_warmup": sum(settled) / len(settled)}


def gold_scores(rows: list[dict], texts: list[str]) -> list[float]:
    """The tiny world's true score of each response (rows carry the task's ``meta``)."""
    from .world import score_response

    return [score_response(r["meta"], t).total for r, t in zip(rows, texts)]


def prompt_rows(profile, n_train: int, n_eval: int, seed: int) -> tuple[list[dict], list[dict]]:
    """(training prompts, held-out prompts): the tiny world's RL prompts, or the preference data's prompts (gpu)."""
    p = get_profile(profile)
    if p.offline:
        from .world import rl_prompts

        return rl_prompts(seed, n_train, "train"), rl_prompts(seed, n_eval, "test")
    from .reward import RewardConfig, build_pairs

    train_rows, test_rows = build_pairs(RewardConfig.for_profile(p.name, max_pairs=n_train, eval_pairs=n_eval))
    unique = lambda rows: list({r["prompt"]: {"prompt": r["prompt"]} for r in rows}.values())  # noqa: E731
    return unique(train_rows), unique(test_rows)[:n_eval]


# --- the stage ----------------------------------------------------------------------------------------


def main(cfg: PPOConfig | None = None, out_dir=None, tracker=None, log=print, sft=None, rm=None) -> dict:
    """Run PPO from the SFT model against the reward model; save ``<out_dir>/final``. Returns metrics."""
    import copy

    from . import judge
    from .checkpoint import save_checkpoint
    from .reward import RewardConfig, reward_scores
    from .stages import load_stage, stage_dir

    cfg = cfg or PPOConfig.for_profile()
    cfg.validate()
    p = get_profile(cfg.profile)
    if cfg.reward == "gold" and not p.offline:
        raise ConfigError("reward='gold' needs the tiny world's true scorer; the gpu profile has none")
    out_dir = Path(out_dir) if out_dir else stage_dir("ppo", p)
    t0 = time.perf_counter()
    sft_lm, tokenizer = sft if sft is not None else load_stage("sft", p)
    rm_model, _ = rm if rm is not None else load_stage("rm", p)
    rm_cfg = RewardConfig.for_profile(p.name, chat_format=cfg.chat_format)
    rm_model = rm_model.eval()

    def rm_fn(prompts, texts):
        return reward_scores(rm_model, tokenizer, prompts, texts, rm_cfg)

    gold_fn = gold_scores if p.offline else None
    score_fn = rm_fn
    train_rows, test_rows = prompt_rows(p.name, p.world.rl_prompts, cfg.eval_prompts, cfg.seed)
    if cfg.reward == "gold":  # the scorer needs each prompt's meta: look rows up by prompt
        by_prompt = {r["prompt"]: r for r in train_rows}
        score_fn = lambda prompts, texts: gold_scores([by_prompt[q] for q in prompts], texts)  # noqa: E731
    policy = PolicyWithValue(copy.deepcopy(sft_lm).float())
    ref = frozen(copy.deepcopy(sft_lm).float())
    ref_digest = parameters_digest(ref)
    log(f"  PPO: {len(train_rows)} prompts, {cfg.steps} steps × {cfg.rollout_batch} rollouts, reward {cfg.reward}, "
        f"β {cfg.kl_beta} ({'adaptive, target KL ' + str(cfg.kl_target) if cfg.kl_target else 'fixed'})")
    result = train(cfg, policy, ref, tokenizer, train_rows, score_fn, gold_fn, tracker=tracker, log=log)
    unchanged = parameters_digest(ref) == ref_digest
    if not unchanged:
        raise RuntimeError("the reference model's parameters changed during PPO: it must stay frozen")
    comparison = judge.compare({"sft": ref, "ppo": policy.lm}, tokenizer, test_rows, ref, "sft", cfg.chat_format,
                               cfg.max_new_tokens, cfg.eval_samples, gold_fn, rm_fn, seed=cfg.seed + 1)
    log("  held-out comparison:\n" + "\n".join("    " + line for line in judge.summary(comparison).splitlines()))
    save_checkpoint(out_dir / "final", policy.lm, step=cfg.steps, tokenizer=tokenizer,
                    state={"history": result["history"], "config": asdict(cfg)})
    return {**{k: v for k, v in result.items() if k != "seconds"}, "train_seconds": result["seconds"],
            "comparison": comparison, "reference_unchanged": unchanged, "seconds": time.perf_counter() - t0,
            "checkpoint": str(out_dir / "final"), "config": asdict(cfg)}


def history_line(row: dict) -> str:
    """One row of :func:`train`'s history as the training log prints it."""
    return (f"  step {row['step']:4d}  RM {row['rm_score']:+.2f}"
            + (f"  true {row['true_score']:.3f}" if "true_score" in row else "")
            + f"  KL {row['kl']:5.2f}  β {row['beta']:.4f}  clip {row['clip_fraction']:.3f}"
            f"  EV {row['explained_variance']:+.2f}  len {row['response_tokens']:.1f}")


def plot_history(history: list[dict], title: str = "PPO", window: int = 10, axes=None):
    """Three panels from :func:`train`'s history: rewards by step, KL and β by step, and true score and RM
    score against KL (reward over-optimisation: the proxy keeps rising where the truth stops). Returns the figure."""
    import matplotlib.pyplot as plt

    if axes is None:
        fig, axes = plt.subplots(1, 3, figsize=(15, 3.8))
    fig = axes[0].figure
    steps = [r["step"] for r in history]
    rm, kl = smooth([r["rm_score"] for r in history], window), smooth([r["kl"] for r in history], window)
    ax = axes[0]
    ax.plot(steps, rm, color="C0", label="RM score (optimised)")
    ax.set_xlabel("PPO step")
    ax.set_ylabel("RM score", color="C0")
    if "true_score" in history[0]:
        true = smooth([r["true_score"] for r in history], window)
        twin = ax.twinx()
        twin.plot(steps, true, color="C3", label="true score (never seen)")
        twin.set_ylabel("true score", color="C3")
    ax.set_title(f"{title}: rewards (moving average of {window})")
    ax = axes[1]
    ax.plot(steps, kl, color="C2", label="KL(π‖π_ref) per response")
    ax.set_xlabel("PPO step")
    ax.set_ylabel("KL (nats)")
    twin = ax.twinx()
    twin.plot(steps, [r["beta"] for r in history], color="k", ls="--", label="β")
    twin.set_ylabel("β")
    ax.set_title("KL to the reference, and β")
    ax = axes[2]
    ax.scatter(kl, rm, s=8, color="C0", label="RM score")
    ax.set_xlabel("KL to the reference (moving average)")
    ax.set_ylabel("RM score", color="C0")
    if "true_score" in history[0]:
        twin = ax.twinx()
        twin.scatter(kl, true, s=8, color="C3", label="true score")
        twin.set_ylabel("true score", color="C3")
    ax.set_title("rewards against KL")
    for ax in axes:
        ax.grid(alpha=0.3)
    fig.tight_layout()
    return fig
