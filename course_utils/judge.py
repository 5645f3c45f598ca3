"""Judging aligned policies side by side (chapters 06–07 and the pipeline report).

Each policy answers the same held-out prompts; the tiny world's ground-truth scorer (the "labeller" the reward
model was trained to imitate) and the reward model both score every answer, and each policy's answers are
compared with a baseline's (the SFT model) answer to the same prompt and sample index:

* **win-rate** = (wins + ½ ties) / comparisons, judged by the true scorer, with wins / ties / losses kept apart.
  The headline compares *prompts*: a policy wins a prompt when the mean true score of its ``samples`` answers is
  higher than the baseline's. Per answer (answer k against the baseline's answer k) most comparisons tie, because
  both answers are perfect; that count is reported too (``vs_baseline_per_sample``), and so is greedy decoding;
* **KL to the reference**: Σ_t log π(y_t) − log π_ref(y_t) over the policy's own samples (0 for the reference);
* **sampled and greedy**: a chat model is usually sampled, and RLHF optimises the sampled distribution, so the
  headline numbers are over ``samples`` answers per prompt at temperature 1; greedy answers are reported too.
"""

from __future__ import annotations

import math

import torch

from .errors import ConfigError


def answer_batches(lm, tokenizer, prompts: list[str], fmt: str, max_new_tokens: int, greedy: bool, seed: int,
                   batch_size: int = 64):
    """Yield (start, :func:`ppo.sample` batch) over ``prompts``, sampling seeded by ``seed`` and the batch."""
    from .ppo import sample

    for start in range(0, len(prompts), batch_size):
        torch.manual_seed(seed * 100_003 + start)
        yield start, sample(lm, tokenizer, prompts[start : start + batch_size], fmt, max_new_tokens, greedy=greedy)


def per_prompt_means(scores: list[float], samples: int) -> list[float]:
    """Mean score per prompt from ``samples`` consecutive blocks of one score per prompt."""
    n = len(scores) // samples
    if n * samples != len(scores):
        raise ConfigError(f"{len(scores)} scores are not {samples} blocks of equal length")
    return [sum(scores[k * n + i] for k in range(samples)) / samples for i in range(n)]


def win_tie_loss(scores: list[float], baseline: list[float], tol: float = 1e-9) -> dict:
    """Pairwise comparison of two equally long score lists; win-rate counts a tie as half a win."""
    if len(scores) != len(baseline) or not scores:
        raise ConfigError(f"need two non-empty score lists of equal length, got {len(scores)} and {len(baseline)}")
    wins = sum(a > b + tol for a, b in zip(scores, baseline))
    losses = sum(b > a + tol for a, b in zip(scores, baseline))
    n = len(scores)
    rate = (wins + 0.5 * (n - wins - losses)) / n
    # normal-approximation 95% interval of the mean of per-comparison outcomes (1, ½, 0)
    outcomes = [1.0 if a > b + tol else 0.0 if b > a + tol else 0.5 for a, b in zip(scores, baseline)]
    sd = math.sqrt(sum((o - rate) ** 2 for o in outcomes) / max(1, n - 1))
    return {"win": wins / n, "tie": (n - wins - losses) / n, "loss": losses / n, "win_rate": rate,
            "ci95": 1.96 * sd / math.sqrt(n), "n": n}


@torch.no_grad()
def compare(policies: dict, tokenizer, rows: list[dict], ref_lm, baseline: str, fmt: str = "chatml",
            max_new_tokens: int = 24, samples: int = 2, gold_fn=None, rm_fn=None, seed: int = 0,
            show: int = 8) -> dict:
    """Judge every policy in ``policies`` (name → causal LM) on ``rows`` (dicts with a "prompt").

    ``gold_fn(rows, texts)`` and ``rm_fn(prompts, texts)`` return one score per text (either may be None: the
    gpu profile has no ground truth). Returns {"policies": {name: metrics}, "samples": [...], "baseline"}.
    """
    from .ppo import sequence_kl

    if baseline not in policies:
        raise ConfigError(f"baseline {baseline!r} is not one of the policies {list(policies)}")
    if samples < 1:
        raise ConfigError(f"samples must be >= 1, got {samples}")
    prompts = [r["prompt"] for r in rows]
    texts, metrics = {}, {}
    for name, lm in policies.items():
        m, sampled, kls, truncated = {}, [], [], 0
        for k in range(samples):
            for start, batch in answer_batches(lm, tokenizer, prompts, fmt, max_new_tokens, False, seed + k):
                sampled += batch["texts"]
                truncated += int((~batch["stopped"]).sum())
                kls += sequence_kl(lm, ref_lm, batch).tolist() if lm is not ref_lm else [0.0] * len(batch["texts"])
        greedy = [t for _, b in answer_batches(lm, tokenizer, prompts, fmt, max_new_tokens, True, seed)
                  for t in b["texts"]]
        texts[name] = {"sampled": sampled, "greedy": greedy}
        m["kl"] = sum(kls) / len(kls)
        m["truncated"] = truncated / len(sampled)
        m["empty"] = sum(not t for t in sampled) / len(sampled)
        m["response_words"] = sum(len(t.split()) for t in sampled) / len(sampled)
        if gold_fn is not None:
            m["gold_sampled"] = gold_fn(rows * samples, sampled)
            m["gold_greedy"] = gold_fn(rows, greedy)
            m["true_score"] = sum(m["gold_sampled"]) / len(sampled)
            m["true_score_greedy"] = sum(m["gold_greedy"]) / len(greedy)
        if rm_fn is not None:
            rm_sampled = rm_fn(prompts * samples, sampled)
            m["rm_score"] = sum(rm_sampled) / len(rm_sampled)
            m["rm_score_greedy"] = sum(rm_fn(prompts, greedy)) / len(greedy)
        metrics[name] = m
    if gold_fn is not None:
        base = metrics[baseline]
        for name, m in metrics.items():
            if name != baseline:
                m["vs_baseline"] = win_tie_loss(per_prompt_means(m["gold_sampled"], samples),
                                                per_prompt_means(base["gold_sampled"], samples))
                m["vs_baseline_per_sample"] = win_tie_loss(m["gold_sampled"], base["gold_sampled"])
                m["vs_baseline_greedy"] = win_tie_loss(m["gold_greedy"], base["gold_greedy"])
        for m in metrics.values():
            del m["gold_sampled"], m["gold_greedy"]
    table = [{"prompt": p, **{name: texts[name]["sampled"][i] for name in policies}} for i, p in enumerate(prompts[:show])]
    return {"baseline": baseline, "samples_per_prompt": samples, "prompts": len(rows), "policies": metrics,
            "samples": table}


def summary(result: dict) -> str:
    """One line per policy: true score, RM score, KL, win-rate vs the baseline."""
    lines = []
    base = result["baseline"]  # first, whatever order the dict has (a result read back from JSON may be sorted)
    for name, m in sorted(result["policies"].items(), key=lambda item: item[0] != base):
        parts = [f"{name:>5}:"]
        if "true_score" in m:
            parts.append(f"true score {m['true_score']:.3f} (greedy {m['true_score_greedy']:.3f})")
        if "rm_score" in m:
            parts.append(f"RM {m['rm_score']:+.2f}")
        parts.append(f"KL {m['kl']:.2f}")
        if "vs_baseline" in m:
            v = m["vs_baseline"]
            parts.append(f"win-rate vs {result['baseline']} {v['win_rate']:.1%} ±{v['ci95']:.1%} of prompts "
                         f"(W/T/L {v['win']:.0%}/{v['tie']:.0%}/{v['loss']:.0%}; per answer "
                         f"{m['vs_baseline_per_sample']['win_rate']:.0%}, greedy "
                         f"{m['vs_baseline_greedy']['win_rate']:.0%})")
        lines.append(", ".join(parts[:1]) + " " + ", ".join(parts[1:]))
    return "\n".join(lines)
