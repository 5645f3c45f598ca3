"""The RL arithmetic of course_utils.rl against brute force, torch.distributions and scikit-learn."""

from __future__ import annotations

import math

import pytest
import torch

from course_utils import rl
from course_utils.errors import ConfigError, DataError


def _batch(seed: int = 0, B: int = 5, T: int = 7):
    """Random right-padded rows: lengths 1..T, at least one full row; garbage (not 0) in the padding, which
    every function must ignore."""
    g = torch.Generator().manual_seed(seed)
    lengths = torch.randint(1, T + 1, (B,), generator=g)
    lengths[0] = T
    mask = (torch.arange(T)[None, :] < lengths[:, None]).float()
    rewards = torch.randn(B, T, generator=g)
    values = torch.randn(B, T, generator=g)
    return rewards, values, mask, lengths


def test_token_logprobs_equal_categorical_log_prob():
    g = torch.Generator().manual_seed(1)
    logits = torch.randn(3, 6, 11, generator=g) * 3
    tokens = torch.randint(0, 11, (3, 6), generator=g)
    mask = torch.tensor([[1, 1, 1, 1, 1, 1], [1, 1, 1, 0, 0, 0], [1, 0, 0, 0, 0, 0]]).float()
    want = torch.distributions.Categorical(logits=logits).log_prob(tokens)
    got = rl.token_logprobs(logits, tokens)
    assert torch.allclose(got, want, atol=1e-6)
    masked = rl.token_logprobs(logits.to(torch.bfloat16), tokens, mask)
    assert torch.equal(masked == 0, mask == 0) and masked.dtype == torch.float32
    with pytest.raises(ConfigError):
        rl.token_logprobs(logits, tokens[:, :-1])


@pytest.mark.parametrize("gamma,lam", [(1.0, 0.95), (0.9, 0.8), (1.0, 1.0), (0.99, 0.0)])
def test_gae_matches_the_sum_of_discounted_td_errors(gamma, lam):
    rewards, values, mask, lengths = _batch(seed=2)
    adv, ret = rl.gae(rewards, values, mask, gamma, lam)
    for b, n in enumerate(lengths.tolist()):
        v = values[b, :n].tolist() + [0.0]  # no value after the episode ends
        deltas = [rewards[b, t].item() + gamma * v[t + 1] - v[t] for t in range(n)]
        for t in range(n):
            want = sum((gamma * lam) ** k * deltas[t + k] for k in range(n - t))
            assert adv[b, t].item() == pytest.approx(want, abs=1e-5)
            assert ret[b, t].item() == pytest.approx(want + v[t], abs=1e-5)
        assert (adv[b, n:] == 0).all() and (ret[b, n:] == 0).all()
    if gamma == 1.0 and lam == 1.0:  # Monte-Carlo: return = sum of the rewards still to come
        for b, n in enumerate(lengths.tolist()):
            assert ret[b, 0].item() == pytest.approx(rewards[b, :n].sum().item(), abs=1e-5)


def test_kl_shaped_rewards_put_the_score_on_the_last_token():
    _, _, mask, lengths = _batch(seed=3)
    g = torch.Generator().manual_seed(3)
    logp, ref = torch.randn(mask.shape, generator=g) * mask, torch.randn(mask.shape, generator=g) * mask
    score = torch.tensor([1.0, -2.0, 0.5, 3.0, 0.0])
    rewards, kl = rl.kl_shaped_rewards(score, logp, ref, mask, beta=0.1)
    assert torch.allclose(kl, (logp - ref) * mask)
    assert torch.allclose(rewards.sum(1), score - 0.1 * kl.sum(1), atol=1e-6)
    for b, n in enumerate(lengths.tolist()):
        assert rewards[b, n - 1].item() == pytest.approx(score[b].item() - 0.1 * kl[b, n - 1].item(), abs=1e-6)
        assert torch.allclose(rewards[b, : n - 1], -0.1 * kl[b, : n - 1])
    with pytest.raises(DataError, match="NaN"):
        rl.kl_shaped_rewards(torch.tensor([1.0, float("nan"), 0, 0, 0]), logp, ref, mask, 0.1)
    empty = mask.clone()
    empty[2] = 0
    with pytest.raises(DataError, match="no generated token"):
        rl.kl_shaped_rewards(score, logp, ref, empty, 0.1)


def test_clipped_policy_loss_values_and_gradients():
    # four tokens: ratio 1.5 with A>0 (clipped at 1.2), 0.5 with A>0 (not clipped), 1.5 with A<0 (not clipped),
    # 0.5 with A<0 (clipped at 0.8); a padded fifth token must not count
    ratio = torch.tensor([[1.5, 0.5, 1.5, 0.5, 9.0]])
    adv = torch.tensor([[1.0, 1.0, -1.0, -1.0, 5.0]])
    mask = torch.tensor([[1.0, 1.0, 1.0, 1.0, 0.0]])
    old = torch.zeros_like(ratio)
    logp = torch.log(ratio).requires_grad_(True)
    loss, stats = rl.clipped_policy_loss(logp, old, adv, mask, clip=0.2)
    want = -(1.2 * 1.0 + 0.5 * 1.0 + 1.5 * -1.0 + 0.8 * -1.0) / 4
    assert loss.item() == pytest.approx(want)
    loss.backward()
    # clipped tokens get no gradient; others get -A·ρ/n (d ρ / d log π = ρ)
    assert logp.grad.tolist()[0] == pytest.approx([0.0, -0.5 / 4, 1.5 / 4, 0.0, 0.0])
    assert stats["clip_fraction"] == pytest.approx(0.5)
    assert stats["approx_kl"] == pytest.approx(0.5 * (2 * math.log(1.5) ** 2 + 2 * math.log(0.5) ** 2) / 4)


def test_policy_loss_at_ratio_one_is_the_policy_gradient():
    g = torch.Generator().manual_seed(4)
    logp = torch.randn(2, 5, generator=g).requires_grad_(True)
    adv = torch.randn(2, 5, generator=g)
    mask = torch.ones(2, 5)
    loss, stats = rl.clipped_policy_loss(logp, logp.detach(), adv, mask)
    loss.backward()
    assert torch.allclose(logp.grad, -adv / 10) and stats["clip_fraction"] == 0.0 and stats["approx_kl"] == 0.0


def test_clipped_value_loss_and_explained_variance():
    from sklearn.metrics import explained_variance_score

    old = torch.tensor([[0.0, 0.0, 0.0, 0.0]])
    values = torch.tensor([[0.5, 0.1, -0.5, 7.0]], requires_grad=True)
    returns = torch.tensor([[1.0, 1.0, 1.0, 0.0]])
    mask = torch.tensor([[1.0, 1.0, 1.0, 0.0]])
    loss, stats = rl.clipped_value_loss(values, old, returns, mask, clip=0.2)
    # token 0: max((0.5-1)^2, (0.2-1)^2) = 0.64; token 1: 0.81 (unclipped); token 2: max(2.25, 1.44) = 2.25
    assert loss.item() == pytest.approx(0.5 * (0.64 + 0.81 + 2.25) / 3)
    assert stats["value_clip_fraction"] == pytest.approx(1 / 3)
    rewards, v, m, _ = _batch(seed=5)
    _, ret = rl.gae(rewards, v, m)
    _, stats = rl.clipped_value_loss(v, v, ret, m)
    keep = m.bool()
    assert stats["explained_variance"] == pytest.approx(explained_variance_score(ret[keep], v[keep]), abs=1e-5)


def test_whiten_over_real_tokens_only():
    rewards, _, mask, _ = _batch(seed=6)
    x = rewards * 10 + 3
    w = rl.whiten(x, mask)
    real = w[mask.bool()]
    assert real.mean().item() == pytest.approx(0.0, abs=1e-5) and real.std().item() == pytest.approx(1.0, abs=1e-4)
    assert (w[~mask.bool()] == 0).all()
    kept = rl.whiten(x, mask, shift_mean=False)[mask.bool()]
    assert kept.mean().item() == pytest.approx(x[mask.bool()].mean().item(), rel=1e-4)
    with pytest.raises(DataError):
        rl.whiten(x, torch.zeros_like(mask))


def test_adaptive_kl_steers_towards_its_target():
    # a toy policy whose KL falls as β rises (KL = 2/β): β must settle where KL = target
    ctl = rl.AdaptiveKL(beta=0.02, target=6.0, horizon=200)
    history = []
    for _ in range(400):
        history.append(2.0 / ctl.beta)
        ctl.update(history[-1], n_steps=32)
    assert abs(history[-1] / 6.0 - 1) < 0.05
    assert history[0] > 6.0 * 10  # it did start far away
    # one step moves β by at most 20% × n/horizon, whatever the KL
    ctl = rl.AdaptiveKL(beta=1.0, target=1.0, horizon=100)
    assert ctl.update(1000.0, 10) == pytest.approx(1.02) and ctl.update(0.0, 10) == pytest.approx(1.02 * 0.98)
    assert rl.FixedKL(0.1).update(50.0, 10) == 0.1
    with pytest.raises(DataError):
        ctl.update(float("nan"), 10)
    with pytest.raises(ConfigError):
        rl.AdaptiveKL(beta=0.1, target=0.0)


def test_bad_shapes_and_masks_are_refused():
    x = torch.zeros(2, 3)
    with pytest.raises(ConfigError, match="shape"):
        rl.gae(x, torch.zeros(2, 4), torch.ones(2, 3))
    with pytest.raises(ConfigError, match="0 and 1"):
        rl.masked_mean(x, torch.full((2, 3), 0.5))
    with pytest.raises(ConfigError):
        rl.gae(x, x, torch.ones(2, 3), gamma=1.5)


def test_group_advantages_equal_trl_grpo(tokenizer):
    """TRL's GRPOTrainer scores 2 prompts x 4 sampled completions; our advantages from the same rewards match."""
    import tempfile

    from course_utils.model import build_model, make_config
    from course_utils.profiles import ModelSize
    from course_utils.trl_runs import group_trainer
    from course_utils.world import rl_prompts

    size = ModelSize(hidden_size=32, num_layers=2, num_heads=2, intermediate_size=64, context_length=128)
    model = build_model(make_config(size, tokenizer), seed=0)
    seen = []

    def reward(completions, **kwargs):  # any deterministic function of the text will do
        values = [float(len(str(c)) % 7) for c in completions]
        seen.extend(values)
        return values

    with tempfile.TemporaryDirectory() as tmp:
        trainer = group_trainer("grpo", model, tokenizer, rl_prompts(0, 8), reward, tmp, per_device_train_batch_size=8,
                                num_generations=4, max_completion_length=8)
        out = trainer._generate_and_score_completions(next(iter(trainer.get_train_dataloader())))
    rewards = torch.tensor(seen)
    assert rewards.numel() == 8 and rewards.view(2, 4).std(1).min() > 0, "a constant group would not test the scale"
    assert torch.allclose(rl.group_advantages(rewards, 4), out["advantages"], atol=1e-5)
    assert not torch.allclose(rl.group_advantages(rewards, 4, scale="none"), out["advantages"], atol=1e-3)


def test_group_and_leave_one_out_baselines():
    r = torch.tensor([1.0, 2.0, 3.0, 6.0, 5.0, 5.0, 5.0, 5.0])
    adv = rl.group_advantages(r, 4)
    assert adv[:4].tolist() == pytest.approx(((r[:4] - 3) / (r[:4].std() + 1e-4)).tolist())
    assert adv[4:].tolist() == [0.0] * 4  # all alike: nothing to learn
    assert rl.group_advantages(r, 4, scale="none")[:4].tolist() == pytest.approx([-2.0, -1.0, 0.0, 3.0])
    assert rl.group_advantages(r, 4, scale="batch")[:4].tolist() == pytest.approx(
        ((r[:4] - 3) / (r.std() + 1e-4)).tolist())
    loo = rl.rloo_advantages(r, 4)
    assert loo[0].item() == pytest.approx(1.0 - (2 + 3 + 6) / 3)
    assert loo[:4].tolist() == pytest.approx((4 / 3 * (r[:4] - 3)).tolist())
    for bad in (dict(group_size=3), dict(group_size=1), dict(group_size=4, scale="mean")):
        with pytest.raises(ConfigError):
            rl.group_advantages(r, **bad)
    with pytest.raises(DataError):
        rl.group_advantages(torch.tensor([1.0, float("nan")]), 2)


def test_leave_one_out_advantages_equal_trl_rloo(tokenizer):
    """TRL's RLOOTrainer (β = 0: no reference model) scores 2 prompts x 4 completions; our RLOO advantages match."""
    import tempfile

    from course_utils.model import build_model, make_config
    from course_utils.profiles import ModelSize
    from course_utils.trl_runs import group_trainer
    from course_utils.world import rl_prompts

    size = ModelSize(hidden_size=32, num_layers=2, num_heads=2, intermediate_size=64, context_length=128)
    model = build_model(make_config(size, tokenizer), seed=0)
    seen = []

    def reward(completions, **kwargs):
        values = [float(len(str(c)) % 7) for c in completions]
        seen.extend(values)
        return values

    with tempfile.TemporaryDirectory() as tmp:
        trainer = group_trainer("rloo", model, tokenizer, rl_prompts(0, 8), reward, tmp, per_device_train_batch_size=8,
                                num_generations=4, max_completion_length=8, beta=0.0)
        out = trainer._generate_and_score_completions(next(iter(trainer.get_train_dataloader())))
    rewards = torch.tensor(seen)
    assert rewards.view(2, 4).std(1).min() > 0
    assert torch.allclose(rl.rloo_advantages(rewards, 4), out["advantages"], atol=1e-5)
    assert not torch.allclose(rl.group_advantages(rewards, 4, scale="none"), out["advantages"], atol=1e-3)
