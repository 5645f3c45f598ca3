"""Stage 3 — reward modeling, RM (奖励建模).

A reward model reads (prompt, response) and returns one number. It is trained on pairs that a
labeller ranked: the Bradley–Terry model says P(chosen beats rejected) = σ(r_chosen − r_rejected),
so the loss is −log σ(r_chosen − r_rejected). Only differences within a pair are learned; the
absolute level of a reward means nothing.

The pieces, each small enough to read:

* :func:`reward_model_from` — the SFT model with its LM head swapped for a one-number ``score`` head
  (transformers' ``*ForSequenceClassification``), and :func:`last_token_rewards`, the pooling written
  out: the score of the hidden state at the last *non-pad* token, whatever the padding side;
* :func:`pairwise_loss` — Bradley–Terry, with an optional margin (TRL ``RewardTrainer`` computes the same);
* :func:`clean_pairs` — drops malformed rows, exact and near duplicates, ties and (given a first model's
  out-of-fold scores) likely flipped labels, and says how many of each; :func:`length_bias` checks whether
  "longer" alone predicts "chosen";
* :func:`evaluate` — pairwise accuracy, ROC-AUC (scikit-learn), calibration, and Kendall τ (scipy) between
  the RM and the tiny world's ground-truth scorer.

``main(cfg)`` runs the stage: data → cleaning (with a cross-fitted first model) → training → metrics → the
``rm`` checkpoint that RLHF uses.
"""

from __future__ import annotations

import copy
import math
import random
import re
import time
from collections import Counter
from dataclasses import asdict, dataclass, replace
from functools import partial
from pathlib import Path

import torch
import torch.nn.functional as F

from . import training
from .chat import FORMATS, encode, pad_batch
from .errors import ConfigError, DataError
from .objectives import token_loss_sum
from .profiles import get_profile
from .tokenizer import require_pad_token


@dataclass
class RewardConfig:
    # --- data
    profile: str = "tiny"
    seed: int = 0  # data order, the score head's init, the cleaning folds
    chat_format: str = "chatml"  # must be the format the SFT model was trained with
    max_length: int = 128  # tokens per (prompt, response); longer prompts are cut from the left
    label_noise: float = 0.0  # tiny world only: share of training pairs whose labels are flipped (demos)
    duplicate_rate: float = 0.0  # tiny world only: share of exact / near duplicate rows
    tie_rate: float = 0.0  # tiny world only: share of pairs whose two responses are equally good
    max_pairs: int = 0  # > 0: train on only the first max_pairs labelled pairs (quicker demos); 0: all of them
    # --- cleaning
    clean: bool = True  # drop malformed rows, duplicates and ties (counted in the report)
    noise_filter: bool = True  # also drop pairs that out-of-fold first models confidently rank the other way
    noise_threshold: float = 0.2  # ... i.e. whose P(chosen wins) under the first model is below this
    first_pass_steps: int = 150  # optimizer steps of each of the two cross-fitted first models
    # --- loss
    margin_scale: float = 0.0  # > 0: loss −log σ(Δr − margin), margin = scale × the labeller's rating gap
    lm_coef: float = 0.0  # > 0: + lm_coef × the backbone's next-token loss on chosen responses (keeps what it knows)
    # --- optimisation
    batch_size: int = 32  # pairs per micro-batch (2 × batch_size sequences)
    group_by_length: bool = True  # batches of pairs of similar length: 37% fewer tokens, 1.5x faster (benchmarks/)
    grad_accum: int = 1
    max_steps: int = 300
    lr: float = 1e-3
    min_lr_ratio: float = 0.1
    warmup_steps: int = 20
    weight_decay: float = 0.0
    grad_clip: float = 1.0
    precision: str = "auto"
    # --- evaluation, logging
    eval_pairs: int = 400  # held-out (clean) test pairs
    tau_prompts: int = 200  # held-out prompts, each with one response per quality, for Kendall τ
    eval_every: int = 0
    log_every: int = 10
    ckpt_every: int = 0
    progress: bool = True

    @classmethod
    def for_profile(cls, profile: str | None = None, **overrides) -> "RewardConfig":
        p = get_profile(profile)
        cfg = replace(cls(profile=p.name, seed=p.seed, max_length=p.model.context_length), **PRESETS[p.name])
        return replace(cfg, **overrides)

    def validate(self) -> None:
        if self.chat_format not in FORMATS:
            raise ConfigError(f"chat_format must be one of {FORMATS}, got {self.chat_format!r}")
        for name in ("label_noise", "duplicate_rate", "tie_rate"):
            if not 0.0 <= getattr(self, name) <= 1.0:
                raise ConfigError(f"{name} must be in [0, 1], got {getattr(self, name)}")
        if not 0.0 < self.noise_threshold < 0.5:
            raise ConfigError(f"noise_threshold must be in (0, 0.5): a pair is dropped only when the first model "
                              f"prefers the rejected side; got {self.noise_threshold}")
        if min(self.margin_scale, self.lm_coef, self.first_pass_steps, self.max_pairs) < 0:
            raise ConfigError("margin_scale, lm_coef, first_pass_steps and max_pairs must be >= 0")
        training.validate_optim(self, ("batch_size", "grad_accum", "max_steps", "max_length", "eval_pairs"))


PRESETS = {
    "smoke": dict(max_steps=12, batch_size=8, warmup_steps=2, eval_pairs=32, tau_prompts=16, log_every=4,
                  first_pass_steps=6, label_noise=0.1, duplicate_rate=0.05, tie_rate=0.05, lm_coef=1.0),
    # the stage cleans what a labelled set contains: duplicates and ties (flipped labels: notebook 05, section 7).
    # Measured on 400 held-out pairs (notebook 05, section 6), training on clean pairs: 12,000 pairs, 600 steps
    # 88-89.5%; 20,000 pairs, 1,000 steps 89.0%, with lm_coef=1.0 90.0% (Kendall τ 0.74 -> 0.79); with the injected
    # duplicates and ties removed first: 1,000 steps 92.2% (τ 0.86), this preset's 500 steps 88.0% (τ 0.75) in half
    # the time, which keeps the whole tiny course under 30 minutes. About ±1.4 points is noise.
    "tiny": dict(max_steps=500, batch_size=32, lr=1e-3, warmup_steps=40, first_pass_steps=150, noise_filter=False,
                 label_noise=0.0, duplicate_rate=0.05, tie_rate=0.05, lm_coef=1.0),
    # lm_coef stays 0 on the gpu profile: logits over a 49,152-token vocabulary for every chosen token cost memory
    "gpu": dict(max_steps=500, batch_size=8, grad_accum=4, lr=1e-5, warmup_steps=50, max_length=512,
                eval_pairs=500, first_pass_steps=0, noise_filter=False),
}


# --- the model and its pooling ------------------------------------------------------------------------


def reward_model_from(causal_lm, tokenizer, seed: int = 0):
    """A ``*ForSequenceClassification`` (one output) sharing every weight of ``causal_lm`` but its LM head.

    The new ``score`` head (hidden → 1, no bias) is initialised from ``seed``. ``causal_lm`` is not modified.
    """
    from transformers import AutoModelForSequenceClassification

    config = copy.deepcopy(causal_lm.config)
    config.num_labels = 1
    config.pad_token_id = require_pad_token(tokenizer)  # transformers' own pooling looks for it
    config.tie_word_embeddings = False  # no LM head any more ...
    config.tied_lm_head = bool(getattr(causal_lm.config, "tie_word_embeddings", False))  # ... but the embeddings are it
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        rm = AutoModelForSequenceClassification.from_config(config)
    state = {k: v for k, v in causal_lm.state_dict().items() if not k.startswith("lm_head.")}
    missing, unexpected = rm.load_state_dict(state, strict=False)
    if unexpected or [k for k in missing if not k.startswith("score.")]:
        raise ConfigError(f"backbone weights do not fit the reward model: missing {missing}, unexpected {unexpected}")
    return rm.to(next(causal_lm.parameters()).device)


def last_token_index(attention_mask: torch.Tensor) -> torch.Tensor:
    """Position of the last real token of each row; right padding (…x x 0 0) and left padding (0 0 x x…) alike."""
    if attention_mask.dim() != 2:
        raise ConfigError(f"attention_mask must be (batch, time), got shape {tuple(attention_mask.shape)}")
    if not bool(attention_mask.any(dim=1).all()):
        raise DataError("a row of the batch has no real token (its attention mask is all zeros)")
    positions = torch.arange(attention_mask.size(1), device=attention_mask.device)
    return (positions * attention_mask.long()).argmax(dim=1)  # the largest position whose mask is 1


def last_token_rewards(model, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """(batch,) rewards: the score head applied to the hidden state of each row's last real token.

    This is what ``model(input_ids, attention_mask).logits`` computes inside transformers, written out;
    ``tests/test_reward.py`` checks that both agree for left and right padding.
    """
    hidden = model.base_model(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state  # (B, T, H)
    return _score_last_token(model, hidden, attention_mask)


def _score_last_token(model, hidden: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    last = hidden[torch.arange(hidden.size(0), device=hidden.device), last_token_index(attention_mask)]  # (B, H)
    return model.score(last).squeeze(-1).float()


def lm_loss(model, hidden: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Mean next-token loss of the RM's backbone on the labelled tokens, through the LM head it came with.

    The head is the input embedding matrix (tied embeddings, as in the course's models and SmolLM2), so this
    needs no extra weights. Added to the ranking loss it is a regulariser ("keep a generation loss", as in
    Yang et al. 2024, *Regularizing hidden states enables learning generalizable reward models*): fine-tuning
    for rankings alone may overwrite what the backbone knows, e.g. which answer is right.
    """
    if not getattr(model.config, "tied_lm_head", False):
        raise ConfigError("lm_coef > 0 needs a backbone whose LM head is its input embedding (tie_word_embeddings)")
    logits = hidden[:, :-1] @ model.get_input_embeddings().weight.T
    total, count = token_loss_sum(logits, labels[:, 1:])
    return total / count.clamp(min=1)


def pairwise_loss(r_chosen: torch.Tensor, r_rejected: torch.Tensor, margin: torch.Tensor | None = None,
                  reduction: str = "mean") -> torch.Tensor:
    """Bradley–Terry: −log σ(r_chosen − r_rejected − margin).

    ``F.logsigmoid`` rather than ``torch.log(torch.sigmoid(...))``: the latter returns −inf (and a NaN
    gradient) once a difference is below about −100 in float32.
    """
    if r_chosen.shape != r_rejected.shape:
        raise ConfigError(f"chosen and rejected rewards differ in shape: {tuple(r_chosen.shape)} vs "
                          f"{tuple(r_rejected.shape)}")
    if reduction not in ("mean", "sum", "none"):
        raise ConfigError(f"reduction must be 'mean', 'sum' or 'none', got {reduction!r}")
    diff = r_chosen - r_rejected - (margin if margin is not None else 0.0)
    loss = -F.logsigmoid(diff)
    return loss.mean() if reduction == "mean" else loss.sum() if reduction == "sum" else loss


# --- data ---------------------------------------------------------------------------------------------


def encode_pair(row: dict, tokenizer, cfg: RewardConfig, i: int = 0):
    """(chosen, rejected) token sequences: the prompt as a user turn, each response as the assistant's turn."""
    out = []
    for side in ("chosen", "rejected"):
        messages = [{"role": "user", "content": row["prompt"]}, {"role": "assistant", "content": row[side]}]
        out.append(encode(messages, tokenizer, cfg.chat_format, cfg.max_length, row=i))
    return out[0], out[1]


def pair_margin(row: dict, scale: float) -> float:
    """``scale`` × the labeller's rating gap (``meta.score_chosen − score_rejected``), floored at 0; 0 if absent."""
    meta = row.get("meta") or {}
    if scale <= 0 or "score_chosen" not in meta or "score_rejected" not in meta:
        return 0.0
    return scale * max(0.0, float(meta["score_chosen"]) - float(meta["score_rejected"]))


def encode_pairs(rows: list[dict], tokenizer, cfg: RewardConfig) -> tuple[list[tuple], int]:
    """Tokenize every pair; pairs whose response alone exceeds ``max_length`` are dropped and counted."""
    pairs, dropped = [], 0
    for i, row in enumerate(rows):
        try:
            c, r = encode_pair(row, tokenizer, cfg, i)
        except DataError:
            dropped += 1
            continue
        pairs.append((c, r, pair_margin(row, cfg.margin_scale)))
    if not pairs:
        raise DataError("no preference pair is left to train on")
    return pairs, dropped


def collate_pairs(pairs: list[tuple], pad_id: int, side: str = "right", lm_labels: bool = False) -> dict:
    """One batch of 2B sequences: the B chosen first, then the B rejected (TRL's layout), plus the margins
    (and with ``lm_labels`` the chosen rows' token labels, for :func:`lm_loss`)."""
    batch = pad_batch([p[0] for p in pairs] + [p[1] for p in pairs], pad_id, side)
    labels = batch.pop("labels")
    if lm_labels:
        batch["chosen_labels"] = labels[: len(pairs)]
    batch["margin"] = torch.tensor([p[2] for p in pairs], dtype=torch.float32)
    return batch


def loss_sum(model, batch: dict, lm_coef: float = 0.0) -> tuple[torch.Tensor, torch.Tensor]:
    """(sum of pair losses, number of pairs): the form ``training.fit`` accumulates. With ``lm_coef`` > 0 each
    pair's loss also carries ``lm_coef`` × the batch's :func:`lm_loss` on the chosen responses."""
    hidden = model.base_model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).last_hidden_state
    rc, rr = _score_last_token(model, hidden, batch["attention_mask"]).chunk(2)
    margin = batch["margin"].to(rc.device) if bool(batch["margin"].any()) else None
    loss = pairwise_loss(rc, rr, margin, reduction="sum")
    if lm_coef > 0:
        loss = loss + lm_coef * rc.numel() * lm_loss(model, hidden[: rc.numel()], batch["chosen_labels"].to(rc.device))
    return loss, torch.tensor(rc.numel())


def build_pairs(cfg: RewardConfig) -> tuple[list[dict], list[dict]]:
    """(training rows as labelled, clean held-out test rows) for the profile."""
    p = get_profile(cfg.profile)
    if not p.offline:
        from .hub_data import load_hub_dataset

        rows = load_hub_dataset("hh_rlhf", p.hub_datasets["preference"], "train", cfg.max_pairs or p.world.pref_pairs,
                                errors="skip").records
        test = load_hub_dataset("hh_rlhf", p.hub_datasets["preference"], "test", cfg.eval_pairs, errors="skip").records
        return rows, test
    from .world import preference_pairs

    train = preference_pairs(p.seed, cfg.max_pairs or p.world.pref_pairs, "train", label_noise=cfg.label_noise,
                             duplicate_rate=cfg.duplicate_rate, tie_rate=cfg.tie_rate)
    return train, preference_pairs(p.seed, cfg.eval_pairs, "test")


# --- cleaning -----------------------------------------------------------------------------------------

REASONS = ("missing side", "not a string", "identical sides", "exact duplicate", "near duplicate", "tie",
           "likely flipped label")


def _normalise(text: str) -> str:
    """Case, spacing and punctuation removed: "Pip  lives in MOSSBROOK." -> "pip lives in mossbrook"."""
    return " ".join(re.sub(r"[^\w\s]", " ", text.casefold()).split())


def check_pair(row) -> str | None:
    """Why ``row`` cannot be used as a preference pair (one of ``REASONS``), or None if it can."""
    if not isinstance(row, dict):
        return "missing side"
    values = [row.get(k) for k in ("prompt", "chosen", "rejected")]
    if any(v is None or (isinstance(v, str) and not v.strip()) for v in values):
        return "missing side"
    if not all(isinstance(v, str) for v in values):
        return "not a string"
    if " ".join(row["chosen"].split()) == " ".join(row["rejected"].split()):
        return "identical sides"
    return None


def is_tie(row: dict) -> bool:
    """The labeller marked the two responses as equally good (an explicit flag, or equal ratings)."""
    meta = row.get("meta") if isinstance(row.get("meta"), dict) else {}
    if row.get("tie") or meta.get("is_tie"):
        return True
    return "score_chosen" in meta and "score_rejected" in meta and meta["score_chosen"] == meta["score_rejected"]


def clean_pairs(rows: list, p_chosen: list[float] | None = None, threshold: float = 0.2,
                errors: str = "drop") -> tuple[list[dict], dict]:
    """(kept rows, removal counts by reason). The first reason that applies to a row is the one counted.

    * malformed rows (``missing side``, ``not a string``, ``identical sides``) are dropped, or with
      ``errors="raise"`` raise a ``DataError`` naming the row;
    * ``exact duplicate`` repeats an earlier (prompt, chosen, rejected); ``near duplicate`` repeats one once
      case, spacing and punctuation are removed;
    * ``tie``: the labeller rated both sides equally — the pair teaches nothing about the order;
    * ``likely flipped label``: only with ``p_chosen`` (one probability per row that the chosen side wins,
      from a model that did NOT train on that row): dropped when below ``threshold``.
    """
    if errors not in ("drop", "raise"):
        raise ConfigError(f"errors must be 'drop' or 'raise', got {errors!r}")
    if p_chosen is not None and len(p_chosen) != len(rows):
        raise ConfigError(f"p_chosen has {len(p_chosen)} values for {len(rows)} rows")
    kept, removed, seen_exact, seen_near = [], Counter(), set(), set()
    for i, row in enumerate(rows):
        reason = check_pair(row)
        if reason and errors == "raise":
            raise DataError(f"preference row {i}: {reason} (prompt, chosen and rejected must be non-empty, "
                            "different strings)")
        if reason is None:
            exact = (row["prompt"], row["chosen"], row["rejected"])
            near = tuple(_normalise(x) for x in exact)
            if exact in seen_exact:
                reason = "exact duplicate"
            elif near in seen_near:
                reason = "near duplicate"
            elif is_tie(row):
                reason = "tie"
            elif p_chosen is not None and p_chosen[i] < threshold:
                reason = "likely flipped label"
            seen_exact.add(exact)
            seen_near.add(near)
        if reason:
            removed[reason] += 1
        else:
            kept.append(row)
    return kept, {r: removed.get(r, 0) for r in REASONS}


def length_bias(rows: list[dict]) -> dict:
    """Does "longer" predict "chosen"? Share of pairs (of unequal length) whose chosen side is the longer one.

    0.5 means length carries no signal; far from 0.5 means an RM can score well by measuring length, and a
    policy optimised against it will learn to pad (or to clip) its answers.
    """
    unequal = [r for r in rows if len(r["chosen"]) != len(r["rejected"])]
    longer = sum(len(r["chosen"]) > len(r["rejected"]) for r in unequal)
    return {"pairs": len(rows), "unequal_length": len(unequal), "chosen_longer": longer / max(1, len(unequal))}


def cross_fit_p_chosen(rows: list[dict], model_factory, tokenizer, cfg: RewardConfig, folds: int = 2,
                       log=print) -> list[float]:
    """P(chosen wins) for every row from a first model that never saw it (``folds``-fold cross-fitting).

    A model scoring its own training rows would have memorised some flipped labels and vouch for them;
    out-of-fold scores do not have that blind spot (the idea behind confident learning).
    """
    order = list(range(len(rows)))
    random.Random(cfg.seed).shuffle(order)
    p = [0.5] * len(rows)
    first = replace(cfg, max_steps=cfg.first_pass_steps, warmup_steps=min(cfg.warmup_steps, cfg.first_pass_steps // 5),
                    eval_every=0, ckpt_every=0)
    for k in range(folds):
        held = order[k::folds]
        held_set = set(held)
        train_rows = [rows[i] for i in order if i not in held_set]
        model = model_factory()
        pairs, _ = encode_pairs(train_rows, tokenizer, first)
        train(first, model, tokenizer, pairs, desc=f"rm first pass {k + 1}/{folds}")
        scored = score_pairs(model, tokenizer, [rows[i] for i in held], first)
        for i, s in zip(held, scored):
            p[i] = s
        log(f"  first pass {k + 1}/{folds}: trained on {len(train_rows)} rows, scored {len(held)} held-out rows")
    return p


def score_pairs(model, tokenizer, rows: list[dict], cfg: RewardConfig) -> list[float]:
    """σ(r_chosen − r_rejected) per row (0.5 for a row whose pair does not fit in ``max_length``)."""
    ok = [i for i, row in enumerate(rows) if fits(row, tokenizer, cfg)]
    prompts = [rows[i]["prompt"] for i in ok]
    r_chosen = reward_scores(model, tokenizer, prompts, [rows[i]["chosen"] for i in ok], cfg)
    r_rejected = reward_scores(model, tokenizer, prompts, [rows[i]["rejected"] for i in ok], cfg)
    p = [0.5] * len(rows)
    for i, value in zip(ok, torch.sigmoid(torch.tensor(r_chosen) - torch.tensor(r_rejected)).tolist()):
        p[i] = value
    return p


# --- training -----------------------------------------------------------------------------------------


def train(cfg: RewardConfig, model, tokenizer, pairs: list[tuple], out_dir=None, tracker=None,
          desc: str = "rm") -> dict:
    """Train ``model`` in place on encoded pairs with the course's loop (``training.fit``)."""
    cfg.validate()
    from .data import step_sampler

    pad = require_pad_token(tokenizer)
    lengths = [max(len(c.input_ids), len(r.input_ids)) for c, r, _ in pairs]  # a pair is padded to its longer side
    sampler = step_sampler(lengths, cfg.batch_size, cfg.seed, cfg.group_by_length)

    def micro_batches(step: int) -> list[dict]:
        return [collate_pairs([pairs[i] for i in sampler.indices(step * cfg.grad_accum + k)], pad,
                              lm_labels=cfg.lm_coef > 0) for k in range(cfg.grad_accum)]

    return training.fit(cfg, model, micro_batches, partial(loss_sum, lm_coef=cfg.lm_coef),
                        lambda b: b["margin"].numel(), None, out_dir, tracker=tracker, desc=desc)


# --- evaluation ---------------------------------------------------------------------------------------


@torch.no_grad()
def reward_scores(model, tokenizer, prompts: list[str], responses: list[str], cfg: RewardConfig,
                  batch_size: int = 128) -> list[float]:
    """The RM's reward for each (prompt, response), in batches of similar length (a batch is padded to its
    longest row; the rewards come back in the order of the inputs)."""
    model.eval()
    device = next(model.parameters()).device
    pad = require_pad_token(tokenizer)
    enc = [encode([{"role": "user", "content": p}, {"role": "assistant", "content": r}], tokenizer, cfg.chat_format,
                  cfg.max_length, row=i) for i, (p, r) in enumerate(zip(prompts, responses))]
    order = sorted(range(len(enc)), key=lambda i: len(enc[i].input_ids))
    out = [0.0] * len(enc)
    for start in range(0, len(order), batch_size):
        idx = order[start:start + batch_size]
        b = pad_batch([enc[i] for i in idx], pad, "right")
        rewards = last_token_rewards(model, b["input_ids"].to(device), b["attention_mask"].to(device))
        for i, r in zip(idx, rewards.tolist()):
            out[i] = r
    return out


def calibration(p: list[float], won: list[bool], bins: int = 10) -> list[dict]:
    """Reliability table: for predicted P(first wins) in each bin, how often the first really won."""
    table = []
    for b in range(bins):
        lo, hi = b / bins, (b + 1) / bins
        idx = [i for i, x in enumerate(p) if lo <= x < hi or (b == bins - 1 and x == 1.0)]
        if idx:
            table.append({"bin": (lo, hi), "n": len(idx), "predicted": sum(p[i] for i in idx) / len(idx),
                          "observed": sum(won[i] for i in idx) / len(idx)})
    return table


def calibration_error(table: list[dict]) -> float:
    """Expected calibration error of a :func:`calibration` table: the mean |predicted − observed|, weighted by
    how many predictions fall in each bin. 0 is perfect; an RM trained on flipped labels learns to hedge."""
    n = sum(row["n"] for row in table)
    if not n:
        raise DataError("an empty calibration table has no calibration error")
    return sum(row["n"] * abs(row["predicted"] - row["observed"]) for row in table) / n


def kendall_tau(x: list[float], y: list[float]) -> float:
    """Kendall's τ-b (ties in either list handled) via scipy; NaN when one list is constant."""
    from scipy.stats import kendalltau

    return float(kendalltau(x, y).statistic)


def tau_items(seed: int, n_prompts: int) -> list[dict]:
    """Held-out prompts, each answered once in every quality of the tiny world (distinct texts only)."""
    from .world import QUALITIES, preference_pairs, response_for, score_response

    rows = preference_pairs(seed, n_prompts, "test")
    items = []
    for k, row in enumerate(rows):
        rng, texts = random.Random(f"tau-{seed}-{k}"), set()
        for q in QUALITIES:
            text = response_for(row["meta"], q, rng)
            if text not in texts:
                texts.add(text)
                items.append({"group": k, "prompt": row["prompt"], "response": text, "quality": q,
                              "true": score_response(row["meta"], text).total})
    return items


def fits(row: dict, tokenizer, cfg: RewardConfig) -> bool:
    """Both sides of the pair encode within ``cfg.max_length`` (the prompt may be cut from the left)."""
    try:
        encode_pair(row, tokenizer, cfg)
        return True
    except DataError:
        return False


def evaluate(model, tokenizer, rows: list[dict], cfg: RewardConfig, tau: bool = True) -> dict:
    """Held-out pairwise accuracy, ROC-AUC, calibration, reward distributions and (tiny world) Kendall τ.

    Pairs with a response longer than ``max_length`` cannot be scored whole; they are left out and counted
    (``skipped_too_long``) rather than scored as coin flips.
    """
    from sklearn.metrics import roc_auc_score

    n_rows = len(rows)
    rows = [r for r in rows if fits(r, tokenizer, cfg)]
    if not rows:
        raise DataError(f"none of the {n_rows} evaluation pairs fits in max_length={cfg.max_length}")
    prompts = [r["prompt"] for r in rows]
    r_chosen = reward_scores(model, tokenizer, prompts, [r["chosen"] for r in rows], cfg)
    r_rejected = reward_scores(model, tokenizer, prompts, [r["rejected"] for r in rows], cfg)
    p_first = torch.sigmoid(torch.tensor(r_chosen) - torch.tensor(r_rejected)).tolist()  # P(chosen wins)
    result = {"pairs": len(rows), "skipped_too_long": n_rows - len(rows),
              "accuracy": sum(c > r for c, r in zip(r_chosen, r_rejected)) / len(rows),
              "mean_margin": sum(c - r for c, r in zip(r_chosen, r_rejected)) / len(rows),
              # pooled: does the reward alone, without the other side of the pair, tell chosen from rejected?
              "roc_auc": float(roc_auc_score([1] * len(rows) + [0] * len(rows), r_chosen + r_rejected)),
              "rewards_chosen": r_chosen, "rewards_rejected": r_rejected}
    # a symmetric calibration table: each pair once in each order, so both outcomes occur
    result["calibration"] = calibration(p_first + [1 - p for p in p_first], [True] * len(rows) + [False] * len(rows))
    result["calibration_error"] = calibration_error(result["calibration"])
    types = {}
    for r, p in zip(rows, p_first):  # tiny world: which kinds of difference did the RM learn?
        meta = r.get("meta") or {}
        if meta.get("chosen_quality", "unknown") != "unknown":
            types.setdefault(f"{meta['chosen_quality']} > {meta['rejected_quality']}", []).append(p > 0.5)
    result["accuracy_by_pair_type"] = {k: {"n": len(v), "accuracy": sum(v) / len(v)} for k, v in sorted(types.items())}
    lengths_c, lengths_r = [len(r["chosen"]) for r in rows], [len(r["rejected"]) for r in rows]
    result["reward_length_tau"] = kendall_tau(r_chosen + r_rejected, lengths_c + lengths_r)
    if tau and get_profile(cfg.profile).offline:
        items = [x for x in tau_items(get_profile(cfg.profile).seed, cfg.tau_prompts)
                 if fits({"prompt": x["prompt"], "chosen": x["response"], "rejected": x["response"]}, tokenizer, cfg)]
        scores = reward_scores(model, tokenizer, [x["prompt"] for x in items], [x["response"] for x in items], cfg)
        truth = [x["true"] for x in items]
        groups = sorted({x["group"] for x in items})
        per = [kendall_tau([s for s, x in zip(scores, items) if x["group"] == g],
                           [t for t, x in zip(truth, items) if x["group"] == g]) for g in groups]
        per = [t for t in per if not math.isnan(t)]
        result.update(kendall_tau=kendall_tau(scores, truth), kendall_tau_within_prompt=sum(per) / max(1, len(per)),
                      tau_responses=len(items), tau_prompts=len(groups))
    return result


def plot_rewards(ev: dict, title: str = "reward model on held-out pairs"):
    """Two panels: rewards of chosen vs rejected responses, and the calibration of P(chosen wins)."""
    import matplotlib.pyplot as plt

    fig, (a, b) = plt.subplots(1, 2, figsize=(10, 3.6))
    lo = min(ev["rewards_chosen"] + ev["rewards_rejected"])
    hi = max(ev["rewards_chosen"] + ev["rewards_rejected"])
    bins = [lo + (hi - lo) * i / 30 for i in range(31)] if hi > lo else 10
    a.hist(ev["rewards_chosen"], bins=bins, alpha=0.6, label="chosen")
    a.hist(ev["rewards_rejected"], bins=bins, alpha=0.6, label="rejected")
    a.set_xlabel("reward")
    a.set_ylabel("responses")
    a.set_title(f"{title}: accuracy {ev['accuracy']:.0%}, ROC-AUC {ev['roc_auc']:.2f}", fontsize=9)
    a.legend()
    cal = ev["calibration"]
    b.plot([0, 1], [0, 1], "k--", lw=1, label="perfect calibration")
    b.plot([c["predicted"] for c in cal], [c["observed"] for c in cal], "o-", label="reward model")
    b.set_xlabel("predicted P(first response wins) = σ(Δr)")
    b.set_ylabel("observed share that won")
    b.set_title("calibration (each pair in both orders)", fontsize=9)
    b.legend()
    fig.tight_layout()
    return fig


# --- the stage ----------------------------------------------------------------------------------------


def main(cfg: RewardConfig | None = None, out_dir=None, tracker=None, log=print, sft=None) -> dict:
    """Run the RM stage from the SFT model; save ``<out_dir>/final``. Returns metrics."""
    from .checkpoint import save_checkpoint
    from .stages import load_stage, stage_dir

    cfg = cfg or RewardConfig.for_profile()
    cfg.validate()
    p = get_profile(cfg.profile)
    out_dir = Path(out_dir) if out_dir else stage_dir("rm", p)
    t0 = time.perf_counter()
    sft_model, tokenizer = sft if sft is not None else load_stage("sft", p)
    train_rows, test_rows = build_pairs(cfg)
    bias = length_bias([r for r in train_rows if check_pair(r) is None])
    log(f"  preference data: {len(train_rows)} labelled pairs (flipped {cfg.label_noise:.0%}, duplicates "
        f"{cfg.duplicate_rate:.0%}, ties {cfg.tie_rate:.0%} injected); chosen is the longer side in "
        f"{bias['chosen_longer']:.0%} of pairs of unequal length")

    def factory():
        return reward_model_from(sft_model, tokenizer, cfg.seed)

    removed, kept = {r: 0 for r in REASONS}, train_rows
    t_clean = time.perf_counter()
    if cfg.clean:
        kept, removed = clean_pairs(train_rows)
        if cfg.noise_filter and cfg.first_pass_steps:
            p_kept = cross_fit_p_chosen(kept, factory, tokenizer, cfg, log=log)
            kept, flipped = clean_pairs(kept, p_kept, cfg.noise_threshold)
            removed["likely flipped label"] = flipped["likely flipped label"]
        log(f"  cleaning ({time.perf_counter() - t_clean:.0f} s): kept {len(kept)} of {len(train_rows)}; removed "
            + ", ".join(f"{k} {v}" for k, v in removed.items() if v))
    else:  # no cleaning still cannot train on a row that is not a pair: drop it and count why
        reasons = [check_pair(r) for r in train_rows]
        kept = [r for r, why in zip(train_rows, reasons) if why is None]
        removed.update({why: reasons.count(why) for why in set(reasons) - {None}})
    truly_flipped = sum(bool((r.get("meta") or {}).get("flipped")) for r in kept)
    pairs, too_long = encode_pairs(kept, tokenizer, cfg)
    model = factory()
    before = evaluate(model, tokenizer, test_rows, cfg)
    result = train(cfg, model, tokenizer, pairs, tracker=tracker)
    after = evaluate(model, tokenizer, test_rows, cfg)
    log(f"  after {result['steps']} steps ({result['seconds']:.0f} s) on {len(pairs)} pairs: " + summary(after)
        + f" (untrained head: accuracy {before['accuracy']:.0%})")
    save_checkpoint(out_dir / "final", model, step=result["steps"], tokenizer=tokenizer,
                    state={"history": result["history"], "config": asdict(cfg)})
    return {"before": before, "after": after, "removed": removed, "rows": len(train_rows), "kept": len(kept),
            "flipped_left_after_cleaning": truly_flipped, "dropped_too_long": too_long, "length_bias": bias,
            "steps": result["steps"], "final_train_loss": result["final_loss"], "history": result["history"],
            "seconds": time.perf_counter() - t0, "checkpoint": str(out_dir / "final"), "config": asdict(cfg)}


def summary(ev: dict) -> str:
    parts = [f"pairwise accuracy {ev['accuracy']:.1%}", f"ROC-AUC {ev['roc_auc']:.3f}"]
    if "kendall_tau_within_prompt" in ev:
        parts.append(f"Kendall τ with the true scorer {ev['kendall_tau_within_prompt']:.2f} within prompt, "
                     f"{ev['kendall_tau']:.2f} overall")
    return ", ".join(parts)
