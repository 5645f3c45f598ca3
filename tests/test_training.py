import copy

import pytest
import torch
from transformers import get_cosine_schedule_with_warmup, get_cosine_with_min_lr_schedule_with_warmup

from course_utils import training
from course_utils.pretrain import PretrainConfig, train


def _lrs_from(scheduler_factory, steps):
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
    sched = scheduler_factory(opt)
    out = []
    for _ in range(steps):
        out.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    return out


def test_warmup_cosine_matches_transformers_after_warmup():
    """Same curve as transformers' schedules once warmup ends (theirs starts warmup at lr=0, ours at lr/warmup)."""
    W, N = 10, 100
    ref = _lrs_from(lambda o: get_cosine_schedule_with_warmup(o, W, N), N)
    ours = [training.warmup_cosine(s, W, N, min_ratio=0.0) for s in range(N)]
    assert ours[W:] == pytest.approx(ref[W:], abs=1e-12)
    assert ours[: W - 1] == pytest.approx(ref[1:W], abs=1e-12)  # ours = theirs shifted by one warmup step
    ref_min = _lrs_from(lambda o: get_cosine_with_min_lr_schedule_with_warmup(o, W, N, min_lr_rate=0.1), N)
    ours_min = [training.warmup_cosine(s, W, N, min_ratio=0.1) for s in range(N)]
    assert ours_min[W:] == pytest.approx(ref_min[W:], abs=1e-12)
    assert ours[0] > 0  # the first update is never wasted at lr = 0


def test_weight_decay_only_on_matrices(make_model):
    model = make_model()
    opt = training.make_optimizer(model, 1e-3, 0.1)
    decay, no_decay = opt.param_groups
    assert all(p.dim() >= 2 for p in decay["params"]) and decay["weight_decay"] == 0.1
    assert all(p.dim() == 1 for p in no_decay["params"]) and no_decay["weight_decay"] == 0.0
    n_unique = len({id(p) for p in model.parameters()})
    assert len(decay["params"]) + len(no_decay["params"]) == n_unique  # tied embedding counted once


def test_global_norm_clipping_matches_torch(make_model, packed):
    from course_utils.data import packed_ids

    a, b = make_model(), make_model()
    x = packed_ids(packed[0])[:4]
    for m in (a, b):
        m(input_ids=x, labels=x).loss.backward()
    expected = torch.nn.utils.clip_grad_norm_(b.parameters(), 0.5)
    opt = torch.optim.SGD(a.parameters(), lr=0.0)
    got = training.optimizer_step(a, opt, 0.5)
    assert got == pytest.approx(float(expected), rel=1e-6)


def test_accumulation_equals_big_batch(make_model, packed):
    """TRL's invariant: batch 8 x accumulation 1 gives the same update as batch 2 x accumulation 4."""
    a, b = make_model(), make_model()
    from course_utils.data import packed_ids
    from course_utils.objectives import shifted_targets, token_loss_sum

    x = packed_ids(packed[0])[:8]
    labels = shifted_targets(x)
    labels[:3, 5:20] = -100  # masked positions make the label count differ per micro-batch
    s, n = token_loss_sum(a(input_ids=x).logits, labels)
    (s / n).backward()
    n_total = int((labels != -100).sum())
    for i in range(4):
        s, _ = token_loss_sum(b(input_ids=x[2 * i : 2 * i + 2]).logits, labels[2 * i : 2 * i + 2])
        (s / n_total).backward()
    for (name, pa), pb in zip(a.named_parameters(), b.parameters()):
        assert torch.allclose(pa.grad, pb.grad, atol=1e-6), name


def test_every_parameter_changes_and_loss_is_logged(make_model, packed):
    model = make_model()
    before = copy.deepcopy(model.state_dict())
    cfg = PretrainConfig.for_profile("smoke", max_steps=3, warmup_steps=1, log_every=1, eval_every=0, progress=False, block_size=32)
    result = train(cfg, model, None, packed[0])
    assert [r["step"] for r in result["history"]] == [1, 2, 3]
    assert all(torch.isfinite(torch.tensor(r["loss"])) for r in result["history"])
    for k, v in model.state_dict().items():
        assert not torch.equal(v, before[k]), f"{k} did not change"


def test_training_lowers_heldout_loss(make_model, packed, tokenizer):
    from course_utils.pretrain import evaluate

    model = make_model()
    before = evaluate(model, packed[1], 8, 4)
    cfg = PretrainConfig.for_profile("smoke", max_steps=40, block_size=32, eval_every=0, progress=False)
    train(cfg, model, tokenizer, packed[0])
    after = evaluate(model, packed[1], 8, 4)
    assert after["ppl"] < before["ppl"] / 2


@pytest.mark.parametrize("objective", ["prefix", "mlm"])
def test_other_objectives_train(make_model, packed, tokenizer, objective):
    model = make_model()
    cfg = PretrainConfig.for_profile("smoke", objective=objective, max_steps=15, block_size=32, eval_every=0,
                                     progress=False, log_every=1)
    hist = train(cfg, model, tokenizer, packed[0])["history"]
    assert hist[-1]["loss"] < hist[0]["loss"]


def test_bf16_autocast_runs_on_cpu(make_model, packed, tokenizer):
    cfg = PretrainConfig.for_profile("smoke", precision="bf16", max_steps=2, warmup_steps=1, block_size=32,
                                     eval_every=0, progress=False, log_every=1)
    result = train(cfg, make_model(), tokenizer, packed[0])
    assert torch.isfinite(torch.tensor(result["final_loss"]))


def test_train_loop_accumulation_invariant(make_model, packed, tokenizer):
    """Our loop: batch 8 x accumulation 1 and batch 2 x accumulation 4 see the same rows (the sampler's
    permutation does not depend on the batch size) and must make the same update."""
    a, b = make_model(), make_model()
    common = dict(max_steps=2, warmup_steps=1, eval_every=0, progress=False, block_size=32)
    ra = train(PretrainConfig.for_profile("smoke", batch_size=8, grad_accum=1, **common), a, tokenizer, packed[0])
    rb = train(PretrainConfig.for_profile("smoke", batch_size=2, grad_accum=4, **common), b, tokenizer, packed[0])
    assert ra["final_loss"] == pytest.approx(rb["final_loss"], abs=1e-5)
    for (name, pa), pb in zip(a.named_parameters(), b.parameters()):
        assert torch.allclose(pa, pb, atol=1e-5), name
