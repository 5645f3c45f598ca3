"""Optimizers (优化器) side by side: AdamW, LAMB, Adafactor, 8-bit AdamW (and SGD as the baseline).

==============  ===========================================  =================================================
name            from                                         state per parameter
==============  ===========================================  =================================================
``sgd``         ``torch.optim.SGD`` (momentum 0.9)            momentum: 4 bytes
``adamw``       ``torch.optim.AdamW``                         1st and 2nd moments: 8 bytes
``lamb``        ``pytorch_optimizer.Lamb``                    as AdamW, plus a per-tensor trust ratio
``lamb_own``    :class:`Lamb` below, tested against it        as AdamW
``adafactor``   ``transformers.Adafactor``                    2nd moment factored into row and column sums
``adamw8bit``   ``bitsandbytes.optim.AdamW8bit``              both moments in 8 bits, block-wise scaled: ≈2 bytes
==============  ===========================================  =================================================

Every optimizer gets the same two parameter groups (:func:`course_utils.training.decay_groups`): weight decay on
matrices only, and the same betas where the algorithm has them.
"""

from __future__ import annotations

import torch

from .errors import ConfigError
from .training import decay_groups

OPTIMIZERS = ("sgd", "adamw", "lamb", "lamb_own", "adafactor", "adamw8bit")
BETAS = (0.9, 0.95)


class Lamb(torch.optim.Optimizer):
    """LAMB (You et al., 2019, "Large Batch Optimization for Deep Learning"): Adam's direction, rescaled per tensor.

    Adam's step is the same size for a tensor with tiny weights as for one with huge weights. LAMB multiplies each
    tensor's update by the *trust ratio* ‖w‖ / ‖update‖, so every layer moves by about ``lr`` times its own norm.
    That is what lets BERT train with batches of 32k. Same choices as ``pytorch_optimizer.Lamb``'s defaults (the
    tests compare the two step by step): decoupled weight decay applied first, bias correction on the first moment
    only, ‖w‖ clamped at 10, a trust ratio of 1 where either norm is 0.
    """

    def __init__(self, params, lr: float = 1e-3, betas=(0.9, 0.999), eps: float = 1e-6, weight_decay: float = 0.0,
                 max_weight_norm: float = 10.0):
        if lr <= 0:
            raise ConfigError(f"lr must be > 0, got {lr}")
        super().__init__(params, dict(lr=lr, betas=betas, eps=eps, weight_decay=weight_decay,
                                      max_weight_norm=max_weight_norm))

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            beta1, beta2 = group["betas"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                state = self.state[p]
                if not state:
                    state["step"] = 0
                    state["exp_avg"] = torch.zeros_like(p)
                    state["exp_avg_sq"] = torch.zeros_like(p)
                state["step"] += 1
                m, v = state["exp_avg"], state["exp_avg_sq"]
                m.lerp_(p.grad, 1 - beta1)  # m = β1·m + (1-β1)·g
                v.mul_(beta2).addcmul_(p.grad, p.grad, value=1 - beta2)
                p.mul_(1 - group["lr"] * group["weight_decay"])  # decoupled decay
                update = m / (v.sqrt() + group["eps"])
                w_norm = p.norm().clamp(max=group["max_weight_norm"])
                u_norm = update.norm()
                trust = w_norm / (u_norm + group["eps"]) if w_norm > 0 and u_norm > 0 else 1.0
                p.add_(update, alpha=-float(group["lr"] / (1 - beta1 ** state["step"]) * trust))
        return loss


def make(name: str, model: torch.nn.Module, lr: float, weight_decay: float = 0.0) -> torch.optim.Optimizer:
    """The optimizer ``name`` over ``model``'s trainable parameters (decay on matrices only)."""
    if name not in OPTIMIZERS:
        raise ConfigError(f"unknown optimizer {name!r}; choose one of {OPTIMIZERS}")
    if not lr > 0:
        raise ConfigError(f"lr must be > 0, got {lr}")
    groups = decay_groups(model, weight_decay)
    if name == "sgd":
        return torch.optim.SGD(groups, lr=lr, momentum=0.9)
    if name == "adamw":
        return torch.optim.AdamW(groups, lr=lr, betas=BETAS)
    if name == "lamb":
        from pytorch_optimizer import Lamb as LibraryLamb

        return LibraryLamb(groups, lr=lr, betas=BETAS)
    if name == "lamb_own":
        return Lamb(groups, lr=lr, betas=BETAS)
    if name == "adafactor":
        from transformers.optimization import Adafactor

        # a fixed learning rate like the others (relative_step=False), no first moment (beta1=None): the
        # memory-saving configuration T5 was trained with
        return Adafactor(groups, lr=lr, scale_parameter=False, relative_step=False, warmup_init=False, beta1=None)
    import bitsandbytes as bnb

    return bnb.optim.AdamW8bit(groups, lr=lr, betas=BETAS)


def state_bytes(optimizer: torch.optim.Optimizer) -> dict:
    """Bytes of optimizer state: in all, and per parameter tensor (after at least one ``step()``; states are lazy).

    Tensors shared between parameters (bitsandbytes' quantisation maps) are counted once.
    """
    seen, per_param = set(), {}
    for p, st in optimizer.state.items():
        n = 0
        for v in st.values():
            if torch.is_tensor(v) and v.numel() and (v.data_ptr(), v.numel()) not in seen:
                seen.add((v.data_ptr(), v.numel()))
                n += v.numel() * v.element_size()
        per_param[p] = n
    return {"total": sum(per_param.values()), "per_param": per_param}


def state_bytes_per_parameter(optimizer: torch.optim.Optimizer, min_numel: int = 0) -> float:
    """Optimizer-state bytes divided by parameter count, over parameter tensors with at least ``min_numel`` values."""
    per = state_bytes(optimizer)["per_param"]
    chosen = [p for p in per if p.numel() >= min_numel]
    return sum(per[p] for p in chosen) / max(1, sum(p.numel() for p in chosen))
