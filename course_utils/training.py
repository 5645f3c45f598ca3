"""Training-loop building blocks shared by every stage (pretraining, SFT, reward, ...).

The loop itself is short on purpose; each piece below is one idea:

* :func:`warmup_cosine` — the learning-rate schedule (linear warmup, cosine decay);
* :func:`make_optimizer` — AdamW with weight decay only on matrices;
* :func:`autocast` — bf16 mixed precision where the device supports it;
* :func:`optimizer_step` — accumulate, clip the global gradient norm, step.
"""

from __future__ import annotations

import contextlib
import shutil
import sys
import time
from dataclasses import asdict
from pathlib import Path

import torch
from tqdm import tqdm

from . import schedules
from .checkpoint import latest_checkpoint, load_checkpoint, save_checkpoint
from .errors import ConfigError

PRECISIONS = ("auto", "fp32", "bf16")


def warmup_cosine(step: int, warmup_steps: int, total_steps: int, min_ratio: float = 0.1) -> float:
    """LR multiplier at ``step`` (0-based): 0→1 linearly over ``warmup_steps``, then cosine 1→``min_ratio``.

    Warmup keeps the first updates small while Adam's second-moment estimates are still
    noisy (big early steps are a classic cause of loss spikes and NaNs); the cosine tail
    lets the model settle into a minimum with small final steps. During warmup this runs one
    step ahead of transformers' schedule (:mod:`course_utils.schedules`), so no update is spent
    at learning rate 0; after warmup the two are the same.
    """
    return schedules.cosine(step + 1 if step < warmup_steps else step, warmup_steps, total_steps, min_ratio)


def decay_groups(model: torch.nn.Module, weight_decay: float) -> list[dict]:
    """Two parameter groups: weight matrices decay, norms' gains and biases do not (decaying them only hurts)."""
    # dict.fromkeys de-duplicates tied parameters while keeping order
    params = list(dict.fromkeys(p for p in model.parameters() if p.requires_grad))
    return [{"params": [p for p in params if p.dim() >= 2], "weight_decay": weight_decay},
            {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0}]


def make_optimizer(model: torch.nn.Module, lr: float, weight_decay: float, betas=(0.9, 0.95)) -> torch.optim.AdamW:
    """AdamW; decay applies to weight matrices only (not to norms' gains or biases)."""
    return torch.optim.AdamW(decay_groups(model, weight_decay), lr=lr, betas=betas)


def resolve_precision(precision: str, device: torch.device) -> torch.dtype | None:
    """The autocast dtype for ``precision`` on ``device``, or None for plain fp32."""
    if precision not in PRECISIONS:
        raise ConfigError(f"precision must be one of {PRECISIONS}, got {precision!r}")
    if precision == "fp32":
        return None
    if precision == "bf16":
        return torch.bfloat16
    # auto: bf16 only where it is fast (Ampere+ GPUs); on CPU fp32 is faster for tiny models
    if device.type == "cuda" and torch.cuda.is_bf16_supported():
        return torch.bfloat16
    return None


def autocast(device: torch.device, dtype: torch.dtype | None):
    """bf16 autocast: matmuls run in bf16, reductions and the loss stay fp32. No loss scaling needed
    (bf16 has fp32's exponent range, unlike fp16)."""
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=dtype)


def validate_optim(cfg, positive=("batch_size", "grad_accum", "max_steps")) -> None:
    """Checks every stage config shares: positive sizes, warmup shorter than training, a known precision."""
    for name in positive:
        if getattr(cfg, name) < 1:
            raise ConfigError(f"{name} must be >= 1, got {getattr(cfg, name)}")
    if cfg.warmup_steps >= cfg.max_steps:
        raise ConfigError(f"warmup_steps={cfg.warmup_steps} must be < max_steps={cfg.max_steps}")
    resolve_precision(cfg.precision, torch.device("cpu"))


def set_lr(optimizer: torch.optim.Optimizer, lr: float) -> None:
    for group in optimizer.param_groups:
        group["lr"] = lr


def optimizer_step(model: torch.nn.Module, optimizer: torch.optim.Optimizer, grad_clip: float | None) -> float:
    """Clip the *global* gradient norm (all parameters as one vector), step, zero grads. Returns the pre-clip norm."""
    params = [p for p in model.parameters() if p.grad is not None]
    if grad_clip:
        norm = torch.nn.utils.clip_grad_norm_(params, grad_clip)
    else:
        norm = torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(p.grad) for p in params]))
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return float(norm)


def default_device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


# --- the loop every stage shares ------------------------------------------------------------------


def fit(cfg, model, micro_batches, loss_sum, count, evaluate=None, out_dir=None, resume: bool = False,
        stop_at: int | None = None, tracker=None, desc: str = "train") -> dict:
    """Train ``model`` in place for ``cfg.max_steps`` optimizer steps; return the run's summary.

    ``micro_batches(step)`` returns the ``cfg.grad_accum`` micro-batches (dicts of CPU tensors) of
    optimizer step ``step``; it must depend only on ``step`` so that a resumed run sees the same data.
    ``loss_sum(model, batch)`` returns (sum of token losses, token count); ``count(batch)`` the count
    alone, known before the forward pass. Each micro-batch's sum is divided by the count of the *whole*
    step, so accumulation gives exactly the gradient of one big batch.
    ``evaluate(model, dtype)`` returns held-out metrics, logged every ``cfg.eval_every`` steps.

    ``stop_at=k`` saves a checkpoint after step k and returns (as if the machine stopped);
    ``resume=True`` continues from the latest checkpoint in ``out_dir`` exactly where it stopped.
    ``cfg`` needs: lr, min_lr_ratio, warmup_steps, max_steps, weight_decay, grad_clip, grad_accum,
    precision, log_every, eval_every, ckpt_every, progress.
    """
    device = next(model.parameters()).device
    dtype = resolve_precision(cfg.precision, device)
    optimizer = make_optimizer(model, cfg.lr, cfg.weight_decay)
    out_dir = Path(out_dir) if out_dir else None
    if (resume or stop_at or cfg.ckpt_every) and out_dir is None:
        raise ConfigError("checkpointing (resume / stop_at / ckpt_every) needs an out_dir")
    step, history = 0, []
    if resume and (ckpt := latest_checkpoint(out_dir)) is not None:
        state = load_checkpoint(ckpt, model, optimizer)
        step, history = state["step"], state.get("history", [])
    last = stop_at if stop_at is not None else cfg.max_steps
    model.train()
    bar = tqdm(total=last, initial=step, desc=desc, file=sys.stdout, ncols=100, disable=not cfg.progress,
               mininterval=1.0)
    tokens, t0, eval_seconds, loss_value = 0, time.perf_counter(), 0.0, float("nan")
    while step < last:
        set_lr(optimizer, cfg.lr * warmup_cosine(step, cfg.warmup_steps, cfg.max_steps, cfg.min_lr_ratio))
        batches = micro_batches(step)
        n_total = max(1, sum(count(b) for b in batches))  # label count of the whole step
        step_loss = 0.0
        for b in batches:
            b = {k: (v.to(device) if torch.is_tensor(v) else v) for k, v in b.items()}
            with autocast(device, dtype):
                s, _ = loss_sum(model, b)
            (s / n_total).backward()
            step_loss += s.item()
            tokens += b["input_ids"].numel()
        grad_norm = optimizer_step(model, optimizer, cfg.grad_clip)
        loss_value = step_loss / n_total
        step += 1
        bar.update(1)
        do_eval = evaluate is not None and cfg.eval_every and (step % cfg.eval_every == 0 or step == cfg.max_steps)
        if do_eval or step % cfg.log_every == 0 or step == last:
            row = {"loss": loss_value, "lr": optimizer.param_groups[0]["lr"], "grad_norm": grad_norm,
                   "tokens_per_s": tokens / (time.perf_counter() - t0 - eval_seconds)}
            if do_eval:
                t_eval = time.perf_counter()
                row.update(evaluate(model, dtype))
                model.train()
                eval_seconds += time.perf_counter() - t_eval  # throughput counts training time only
            history.append({"step": step, **row})
            bar.set_postfix(loss=f"{loss_value:.3f}")
            if tracker is not None:
                tracker.log(row, step)
        if out_dir is not None and ((cfg.ckpt_every and step % cfg.ckpt_every == 0) or step == stop_at):
            _save_step(out_dir, model, optimizer, step, {"history": history, "config": asdict(cfg)})
    bar.close()
    elapsed = time.perf_counter() - t0 - eval_seconds
    return {"final_loss": loss_value, "steps": step, "history": history,
            "tokens_per_s": tokens / elapsed if elapsed > 0 else float("nan"), "seconds": elapsed}


def _save_step(out_dir, model, optimizer, step: int, state: dict, keep: int = 2):
    """Save ``out_dir/step_NNNNNN`` and delete all but the ``keep`` newest step folders."""
    path = save_checkpoint(out_dir / f"step_{step:06d}", model, optimizer, step, state)
    for old in sorted(out_dir.glob("step_*"), key=lambda p: int(p.name.split("_")[1]))[:-keep]:
        shutil.rmtree(old)
    return path
