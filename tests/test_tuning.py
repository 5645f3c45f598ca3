"""Chapter 09: schedules vs transformers, LAMB vs pytorch-optimizer, optimizer-state bytes, the tuning run, LR finder,
grid cache, Optuna sweep with pruning, the Trainer's early stopping, magnitude pruning, and bad input."""

import copy
import math
from dataclasses import replace

import pytest
import torch
from transformers import (get_constant_schedule_with_warmup, get_cosine_schedule_with_warmup,
                          get_cosine_with_min_lr_schedule_with_warmup, get_linear_schedule_with_warmup,
                          get_wsd_schedule)

from course_utils import optimizers, schedules, tuning
from course_utils.errors import ConfigError

W, N = 7, 60


def _library_factors(factory, steps=N):
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
    sched = factory(opt)
    out = []
    for _ in range(steps + 1):  # steps 0 .. N, the last one included
        out.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    return out


@pytest.mark.parametrize("name, min_ratio, factory", [
    ("constant", 0.0, lambda o: get_constant_schedule_with_warmup(o, W)),
    ("linear", 0.0, lambda o: get_linear_schedule_with_warmup(o, W, N)),
    ("cosine", 0.0, lambda o: get_cosine_schedule_with_warmup(o, W, N)),
    ("cosine", 0.1, lambda o: get_cosine_with_min_lr_schedule_with_warmup(o, W, N, min_lr_rate=0.1)),
    ("wsd", 0.0, lambda o: get_wsd_schedule(o, W, num_decay_steps=round(0.2 * N), num_training_steps=N)),
    ("wsd", 0.1, lambda o: get_wsd_schedule(o, W, num_decay_steps=round(0.2 * N), num_training_steps=N,
                                            min_lr_ratio=0.1)),
])
def test_schedules_equal_transformers_at_every_step(name, min_ratio, factory):
    fn = schedules.get(name)
    ours = [fn(s, W, N, min_ratio) for s in range(N + 1)]
    assert ours == pytest.approx(_library_factors(factory), abs=1e-12)
    assert schedules.factors(name, W, N, min_ratio) == ours[:N]


def test_lambda_lr_drives_an_optimizer_like_transformers():
    p = torch.nn.Parameter(torch.zeros(1))
    opt = torch.optim.SGD([p], lr=0.5)
    sched = schedules.lambda_lr(opt, "cosine", W, N, 0.1)
    seen = []
    for _ in range(N):
        seen.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    ref = _library_factors(lambda o: get_cosine_with_min_lr_schedule_with_warmup(o, W, N, min_lr_rate=0.1))[:N]
    assert seen == pytest.approx([0.5 * f for f in ref], abs=1e-12)


@pytest.mark.parametrize("warmup, total, min_ratio, words", [
    (60, 60, 0.0, "shorter than total_steps"), (100, 60, 0.0, "shorter than total_steps"),
    (-1, 60, 0.0, ">= 0"), (5, 0, 0.0, "total_steps must be >= 1"), (5, 60, 1.5, "min_ratio"),
])
def test_bad_schedules_are_refused(warmup, total, min_ratio, words):
    with pytest.raises(ConfigError, match=words):
        schedules.factors("cosine", warmup, total, min_ratio)


def test_unknown_schedule_names_the_choices():
    with pytest.raises(ConfigError, match="unknown schedule 'cosin'.*constant"):
        schedules.get("cosin")


# --- optimizers -------------------------------------------------------------------------------------------


def _step_both(model, names, steps=15, lr=1e-2, wd=0.1):
    models = [copy.deepcopy(model) for _ in names]
    opts = [optimizers.make(n, m, lr, wd) for n, m in zip(names, models)]
    x = torch.randint(0, 64, (4, 16), generator=torch.Generator().manual_seed(1))
    for _ in range(steps):
        for m, o in zip(models, opts):
            m(input_ids=x).logits.pow(2).mean().backward()
            o.step()
            o.zero_grad()
    return models, opts


def test_own_lamb_equals_pytorch_optimizer_lamb(make_model):
    (a, b), _ = _step_both(make_model(), ("lamb", "lamb_own"))
    before = make_model()
    moved = max((p - q).abs().max().item() for p, q in zip(a.parameters(), before.parameters()))
    diff = max((p - q).abs().max().item() for p, q in zip(a.parameters(), b.parameters()))
    assert moved > 1e-2  # the optimizers did train
    assert diff < 1e-5, diff


def test_lamb_trust_ratio_scales_each_tensor_by_its_own_norm():
    """Each tensor moves by lr · ‖w‖ / (1 - β1^t), whatever its gradient: 1000× more for 1000× bigger weights."""
    small, big = torch.nn.Parameter(torch.full((10,), 0.001)), torch.nn.Parameter(torch.full((10,), 1.0))
    opt = optimizers.Lamb([small, big], lr=0.1)
    (small.sum() + big.sum()).backward()
    before = [small.detach().clone(), big.detach().clone()]
    opt.step()
    for p, b in zip((small, big), before):
        assert torch.linalg.vector_norm(p.detach() - b).item() == pytest.approx(0.1 * b.norm().item() / (1 - 0.9), rel=1e-3)


def test_optimizer_state_bytes_per_parameter(make_model):
    """AdamW 8 bytes per parameter, SGD with momentum 4, Adafactor far below, 8-bit AdamW about 2."""
    names = ("adamw", "sgd", "adafactor", "adamw8bit", "lamb_own")
    _, opts = _step_both(make_model(hidden_size=128, intermediate_size=256), names, steps=1)
    per = {n: optimizers.state_bytes_per_parameter(o, min_numel=4096) for n, o in zip(names, opts)}
    assert per["adamw"] == pytest.approx(8.0, abs=0.01)
    assert per["lamb_own"] == pytest.approx(8.0, abs=0.01)
    assert per["sgd"] == pytest.approx(4.0)
    assert per["adafactor"] < 0.5
    assert 1.95 < per["adamw8bit"] < 2.1  # two uint8 moments + one fp32 scale per 256 values + 2 KiB of maps
    # bitsandbytes keeps tensors under 4096 values in 32-bit states: over all parameters it is above 2
    assert optimizers.state_bytes_per_parameter(opts[3]) > per["adamw8bit"]


@pytest.mark.parametrize("name, lr, words", [("adamw", -1e-3, "lr must be > 0"), ("adam_w", 1e-3, "unknown optimizer"),
                                             ("lamb_own", 0.0, "lr must be > 0")])
def test_bad_optimizer_input(make_model, name, lr, words):
    with pytest.raises(ConfigError, match=words):
        optimizers.make(name, make_model(), lr)


# --- the tuning run ------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def task():
    return tuning.make_task("smoke")


@pytest.fixture(scope="module")
def cfg():
    return tuning.TuneConfig.for_profile("smoke")


@pytest.mark.parametrize("override, words", [
    (dict(lr=-1e-3), "lr must be a positive number"), (dict(lr=float("nan")), "lr must be a positive number"),
    (dict(warmup_steps=20), "warmup_steps=20 must be >= 0 and shorter than total_steps=20"),
    (dict(optimizer="adam"), "unknown optimizer 'adam'"), (dict(schedule="step"), "unknown schedule 'step'"),
    (dict(batch_size=0), "batch_size must be >= 1"), (dict(grad_clip=-1.0), "grad_clip must be >= 0"),
])
def test_bad_config_is_refused_before_any_work(cfg, override, words):
    with pytest.raises(ConfigError, match=words):
        tuning.run(replace(cfg, **override))


def test_run_learns_and_is_deterministic(task, cfg):
    a, b = tuning.run(cfg, task), tuning.run(cfg, task)
    assert a["val_loss"] == b["val_loss"] and a["steps"] == b["steps"]
    assert a["val_loss"] < math.log(len(task.tokenizer)) - 0.3  # below a uniform guess over the vocabulary
    assert len(a["steps"]) == cfg.max_steps and [e["step"] for e in a["evals"]] == [5, 10, 15, 20]
    lrs = [s["lr"] for s in a["steps"]]
    assert lrs == pytest.approx([cfg.lr * f for f in schedules.factors("cosine", 2, 20, cfg.min_lr_ratio)])


def test_on_eval_can_stop_a_run(task, cfg):
    r = tuning.run(cfg, task, on_eval=lambda step, val: step >= 10)
    assert r["stopped_at"] == 10 and len(r["steps"]) == 10


def test_non_finite_loss_marks_the_run_diverged(task, cfg):
    r = tuning.run(replace(cfg, optimizer="sgd", lr=1e4, grad_clip=0.0, warmup_steps=0), task)
    assert r["diverged"] and math.isnan(r["val_loss"]) and len(r["steps"]) < cfg.max_steps


def test_lr_range_test_stops_when_the_loss_explodes(task, cfg):
    f = tuning.lr_range_test(task, cfg, start=1e-4, end=100.0, steps=40)
    assert f["lrs"] == sorted(f["lrs"]) and f["lrs"][0] == pytest.approx(1e-4)
    assert len(f["lrs"]) < 40  # stopped before the end
    assert f["lrs"][0] <= f["suggested_lr"] <= f["min_loss_lr"]
    with pytest.raises(ConfigError, match="start < end"):
        tuning.lr_range_test(task, cfg, start=1.0, end=0.1)


def test_cached_runs_reuse_results(task, cfg, tmp_path, monkeypatch):
    configs = [replace(cfg, lr=lr) for lr in (1e-3, 3e-3)]
    first = tuning.cached_runs(configs, task, tmp_path / "grid.json", progress=False)
    monkeypatch.setattr(tuning, "run", lambda *a, **k: pytest.fail("a cached config was run again"))
    again = tuning.cached_runs(configs, task, tmp_path / "grid.json", progress=False)
    assert [r["val_loss"] for r in again] == [r["val_loss"] for r in first]
    assert first[0]["val_loss"] != first[1]["val_loss"]


def test_sweep_prunes_bad_trials_and_returns_the_best(task, cfg):
    s = tuning.sweep(cfg, 8, task, startup_trials=2, progress=False)
    states = [r["state"] for r in s["rows"]]
    complete = [r for r in s["rows"] if r["state"] == "complete"]
    assert len(states) == 8 and set(states) <= {"complete", "pruned"}
    assert s["pruned_fraction"] == states.count("pruned") / 8 > 0
    assert s["best_val_loss"] == min(r["val_loss"] for r in complete)
    best = min(complete, key=lambda r: r["val_loss"])
    assert s["best_config"].lr == best["lr"] and s["best_config"].grad_clip == best["grad_clip"]
    assert s["steps_run"] < s["steps_without_pruning"]
    pruned = [r for r in s["rows"] if r["state"] == "pruned"]
    assert all(r["steps"] < cfg.max_steps for r in pruned)


def test_trainer_early_stopping_stops_and_restores_the_best(task, cfg):
    r = tuning.trainer_early_stopping(task, replace(cfg, lr=1e-2, eval_every=10), train_rows=8, max_steps=300,
                                      patience=2)
    losses = [e["val_loss"] for e in r["evals"]]
    assert r["stopped_at"] < r["max_steps"]
    best = min(range(len(losses)), key=losses.__getitem__)
    assert r["best_step"] == r["evals"][best]["step"] and r["best_val_loss"] == pytest.approx(losses[best])
    assert len(losses) - 1 - best == r["patience"]  # stopped exactly `patience` evaluations after the best
    assert r["restored_val_loss"] == pytest.approx(losses[best], rel=1e-4)


# --- pruning ---------------------------------------------------------------------------------------------------


def test_global_magnitude_pruning_zeroes_the_smallest_weights(make_model):
    model = make_model()
    embedding = model.model.embed_tokens.weight.detach().clone()
    weights = torch.cat([m.weight.detach().abs().flatten() for m, _ in tuning.prunable(model)])
    tuning.prune_global(model, 0.5)
    assert tuning.sparsity(model) == pytest.approx(0.5, abs=1e-3)
    kept = torch.cat([m.weight.detach().abs().flatten() for m, _ in tuning.prunable(model)])
    assert kept[kept > 0].min() >= weights.kthvalue(int(0.5 * len(weights))).values  # one global threshold
    assert torch.equal(model.model.embed_tokens.weight, embedding)  # the tied embedding is left alone
    with pytest.raises(ConfigError, match=r"amount must be in \[0, 1\)"):
        tuning.prune_global(make_model(), 1.0)


def test_prune_curve_keeps_masks_through_recovery(task, cfg):
    model = tuning.run(replace(cfg, lr=1e-2, max_steps=60), task, keep_model=True)["model"]
    rows = tuning.prune_curve(model, task, amounts=(0.0, 0.5, 0.9), recover=replace(cfg, max_steps=10, warmup_steps=0),
                              progress=False)
    assert [r["sparsity"] for r in rows] == pytest.approx([0.0, 0.5, 0.9], abs=1e-3)
    assert all(r["sparsity_after"] == r["sparsity"] for r in rows)
    assert rows[2]["test_loss"] > rows[1]["test_loss"] > rows[0]["test_loss"]
    assert rows[2]["recovered_loss"] < rows[2]["test_loss"]
    assert tuning.sparsity(model) == 0.0  # the curve pruned copies, never the model it was given



@pytest.mark.parametrize("profile", ["smoke", "tiny", "gpu"])
def test_every_profile_has_a_valid_tuning_preset(profile):
    cfg = tuning.TuneConfig.for_profile(profile)
    cfg.validate()
    assert cfg.profile == profile and cfg.eval_every < cfg.max_steps
    n_docs, vocab, size = tuning._TASK_SIZES[profile]
    assert size.hidden_size % size.num_heads == 0 and n_docs >= 10 * 10  # validation/test get n_docs // 10 each
