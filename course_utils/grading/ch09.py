"""Checks for chapter 09 — hyper-parameters and optimizers (调参策略): the warmup + cosine schedule (学习率预热,
余弦退火), global-norm gradient clipping (梯度裁剪), one AdamW update (权重衰减 decoupled weight decay), and an early-
stopping rule (早停).

Every reference is the library's own: transformers' ``get_cosine_with_min_lr_schedule_with_warmup``, read off a
real optimizer (9.1); ``torch.nn.utils.clip_grad_norm_`` on copies (9.2); ``torch.optim.AdamW`` run for several
steps (9.3); and for 9.4 the rule of transformers' ``EarlyStoppingCallback`` with the Trainer's ``best_metric``
(``tests/test_grading_ch09.py`` feeds the same losses to the callback and checks that they agree).
"""

from __future__ import annotations

import functools
import math

import torch

from .core import Failure, mistake_notes as _notes, show as _show, task, unchanged


def _raises_value_error(call: str, why: str, fn) -> None:
    try:
        got = fn()
    except ValueError:
        return
    except Exception as e:  # noqa: BLE001 - a wrong exception type is a wrong answer here
        raise Failure(f"{call}: expected ValueError ({why}), got {type(e).__name__}: {e}") from None
    raise Failure(f"{call}: expected ValueError ({why}), but it returned {got!r}")


# --- 9.1 (warm-up): linear warmup + cosine decay to a floor -------------------------------------------------------


@functools.cache
def transformers_multipliers(warmup_steps: int, total_steps: int, min_lr_ratio: float) -> tuple:
    """transformers' schedule as the optimizer sees it: the lr of a base-lr-1 optimizer at steps 0..total_steps."""
    from transformers import get_cosine_with_min_lr_schedule_with_warmup

    opt = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=1.0)
    sched = get_cosine_with_min_lr_schedule_with_warmup(opt, warmup_steps, total_steps, min_lr_rate=min_lr_ratio)
    lrs = []
    for _ in range(total_steps + 1):
        lrs.append(opt.param_groups[0]["lr"])
        opt.step()  # no gradients: changes nothing, but keeps the scheduler's call order right
        sched.step()
    return tuple(lrs)


def _lr_variant(step, W, N, m, *, plus_one=False, floor=True, start=None, span=None, half=True, clamp=False):
    """The schedule of the task text, or one of its known mistakes (``start``/``span`` of the cosine's progress)."""
    if step < W:
        return (step + plus_one) / W
    progress = (step - (W if start is None else start)) / max(1, N - W if span is None else span)
    progress = min(1.0, progress) if clamp else progress
    wave = 0.5 * (1 + math.cos(math.pi * progress)) if half else math.cos(math.pi * progress)
    m = m if floor else 0.0
    return m + (1 - m) * wave


def _lr_mistakes(N):
    progress_notes = [
        (dict(start=0), "the cosine's progress starts at the END of warmup: (step − warmup_steps) / (total_steps − "
         "warmup_steps), not step / (...)"),
        (dict(span=N), "the decay lasts total_steps − warmup_steps steps: divide by that, not by total_steps"),
        (dict(start=0, span=N), "progress = step / total_steps counts the warmup steps too: the decay starts at the "
         "end of warmup and lasts total_steps − warmup_steps steps"),
    ]
    return [
        (dict(plus_one=True), "off by one in the warmup: transformers uses step / warmup_steps, so step 0 has lr 0 "
         "((step + 1) / warmup_steps is chapter 02's lr_at convention; here the multiplier must match transformers)"),
        (dict(floor=False), "min_lr_ratio is missing: the cosine decays to 0; it must end at min_lr_ratio, "
         "min_lr_ratio + (1 − min_lr_ratio)·0.5·(1 + cos(π·progress))"),
        (dict(half=False), "cos(π·progress) alone runs from 1 to −1 (a negative learning rate!): the half-cosine is "
         "0.5·(1 + cos(π·progress)), from 1 to 0"),
        *[(dict(kw, clamp=c), note) for kw, note in progress_notes for c in (False, True)],
    ]


_LR_CASES = ((10, 100, 0.1), (5, 37, 0.0), (1, 10, 0.5), (0, 20, 0.1), (50, 51, 0.1), (8, 8, 0.2))


@task("09", "9.1", "warmup_cosine_lr", "linear warmup + cosine decay to min_lr_ratio, as transformers", "warm-up",
      hint="raise ValueError if step < 0, warmup_steps < 0 or warmup_steps > total_steps; if step < warmup_steps "
           "return step / warmup_steps; else progress = (step - warmup_steps) / max(1, total_steps - warmup_steps) "
           "and return min_lr_ratio + (1 - min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress))")
def check_warmup_cosine_lr(warmup_cosine_lr):
    for W, N, m in _LR_CASES:
        steps = range(N + 1)
        want = transformers_multipliers(W, N, m)
        got = []
        for s in steps:
            call = f"warmup_cosine_lr(step={s}, warmup_steps={W}, total_steps={N}, min_lr_ratio={m})"
            try:
                value = warmup_cosine_lr(s, W, N, m)
            except ZeroDivisionError:
                if W == N:
                    raise Failure(f"{call} raised ZeroDivisionError: with warmup_steps == total_steps there is no "
                                  "decay; transformers divides by max(1, total_steps - warmup_steps), and so must "
                                  "you") from None
                raise
            try:
                got.append(float(value))
            except (TypeError, ValueError, RuntimeError):
                raise Failure(f"{call}: expected a number (the lr multiplier), got {type(value).__name__}") from None
        bad = [s for s in steps if not math.isclose(got[s], want[s], abs_tol=1e-9)]
        if bad:
            s = bad[0]
            marks = sorted({0, 1, W, (W + N) // 2, N} & set(steps))
            note = _notes(got, [(lambda kw=kw: [_lr_variant(t, W, N, m, **kw) for t in steps], note)
                                for kw, note in _lr_mistakes(N)],
                          lambda a, b: all(math.isclose(x, y, abs_tol=1e-9) for x, y in zip(a, b)))
            raise Failure(f"warmup_cosine_lr(step={s}, warmup_steps={W}, total_steps={N}, min_lr_ratio={m}):\n"
                          f"expected {want[s]:.6f} (transformers' get_cosine_with_min_lr_schedule_with_warmup)\n"
                          f"got      {got[s]:.6f}\nat steps {marks}: expected {_show([want[t] for t in marks], 4)}, "
                          f"got {_show([got[t] for t in marks], 4)}{note}")
    for args, why in (((-1, 10, 100, 0.1), "step is negative"), ((0, -5, 100, 0.1), "warmup_steps is negative"),
                      ((5, 20, 10, 0.1), "warmup_steps > total_steps: the warmup would never end")):
        call = "warmup_cosine_lr(step={}, warmup_steps={}, total_steps={}, min_lr_ratio={})".format(*args)
        _raises_value_error(call, why, lambda: warmup_cosine_lr(*args))


# --- 9.2 (core): clip by the global norm --------------------------------------------------------------------------


def clip_grad_norm_reference(grads: list, max_norm: float) -> tuple[list, float]:
    """torch.nn.utils.clip_grad_norm_, run on copies: (the clipped gradients, the norm before clipping)."""
    params = [torch.nn.Parameter(torch.zeros_like(g)) for g in grads]
    for p, g in zip(params, grads):
        p.grad = g.clone()
    norm = torch.nn.utils.clip_grad_norm_(params, max_norm)
    return [p.grad for p in params], float(norm)


def _clip_cases():
    """(description, gradients, max_norm); every clipped case has a norm above 1, so torch's 1e-6 is below tolerance."""
    g = torch.Generator().manual_seed(92)

    def grads(*shapes, scale=1.0):
        return [torch.randn(s, generator=g) * scale for s in shapes]

    yield "3 tensors, global norm above max_norm", grads((4, 3), (3,), (2, 2)), 1.0
    yield "the same kind, max_norm 100: nothing to clip", grads((4, 3), (3,), (2, 2)), 100.0
    yield "each tensor's norm below max_norm, the global norm above it", grads(*[(6,)] * 4, scale=0.8), 3.0
    yield "one large tensor and a small one", [*grads((10, 10), scale=2.0), *grads((2,), scale=0.1)], 5.0
    yield "a single (3, 2, 2) tensor", grads((3, 2, 2), scale=3.0), 0.5


def _clip_norm_mistakes(grads, clipped):
    flat = torch.cat([g.flatten() for g in grads])
    return [
        (lambda: float(flat.abs().sum()), "that is the L1 norm (sum of |g|); the global norm is L2: the square root "
         "of the sum of every squared entry"),
        (lambda: float(flat.abs().max()), "that is the max (inf) norm; the global norm is L2: the square root of the "
         "sum of every squared entry"),
        (lambda: float(sum(g.norm() for g in grads)), "you added the per-tensor norms; the global norm is "
         "sqrt(sum of their SQUARES), the norm of all gradients concatenated into one vector"),
        (lambda: float(flat.pow(2).sum()), "the square root is missing: that is the squared norm"),
        (lambda: float(torch.cat([c.flatten() for c in clipped]).norm()), "return the norm BEFORE clipping (what "
         "clip_grad_norm_ returns and trainers log as grad_norm); after clipping it is just min(norm, max_norm)"),
    ]


def _clip_mistakes(grads, max_norm, norm):
    return [
        (lambda: [g * min(1.0, max_norm / float(g.norm())) for g in grads], "you clipped each tensor by its OWN norm; "
         "clipping scales every tensor by the same factor, max_norm / global norm, which keeps the update's direction"),
        (lambda: [g * (max_norm / norm) for g in grads], "you scaled the gradients UP: clipping only shrinks; when the "
         "global norm is already <= max_norm, leave them as they are (factor min(1, max_norm / norm))"),
        (lambda: [g * (norm / max_norm) for g in grads], "the factor is upside down: max_norm / norm, not norm / "
         "max_norm"),
        (lambda: list(grads), "nothing was clipped: when the global norm is above max_norm, every gradient is "
         "multiplied by max_norm / norm"),
        (lambda: [g.clamp(-max_norm, max_norm) for g in grads], "that clips each VALUE into [-max_norm, max_norm] "
         "(torch.nn.utils.clip_grad_value_); clip by the global NORM"),
    ]


def _same_list(a, b) -> bool:
    return (isinstance(a, (list, tuple)) and len(a) == len(b)
            and all(torch.is_tensor(x) and x.shape == y.shape and torch.allclose(x, y, rtol=1e-5, atol=1e-7)
                    for x, y in zip(a, b)))


@task("09", "9.2", "clip_grad_norm", "clip a list of gradients by their global L2 norm, as clip_grad_norm_", "core",
      hint="norm = torch.linalg.vector_norm(torch.cat([g.flatten() for g in grads])); factor = min(1, max_norm / "
           "(norm + 1e-6)); return [g * factor for g in grads], norm (new tensors: no mul_ on the inputs)")
def check_clip_grad_norm(clip_grad_norm):
    zeros = "all gradients zero (norm 0)", [torch.zeros(3), torch.zeros(2, 2)], 1.0
    for desc, grads, max_norm in [*_clip_cases(), zeros]:
        call = f"clip_grad_norm(grads=[{', '.join(str(tuple(g.shape)) for g in grads)}], max_norm={max_norm}) ({desc})"
        given, originals = list(grads), [g.clone() for g in grads]
        try:
            out = clip_grad_norm(given, max_norm)
        except ZeroDivisionError:
            raise Failure(f"{call} raised ZeroDivisionError: expected the zero gradients back and norm 0. Only scale "
                          "when norm > max_norm (torch divides by norm + 1e-6)") from None
        unchanged(call, grads, originals, "a gradient it was given")
        if len(given) != len(grads) or any(a is not b for a, b in zip(given, grads)):
            raise Failure(f"{call} changed the list it was given (grads[i] = ...?); build and return a new list")
        if not (isinstance(out, (tuple, list)) and len(out) == 2 and isinstance(out[0], (list, tuple))):
            raise Failure(f"{call}: expected a pair (clipped gradients as a list, total norm), got "
                          f"{type(out).__name__}{f' of {len(out)}' if isinstance(out, (tuple, list)) else ''}")
        clipped, norm = out
        try:
            norm = float(norm)
        except (TypeError, ValueError, RuntimeError):
            raise Failure(f"{call}: expected the total norm as a number or 0-dim tensor, got "
                          f"{type(norm).__name__}") from None
        want, want_norm = clip_grad_norm_reference(grads, max_norm)
        if not math.isclose(norm, want_norm, rel_tol=1e-5, abs_tol=1e-6):
            note = _notes(norm, _clip_norm_mistakes(grads, want), lambda a, b: math.isclose(a, b, rel_tol=1e-5))
            raise Failure(f"{call} → total norm:\nexpected {want_norm:.5f} (the L2 norm of all gradients together, "
                          f"before clipping, as torch.nn.utils.clip_grad_norm_ returns)\ngot      {norm:.5f}{note}")
        if not _same_list(clipped, want):
            note = _notes(clipped, _clip_mistakes(grads, max_norm, want_norm), _same_list)
            tensors = bool(clipped) and all(torch.is_tensor(c) for c in clipped)
            if not note and tensors and any(c.isnan().any() for c in clipped):
                note = "\nNaN: 0 / 0. Only scale when norm > max_norm (torch divides by norm + 1e-6)"
            got = (f"{_show(clipped[0].flatten()[:4], 4)}, norm after clipping "
                   f"{float(torch.cat([c.flatten() for c in clipped]).norm()):.5f}" if tensors else repr(clipped))
            raise Failure(f"{call} → clipped gradients must equal torch.nn.utils.clip_grad_norm_'s:\n"
                          f"expected grads[0] {_show(want[0].flatten()[:4], 4)}, norm after clipping "
                          f"{min(want_norm, max_norm):.5f}\ngot      grads[0] {got}\n(grads[0]: its first 4 "
                          f"values){note}")


# --- 9.3 (core): one AdamW step --------------------------------------------------------------------------------------


def _adamw_variant(p, g, m, v, step, lr, betas, eps, wd, *, l2=False, lr_in_decay=True, bias_correction=True,
                   step_shift=0, eps_inside=False, decay_after=False):
    """One AdamW update as in the task text (torch.optim.AdamW's), or with one of the known mistakes."""
    b1, b2 = betas
    if l2:
        g = g + wd * p  # Adam's L2 penalty: the decay goes through the moments
    elif not decay_after:
        p = p * (1 - (lr if lr_in_decay else 1.0) * wd)
    m = b1 * m + (1 - b1) * g
    v = b2 * v + (1 - b2) * g * g
    t = step + step_shift
    c1, c2 = (1 - b1**t, 1 - b2**t) if bias_correction else (1.0, 1.0)
    denom = (v / c2 + eps).sqrt() if eps_inside else (v / c2).sqrt() + eps
    p = p - lr * (m / c1) / denom
    if decay_after:
        p = p * (1 - lr * wd)
    return p, m, v


_ADAMW_MISTAKES = [
    (dict(l2=True), "that is Adam with an L2 penalty (grad + weight_decay·param, torch.optim.Adam's weight_decay): "
     "the decay then goes through the moments and is divided by sqrt(v̂). AdamW DECOUPLES it: param ← param·(1 − "
     "lr·weight_decay), and the moments see the raw gradient"),
    (dict(lr_in_decay=False), "the decay is multiplied by lr: param·(1 − lr·weight_decay), not param·(1 − "
     "weight_decay)"),
    (dict(bias_correction=False), "the bias correction is missing: m̂ = m / (1 − β1^step), v̂ = v / (1 − β2^step); "
     "without it the first steps are far too small or too large, as m and v start at 0"),
    (dict(step_shift=1), "step is already 1-based (the first update has step=1): use β^step, not β^(step + 1)"),
    (dict(eps_inside=True), "eps goes OUTSIDE the square root: sqrt(v̂) + eps, not sqrt(v̂ + eps)"),
    (dict(decay_after=True), "the decay uses the parameter BEFORE the Adam update: param·(1 − lr·weight_decay) − "
     "lr·m̂/(sqrt(v̂) + eps); you decayed the already updated parameter"),
]


def _adamw_cases():
    """(description, param, grads for each step, lr, betas, eps, weight_decay)."""
    g = torch.Generator().manual_seed(93)

    def case(shape, steps, scale=1.0):
        return torch.randn(shape, generator=g), [torch.randn(shape, generator=g) * scale for _ in range(steps)]

    yield ("a (4, 3) weight, 5 steps", *case((4, 3), 5), 1e-2, (0.9, 0.999), 1e-8, 0.1)
    yield ("a (6,) vector, large lr and decay, 4 steps", *case((6,), 4), 0.1, (0.8, 0.99), 1e-6, 0.5)
    yield ("tiny gradients (~1e-4), where eps matters, 3 steps", *case((5,), 3, 1e-4), 1e-2, (0.9, 0.999), 1e-6, 0.01)
    yield ("weight_decay 0 (AdamW is then Adam), 3 steps", *case((3, 2), 3), 1e-3, (0.9, 0.95), 1e-8, 0.0)


def _near(a, b) -> bool:
    """Same shape and within 1e-5 relative, 1e-6 of the largest value (so tiny moments are compared too)."""
    return (torch.is_tensor(a) and a.shape == b.shape
            and torch.allclose(a, b, rtol=1e-5, atol=1e-6 * float(b.abs().max()) + 1e-20))


@task("09", "9.3", "adamw_step", "one AdamW update (decoupled weight decay), as torch.optim.AdamW", "core",
      hint="param = param * (1 - lr * weight_decay); exp_avg = b1 * exp_avg + (1 - b1) * grad; exp_avg_sq = b2 * "
           "exp_avg_sq + (1 - b2) * grad**2; m_hat = exp_avg / (1 - b1**step), v_hat = exp_avg_sq / (1 - b2**step); "
           "param = param - lr * m_hat / (v_hat.sqrt() + eps)")
def check_adamw_step(adamw_step):
    for desc, p0, grads, lr, betas, eps, wd in _adamw_cases():
        ref = torch.nn.Parameter(p0.clone())
        opt = torch.optim.AdamW([ref], lr=lr, betas=betas, eps=eps, weight_decay=wd)
        p, m, v = p0.clone(), torch.zeros_like(p0), torch.zeros_like(p0)
        for step, grad in enumerate(grads, start=1):
            ref.grad = grad.clone()
            opt.step()
            state = opt.state[ref]
            want = ref.detach(), state["exp_avg"], state["exp_avg_sq"]
            call = (f"adamw_step(param {tuple(p0.shape)}, grad, exp_avg, exp_avg_sq, step={step}, lr={lr}, "
                    f"betas={betas}, eps={eps}, weight_decay={wd}) ({desc})")
            inputs = p, grad, m, v
            originals = [x.clone() for x in inputs]
            out = adamw_step(p, grad, m, v, step, lr, betas, eps, wd)
            unchanged(call, inputs, originals)
            if not (isinstance(out, (tuple, list)) and len(out) == 3 and all(torch.is_tensor(x) for x in out)):
                raise Failure(f"{call}: expected a tuple of three tensors (new_param, new_exp_avg, new_exp_avg_sq), "
                              f"got {type(out).__name__}")
            wrong = [name for name, a, b in zip(("param", "exp_avg", "exp_avg_sq"), out, want) if not _near(a, b)]
            if wrong:
                mistakes = [(lambda kw=kw: _adamw_variant(*inputs, step, lr, betas, eps, wd, **kw), note)
                            for kw, note in _ADAMW_MISTAKES]
                note = _notes(tuple(out), mistakes, lambda a, b: all(_near(x, y) for x, y in zip(a, b)))
                i = ("param", "exp_avg", "exp_avg_sq").index(wrong[0])
                got = out[i].detach()
                raise Failure(f"{call} → new_{wrong[0]} must match torch.optim.AdamW after step {step}:\n"
                              f"expected {_show(want[i].flatten()[:4], 6)}\ngot      "
                              f"{_show(got.flatten()[:4], 6) if got.shape == want[i].shape else tuple(got.shape)}"
                              f"\n(first 4 values; wrong: {', '.join(wrong)}){note}")
            p, m, v = (x.detach() for x in out)


# --- 9.4 (stretch): when to stop ---------------------------------------------------------------------------------


def should_stop_reference(val_losses, patience: int, min_delta: float = 0.0) -> bool:
    """transformers' EarlyStoppingCallback with the Trainer's best_metric (the lowest loss so far), plus: NaN stops."""
    if any(math.isnan(x) for x in val_losses):
        return True
    best, waiting = None, 0  # the lowest loss so far; evaluations in a row that did not improve on it
    for loss in val_losses:
        waiting = 0 if best is None or best - loss > min_delta else waiting + 1
        best = loss if best is None else min(best, loss)
    return waiting >= patience


def _stop_variant(losses, patience, min_delta, *, previous=False, at_least=False, late=0, nan=True,
                  best_on_improvement=False, absolute=False, no_reset=False) -> bool:
    """The rule of the task text, or one of its known mistakes."""
    if nan and any(math.isnan(x) for x in losses):
        return True
    best, waiting, misses = None, 0, 0
    for i, loss in enumerate(losses):
        base = losses[i - 1] if previous and i else best
        diff = None if base is None else (abs(base - loss) if absolute else base - loss)
        improved = diff is None or (diff >= min_delta if at_least else diff > min_delta)
        waiting, misses = (0 if improved else waiting + 1), misses + (not improved)
        if best is None or (improved if best_on_improvement else loss < best):
            best = loss
    return (misses if no_reset else waiting) >= patience + late


_STOP_MISTAKES = [
    (dict(previous=True), "you compared each loss with the PREVIOUS one; compare with the best (lowest) loss so far, "
     "or a slow rise with small dips would never stop"),
    (dict(at_least=True), "an improvement must beat the best by MORE than min_delta (best − loss > min_delta): equal "
     "to the best (min_delta 0), or better by exactly min_delta, is not an improvement"),
    (dict(late=1), "off by one: stop once `patience` evaluations in a row have not improved, not patience + 1"),
    (dict(late=-1), "off by one: you stop after patience − 1 evaluations without improvement"),
    (dict(nan=False), "a NaN loss must stop training at once (return True): the run has diverged, and waiting "
     "`patience` more evaluations only burns compute (every comparison with NaN is False, so it needs its own check: "
     "math.isnan)"),
    (dict(best_on_improvement=True), "the best so far is the lowest loss seen, even one that improved by less than "
     "min_delta (the Trainer updates best_metric on any lower loss): small improvements do not add up"),
    (dict(absolute=True), "a loss that got WORSE by more than min_delta is no improvement: best − loss > min_delta, "
     "not |best − loss| > min_delta"),
    (dict(no_reset=True), "the count restarts at 0 after each improvement: stop after `patience` non-improving "
     "evaluations IN A ROW"),
]

_NAN = float("nan")
_STOP_CASES = (  # (description, val_losses, patience, min_delta)
    ("no evaluation yet", [], 2, 0.0),
    ("the first evaluation is always an improvement", [1.0], 1, 0.0),
    ("steady improvement", [2.0, 1.5, 1.2, 1.1], 2, 0.0),
    ("1 evaluation without improvement, patience 2", [2.0, 1.5, 1.6], 2, 0.0),
    ("2 evaluations without improvement, patience 2", [2.0, 1.5, 1.6, 1.7], 2, 0.0),
    ("1 evaluation without improvement, patience 1", [1.0, 1.2], 1, 0.0),
    ("after a low 1.0, falling again but never below it", [2.0, 1.0, 1.5, 1.4, 1.3], 3, 0.0),
    ("a plateau: equal is not better", [1.0, 1.0, 1.0], 2, 0.0),
    ("better by exactly min_delta, twice", [2.0, 1.5, 1.0], 2, 0.5),
    ("creeping: better by 0.05 each time, min_delta 0.1", [1.0, 0.95, 0.9, 0.85], 3, 0.1),
    ("improved by 0.2 > min_delta, then 2 worse", [1.0, 0.8, 0.85, 0.9], 2, 0.1),
    ("getting worse by more than min_delta", [1.0, 1.5, 2.0], 2, 0.1),
    ("one miss, an improvement, one miss", [2.0, 2.1, 1.5, 1.6], 2, 0.0),
    ("a long wait, patience 5", [3.0, 2.0, 2.5, 2.4, 2.3, 2.2, 2.1], 5, 0.0),
    ("NaN last", [2.0, 1.5, _NAN], 5, 0.0),
    ("NaN in the middle", [2.0, _NAN, 1.0], 5, 0.0),
)


@task("09", "9.4", "should_stop", "early stopping: patience, min_delta and NaN, as transformers' callback", "stretch",
      hint="if any loss is NaN return True; walk the losses keeping the lowest so far: a loss improves if it is the "
           "first or best - loss > min_delta (then waiting = 0, else waiting += 1), and best = min(best, loss) "
           "either way; return waiting >= patience")
def check_should_stop(should_stop):
    got = []
    for desc, losses, patience, min_delta in _STOP_CASES:
        given = list(losses)
        answer = should_stop(given, patience, min_delta)
        call = f"should_stop(val_losses={losses}, patience={patience}, min_delta={min_delta}) ({desc})"
        if given != losses:
            raise Failure(f"{call} changed val_losses (sort? pop?); read the list, do not modify it")
        if not isinstance(answer, bool) and type(answer).__name__ != "bool_":  # numpy's bool is fine
            raise Failure(f"{call}: expected True or False, got {type(answer).__name__} {answer!r}")
        got.append(bool(answer))
    want = [should_stop_reference(*case[1:]) for case in _STOP_CASES]
    if got != want:
        note = _notes(got, [(lambda kw=kw: [_stop_variant(*case[1:], **kw) for case in _STOP_CASES], note)
                            for kw, note in _STOP_MISTAKES], lambda a, b: a == b)
        wrong = [(case, w) for case, g, w in zip(_STOP_CASES, got, want) if g != w]
        shown = "\n".join(f"  should_stop({losses}, patience={patience}, min_delta={min_delta}) ({desc}): "
                          f"expected {w}, got {not w}" for (desc, losses, patience, min_delta), w in wrong[:3])
        raise Failure(f"{len(wrong)} of {len(_STOP_CASES)} answers differ from transformers' EarlyStoppingCallback "
                      f"(+ stop on NaN):\n{shown}{note}")
