"""Training-loop building blocks shared by every stage (pretraining, SFT, reward, ...).

The loop itself is short on purpose; each piece below is one idea:

* :func:`warmup_cosine` — the learning-rate schedule (linear warmup, cosine decay);
* :func:`make_optimizer` — AdamW with weight decay only on matrices;
* :func:`autocast` — bf16 mixed precision where the device supports it;
* :func:`optimizer_step` — accumulate, clip the global gradient norm, step.
"""

from __future__ import annotations

import contextlib
import math

import torch

from .errors import ConfigError

PRECISIONS = ("auto", "fp32", "bf16")


def warmup_cosine(step: int, warmup_steps: int, total_steps: int, min_ratio: float = 0.1) -> float:
    """LR multiplier at ``step`` (0-based): 0→1 linearly over ``warmup_steps``, then cosine 1→``min_ratio``.

    Warmup keeps the first updates small while Adam's second-moment estimates are still
    noisy (big early steps are a classic cause of loss spikes and NaNs); the cosine tail
    lets the model settle into a minimum with small final steps.
    """
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    progress = min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))
    return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * progress))


def make_optimizer(model: torch.nn.Module, lr: float, weight_decay: float, betas=(0.9, 0.95)) -> torch.optim.AdamW:
    """AdamW; decay applies to weight matrices only (not to norms' gains or biases)."""
    params = [p for p in model.parameters() if p.requires_grad]
    # dict.fromkeys de-duplicates tied parameters while keeping order
    params = list(dict.fromkeys(params))
    decay = [p for p in params if p.dim() >= 2]
    no_decay = [p for p in params if p.dim() < 2]
    groups = [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=lr, betas=betas)


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
