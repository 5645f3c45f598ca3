"""The debug checklist (常见问题排查清单) as tools: a NaN guard, training statistics, token-level samples, and
:func:`diagnose`, which checks data, config and model before training and says what it finds.

==========================  ========================================  ===========================================
symptom (seed)              usual causes                              tools here
==========================  ========================================  ===========================================
loss is NaN                 LR too high, broken token mask, labels    :class:`NaNGuard` (first bad step, tensor),
                            shifted                                   :func:`train_steps` statistics, :func:`show_tokens`
no convergence              poor data, not shuffled                   :func:`check_records` (order, quality,
                                                                      duplicates, tokenizer coverage)
out of memory               batch too big, gradients kept in eval     :func:`check_memory` (estimate vs budget, fixes)
fine-tuning has no effect   template mismatch, label offset           :func:`check_batch`, :func:`side_by_side`
==========================  ========================================  ===========================================
"""

from __future__ import annotations

import math
import re
from collections import Counter
from dataclasses import dataclass

import torch

from .errors import ConfigError
from .objectives import IGNORE_INDEX

PROBLEMS = ("nan_loss", "no_convergence", "out_of_memory", "no_effect")


@dataclass(frozen=True)
class Finding:
    code: str  # stable name, e.g. "labels_shifted"
    problem: str  # one of PROBLEMS: the checklist row it explains
    message: str  # what was found, with numbers
    fix: str  # what to do about it

    def __str__(self) -> str:
        return f"[{self.problem}] {self.code}: {self.message}\n    fix: {self.fix}"


class NonFiniteError(FloatingPointError):
    """Training produced a NaN or inf; says at which step and in which tensor it appeared first."""

    def __init__(self, step: int, what: str, where: str | None):
        self.step, self.what, self.where = step, what, where
        super().__init__(f"step {step}: {what}" + (f"; first non-finite tensor: {where}" if where else ""))


# --- NaN guard and training statistics ----------------------------------------------------------------------


class NaNGuard:
    """Watch a model for NaN/inf: forward hooks note the first module (in execution order) whose output is not
    finite; :meth:`check_loss` and :meth:`check_grads` raise :class:`NonFiniteError` naming the step and that
    tensor. Use as a context manager so the hooks are removed afterwards."""

    def __init__(self, model: torch.nn.Module):
        self.model, self.step, self.first_bad, self._hooks = model, 0, None, []

    def __enter__(self):
        for name, module in self.model.named_modules():
            if name:
                self._hooks.append(module.register_forward_hook(self._hook(name)))
        return self

    def __exit__(self, *exc):
        for h in self._hooks:
            h.remove()
        self._hooks = []

    def _hook(self, name: str):
        def check(module, inputs, output):
            t = output[0] if isinstance(output, tuple) else getattr(output, "logits", output)
            if self.first_bad is None and torch.is_tensor(t) and t.is_floating_point() and not torch.isfinite(t).all():
                self.first_bad = f"output of {name}"
        return check

    def start(self, step: int) -> None:
        self.step, self.first_bad = step, None

    def check_loss(self, loss: torch.Tensor) -> None:
        if not torch.isfinite(loss).all():
            raise NonFiniteError(self.step, f"loss is {loss.item()}", self.first_bad)

    def check_grads(self) -> None:
        """After backward, before the optimizer step: a non-finite gradient must never reach the weights."""
        for name, p in self.model.named_parameters():
            if p.grad is not None and not torch.isfinite(p.grad).all():
                raise NonFiniteError(self.step, "a gradient is not finite", f"gradient of {name}")


def layer_of(param_name: str) -> str:
    """"model.layers.3.mlp.up_proj.weight" → "layers.3"; embeddings, final norm and head keep their own names."""
    m = re.search(r"layers\.(\d+)", param_name)
    return f"layers.{m.group(1)}" if m else param_name.replace("model.", "").rsplit(".", 1)[0]


def grad_norms_by_layer(model: torch.nn.Module) -> dict[str, float]:
    sums: dict[str, float] = {}
    for name, p in model.named_parameters():
        if p.grad is not None:
            sums[layer_of(name)] = sums.get(layer_of(name), 0.0) + float(p.grad.float().pow(2).sum())
    return {k: math.sqrt(v) for k, v in sums.items()}


def train_steps(model, batches: list[dict], lr: float, steps: int, optimizer: str = "adamw",
                grad_clip: float | None = None, guard: bool = True) -> dict:
    """A bare training loop for the labs: ``batches`` (dicts for ``model(**batch)``, labels in transformers'
    convention) are cycled; returns per-step loss, global and per-layer gradient norms, and the
    :class:`NonFiniteError` that stopped it (or None)."""
    if optimizer not in ("adamw", "sgd"):
        raise ConfigError(f"optimizer must be 'adamw' or 'sgd', got {optimizer!r}")
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=lr) if optimizer == "adamw" else torch.optim.SGD(params, lr=lr)
    history, error = [], None
    model.train()
    with NaNGuard(model) as g:
        for step in range(1, steps + 1):
            g.start(step)
            try:
                loss = model(**batches[(step - 1) % len(batches)]).loss
                if guard:
                    g.check_loss(loss)
                loss.backward()
                layers = grad_norms_by_layer(model)
                if guard:
                    g.check_grads()
            except NonFiniteError as e:
                error = e
                break
            norm = math.sqrt(sum(v * v for v in layers.values()))
            if grad_clip:
                torch.nn.utils.clip_grad_norm_(params, grad_clip)
            opt.step()
            opt.zero_grad(set_to_none=True)
            history.append({"step": step, "loss": loss.item(), "grad_norm": norm, "layers": layers})
    return {"history": history, "error": error}


def plot_stats(history: list[dict], title: str = ""):
    """Loss, global gradient norm (log scale) and per-layer gradient norms of :func:`train_steps`' history."""
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(15, 3.2))
    steps = [h["step"] for h in history]
    axes[0].plot(steps, [h["loss"] for h in history], marker=".")
    axes[0].set_title(f"{title} loss".strip())
    axes[1].plot(steps, [h["grad_norm"] for h in history], marker=".")
    axes[1].set_yscale("log")
    axes[1].set_title("global gradient norm")
    names = list(history[0]["layers"]) if history else []
    grid = [[max(h["layers"].get(n, 0.0), 1e-12) for h in history] for n in names]
    if grid:
        im = axes[2].imshow([[math.log10(v) for v in row] for row in grid], aspect="auto", cmap="viridis")
        axes[2].set_yticks(range(len(names)), names, fontsize=7)
        fig.colorbar(im, ax=axes[2], label="log10 gradient norm")
    axes[2].set_title("gradient norm per layer, by step")
    for ax in axes[:2]:
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
    fig.tight_layout()
    return fig


def show_tokens(batch: dict, tokenizer, row: int = 0, limit: int = 40) -> str:
    """One row of a batch, token by token: the input token and the token its label asks the model to predict at
    that position (transformers shifts labels inside the model: position t is scored on labels[t + 1]), "·" where
    no loss is computed. Misaligned labels and empty masks are obvious here."""
    ids, labels = batch["input_ids"][row].tolist(), batch["labels"][row].tolist()
    lines = [f"{'pos':>4} {'input':>14}  →  trained to predict"]
    for t in range(min(limit, len(ids) - 1)):
        target = labels[t + 1]
        shown = "·" if target == IGNORE_INDEX else repr(tokenizer.decode([target]))
        lines.append(f"{t:>4} {tokenizer.decode([ids[t]])!r:>14}  →  {shown}")
    return "\n".join(lines)


# --- checks -----------------------------------------------------------------------------------------------------


def check_batch(batch: dict) -> list[Finding]:
    """Label problems visible in one encoded batch (labels in transformers' convention: unshifted)."""
    ids, labels = batch["input_ids"], batch["labels"]
    mask = batch.get("attention_mask", torch.ones_like(ids))
    out = []
    supervised = labels != IGNORE_INDEX
    empty = int((supervised.sum(1) == 0).sum())
    if empty:
        out.append(Finding("all_labels_masked", "nan_loss", f"{empty} of {len(ids)} rows have no labelled token: "
                           "their loss is 0/0 = NaN (a mean over nothing)",
                           "check the loss mask (e.g. the assistant span was not found, or max_length cut it off); "
                           "drop rows with no labels"))
    n = int(supervised.sum())
    if n:
        same = int(((labels == ids) & supervised).sum())
        ahead = int(((labels[:, :-1] == ids[:, 1:]) & supervised[:, :-1]).sum())
        if ahead > 0.8 * n and same < 0.5 * n:
            out.append(Finding("labels_shifted", "no_effect", f"{ahead} of {n} labels equal the NEXT input token: "
                               "the labels were shifted already, and the model shifts them again, so it is trained "
                               "to predict two tokens ahead", "pass labels = input_ids (masked), unshifted: "
                               "transformers' models shift internally"))
    on_pad = int((supervised & (mask == 0)).sum())
    if on_pad:
        out.append(Finding("labels_on_padding", "no_effect", f"{on_pad} labelled positions are padding",
                           "set labels to -100 wherever attention_mask is 0"))
    return out


def check_records(records: list[dict], tokenizer=None, key: str = "family", max_length: int | None = None,
                  text=lambda r: r["prompt"] + " " + r["response"]) -> list[Finding]:
    """Data problems behind "no convergence": order, duplicates, quality, tokenizer coverage, truncation."""
    out = []
    if not records:
        return [Finding("no_data", "no_convergence", "the dataset is empty", "load the data")]
    keys = [r.get(key) for r in records]
    if all(k is not None for k in keys) and len(set(keys)) > 1:
        same = sum(a == b for a, b in zip(keys, keys[1:])) / (len(keys) - 1)
        counts = Counter(keys)
        chance = sum((c / len(keys)) ** 2 for c in counts.values())
        if same > max(0.5, 2 * chance):
            out.append(Finding("unshuffled", "no_convergence", f"{same:.0%} of neighbouring rows share their {key!r} "
                               f"(about {chance:.0%} if shuffled): batches see one kind of example at a time and "
                               "the model forgets the others", "shuffle the training set (a fixed seed keeps it "
                               "reproducible)"))
    texts = [text(r) for r in records]
    dup = 1 - len(set(texts)) / len(texts)
    if dup > 0.25:  # a few repeats are normal (short answers recur); a quarter of the data is not
        out.append(Finding("duplicates", "no_convergence", f"{dup:.0%} of rows are exact duplicates",
                           "deduplicate (chapter 05's clean_pairs shows exact and near duplicates)"))
    quality = [r["quality"] for r in records if "quality" in r]
    if quality:
        bad = sum(q != "good" for q in quality) / len(quality)
        if bad > 0.5:
            out.append(Finding("low_quality", "no_convergence", f"{bad:.0%} of responses are not good answers "
                               f"({dict(Counter(quality).most_common(3))})", "filter or relabel the data: a model "
                               "learns what it is shown, errors included"))
    if tokenizer is not None:
        sample = texts[:500]
        unk = tokenizer.unk_token_id
        ids = [tokenizer(t, add_special_tokens=False)["input_ids"] for t in sample]
        n_tokens = sum(map(len, ids))
        unk_rate = sum(i.count(unk) for i in ids) / max(1, n_tokens) if unk is not None else 0.0
        per_word = n_tokens / max(1, sum(len(t.split()) for t in sample))
        if unk_rate > 0.01 or per_word > 4:
            out.append(Finding("tokenizer_coverage", "no_convergence", f"{unk_rate:.1%} unknown tokens, "
                               f"{per_word:.1f} tokens per word: the tokenizer was not trained on text like this",
                               "train (or extend) the tokenizer on this data, or pick one that covers its "
                               "language and symbols"))
        if max_length:
            long = sum(len(i) + 8 > max_length for i in ids) / len(ids)
            if long > 0.05:
                out.append(Finding("truncated", "no_effect", f"{long:.0%} of rows do not fit in max_length="
                                   f"{max_length} (with the chat markup)", "raise max_length or shorten the data"))
    return out


def lr_limit(n_params: int) -> float:
    """A loose upper bound on a sensible peak AdamW LR for a model of this size (the best LR falls with width):
    3e-2 below 1M parameters, 1e-2 below 10M, 1e-3 below 1B, 3e-4 above."""
    return 3e-2 if n_params < 1e6 else 1e-2 if n_params < 1e7 else 1e-3 if n_params < 1e9 else 3e-4


def check_config(cfg, n_params: int) -> list[Finding]:
    """Optimisation settings that tend to produce NaN losses (lr, warmup, clipping)."""
    out = []
    lr, warmup, clip = cfg.lr, getattr(cfg, "warmup_steps", 0), getattr(cfg, "grad_clip", 0)
    if lr > lr_limit(n_params):
        out.append(Finding("lr_too_high", "nan_loss", f"peak LR {lr:g} is above {lr_limit(n_params):g}, a loose "
                           f"limit for {n_params:,} parameters", "run an LR range test (chapter 09) and start "
                           "well below where the loss blows up"))
    if warmup == 0 and not clip and lr > 0.1 * lr_limit(n_params):
        out.append(Finding("no_warmup_no_clipping", "nan_loss", f"no warmup and no gradient clipping at LR {lr:g}: "
                           "the first updates are the largest and nothing caps them", "warm up over a few percent "
                           "of the steps and clip the global gradient norm at 1.0"))
    return out


def check_memory(setup, budget_gib: float) -> list[Finding]:
    """Estimate a run's memory (:func:`memory.estimate`) against a budget; if it does not fit, say which part is
    biggest and what each fix would bring it down to."""
    from dataclasses import replace

    from .memory import estimate

    gib = 2**30
    need = estimate(setup).total / gib
    if need <= budget_gib:
        return []
    fixes = {"gradient checkpointing": replace(setup, gradient_checkpointing=True),
             f"micro-batch {max(1, setup.batch_size // 4)} (×{setup.batch_size // max(1, setup.batch_size // 4)} "
             "accumulation)": replace(setup, batch_size=max(1, setup.batch_size // 4)),
             "LoRA r=8": replace(setup, lora_rank=8)}
    options = ", ".join(f"{k} → {estimate(s).total / gib:.2f} GiB" for k, s in fixes.items())
    parts = {k: v for k, v in vars(estimate(setup)).items() if isinstance(v, int)}
    worst = max(parts, key=parts.get)
    return [Finding("out_of_memory", "out_of_memory", f"needs {need:.2f} GiB, budget {budget_gib:g} GiB; the "
                    f"largest part is {worst} ({parts[worst] / gib:.2f} GiB)", f"{options}; and evaluate under "
                    "torch.no_grad() so no activations are kept")]


def check_model(model, tokenizer=None, chat_format: str | None = None) -> list[Finding]:
    """Weights that are not finite, nothing trainable, or a chat format the tokenizer does not know."""
    out = []
    bad = [n for n, p in model.named_parameters() if not torch.isfinite(p).all()]
    if bad:
        out.append(Finding("non_finite_weights", "nan_loss", f"{len(bad)} parameter tensors hold NaN/inf, first "
                           f"{bad[0]}", "reload the last good checkpoint; lower the LR"))
    if not any(p.requires_grad for p in model.parameters()):
        out.append(Finding("nothing_trainable", "no_effect", "no parameter has requires_grad=True: training "
                           "changes nothing", "unfreeze the layers to train (or check that LoRA adapters were "
                           "injected before building the optimizer)"))
    if tokenizer is not None and chat_format == "chatml" and "<|im_start|>" not in tokenizer.get_vocab():
        out.append(Finding("template_mismatch", "no_effect", "ChatML markup is not a token of this tokenizer: "
                           "the model never saw this template", "use the template the model was trained with "
                           "(tokenizer.chat_template), at training and at inference"))
    return out


def template_logprobs(model, tokenizer, records: list[dict]) -> dict[str, float]:
    """Mean log-probability per token of each record's response given its prompt, rendered in every chat format."""
    from .chat import FORMATS
    from .dpo import conversation_logprobs

    out = {}
    for fmt in FORMATS:
        lp, n = conversation_logprobs(model, tokenizer, [r["messages"] for r in records], fmt)
        out[fmt] = float(lp.sum() / n.sum())
    return out


def check_template(model, tokenizer, chat_format: str, records: list[dict], margin: float = 0.3) -> list[Finding]:
    """Few-shot probe of the chat template with known answers (a few of your training records): if the model
    finds the right answers far likelier (by ``margin`` nats per token) in another format than in ``chat_format``,
    it was fine-tuned with that one, and asking in ``chat_format`` wastes the fine-tuning."""
    lp = template_logprobs(model, tokenizer, records)
    best = max(lp, key=lp.get)
    if best != chat_format and lp[best] - lp[chat_format] > margin:
        return [Finding("template_mismatch", "no_effect", f"the right answers average {lp[chat_format]:.2f} nats per "
                        f"token in {chat_format!r} but {lp[best]:.2f} in {best!r}: the model was fine-tuned with "
                        f"the {best!r} template", f"use {best!r} at inference, or fine-tune with {chat_format!r}")]
    return []


def diagnose(records=None, tokenizer=None, config=None, model=None, batch=None, memory_setup=None,
             memory_budget_gib: float | None = None, probe: list[dict] | None = None, key: str = "family",
             show: bool = True) -> list[Finding]:
    """Run every check that the given arguments allow; print the findings (or "no problem found").
    ``probe`` (a few records with known answers, plus a model, a tokenizer and a config with ``chat_format``) adds
    the template check."""
    findings = []
    if batch is not None:
        findings += check_batch(batch)
    if records is not None:
        findings += check_records(records, tokenizer, key, getattr(config, "max_length", None))
    if config is not None and model is not None:
        findings += check_config(config, sum(p.numel() for p in model.parameters()))
    if model is not None:
        findings += check_model(model, tokenizer, getattr(config, "chat_format", None))
    if memory_setup is not None and memory_budget_gib is not None:
        findings += check_memory(memory_setup, memory_budget_gib)
    if probe and model is not None and tokenizer is not None and hasattr(config, "chat_format"):
        findings += check_template(model, tokenizer, config.chat_format, probe)
    if show:
        print("\n".join(map(str, findings)) if findings else "diagnose: no problem found")
    return findings


# --- "fine-tuning had no effect": look at the outputs ------------------------------------------------------------


def side_by_side(models: dict, tokenizer, prompts: list[str], fmt: dict | str = "chatml",
                 max_new_tokens: int = 24) -> list[dict]:
    """Greedy answers of several models to the same prompts (``fmt`` per model name, or one for all): the manual
    evaluation the checklist asks for, and few-shot probes of a template mismatch."""
    from .ppo import sample

    out = [{"prompt": p} for p in prompts]
    for name, lm in models.items():
        texts = sample(lm, tokenizer, prompts, fmt[name] if isinstance(fmt, dict) else fmt, max_new_tokens,
                       greedy=True)["texts"]
        for row, t in zip(out, texts):
            row[name] = t
    return out
