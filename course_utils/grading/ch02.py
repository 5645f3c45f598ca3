"""Checks for chapter 02 — pretraining the tiny model (预训练, part II)."""

from __future__ import annotations

import copy

import torch

from ..training import warmup_cosine
from .core import Failure, task


@task("02", "2.1", "lr_at", "Linear warmup + cosine decay", "warm-up",
      hint="step is 0-based: warmup gives peak*(step+1)/warmup_steps; then cosine from peak to peak*min_ratio "
           "over the remaining total_steps - warmup_steps steps")
def check_lr_at(lr_at):
    for peak, W, N, m in ((1.0, 10, 100, 0.1), (3e-4, 5, 37, 0.0), (1e-3, 1, 10, 0.5), (2.0, 50, 51, 0.1)):
        for step in sorted({0, 1, W - 1, W, W + 1, (W + N) // 2, N - 1, N, N + 5}):
            expected = peak * warmup_cosine(step, W, N, m)
            got = lr_at(step, peak, W, N, m)
            if abs(float(got) - expected) > 1e-9 * max(1.0, peak):
                raise Failure(f"lr_at(step={step}, peak={peak}, warmup={W}, total={N}, min_ratio={m}): "
                              f"expected {expected:.6g}, got {float(got):.6g}")


def _grads(seed: int, shapes=((4, 3), (3,), (2, 2))) -> list[torch.nn.Parameter]:
    g = torch.Generator().manual_seed(seed)
    params = []
    for s in shapes:
        p = torch.nn.Parameter(torch.zeros(s))
        p.grad = torch.randn(s, generator=g) * (seed % 3 + 1)
        params.append(p)
    return params


@task("02", "2.2", "clip_grad_global_norm", "Clip gradients by their global norm", "core",
      hint="the norm of ALL gradients as one vector: sqrt(sum of every squared entry); scale every grad by "
           "max_norm / norm only when norm > max_norm; return the norm measured before clipping")
def check_clip(clip_grad_global_norm):
    for seed in range(6):
        for max_norm in (0.5, 1.0, 100.0):
            ours, ref = _grads(seed), _grads(seed)
            got = clip_grad_global_norm(ours, max_norm)
            expected = torch.nn.utils.clip_grad_norm_(ref, max_norm)
            if abs(float(got) - float(expected)) > 1e-5 * float(expected):
                raise Failure(f"returned norm {float(got):.6f}, expected the pre-clip global norm {float(expected):.6f}")
            for i, (a, b) in enumerate(zip(ours, ref)):
                if not torch.allclose(a.grad, b.grad, rtol=1e-5, atol=1e-7):
                    raise Failure(f"max_norm={max_norm}: gradient {i} differs from torch.nn.utils.clip_grad_norm_ "
                                  f"(norm after clipping: yours {torch.linalg.vector_norm(torch.cat([p.grad.flatten() for p in ours])):.4f}, "
                                  f"expected {min(max_norm, float(expected)):.4f})")
    no_grad = torch.nn.Parameter(torch.zeros(2))  # a frozen or unused parameter has grad None
    params = [*_grads(1), no_grad]
    clip_grad_global_norm(params, 1.0)
    if no_grad.grad is not None:
        raise Failure("a parameter whose grad is None must be skipped, not given a gradient")


def _toy_model(seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Linear(6, 16), torch.nn.Dropout(0.3), torch.nn.ReLU(), torch.nn.Linear(16, 1))


def _steps(model, opt, n: int) -> list[float]:
    losses = []
    for _ in range(n):
        x = torch.randn(8, 6)  # drawn from the global RNG, like dropout: both must be restored
        loss = model(x).pow(2).mean()
        loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(loss.item())
    return losses


@task("02", "2.3", ("capture_state", "restore_state"), "Save and restore everything a resume needs", "stretch",
      hint="a resume needs the weights, the optimizer state (AdamW moments, step counts) and the RNG state; "
           "capture copies (copy.deepcopy or .clone()), not references that later training would change")
def check_resume(capture_state, restore_state):
    model = _toy_model()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    _steps(model, opt, 3)
    state = capture_state(model, opt)
    expected = _steps(model, opt, 4)  # what happens after the capture point
    _steps(model, opt, 2)  # wander off further
    restore_state(state, model, opt)
    got = _steps(model, opt, 4)
    if got != expected:
        first = next(i for i, (a, b) in enumerate(zip(got, expected)) if a != b)
        raise Failure(f"after restore, step {first + 1} gave loss {got[first]:.6f}; the original run gave "
                      f"{expected[first]:.6f}. Something that shapes training was not restored (weights? AdamW state? RNG?)")
    # restoring into a fresh model and optimizer must work too (that is what a resumed process has)
    fresh = _toy_model(seed=5)
    fresh_opt = torch.optim.AdamW(fresh.parameters(), lr=1e-2)
    restore_state(state, fresh, fresh_opt)
    if _steps(fresh, fresh_opt, 4) != expected:
        raise Failure("restoring into a fresh model and optimizer did not reproduce the run")
    state_copy = copy.deepcopy(state)
    _steps(fresh, fresh_opt, 2)
    restore_state(state_copy, fresh, fresh_opt)
    if _steps(fresh, fresh_opt, 4) != expected:
        raise Failure("the captured state changed after more training: capture copies, not references")
