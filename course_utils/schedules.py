"""Learning-rate schedules (学习率调度): the multiplier of the peak learning rate at each optimizer step.

Every function here maps ``step`` = the number of optimizer steps already taken (0 for the first update) to a
factor in [0, 1], with the conventions of transformers' ``get_*_schedule_with_warmup`` (tests check them step by
step): linear warmup from 0 at step 0 to 1 at ``warmup_steps``, then

==========  ====================================================================================
constant    1 until the end (warmup only)
linear      straight down to ``min_ratio`` at ``total_steps``
cosine      half a cosine down to ``min_ratio`` (the seed's "warmup + cosine")
wsd         warmup-stable-decay: 1 for most of the run, then a short cosine decay over the last
            ``decay_fraction`` of the steps (restartable: a longer run just extends the stable phase)
==========  ====================================================================================

transformers' schedulers give factor 0 at step 0, so the first optimizer step does not move the weights. The
course's training loop (:func:`course_utils.training.warmup_cosine`) takes the warmup one step earlier and never
spends a step at learning rate 0; after warmup the two are identical.
"""

from __future__ import annotations

import math

import torch

from .errors import ConfigError

SCHEDULES = ("constant", "linear", "cosine", "wsd")


def check_schedule(warmup_steps: int, total_steps: int, min_ratio: float = 0.0) -> None:
    if total_steps < 1:
        raise ConfigError(f"total_steps must be >= 1, got {total_steps}")
    if not 0 <= warmup_steps < total_steps:
        raise ConfigError(f"warmup_steps={warmup_steps} must be >= 0 and shorter than total_steps={total_steps}: "
                          "a warmup longer than training never reaches the peak learning rate")
    if not 0.0 <= min_ratio <= 1.0:
        raise ConfigError(f"min_ratio must be in [0, 1], got {min_ratio}")


def _warmup(step: int, warmup_steps: int) -> float:
    return step / max(1, warmup_steps)


def constant(step: int, warmup_steps: int, total_steps: int, min_ratio: float = 0.0) -> float:
    return _warmup(step, warmup_steps) if step < warmup_steps else 1.0


def linear(step: int, warmup_steps: int, total_steps: int, min_ratio: float = 0.0) -> float:
    if step < warmup_steps:
        return _warmup(step, warmup_steps)
    remaining = max(0.0, (total_steps - step) / max(1, total_steps - warmup_steps))
    return min_ratio + (1 - min_ratio) * remaining


def cosine(step: int, warmup_steps: int, total_steps: int, min_ratio: float = 0.0) -> float:
    if step < warmup_steps:
        return _warmup(step, warmup_steps)
    progress = min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))  # stays at the floor after the end
    return max(0.0, min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * progress)))


def wsd(step: int, warmup_steps: int, total_steps: int, min_ratio: float = 0.0, decay_fraction: float = 0.2) -> float:
    """Warmup-stable-decay with transformers' ``get_wsd_schedule`` conventions (warmup rises from ``min_ratio``)."""
    decay_steps = max(1, round(decay_fraction * total_steps))
    stable_end = total_steps - decay_steps
    if step < warmup_steps:
        return min_ratio + (1 - min_ratio) * _warmup(step, warmup_steps)
    if step < stable_end:
        return 1.0
    if step < total_steps:
        progress = (step - stable_end) / decay_steps
        return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * progress))
    return min_ratio


def get(name: str):
    """The schedule function called ``name``."""
    if name not in SCHEDULES:
        raise ConfigError(f"unknown schedule {name!r}; choose one of {SCHEDULES}")
    return globals()[name]


def factors(name: str, warmup_steps: int, total_steps: int, min_ratio: float = 0.0) -> list[float]:
    """The multiplier at steps 0 .. total_steps - 1 (what each optimizer step uses)."""
    check_schedule(warmup_steps, total_steps, min_ratio)
    fn = get(name)
    return [fn(s, warmup_steps, total_steps, min_ratio) for s in range(total_steps)]


def lambda_lr(optimizer: torch.optim.Optimizer, name: str, warmup_steps: int, total_steps: int,
              min_ratio: float = 0.0) -> torch.optim.lr_scheduler.LambdaLR:
    """A torch scheduler for ``optimizer``: call ``scheduler.step()`` after each ``optimizer.step()``."""
    check_schedule(warmup_steps, total_steps, min_ratio)
    fn = get(name)
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: fn(s, warmup_steps, total_steps, min_ratio))
