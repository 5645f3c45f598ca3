"""Stage 2 — supervised instruction fine-tuning, SFT (指令微调).

Start from the pretrained base, show it conversations in one chat format, and train only on
the assistant's tokens. ``main(cfg)`` runs the whole stage: build data, measure the base model,
train, measure again (held-out accuracy judged by the tiny world's ground truth, format
compliance, samples), and save the ``sft`` checkpoint that the reward model and RLHF start from.
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import torch

from . import training
from .chat import FORMATS, OVERFLOW, encode, pad_batch, pad_ids, render, to_messages
from .data import step_sampler
from .errors import ConfigError, DataError
from .objectives import token_loss_sum
from .profiles import get_profile
from .tokenizer import IM_END, IM_START, require_pad_token


@dataclass
class SFTConfig:
    # --- data and formatting
    profile: str = "tiny"  # sizes and data come from this profile
    seed: int = 0  # data order, sampling and the LoRA init
    chat_format: str = "chatml"  # "chatml" or "alpaca": how a conversation becomes text (use the same at inference!)
    prompt_templates: str = "all"  # "all": every training phrasing of each task; "one": only phrasing 0 (ablation)
    max_length: int = 128  # tokens per example; longer prompts are cut from the left, see chat.encode
    on_overflow: str = "error"  # "error" or "drop": what to do with a row whose response alone exceeds max_length
    loss_on_prompt: bool = False  # the classic bug, for demos: also train on the prompt tokens
    add_eos: bool = True  # the other classic bug, for demos: without EOS the model never learns to stop
    # --- optimisation
    batch_size: int = 32  # conversations per micro-batch; lower it if you run out of memory...
    grad_accum: int = 1  # ...and raise this to keep the effective batch
    # micro-batches of similar length: half the padded tokens, 1.3x faster here, but in the tiny world a length is
    # nearly a task, so each batch holds one kind of task: 300 steps reached 72% held-out accuracy instead of 80%
    group_by_length: bool = False
    max_steps: int = 300  # optimizer steps
    lr: float = 1e-3  # peak LR; fine-tuning a real 135M-7B model wants 1e-5..1e-4
    min_lr_ratio: float = 0.1  # cosine decays to lr * min_lr_ratio
    warmup_steps: int = 30  # linear warmup
    weight_decay: float = 0.0
    grad_clip: float = 1.0  # max global gradient norm; 0 disables clipping
    precision: str = "auto"  # "auto" (bf16 on capable GPUs), "fp32" or "bf16"
    # --- parameter-efficient fine-tuning (chapter 04): one flag switches the stage to LoRA or QLoRA
    peft: str = "none"  # "none": full fine-tuning; "lora": frozen base + LoRA; "qlora": 4-bit NF4 base + LoRA
    lora_r: int = 8  # rank of each update B @ A
    lora_alpha: float = 16.0  # the update is scaled by lora_alpha / lora_r
    lora_dropout: float = 0.0
    lora_targets: str = "all-linear"  # "all-linear" or comma-separated module names, e.g. "q_proj,v_proj"
    lora_lr: float = 0.0  # peak LR when peft != "none" (0: keep `lr`); LoRA usually wants a higher LR than full FT
    lora_steps: int = 0  # optimizer steps when peft != "none" (0: keep `max_steps`); a low-rank update learns slower
    lora_train_tokens: bool = True  # also train the embedding rows of the chat special tokens (see apply_peft)
    # --- evaluation, logging, checkpoints
    eval_examples: int = 400  # held-out prompts answered greedily and judged
    max_new_tokens: int = 40  # generation budget per answer
    eval_every: int = 0  # steps between held-out loss evaluations (0: none during training)
    log_every: int = 10
    ckpt_every: int = 0
    progress: bool = True  # show a progress bar

    @classmethod
    def for_profile(cls, profile: str | None = None, **overrides) -> "SFTConfig":
        p = get_profile(profile)
        cfg = replace(cls(profile=p.name, seed=p.seed, max_length=p.model.context_length), **PRESETS[p.name])
        return replace(cfg, **overrides)

    def validate(self) -> None:
        if self.chat_format not in FORMATS:
            raise ConfigError(f"chat_format must be one of {FORMATS}, got {self.chat_format!r}")
        if self.prompt_templates not in ("all", "one"):
            raise ConfigError(f"prompt_templates must be 'all' or 'one', got {self.prompt_templates!r}")
        if self.on_overflow not in OVERFLOW:
            raise ConfigError(f"on_overflow must be one of {OVERFLOW}, got {self.on_overflow!r}")
        training.validate_optim(self, ("batch_size", "grad_accum", "max_steps", "max_length", "max_new_tokens"))
        if self.peft not in PEFT_MODES:
            raise ConfigError(f"peft must be one of {PEFT_MODES}, got {self.peft!r}")
        if self.peft != "none" and (self.lora_r <= 0 or self.lora_alpha <= 0 or not 0 <= self.lora_dropout < 1):
            raise ConfigError(f"LoRA needs lora_r > 0, lora_alpha > 0 and 0 <= lora_dropout < 1; got r={self.lora_r}, "
                              f"alpha={self.lora_alpha}, dropout={self.lora_dropout}")
        if self.lora_lr < 0 or self.lora_steps < 0:
            raise ConfigError(f"lora_lr and lora_steps must be >= 0 (0: use lr / max_steps); got {self.lora_lr}, "
                              f"{self.lora_steps}")

    def target_modules(self):
        """``lora_targets`` in the form PEFT's ``LoraConfig(target_modules=...)`` takes."""
        t = self.lora_targets.strip()
        return t if t == "all-linear" else [x.strip() for x in t.split(",") if x.strip()]


PEFT_MODES = ("none", "lora", "qlora")


PRESETS = {
    "smoke": dict(max_steps=20, batch_size=8, warmup_steps=2, eval_examples=16, max_new_tokens=16, log_every=5,
                  on_overflow="drop"),
    # verbose answers of the tiny world can exceed the 128-token context once tokenized: drop and count them
    "tiny": dict(max_steps=300, batch_size=32, lr=3e-3, warmup_steps=30, eval_examples=400, on_overflow="drop",
                 # measured over seeds 0-2 (table in notebook 04): full fine-tuning 74-86% held-out accuracy;
                 # LoRA r=8, 300 steps at LR 1.5e-2: 63-75%; 600 steps at 1e-2: 78-85%. LR 2e-2 diverges.
                 lora_lr=1e-2, lora_steps=600),
    # a real base model: small LR, longer context, alpaca rows that do not fit are dropped
    "gpu": dict(max_steps=300, batch_size=8, grad_accum=4, lr=2e-5, warmup_steps=30, max_length=512,
                on_overflow="drop", eval_examples=100, max_new_tokens=128, lora_r=16, lora_alpha=32.0, lora_lr=2e-4),
}


# --- data --------------------------------------------------------------------------------------------


def encode_records(records: list[dict], tokenizer, cfg: SFTConfig) -> tuple[list, dict]:
    """Validate and tokenize every record; returns (examples, counts of truncated / dropped rows)."""
    examples, counts = [], {"rows": len(records), "truncated": 0, "dropped": 0}
    for i, rec in enumerate(records):
        messages = to_messages(rec, i)
        try:
            enc = encode(messages, tokenizer, cfg.chat_format, cfg.max_length, cfg.loss_on_prompt, cfg.add_eos, row=i)
        except DataError:
            if cfg.on_overflow == "error":
                raise
            counts["dropped"] += 1
            continue
        counts["truncated"] += enc.truncated
        examples.append(enc)
    if not examples:
        raise DataError("no SFT example is left to train on")
    return examples, counts


def build_records(cfg: SFTConfig) -> tuple[list[dict], list[dict]]:
    """(train records, held-out evaluation records) for the profile."""
    p = get_profile(cfg.profile)
    if not p.offline:
        from .hub_data import load_hub_dataset

        name = p.hub_datasets["sft"]
        rows = load_hub_dataset("alpaca", name, "train", p.world.sft_examples + cfg.eval_examples, errors="skip").records
        return rows[cfg.eval_examples:], rows[: cfg.eval_examples]
    from .world import sft_examples

    if cfg.prompt_templates == "one":  # phrasing 0 only: draw more and keep those
        train = [r for r in sft_examples(p.seed, 5 * p.world.sft_examples, "train") if r["meta"]["template_id"] == 0]
        train = train[: p.world.sft_examples]
    else:
        train = sft_examples(p.seed, p.world.sft_examples, "train")
    return train, sft_examples(p.seed, cfg.eval_examples, "test")


# --- loss and training ---------------------------------------------------------------------------------


def sft_loss_sum(model, batch: dict) -> tuple[torch.Tensor, torch.Tensor]:
    """(sum of token losses, count) over labelled tokens; labels are unshifted (transformers' convention)."""
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits  # (B, T, V)
    return token_loss_sum(logits[:, :-1], batch["labels"][:, 1:])  # position t predicts token t+1


def sft_loss(model, batch: dict) -> torch.Tensor:
    """Masked mean cross-entropy over the assistant tokens (what TRL's SFTTrainer computes)."""
    s, n = sft_loss_sum(model, batch)
    return s / n.clamp(min=1)


def train(cfg: SFTConfig, model, tokenizer, examples: list, out_dir=None, resume: bool = False,
          stop_at: int | None = None, tracker=None) -> dict:
    """Fine-tune ``model`` in place on encoded ``examples`` (right-padded batches)."""
    cfg.validate()
    pad = require_pad_token(tokenizer)
    sampler = step_sampler([len(e.input_ids) for e in examples], cfg.batch_size, cfg.seed, cfg.group_by_length)

    def micro_batches(step: int) -> list[dict]:
        return [pad_batch([examples[i] for i in sampler.indices(step * cfg.grad_accum + k)], pad, "right")
                for k in range(cfg.grad_accum)]

    cfg = effective_config(cfg)
    return training.fit(cfg, model, micro_batches, sft_loss_sum, lambda b: int((b["labels"][:, 1:] != -100).sum()),
                        None, out_dir, resume, stop_at, tracker, desc=f"sft[{cfg.chat_format}]")


# --- parameter-efficient variants (chapter 04) ----------------------------------------------------------


def effective_config(cfg: SFTConfig) -> SFTConfig:
    """The config the loop runs: with ``peft`` on, ``lora_lr`` / ``lora_steps`` (when set) replace ``lr`` / ``max_steps``."""
    if cfg.peft == "none":
        return cfg
    return replace(cfg, lr=cfg.lora_lr or cfg.lr, max_steps=cfg.lora_steps or cfg.max_steps)


def apply_peft(model, cfg: SFTConfig, tokenizer=None):
    """The model the stage trains: ``model`` itself, or a PEFT LoRA model over a frozen (or 4-bit) copy of it.

    ``qlora`` re-loads the same weights through transformers' ``BitsAndBytesConfig`` (NF4, double
    quantization, compute dtype fp32 on CPU / bf16 on a bf16 GPU), then runs PEFT's
    ``prepare_model_for_kbit_training`` (norms and embeddings to fp32, input gradients on) before adding
    LoRA. ``model`` is never modified in that case; for ``qlora`` it may also be a saved folder or a hub id,
    so that a large base is never materialised in full precision.
    """
    if cfg.peft == "none":
        return model
    from peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training

    if cfg.peft == "qlora":
        from .quant import load_4bit

        if isinstance(model, (str, Path)):  # a saved folder or a hub id: quantized while loading, never in full precision
            device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        else:
            device = next(model.parameters()).device
        dtype = training.resolve_precision(cfg.precision, device) or torch.float32
        model = load_4bit(model, compute_dtype=dtype, device_map=str(device))
        # gradient checkpointing trades compute for activation memory; the tiny model does not need it
        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=False)
    # The chat markers (<|im_start|>, <|im_end|>, EOS) never occur in pretraining text, so their embedding rows
    # (tied to the output layer) are still random. LoRA on the Linear layers cannot fix a row of the embedding:
    # the model cannot learn to *predict* <|im_end|> and EOS. PEFT's trainable_token_indices trains just those rows.
    tokens = _chat_token_ids(tokenizer) if cfg.lora_train_tokens and tokenizer is not None else None
    lora = LoraConfig(r=cfg.lora_r, lora_alpha=cfg.lora_alpha, lora_dropout=cfg.lora_dropout,
                      target_modules=cfg.target_modules(), task_type="CAUSAL_LM", trainable_token_indices=tokens)
    try:
        with torch.random.fork_rng(devices=[]):  # A's random init depends on cfg.seed only, not on what ran before
            torch.manual_seed(cfg.seed)
            return get_peft_model(model, lora)
    except ValueError as e:  # PEFT's message for targets that match nothing
        raise ConfigError(f"lora_targets={cfg.lora_targets!r}: {e}") from e


def _chat_token_ids(tokenizer) -> list[int]:
    """Ids of the special tokens a chat format writes: BOS, EOS, <|im_start|>, <|im_end|> (those the vocabulary has)."""
    ids = {tokenizer.bos_token_id, tokenizer.eos_token_id}
    vocab = tokenizer.get_vocab()
    ids |= {vocab[t] for t in (IM_START, IM_END) if t in vocab}
    return sorted(i for i in ids if i is not None)


def merged_model(trained, cfg: SFTConfig, full_precision_base=None):
    """A plain model with the LoRA update folded in, for saving and for the later stages.

    LoRA: merge into the frozen base (``merge_and_unload``). QLoRA: the trained adapter is merged into
    the *full-precision* base it was quantized from (what practitioners ship), not into the 4-bit weights;
    that base is modified in place and returned.
    """
    if cfg.peft == "none":
        return trained
    if cfg.peft == "lora":
        return trained.merge_and_unload()
    if full_precision_base is None:
        raise ConfigError("merging a QLoRA adapter needs the full-precision base model it was trained on")
    import copy

    from peft import get_peft_model, get_peft_model_state_dict, set_peft_model_state_dict

    # the same adapter layout (targets, rank, token rows) on the fp32 base, then the trained values
    fresh = get_peft_model(full_precision_base, copy.deepcopy(trained.peft_config["default"]))
    set_peft_model_state_dict(fresh, get_peft_model_state_dict(trained))
    return fresh.merge_and_unload()


# --- evaluation ----------------------------------------------------------------------------------------


@torch.no_grad()
def generate_answers(model, tokenizer, records: list[dict], fmt: str = "chatml", max_new_tokens: int = 40,
                     batch_size: int = 64, padding_side: str = "left") -> list[dict]:
    """Greedy answers to each record's prompt, batched. Returns {"text", "stopped", "raw"} per record.

    ``padding_side="right"`` is here to show the bug: with right padding, a short prompt's last
    position is a pad token, and generation continues from the padding instead of from the prompt.
    """
    model.eval()
    device = next(model.parameters()).device
    pad = require_pad_token(tokenizer)
    prompts = [render(to_messages(r, i)[:-1], tokenizer, fmt, add_generation_prompt=True)[0] for i, r in enumerate(records)]
    out = []
    for start in range(0, len(prompts), batch_size):
        chunk = prompts[start : start + batch_size]
        ids = [tokenizer(p, add_special_tokens=False)["input_ids"] for p in chunk]
        x, mask = pad_ids(ids, pad, padding_side)
        T = x.size(1)
        limit = getattr(model.config, "max_position_embeddings", T + max_new_tokens)
        gen = model.generate(input_ids=x.to(device), attention_mask=mask.to(device), do_sample=False,
                             max_new_tokens=max(1, min(max_new_tokens, limit - T)), eos_token_id=tokenizer.eos_token_id,
                             pad_token_id=pad)
        for row in gen[:, T:].tolist():
            stopped = tokenizer.eos_token_id in row
            row = row[: row.index(tokenizer.eos_token_id)] if stopped else row
            row = [t for t in row if t != pad]
            raw = tokenizer.decode(row, skip_special_tokens=False)
            out.append({"text": tokenizer.decode(row, skip_special_tokens=True).strip(), "stopped": stopped, "raw": raw})
    return out


def follows_format(answer: dict, fmt: str) -> bool:
    """Stopped with EOS, closed its turn the way the template does, and did not start a new turn."""
    raw = answer["raw"]
    if not answer["stopped"] or IM_START in raw or "### Instruction" in raw or "### Response" in raw:
        return False
    return raw.rstrip().endswith(IM_END) if fmt == "chatml" else IM_END not in raw


def evaluate(model, tokenizer, records: list[dict], cfg: SFTConfig, fmt: str | None = None) -> dict:
    """Accuracy (ground-truth judge), mean true score, format compliance, per held-out phrasing."""
    from .world import score_response

    fmt = fmt or cfg.chat_format
    answers = generate_answers(model, tokenizer, records, fmt, cfg.max_new_tokens)
    fmt_ok = [follows_format(a, fmt) for a in answers]
    result = {"format_compliance": sum(fmt_ok) / len(fmt_ok), "stopped_with_eos": sum(a["stopped"] for a in answers) / len(answers),
              "n": len(records), "answers": [a["text"] for a in answers]}
    judged = [(r, a) for r, a in zip(records, answers) if r.get("meta", {}).get("accept") is not None
              and r.get("family") != "alpaca"]
    if judged:  # the tiny world knows the right answers; real alpaca data does not
        scores = [score_response(r["meta"], a["text"]) for r, a in judged]
        result["accuracy"] = sum(s.correct for s in scores) / len(scores)
        result["true_score"] = sum(s.total for s in scores) / len(scores)
        held = [s.correct for (r, _), s in zip(judged, scores) if r["meta"]["template_id"] == 4]
        seen = [s.correct for (r, _), s in zip(judged, scores) if r["meta"]["template_id"] != 4]
        result["accuracy_unseen_phrasing"] = sum(held) / max(1, len(held))
        result["accuracy_seen_phrasing"] = sum(seen) / max(1, len(seen))
        families = sorted({r["family"] for r, _ in judged})
        result["accuracy_by_family"] = {f: sum(s.correct for (r, _), s in zip(judged, scores) if r["family"] == f)
                                        / sum(r["family"] == f for r, _ in judged) for f in families}
    return result


# --- the stage -----------------------------------------------------------------------------------------


def main(cfg: SFTConfig | None = None, out_dir=None, tracker=None, log=print, base=None) -> dict:
    """Run the SFT stage from the pretrained base; save ``<out_dir>/final``. Returns metrics."""
    from .checkpoint import save_checkpoint
    from .stages import load_stage, stage_dir

    cfg = cfg or SFTConfig.for_profile()
    cfg.validate()
    p = get_profile(cfg.profile)
    out_dir = Path(out_dir) if out_dir else stage_dir("sft", p)
    t0 = time.perf_counter()
    model, tokenizer = base if base is not None else load_stage("base", p)
    train_records, eval_records = build_records(cfg)
    examples, counts = encode_records(train_records, tokenizer, cfg)
    n_tokens = sum(len(e.input_ids) for e in examples)
    log(f"  SFT data: {len(examples)} conversations ({n_tokens / len(examples):.0f} tokens on average), "
        f"format {cfg.chat_format}, prompt templates: {cfg.prompt_templates}; truncated {counts['truncated']}, "
        f"dropped {counts['dropped']}")
    before = evaluate(model, tokenizer, eval_records, cfg)
    log(f"  base model on {len(eval_records)} held-out prompts: " + _summary(before))
    trained = apply_peft(model, cfg, tokenizer)
    trainable, total = _trainable(trained)
    if cfg.peft != "none":
        log(f"  {cfg.peft}: r={cfg.lora_r}, alpha={cfg.lora_alpha}, targets {cfg.lora_targets}; "
            f"{trainable:,} of {total:,} parameters trainable ({trainable / total:.2%})")
    result = train(cfg, trained, tokenizer, examples, tracker=tracker)
    after = evaluate(trained, tokenizer, eval_records, cfg)
    log(f"  after {result['steps']} SFT steps ({result['seconds']:.0f} s): " + _summary(after))
    model = merged_model(trained, cfg, full_precision_base=model)
    save_checkpoint(out_dir / "final", model, step=result["steps"], tokenizer=tokenizer,
                    state={"history": result["history"], "config": asdict(cfg)})
    samples = [{"prompt": r["prompt"] if "prompt" in r else to_messages(r, i)[-2]["content"],
                "before": b, "after": a}
               for i, (r, b, a) in enumerate(zip(eval_records[:6], before["answers"], after["answers"]))]
    strip = lambda d: {k: v for k, v in d.items() if k != "answers"}  # noqa: E731
    return {"before": strip(before), "after": strip(after), "data": counts, "train_conversations": len(examples),
            "steps": result["steps"], "final_train_loss": result["final_loss"], "peft": cfg.peft,
            "trainable_parameters": trainable, "total_parameters": total, "history": result["history"],
            "tokens_per_s": result["tokens_per_s"], "train_seconds": result["seconds"],
            "seconds": time.perf_counter() - t0, "samples": samples,
            "checkpoint": str(out_dir / "final"), "config": asdict(cfg)}


def _trainable(model) -> tuple[int, int]:
    """(trainable, total) parameters, tied tensors once, 4-bit packed weights counted as weights."""
    from .lora import trainable_parameters

    return trainable_parameters(model)


def _summary(ev: dict) -> str:
    parts = [f"format compliance {ev['format_compliance']:.0%}"]
    if "accuracy" in ev:
        parts = [f"accuracy {ev['accuracy']:.0%} (unseen phrasing {ev['accuracy_unseen_phrasing']:.0%})",
                 f"true score {ev['true_score']:.2f}"] + parts
    return ", ".join(parts)
