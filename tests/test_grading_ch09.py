"""Chapter 09 (hyper-parameters and optimizers) grading bites: references pass, common mistakes fail and say why,
and the task rules are the libraries' (solution 100% and exercise 0 are checked for every chapter in
test_grading.py)."""

import math
import random
from types import SimpleNamespace

import pytest
import torch

from course_utils import grading
from grading_asserts import assert_reference_passes, chapter_tests

pytestmark = pytest.mark.usefixtures("one_thread")  # small tensors: threads only add overhead


# --- references (what the solution notebook has) -----------------------------------------------------

def warmup_cosine_lr(step, warmup_steps, total_steps, min_lr_ratio):
    if step < 0 or warmup_steps < 0 or warmup_steps > total_steps:
        raise ValueError(f"need 0 <= step and 0 <= warmup_steps <= total_steps, got {step}, {warmup_steps}, "
                         f"{total_steps}")
    if step < warmup_steps:
        return step / warmup_steps
    progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
    return min_lr_ratio + (1 - min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress))


def clip_grad_norm(grads, max_norm):
    norm = torch.linalg.vector_norm(torch.cat([g.flatten() for g in grads]))
    factor = min(1.0, max_norm / (float(norm) + 1e-6))
    return [g * factor for g in grads], norm


def adamw_step(param, grad, exp_avg, exp_avg_sq, step, lr, betas, eps, weight_decay):
    b1, b2 = betas
    param = param * (1 - lr * weight_decay)
    exp_avg = b1 * exp_avg + (1 - b1) * grad
    exp_avg_sq = b2 * exp_avg_sq + (1 - b2) * grad**2
    m_hat, v_hat = exp_avg / (1 - b1**step), exp_avg_sq / (1 - b2**step)
    return param - lr * m_hat / (v_hat.sqrt() + eps), exp_avg, exp_avg_sq


def should_stop(val_losses, patience, min_delta=0.0):
    if any(math.isnan(x) for x in val_losses):
        return True
    best, waiting = math.inf, 0
    for i, loss in enumerate(val_losses):
        waiting = 0 if i == 0 or best - loss > min_delta else waiting + 1
        best = min(best, loss)
    return waiting >= patience


REFERENCES = {"9.1": (warmup_cosine_lr,), "9.2": (clip_grad_norm,), "9.3": (adamw_step,), "9.4": (should_stop,)}


# --- common mistakes -----------------------------------------------------------------------------------

def lr_plus_one(step, warmup_steps, total_steps, min_lr_ratio):
    warmup_cosine_lr(step, warmup_steps, total_steps, min_lr_ratio)
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    return warmup_cosine_lr(step, warmup_steps, total_steps, min_lr_ratio)


def lr_no_floor(step, warmup_steps, total_steps, min_lr_ratio):
    return warmup_cosine_lr(step, warmup_steps, total_steps, 0.0)


def lr_full_cosine(step, warmup_steps, total_steps, min_lr_ratio):
    if step < warmup_steps:
        return step / warmup_steps
    progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
    return min_lr_ratio + (1 - min_lr_ratio) * math.cos(math.pi * progress)


def _cosine(progress, min_lr_ratio):
    return min_lr_ratio + (1 - min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))


def lr_progress_from_zero(step, warmup_steps, total_steps, min_lr_ratio):
    if step < warmup_steps:
        return step / warmup_steps
    return _cosine(step / max(1, total_steps - warmup_steps), min_lr_ratio)


def lr_decay_over_total(step, warmup_steps, total_steps, min_lr_ratio):
    if step < warmup_steps:
        return step / warmup_steps
    return _cosine((step - warmup_steps) / total_steps, min_lr_ratio)


def lr_step_over_total(step, warmup_steps, total_steps, min_lr_ratio):
    if step < warmup_steps:
        return step / warmup_steps
    return _cosine(step / total_steps, min_lr_ratio)


def lr_divides_by_zero(step, warmup_steps, total_steps, min_lr_ratio):
    if step < warmup_steps:
        return step / warmup_steps
    return _cosine((step - warmup_steps) / (total_steps - warmup_steps), min_lr_ratio)


def lr_no_checks(step, warmup_steps, total_steps, min_lr_ratio):
    if step < warmup_steps:
        return step / warmup_steps
    return _cosine((step - warmup_steps) / max(1, total_steps - warmup_steps), min_lr_ratio)


def lr_asserts(step, warmup_steps, total_steps, min_lr_ratio):
    assert 0 <= step and 0 <= warmup_steps <= total_steps
    return lr_no_checks(step, warmup_steps, total_steps, min_lr_ratio)


def _global_norm(grads):
    return float(torch.cat([g.flatten() for g in grads]).norm())


def clip_per_tensor(grads, max_norm):
    return [g * min(1.0, max_norm / (float(g.norm()) + 1e-6)) for g in grads], _global_norm(grads)


def clip_scales_up(grads, max_norm):
    norm = _global_norm(grads)
    return [g * (max_norm / (norm + 1e-6)) for g in grads], norm


def clip_inverted(grads, max_norm):
    norm = _global_norm(grads)
    return [g * (norm / max_norm) if norm > max_norm else g.clone() for g in grads], norm


def clip_never(grads, max_norm):  # min(1, norm / max_norm): the factor upside down, then capped at 1
    norm = _global_norm(grads)
    return [g * min(1.0, norm / max_norm) for g in grads], norm


def clip_values(grads, max_norm):
    return [g.clamp(-max_norm, max_norm) for g in grads], _global_norm(grads)


def clip_l1(grads, max_norm):
    norm = sum(float(g.abs().sum()) for g in grads)
    return [g * min(1.0, max_norm / (norm + 1e-6)) for g in grads], norm


def clip_max_norm(grads, max_norm):
    norm = max(float(g.abs().max()) for g in grads)
    return [g * min(1.0, max_norm / (norm + 1e-6)) for g in grads], norm


def clip_sum_of_norms(grads, max_norm):
    norm = sum(float(g.norm()) for g in grads)
    return [g * min(1.0, max_norm / (norm + 1e-6)) for g in grads], norm


def clip_no_sqrt(grads, max_norm):
    clipped, norm = clip_grad_norm(grads, max_norm)
    return clipped, float(norm) ** 2


def clip_post_norm(grads, max_norm):
    clipped, _ = clip_grad_norm(grads, max_norm)
    return clipped, _global_norm(clipped)


def clip_in_place(grads, max_norm):
    norm = _global_norm(grads)
    for g in grads:
        g.mul_(min(1.0, max_norm / (norm + 1e-6)))
    return grads, norm


def clip_replaces_in_list(grads, max_norm):
    clipped, norm = clip_grad_norm(grads, max_norm)
    grads[:] = clipped
    return grads, norm


def clip_divides_by_zero(grads, max_norm):
    norm = _global_norm(grads)
    factor = max_norm / norm
    return [g * min(1.0, factor) for g in grads], norm


def clip_nan_on_zero(grads, max_norm):
    norm = torch.linalg.vector_norm(torch.cat([g.flatten() for g in grads]))
    return [g / norm * torch.clamp(norm, max=max_norm) for g in grads], norm


def clip_no_eps(grads, max_norm):  # torch's 1e-6 left out: accepted (every clipped case has a norm above 1)
    norm = _global_norm(grads)
    return ([g * (max_norm / norm) for g in grads] if norm > max_norm else [g.clone() for g in grads]), norm


def _adamw(param, grad, exp_avg, exp_avg_sq, step, lr, betas, eps, wd, mistake=""):
    """Written the way torch.optim.AdamW's loop is (step_size, denom), with one mistake switched on."""
    b1, b2 = betas
    if mistake == "l2":
        grad = grad + wd * param
    elif mistake == "decay without lr":
        param = param * (1 - wd)
    elif mistake != "decay after":
        param = param * (1 - lr * wd)
    t = step + 1 if mistake == "step + 1" else step
    exp_avg = exp_avg * b1 + grad * (1 - b1)
    exp_avg_sq = exp_avg_sq * b2 + grad * grad * (1 - b2)
    c1, c2 = (1.0, 1.0) if mistake == "no bias correction" else (1 - b1**t, 1 - b2**t)
    denom = (exp_avg_sq / c2 + eps).sqrt() if mistake == "eps inside" else exp_avg_sq.sqrt() / math.sqrt(c2) + eps
    param = param - (lr / c1) * exp_avg / denom
    if mistake == "decay after":
        param = param - lr * wd * param
    return param, exp_avg, exp_avg_sq


def _adamw_with(mistake):
    def adamw_step(param, grad, exp_avg, exp_avg_sq, step, lr, betas, eps, weight_decay):
        return _adamw(param, grad, exp_avg, exp_avg_sq, step, lr, betas, eps, weight_decay, mistake)

    adamw_step.__name__ = f"adamw_{mistake.replace(' ', '_').replace('+', 'plus')}"
    return adamw_step


def adamw_in_place(param, grad, exp_avg, exp_avg_sq, step, lr, betas, eps, weight_decay):
    new = adamw_step(param, grad, exp_avg, exp_avg_sq, step, lr, betas, eps, weight_decay)
    for old, value in zip((param, exp_avg, exp_avg_sq), new):
        old.copy_(value)
    return param, exp_avg, exp_avg_sq


def adamw_returns_param_only(param, grad, exp_avg, exp_avg_sq, step, lr, betas, eps, weight_decay):
    return adamw_step(param, grad, exp_avg, exp_avg_sq, step, lr, betas, eps, weight_decay)[0]


def _stop(val_losses, patience, min_delta, compare_previous=False, strict=True, extra=0, nan=True,
          best_on_improvement=False, absolute=False, reset=True):
    """Written as a learner might: a running counter, with one mistake switched on."""
    if nan and any(x != x for x in val_losses):
        return True
    best = prev = None
    bad = 0
    for loss in val_losses:
        ref = prev if compare_previous and prev is not None else best
        gain = None if ref is None else (abs(ref - loss) if absolute else ref - loss)
        better = gain is None or (gain > min_delta if strict else gain >= min_delta)
        bad = 0 if better and reset else bad + (not better)
        if best is None or (better if best_on_improvement else loss < best):
            best = loss
        prev = loss
    return bad >= patience + extra


def _stop_with(name, **mistake):
    def should_stop(val_losses, patience, min_delta=0.0):
        return _stop(val_losses, patience, min_delta, **mistake)

    should_stop.__name__ = name
    return should_stop


def stop_sorts_losses(val_losses, patience, min_delta=0.0):
    answer = should_stop(val_losses, patience, min_delta)
    val_losses.sort()
    return answer


def stop_returns_count(val_losses, patience, min_delta=0.0):
    return int(should_stop(val_losses, patience, min_delta))


# (task, functions with the mistake, words the message must contain)
WRONG = [
    ("9.1", (lr_plus_one,), "off by one in the warmup"),
    ("9.1", (lr_no_floor,), "min_lr_ratio is missing"),
    ("9.1", (lr_full_cosine,), "negative learning rate"),
    ("9.1", (lr_progress_from_zero,), "starts at the END of warmup"),
    ("9.1", (lr_decay_over_total,), "not by total_steps"),
    ("9.1", (lr_step_over_total,), "counts the warmup steps too"),
    ("9.1", (lr_divides_by_zero,), "max(1, total_steps - warmup_steps)"),
    ("9.1", (lr_no_checks,), "expected ValueError (step is negative)"),
    ("9.1", (lr_asserts,), "expected ValueError (step is negative), got AssertionError"),
    ("9.2", (clip_per_tensor,), "its OWN norm"),
    ("9.2", (clip_scales_up,), "scaled the gradients UP"),
    ("9.2", (clip_inverted,), "upside down"),
    ("9.2", (clip_never,), "nothing was clipped"),
    ("9.2", (clip_values,), "clip_grad_value_"),
    ("9.2", (clip_l1,), "L1 norm"),
    ("9.2", (clip_max_norm,), "max (inf) norm"),
    ("9.2", (clip_sum_of_norms,), "added the per-tensor norms"),
    ("9.2", (clip_no_sqrt,), "square root is missing"),
    ("9.2", (clip_post_norm,), "norm BEFORE clipping"),
    ("9.2", (clip_in_place,), "changed a gradient"),
    ("9.2", (clip_replaces_in_list,), "changed the list"),
    ("9.2", (clip_divides_by_zero,), "raised ZeroDivisionError"),
    ("9.2", (clip_nan_on_zero,), "NaN: 0 / 0"),
    ("9.3", (_adamw_with("l2"),), "Adam with an L2 penalty"),
    ("9.3", (_adamw_with("decay without lr"),), "the decay is multiplied by lr"),
    ("9.3", (_adamw_with("no bias correction"),), "bias correction is missing"),
    ("9.3", (_adamw_with("step + 1"),), "already 1-based"),
    ("9.3", (_adamw_with("eps inside"),), "OUTSIDE the square root"),
    ("9.3", (_adamw_with("decay after"),), "already updated parameter"),
    ("9.3", (adamw_in_place,), "changed one of its inputs"),
    ("9.3", (adamw_returns_param_only,), "expected a tuple of three tensors"),
    ("9.4", (_stop_with("stop_previous", compare_previous=True),), "PREVIOUS"),
    ("9.4", (_stop_with("stop_at_least", strict=False),), "MORE than min_delta"),
    ("9.4", (_stop_with("stop_late", extra=1),), "not patience + 1"),
    ("9.4", (_stop_with("stop_early", extra=-1),), "patience − 1"),
    ("9.4", (_stop_with("stop_ignores_nan", nan=False),), "NaN loss must stop"),
    ("9.4", (_stop_with("stop_best_on_improvement", best_on_improvement=True),), "do not add up"),
    ("9.4", (_stop_with("stop_absolute", absolute=True),), "got WORSE"),
    ("9.4", (_stop_with("stop_no_reset", reset=False),), "IN A ROW"),
    ("9.4", (stop_sorts_losses,), "changed val_losses"),
    ("9.4", (stop_returns_count,), "expected True or False"),
]


(test_common_mistake_fails_and_names_it, test_reference_passes,
 test_every_task_has_a_wrong_variant_and_tiers_are_valid) = chapter_tests("09", WRONG, REFERENCES)


def test_an_untouched_stub_is_not_implemented():
    def should_stop(val_losses, patience, min_delta=0.0):
        raise NotImplementedError("task 9.4: not implemented yet")

    row = grading.check("9.4", should_stop)[0]
    assert row.status == "not implemented" and row.earned == 0


def test_clipping_without_torchs_eps_is_accepted():
    """torch divides by norm + 1e-6; the check says the 1e-6 is optional, and every clipped case keeps it so."""
    from course_utils.grading.ch09 import _clip_cases

    assert_reference_passes("9.2", (clip_no_eps,))
    assert all(_global_norm(grads) > 1 for _, grads, max_norm in _clip_cases() if _global_norm(grads) > max_norm)


# --- the task rules are the libraries' -------------------------------------------------------------------

def test_schedule_reference_is_transformers_and_the_task_formula():
    """The grader reads transformers' scheduler off a real optimizer; the formula of the task text gives the same."""
    from transformers import get_cosine_with_min_lr_schedule_with_warmup

    from course_utils.grading.ch09 import _LR_CASES, transformers_multipliers

    for W, N, m in {*_LR_CASES, (3, 30, 0.05), (0, 1, 0.0), (1, 1, 0.3), (100, 1000, 0.1)}:
        lrs = transformers_multipliers(W, N, m)
        opt = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=1.0)
        lam = get_cosine_with_min_lr_schedule_with_warmup(opt, W, N, min_lr_rate=m).lr_lambdas[0]
        assert len(lrs) == N + 1 and lrs[0] == (0.0 if W else 1.0) and lrs[N] == pytest.approx(1.0 if W == N else m)
        assert lrs == pytest.approx([lam(s) for s in range(N + 1)], abs=1e-12)
        assert lrs == pytest.approx([warmup_cosine_lr(s, W, N, m) for s in range(N + 1)], abs=1e-12)


def test_adamw_formula_of_the_grader_is_torchs():
    """The base the mistakes are built on (no mistake switched on) is torch.optim.AdamW, step after step."""
    from course_utils.grading.ch09 import _adamw_cases, _adamw_variant, _near

    for _, p0, grads, lr, betas, eps, wd in _adamw_cases():
        ref = torch.nn.Parameter(p0.clone())
        opt = torch.optim.AdamW([ref], lr=lr, betas=betas, eps=eps, weight_decay=wd)
        p, m, v = p0.clone(), torch.zeros_like(p0), torch.zeros_like(p0)
        for step, g in enumerate(grads, start=1):
            ref.grad = g.clone()
            opt.step()
            p, m, v = _adamw_variant(p, g, m, v, step, lr, betas, eps, wd)
            assert _near(p, ref.detach()) and _near(m, opt.state[ref]["exp_avg"])
            assert _near(v, opt.state[ref]["exp_avg_sq"])


def _library_stops(losses, patience, min_delta, args) -> list:
    """transformers' EarlyStoppingCallback after each evaluation, with best_metric kept by the Trainer's own code."""
    from transformers import EarlyStoppingCallback, Trainer, TrainerControl, TrainerState

    callback, state, stops = EarlyStoppingCallback(patience, min_delta), TrainerState(), []
    trainer = SimpleNamespace(args=args, state=state)  # what Trainer._determine_best_metric reads
    for loss in losses:
        control = TrainerControl()
        callback.on_evaluate(args, state, control, metrics={"eval_loss": loss})
        stops.append(control.should_training_stop)
        Trainer._determine_best_metric(trainer, {"eval_loss": loss}, None)  # the Trainer does this right after
    return stops


def test_should_stop_is_transformers_early_stopping(tmp_path):
    """On every prefix of many loss curves (and the grader's own cases, NaN aside), the rule and the callback agree."""
    from transformers import TrainingArguments

    from course_utils.grading.ch09 import _STOP_CASES, should_stop_reference

    args = TrainingArguments(output_dir=str(tmp_path), eval_strategy="steps", metric_for_best_model="eval_loss",
                             greater_is_better=False, load_best_model_at_end=True, report_to="none")
    rng = random.Random(94)
    curves = [(c[1], c[2], c[3]) for c in _STOP_CASES if c[1] and not any(map(math.isnan, c[1]))]
    for _ in range(300):  # steps of 1/8 (exact in binary), so ties and improvements of exactly min_delta happen
        losses = [4.0]
        for _ in range(rng.randint(0, 9)):
            losses.append(losses[-1] + rng.choice((-4, -2, -1, -1, 0, 1, 2)) / 8)
        curves.append((losses, rng.randint(1, 4), rng.choice((0.0, 0.125, 0.25, 0.1))))
    stopped = 0
    for losses, patience, min_delta in curves:
        library = _library_stops(losses, patience, min_delta, args)
        ours = [should_stop_reference(losses[: i + 1], patience, min_delta) for i in range(len(losses))]
        assert ours == library, (losses, patience, min_delta)
        assert ours == [should_stop(losses[: i + 1], patience, min_delta) for i in range(len(losses))]
        stopped += library[-1]
    assert 0.2 < stopped / len(curves) < 0.8  # both answers are common


def test_failure_shows_the_call_and_expected_vs_got():
    row = grading.check("9.1", lr_plus_one)[0]
    assert "step=0" in row.message and "expected 0.000000" in row.message and "transformers" in row.message
    row = grading.check("9.4", _stop_with("stop_best_on_improvement", best_on_improvement=True))[0]
    assert "creeping" in row.message and "expected True, got False" in row.message


def test_checks_are_fast():
    import time

    grading.check("9.1", warmup_cosine_lr)  # the first call imports transformers
    for task_id, fns in REFERENCES.items():
        t0 = time.monotonic()
        grading.check(task_id, *fns)
        assert time.monotonic() - t0 < 1.0, task_id
