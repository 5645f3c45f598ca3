"""Hyper-parameter tuning (调参策略) on a model that trains in seconds.

The seed's ranges (learning rate 1e-5–1e-4 with warmup and cosine decay, clipping at 1.0, weight decay
0.01–0.1) are for billion-parameter models; the *shape* of the lessons is the same at any size, so chapter 09
learns them on a ~140k-parameter Llama trained on the tiny world's stories, where one run of 150 steps takes a few
seconds:

* :func:`run` — one short training run with any optimizer / schedule / LR / warmup / batch / clipping / decay,
  held-out loss every ``eval_every`` steps, a callback that may stop it (what a sweep's pruner uses);
* :func:`lr_range_test` — the LR finder: one run with an exponentially growing learning rate;
* :func:`cached_runs` — a grid of runs, cached on disk so a notebook re-executes in seconds;
* :func:`sweep` — an Optuna search with early pruning of bad trials (:mod:`optuna` runs locally, needs no
  account or server; W&B sweeps need W&B's cloud controller to hand out the configurations);
* :func:`trainer_early_stopping` — the same idea for one run: transformers' ``EarlyStoppingCallback``;
* :func:`prune_curve` — magnitude pruning (``torch.nn.utils.prune``) with and without a recovery fine-tune.
"""

from __future__ import annotations

import copy
import json
import math
import sys
import time
from dataclasses import asdict, dataclass, replace
from functools import lru_cache
from pathlib import Path

import torch
from tqdm import tqdm

from . import optimizers, schedules, training
from .errors import ConfigError
from .objectives import shifted_targets, token_loss_sum
from .profiles import ModelSize, get_profile


@dataclass
class TuneConfig:
    profile: str = "tiny"
    seed: int = 0  # weights and data order
    optimizer: str = "adamw"  # one of optimizers.OPTIMIZERS
    lr: float = 3e-3  # peak learning rate (a model this small tolerates far more than a 7B one)
    schedule: str = "cosine"  # one of schedules.SCHEDULES
    warmup_steps: int = 15
    max_steps: int = 150
    min_lr_ratio: float = 0.1
    batch_size: int = 16  # rows of block_size tokens per step
    grad_clip: float = 1.0  # global-norm clipping threshold; 0 turns it off
    weight_decay: float = 0.1
    eval_every: int = 25  # steps between held-out evaluations (what a pruner sees)
    eval_rows: int = 128  # held-out rows per evaluation

    @classmethod
    def for_profile(cls, profile: str | None = None, **overrides) -> "TuneConfig":
        p = get_profile(profile)
        return replace(cls(profile=p.name, seed=p.seed), **{**PRESETS[p.name], **overrides})

    def validate(self) -> None:
        if not (self.lr > 0 and math.isfinite(self.lr)):
            raise ConfigError(f"lr must be a positive number, got {self.lr}")
        if self.optimizer not in optimizers.OPTIMIZERS:
            raise ConfigError(f"unknown optimizer {self.optimizer!r}; choose one of {optimizers.OPTIMIZERS}")
        if self.schedule not in schedules.SCHEDULES:
            raise ConfigError(f"unknown schedule {self.schedule!r}; choose one of {schedules.SCHEDULES}")
        schedules.check_schedule(self.warmup_steps, self.max_steps, self.min_lr_ratio)
        for name in ("batch_size", "eval_every", "eval_rows"):
            if getattr(self, name) < 1:
                raise ConfigError(f"{name} must be >= 1, got {getattr(self, name)}")
        for name in ("grad_clip", "weight_decay"):
            if getattr(self, name) < 0:
                raise ConfigError(f"{name} must be >= 0, got {getattr(self, name)}")


PRESETS = {
    "smoke": dict(max_steps=20, warmup_steps=2, batch_size=8, eval_every=5, eval_rows=32),
    "tiny": dict(),
    "gpu": dict(max_steps=300, warmup_steps=30, batch_size=32, eval_every=50, eval_rows=256),
}

# corpus documents, tokenizer vocabulary and model shape of the tuning task, per profile
_TASK_SIZES = {
    "smoke": (300, 320, ModelSize(hidden_size=32, num_layers=2, num_heads=2, intermediate_size=64, context_length=32)),
    "tiny": (3000, 512, ModelSize(hidden_size=64, num_layers=2, num_heads=2, intermediate_size=192, context_length=64)),
    "gpu": (6000, 1024, ModelSize(hidden_size=128, num_layers=4, num_heads=4, intermediate_size=384,
                                  context_length=128)),
}


@dataclass
class Task:
    """Next-token prediction on the tiny world's stories, packed into rows of ``size.context_length`` tokens."""

    tokenizer: object
    train: torch.Tensor  # (N, T) token ids
    val: torch.Tensor  # used to choose hyper-parameters
    test: torch.Tensor  # touched once, to report the chosen configuration
    size: ModelSize
    seed: int = 0

    def new_model(self, seed: int = 0):
        from .model import build_model, make_config

        return build_model(make_config(self.size, self.tokenizer), seed=seed)


@lru_cache(maxsize=4)
def make_task(profile: str | None = None) -> Task:
    """Build (once per process) the corpus, tokenizer and packed splits of ``profile``'s tuning task."""
    from .data import packed_ids, tokenize_and_pack
    from .tokenizer import train_tokenizer
    from .world import pretrain_corpus

    p = get_profile(profile)
    n_docs, vocab, size = _TASK_SIZES[p.name]
    docs = {split: pretrain_corpus(p.seed, n, split)
            for split, n in (("train", n_docs), ("validation", n_docs // 10), ("test", n_docs // 10))}
    tok = train_tokenizer(docs["train"], vocab)
    ids = {s: packed_ids(tokenize_and_pack(d, tok, size.context_length)) for s, d in docs.items()}
    return Task(tok, ids["train"], ids["validation"], ids["test"], size, p.seed)


def evaluate(model, ids: torch.Tensor, rows: int | None = None, batch_size: int = 64) -> dict:
    """Mean next-token loss, perplexity and accuracy over the first ``rows`` rows of ``ids``
    (:func:`course_utils.pretrain.evaluate`)."""
    from .pretrain import evaluate as held_out

    ids = ids[:rows] if rows else ids
    return held_out(model, ids, batch_size, math.ceil(len(ids) / batch_size))


def _batch(task: Task, batch_size: int, gen: torch.Generator) -> torch.Tensor:
    return task.train[torch.randint(len(task.train), (batch_size,), generator=gen)]


def lm_loss(model, x: torch.Tensor) -> torch.Tensor:
    s, n = token_loss_sum(model(input_ids=x).logits, shifted_targets(x))
    return s / n


def run(cfg: TuneConfig, task: Task | None = None, on_eval=None, model=None, keep_model: bool = False,
        progress: bool = False, tracker=None) -> dict:
    """Train for ``cfg.max_steps`` steps; return per-step losses, held-out evaluations and the final held-out loss.

    ``on_eval(step, val_loss)`` is called at every evaluation; if it returns True the run stops there
    (``stopped_at`` is set). A non-finite training loss stops the run too (``diverged``). ``model`` continues
    training a given model instead of a fresh one (a recovery fine-tune); ``keep_model`` returns it as ``"model"``.
    ``tracker`` (a :class:`course_utils.tracking.Tracker`) receives every step's loss, LR and gradient norm and
    every held-out loss.
    The schedule follows transformers' convention (:mod:`course_utils.schedules`).
    """
    cfg.validate()
    task = task or make_task(cfg.profile)
    device = training.default_device()
    model = (model if model is not None else task.new_model(cfg.seed)).to(device)
    model.train()
    opt = optimizers.make(cfg.optimizer, model, cfg.lr, cfg.weight_decay)
    factor = schedules.get(cfg.schedule)
    gen = torch.Generator().manual_seed(cfg.seed)
    steps, evals, stopped_at, diverged = [], [], None, False
    t0 = time.perf_counter()
    for step in tqdm(range(cfg.max_steps), desc=f"{cfg.optimizer} lr={cfg.lr:.1e}", disable=not progress,
                     file=sys.stdout, ncols=100, mininterval=1.0):
        training.set_lr(opt, cfg.lr * factor(step, cfg.warmup_steps, cfg.max_steps, cfg.min_lr_ratio))
        loss = lm_loss(model, _batch(task, cfg.batch_size, gen).to(device))
        if not torch.isfinite(loss):
            diverged = True
            nan = float("nan")
            steps.append({"step": step + 1, "loss": nan, "lr": opt.param_groups[0]["lr"], "grad_norm": nan})
            break
        loss.backward()
        grad_norm = training.optimizer_step(model, opt, cfg.grad_clip)
        steps.append({"step": step + 1, "loss": loss.item(), "lr": opt.param_groups[0]["lr"], "grad_norm": grad_norm})
        if tracker is not None:
            tracker.log({k: v for k, v in steps[-1].items() if k != "step"}, step + 1)
        if (step + 1) % cfg.eval_every == 0 or step + 1 == cfg.max_steps:
            val = evaluate(model, task.val, cfg.eval_rows)["loss"]
            evals.append({"step": step + 1, "val_loss": val})
            if tracker is not None:
                tracker.log({"val_loss": val}, step + 1)
            if on_eval is not None and on_eval(step + 1, val):
                stopped_at = step + 1
                break
    out = {
        "config": asdict(cfg),
        "steps": steps,
        "evals": evals,
        "val_loss": evals[-1]["val_loss"] if evals and not diverged else float("nan"),
        "diverged": diverged,
        "stopped_at": stopped_at,
        "seconds": time.perf_counter() - t0,
        "tokens": len(steps) * cfg.batch_size * task.size.context_length,
    }
    if keep_model:
        out["model"] = model
    return out


def lr_range_test(task: Task | None = None, cfg: TuneConfig | None = None, start: float = 1e-5, end: float = 10.0,
                  steps: int = 100, smoothing: float = 0.9, stop_factor: float = 4.0) -> dict:
    """LR finder (Smith, 2017): raise the LR exponentially from ``start`` to ``end``, one step each; record the loss.

    Stops once the (smoothed) loss exceeds ``stop_factor`` × its minimum or climbs back above where it started (a
    language model's loss is bounded by what it costs to guess, so it rarely grows 4×). Suggests the LR where the
    smoothed loss fell fastest (``suggested_lr``); the other common rule, the minimum's LR / 10 (``min_loss_lr / 10``), is
    returned too. Both are starting points for a real run with warmup, not answers.
    """
    cfg = cfg or TuneConfig.for_profile()
    if not 0 < start < end:
        raise ConfigError(f"need 0 < start < end, got start={start}, end={end}")
    if steps < 10:
        raise ConfigError(f"steps must be >= 10, got {steps}")
    task = task or make_task(cfg.profile)
    device = training.default_device()
    model = task.new_model(cfg.seed).to(device)
    opt = optimizers.make(cfg.optimizer, model, start, cfg.weight_decay)
    gen = torch.Generator().manual_seed(cfg.seed)
    lrs, losses, avg, best = [], [], 0.0, float("inf")
    for i in range(steps):
        lr = start * (end / start) ** (i / (steps - 1))
        training.set_lr(opt, lr)
        loss = lm_loss(model, _batch(task, cfg.batch_size, gen).to(device))
        if not torch.isfinite(loss):
            break
        loss.backward()
        training.optimizer_step(model, opt, cfg.grad_clip)
        avg = smoothing * avg + (1 - smoothing) * loss.item()
        smoothed = avg / (1 - smoothing ** (i + 1))  # bias-corrected moving average
        lrs.append(lr)
        losses.append(smoothed)
        best = min(best, smoothed)
        if smoothed > min(stop_factor * best, losses[0]):
            break
    i_min = min(range(len(losses)), key=losses.__getitem__)
    logs = [math.log(lr) for lr in lrs]
    slopes = [(losses[i + 1] - losses[i - 1]) / (logs[i + 1] - logs[i - 1]) for i in range(1, i_min)]
    steepest = lrs[1 + min(range(len(slopes)), key=slopes.__getitem__)] if slopes else lrs[i_min] / 10
    return {"lrs": lrs, "losses": losses, "min_loss_lr": lrs[i_min], "suggested_lr": steepest}


def _key(cfg: TuneConfig) -> str:
    return json.dumps(asdict(cfg), sort_keys=True)


def cached_runs(configs, task: Task | None = None, cache: str | Path | None = None,
                progress: bool = True) -> list[dict]:
    """:func:`run` for each config, reusing results stored in the JSON file ``cache`` (a grid re-executes in seconds).

    A cached result is reused only for exactly the same config; delete the file to measure again.
    """
    configs = list(configs)
    path = Path(cache) if cache else None
    stored = json.loads(path.read_text()) if path and path.exists() else {}
    todo = [c for c in configs if _key(c) not in stored]
    for cfg in tqdm(todo, desc="runs", disable=not (progress and todo), file=sys.stdout, ncols=100):
        stored[_key(cfg)] = run(cfg, task)
        if path:
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(json.dumps(stored))
    return [stored[_key(c)] for c in configs]


def plot_runs(runs, labels, ax, key: str = "loss", x: str = "step", window: int = 10):
    """Curves of several runs on ``ax``: the smoothed training ``"loss"``, ``"grad_norm"``, ``"lr"``, or the held-out
    ``"val_loss"``; against the ``"step"`` or the ``"tokens"`` seen (to compare batch sizes fairly)."""
    from .report import smooth

    for r, label in zip(runs, labels):
        rows = r["evals"] if key == "val_loss" else r["steps"]
        tokens_per_step = r["tokens"] / max(1, len(r["steps"]))
        xs = [row["step"] * (tokens_per_step if x == "tokens" else 1) for row in rows]
        ys = [row[key] for row in rows]
        ax.plot(xs, ys if key in ("val_loss", "lr") else smooth(ys, window), label=label,
                marker="." if key == "val_loss" else None)
    ax.set_xlabel("tokens seen" if x == "tokens" else "optimizer step")
    ax.set_ylabel(key if key != "loss" else f"training loss (mean of {window} steps)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    return ax


# --- sweeps with early stopping --------------------------------------------------------------------------------


def sweep(base: TuneConfig, n_trials: int, task: Task | None = None, seed: int = 0, startup_trials: int = 5,
          warmup_evals: int = 1, progress: bool = True) -> dict:
    """Search LR, warmup, weight decay and clipping with Optuna's TPE sampler; prune trials with a median rule.

    At each held-out evaluation a trial reports its loss; after ``startup_trials`` complete trials and
    ``warmup_evals`` evaluations of its own, a trial whose loss is worse than the median of earlier trials at the
    same step is stopped (Optuna's ``MedianPruner``). Diverged trials count as pruned. Returns the study, one row
    per trial and the best configuration.
    """
    import optuna

    if n_trials < 1:
        raise ConfigError(f"n_trials must be >= 1, got {n_trials}")
    base.validate()
    task = task or make_task(base.profile)
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    study = optuna.create_study(
        direction="minimize", sampler=optuna.samplers.TPESampler(seed=seed),
        pruner=optuna.pruners.MedianPruner(n_startup_trials=startup_trials,
                                           n_warmup_steps=warmup_evals * base.eval_every))
    results = {}

    def objective(trial):
        cfg = replace(base,
                      lr=trial.suggest_float("lr", 3e-4, 3e-2, log=True),
                      warmup_steps=trial.suggest_int("warmup_steps", 0, base.max_steps // 3),
                      weight_decay=trial.suggest_float("weight_decay", 0.0, 0.3),
                      grad_clip=trial.suggest_categorical("grad_clip", [0.0, 0.5, 1.0, 5.0]))

        def on_eval(step, val):
            trial.report(val, step)
            return trial.should_prune()

        r = results[trial.number] = run(cfg, task, on_eval=on_eval)
        if r["diverged"] or r["stopped_at"] is not None:
            raise optuna.TrialPruned()
        return r["val_loss"]

    study.optimize(objective, n_trials=n_trials, show_progress_bar=progress)
    rows = [{"trial": t.number, "state": t.state.name.lower(), **t.params,
             "val_loss": results[t.number]["evals"][-1]["val_loss"] if results[t.number]["evals"] else float("nan"),
             "steps": len(results[t.number]["steps"]), "seconds": results[t.number]["seconds"]}
            for t in study.trials]
    pruned = sum(r["state"] == "pruned" for r in rows)
    best = replace(base, **study.best_trial.params)
    return {"study": study, "rows": rows, "runs": results, "best_config": best, "best_val_loss": study.best_value,
            "pruned_fraction": pruned / len(rows), "steps_run": sum(r["steps"] for r in rows),
            "steps_without_pruning": len(rows) * base.max_steps}


def trainer_early_stopping(task: Task | None = None, cfg: TuneConfig | None = None, train_rows: int = 64,
                           max_steps: int = 400, patience: int = 3, out_dir=None, progress: bool = False) -> dict:
    """One ``transformers.Trainer`` run with ``EarlyStoppingCallback``, set up to overfit (few training rows).

    The held-out loss falls, bottoms out and rises; the callback stops ``patience`` evaluations after the best
    one and ``load_best_model_at_end`` restores it. Returns the evaluation history and where it stopped.
    """
    import tempfile

    from datasets import Dataset
    from transformers import EarlyStoppingCallback, Trainer, TrainingArguments

    from .checkpoint import quiet_transformers
    from .trl_runs import quiet

    cfg = cfg or TuneConfig.for_profile()
    task = task or make_task(cfg.profile)
    rows = task.train[:train_rows]
    train_ds = Dataset.from_dict({"input_ids": rows.tolist(), "labels": rows.tolist()})
    val = task.val[: cfg.eval_rows]
    val_ds = Dataset.from_dict({"input_ids": val.tolist(), "labels": val.tolist()})
    model = task.new_model(cfg.seed)
    with tempfile.TemporaryDirectory() as tmp:
        args = TrainingArguments(
            output_dir=str(out_dir or tmp), max_steps=max_steps, per_device_train_batch_size=cfg.batch_size,
            learning_rate=cfg.lr, warmup_steps=cfg.warmup_steps, lr_scheduler_type="cosine",
            weight_decay=cfg.weight_decay, max_grad_norm=cfg.grad_clip, eval_strategy="steps",
            eval_steps=cfg.eval_every, save_strategy="steps", save_steps=cfg.eval_every, save_total_limit=1,
            load_best_model_at_end=True, metric_for_best_model="eval_loss", greater_is_better=False,
            report_to="none", disable_tqdm=not progress, logging_strategy="no", use_cpu=not torch.cuda.is_available(),
            seed=cfg.seed, data_seed=cfg.seed)
        trainer = quiet(Trainer(model=model, args=args, train_dataset=train_ds, eval_dataset=val_ds,
                                callbacks=[EarlyStoppingCallback(early_stopping_patience=patience)]))
        with quiet_transformers(errors_only=True):
            trainer.train()
        evals = [{"step": h["step"], "val_loss": h["eval_loss"]} for h in trainer.state.log_history if "eval_loss" in h]
        best_step = int(Path(trainer.state.best_model_checkpoint).name.split("-")[1])
        final = evaluate(trainer.model, val, None)["loss"]  # the restored best model
    return {"evals": evals, "stopped_at": trainer.state.global_step, "max_steps": max_steps, "best_step": best_step,
            "best_val_loss": trainer.state.best_metric, "restored_val_loss": final, "patience": patience}


# --- pruning (模型剪枝) -------------------------------------------------------------------------------------------


def prunable(model) -> list[tuple[torch.nn.Module, str]]:
    """The attention and MLP projections (not the embedding, which is tied to the output layer)."""
    return [(m, "weight") for name, m in model.named_modules()
            if isinstance(m, torch.nn.Linear) and name.startswith("model.layers")]


def prune_global(model, amount: float):
    """Zero the ``amount`` smallest-magnitude weights across all prunable layers (one global threshold)."""
    from torch.nn.utils import prune

    if not 0.0 <= amount < 1.0:
        raise ConfigError(f"amount must be in [0, 1), got {amount}")
    prune.global_unstructured(prunable(model), pruning_method=prune.L1Unstructured, amount=amount)
    return model


def sparsity(model) -> float:
    """Fraction of exact zeros in the prunable layers' (effective) weights."""
    ws = [getattr(m, n) for m, n in prunable(model)]
    return sum(int((w == 0).sum()) for w in ws) / sum(w.numel() for w in ws)


def prune_curve(model, task: Task, amounts=(0.0, 0.2, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9), recover: TuneConfig | None = None,
                progress: bool = True) -> list[dict]:
    """Held-out accuracy after global magnitude pruning at each ``amount``, then after a short recovery fine-tune.

    Pruning masks stay on during the fine-tune (``torch.nn.utils.prune`` re-applies them in every forward), so the
    recovered model has exactly the same sparsity.
    """
    from torch.nn.utils import prune

    rows = []
    for amount in tqdm(amounts, desc="prune", disable=not progress, file=sys.stdout, ncols=100):
        pruned = prune_global(copy.deepcopy(model), amount)
        before = evaluate(pruned, task.test)
        row = {"amount": amount, "sparsity": sparsity(pruned), "test_loss": before["loss"],
               "accuracy": before["accuracy"]}
        if recover is not None:
            run(recover, task, model=pruned)
            after = evaluate(pruned, task.test)
            row.update(recovered_loss=after["loss"], recovered_accuracy=after["accuracy"],
                       sparsity_after=sparsity(pruned))
        for m, n in prunable(pruned):
            prune.remove(m, n)  # make it permanent: the weight itself now holds the zeros
        rows.append(row)
    return rows
