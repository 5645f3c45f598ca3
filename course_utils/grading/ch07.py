"""Checks for chapter 07 — DPO (直接偏好优化) and the critic-free baselines of GRPO (组相对策略优化) and RLOO.

The references are the course library's own: :func:`course_utils.dpo.dpo_loss` (the sigmoid loss, checked
against TRL's ``DPOTrainer`` in ``tests/test_dpo.py``), and :func:`course_utils.rl.group_advantages` /
:func:`course_utils.rl.rloo_advantages` (the first checked against TRL's ``GRPOTrainer`` in ``tests/test_rl.py``).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from .. import dpo, rl
from .core import Failure, close as _close, mistake_notes as _notes, show as _show, task


def _vector(call: str, got, n: int, what: str, why: str = "") -> None:
    if not torch.is_tensor(got) or tuple(got.shape) != (n,):
        raise Failure(f"{call}: expected a tensor of shape ({n},) ({what}), got "
                      f"{tuple(got.shape) if torch.is_tensor(got) else type(got).__name__}{why}")


# --- 7.1: the DPO loss ---------------------------------------------------------------------------------

KEYS = ("losses", "chosen_rewards", "rejected_rewards", "margins", "accuracy")


def dpo_loss_reference(policy_chosen, policy_rejected, ref_chosen, ref_rejected, beta) -> dict:
    return dpo.dpo_loss(policy_chosen, policy_rejected, ref_chosen, ref_rejected, beta, loss_type="sigmoid")


def _dpo_cases():
    """(description, policy_chosen, policy_rejected, ref_chosen, ref_rejected, beta): summed log-probs, (B,)."""
    g = torch.Generator().manual_seed(71)

    def case(B, drift):
        ref_c, ref_r = -40 + 10 * torch.randn(B, generator=g), -40 + 10 * torch.randn(B, generator=g)
        return (ref_c + drift * torch.randn(B, generator=g), ref_r + drift * torch.randn(B, generator=g), ref_c, ref_r)

    yield ("4 pairs, β = 0.1", *case(4, 3.0), 0.1)
    yield ("6 pairs, β = 0.5", *case(6, 2.0), 0.5)
    _, _, ref_c, ref_r = case(3, 0.0)
    yield "policy equal to the reference (the first step), β = 0.1", ref_c.clone(), ref_r.clone(), ref_c, ref_r, 0.1
    yield ("3 pairs, β = 2, one ranked far wrong (β·margin = −200)", torch.tensor([-130.0, -20.0, -35.0]),
           torch.tensor([-30.0, -25.0, -33.0]), torch.tensor([-30.0, -22.0, -34.0]),
           torch.tensor([-30.0, -24.0, -30.0]), 2.0)


def _loss_mistakes(pc, pr, rc, rr, beta):
    d = (pc - rc) - (pr - rr)
    return [
        (lambda: -F.logsigmoid(d), "β is missing: the loss is −log σ(β·[(log π_c − log π_ref,c) − (log π_r − "
         "log π_ref,r)])"),
        (lambda: -beta * F.logsigmoid(d), "β goes INSIDE the sigmoid: −log σ(β·margin), not −β·log σ(margin)"),
        (lambda: -F.logsigmoid(-beta * d), "chosen and rejected swapped: the chosen side's log-ratio comes first, "
         "so that minimising the loss raises it"),
        (lambda: -F.logsigmoid(beta * (pc - pr)), "you used the policy's log-probs alone: subtract the reference's, "
         "log π(y) − log π_ref(y) is the implicit reward (over β)"),
        (lambda: -F.logsigmoid(beta * ((pc + rc) - (pr + rr))), "log π_ref is SUBTRACTED: log π(y) − log π_ref(y)"),
        (lambda: F.logsigmoid(beta * d), "a loss is >= 0: it is MINUS log σ(...)"),
    ]


def _reward_mistakes(p, r, p_other, r_other, beta):
    return [
        (lambda: p - r, "β is missing: the implicit reward is β·(log π(y) − log π_ref(y))"),
        (lambda: beta * p, "the implicit reward is β·(log π(y) − log π_ref(y)): subtract the reference"),
        (lambda: beta * (p_other - r_other), "chosen and rejected rewards swapped"),
    ]


@task("07", "7.1", "dpo_loss", "DPO loss −log σ(β·Δ log-ratio), with the implicit rewards", "warm-up",
      hint="chosen_ratio = policy_chosen - ref_chosen, rejected_ratio = policy_rejected - ref_rejected; losses = "
           "-F.logsigmoid(beta * (chosen_ratio - rejected_ratio)) (one per pair); chosen_rewards = beta * "
           "chosen_ratio.detach() (same for rejected); margins = chosen - rejected rewards; accuracy = "
           "(chosen_rewards > rejected_rewards).float().mean()")
def check_dpo_loss(dpo_loss):
    for n, (desc, pc, pr, rc, rr, beta) in enumerate(_dpo_cases()):
        B = pc.numel()
        originals = pc.clone(), pr.clone(), rc.clone(), rr.clone()
        pc_, pr_ = pc.clone().requires_grad_(), pr.clone().requires_grad_()
        call = (f"dpo_loss(policy_chosen={_show(pc, 2)}, policy_rejected={_show(pr, 2)}, ref_chosen={_show(rc, 2)}, "
                f"ref_rejected={_show(rr, 2)}, beta={beta}) ({desc})")
        got = dpo_loss(pc_, pr_, rc, rr, beta)
        if not all(torch.equal(x.detach(), o) for x, o in zip((pc_, pr_, rc, rr), originals)):
            raise Failure(f"{call} changed one of its inputs; compute new tensors instead")
        if not isinstance(got, dict) or any(k not in got for k in KEYS):
            have = sorted(got) if isinstance(got, dict) else type(got).__name__
            raise Failure(f"{call}: expected a dict with keys {list(KEYS)}, as course_utils.dpo.dpo_loss returns; "
                          f"got {have}")
        expected = dpo_loss_reference(pc, pr, rc, rr, beta)
        losses = got["losses"]
        why = (" (one loss per pair: the trainer takes the mean, and logs per-pair values)"
               if torch.is_tensor(losses) and losses.dim() == 0 else "")
        _vector(call + " → losses", losses, B, "one loss per pair", why)
        want = expected["losses"]
        if not torch.isfinite(losses.detach()).all():
            raise Failure(f"{call} → losses:\nexpected {_show(want)}\ngot      {_show(losses.detach())}\n"
                          "σ(−200) is about 1e-87, below float32's smallest number: torch.sigmoid returns 0 and "
                          "log(0) = −inf. Use F.logsigmoid, which never forms σ")
        if not _close(losses.detach(), want):
            note = _notes(losses.detach(), _loss_mistakes(pc, pr, rc, rr, beta), _close)
            raise Failure(f"{call} → losses:\nexpected {_show(want, 4)}\ngot      {_show(losses.detach(), 4)}{note}")
        if not losses.requires_grad:
            raise Failure(f"{call} → losses carry no gradient (.detach(), .item() or torch.tensor(...) inside?): "
                          "training calls losses.mean().backward()")
        if n == 0:
            losses.sum().backward()
            ref_c, ref_r = pc.clone().requires_grad_(), pr.clone().requires_grad_()
            dpo_loss_reference(ref_c, ref_r, rc, rr, beta)["losses"].sum().backward()
            for name, mine, ref in (("policy_chosen", pc_.grad, ref_c.grad), ("policy_rejected", pr_.grad, ref_r.grad)):
                if mine is None or not torch.allclose(mine, ref, atol=1e-6):
                    raise Failure(f"{call}: right losses, wrong gradient with respect to {name}:\nexpected "
                                  f"{_show(ref, 4)}\ngot      {_show(mine, 4) if mine is not None else None}")
        for key, mistakes in (("chosen_rewards", _reward_mistakes(pc, rc, pr, rr, beta)),
                              ("rejected_rewards", _reward_mistakes(pr, rr, pc, rc, beta))):
            value = got[key]
            _vector(f"{call} → {key}", value, B, "one implicit reward per pair")
            if not _close(value.detach(), expected[key]):
                note = _notes(value.detach(), mistakes, _close)
                raise Failure(f"{call} → {key}:\nexpected {_show(expected[key], 4)}\ngot      "
                              f"{_show(value.detach(), 4)}{note}")
            if value.requires_grad:
                raise Failure(f"{call} → {key} carry gradients: the rewards are for logging, detach them "
                              "(beta * (policy - ref).detach()), so no one backpropagates through a metric by accident")
        margins = got["margins"]
        _vector(f"{call} → margins", margins, B, "chosen_rewards − rejected_rewards")
        if not _close(margins.detach(), expected["margins"]):
            note = ("\nthe margin is chosen_rewards − rejected_rewards"
                    if _close(margins.detach(), -expected["margins"]) else "")
            raise Failure(f"{call} → margins:\nexpected {_show(expected['margins'], 4)}\ngot      "
                          f"{_show(margins.detach(), 4)}{note}")
        try:
            accuracy = float(got["accuracy"])
        except (TypeError, ValueError, RuntimeError):
            raise Failure(f"{call} → accuracy: expected one number (a 0-dim tensor or a float), got "
                          f"{type(got['accuracy']).__name__}") from None
        want_acc = expected["accuracy"].item()
        if not math.isclose(accuracy, want_acc, abs_tol=1e-6):
            cr, rr_ = expected["chosen_rewards"], expected["rejected_rewards"]
            note = _notes(accuracy, [
                (lambda: (cr >= rr_).float().mean().item(), "a tie is not a win: count the pairs where the chosen "
                 "reward is strictly larger (>), as TRL does; at the first step every reward is 0"),
                (lambda: (cr > rr_).float().sum().item(), "accuracy is the SHARE of pairs won (a mean), not their "
                 "count"),
            ], lambda a, b: math.isclose(a, b, abs_tol=1e-6))
            raise Failure(f"{call} → accuracy:\nexpected {want_acc:.4f}\ngot      {accuracy:.4f}{note}")


# --- 7.2: GRPO's group-normalised advantages ------------------------------------------------------------


def group_advantages_reference(rewards, group_size) -> torch.Tensor:
    return rl.group_advantages(rewards, group_size, scale="group", eps=1e-4)  # TRL's GRPOTrainer


def _group_cases():
    """(description, rewards (N,), group_size): completions of one prompt are consecutive."""
    g = torch.Generator().manual_seed(72)
    yield ("3 prompts × 4: the second group all alike (no signal), the third barely different",
           torch.tensor([1.0, 2.0, 3.0, 6.0, 5.0, 5.0, 5.0, 5.0, 0.50, 0.51, 0.49, 0.50]), 4)
    yield "2 prompts × 4 completions", torch.randn(8, generator=g), 4
    yield "3 prompts × 2 completions", 2 * torch.randn(6, generator=g), 2
    binary = (torch.rand(32, generator=g) < 0.4).float()
    binary[:8], binary[8:16] = 0.0, 1.0  # a prompt nothing solves, one every completion solves
    yield "4 prompts × 8 completions, 0/1 rewards (a verifier)", binary, 8
    yield "1 prompt × 5 completions", torch.randn(5, generator=g) + 3.0, 5


def _group_mistakes(rewards, G):
    grouped = rewards.view(-1, G)
    centred = (grouped - grouped.mean(1, keepdim=True)).view(-1)
    std = grouped.std(1, keepdim=True).expand_as(grouped).reshape(-1)
    pop_std = grouped.std(1, unbiased=False, keepdim=True).expand_as(grouped).reshape(-1)
    var = grouped.var(1, keepdim=True).expand_as(grouped).reshape(-1)
    eps_note = ("TRL adds eps = 1e-4 to the standard deviation, (r − mean) / (std + 1e-4); another eps changes "
                "every advantage a little")
    strided = rewards.view(G, -1)
    tiled_mean, tiled_std = grouped.mean(1).repeat(G), grouped.std(1).repeat(G)
    return [
        (lambda: centred / (pop_std + 1e-4), "you divided by the population std (unbiased=False, divide by G); TRL "
         "(and torch's default .std()) use Bessel's correction, G − 1"),
        (lambda: centred / std, "no eps: a group whose rewards are all equal has std 0 and 0 / 0 = nan (a whole "
         "batch of nan gradients); add 1e-4 to the std, as TRL does, so that group's advantages are 0"),
        *[(lambda e=e: centred / (std + e), eps_note) for e in (1e-5, 1e-6, 1e-8)],
        (lambda: centred / torch.sqrt(var + 1e-4), "eps is added to the std, std + 1e-4, not under the square root"),
        (lambda: (rewards - rewards.mean()) / (rewards.std() + 1e-4), "you normalised over the whole batch: the "
         "baseline is each prompt's OWN group mean (a hard prompt's completions compete with each other, not with "
         "an easy prompt's)"),
        (lambda: centred / (rewards.std() + 1e-4), "that divides by the std of the whole batch (TRL's "
         "scale_rewards='batch', a variant); this task divides each group by its own std"),
        (lambda: centred, "no division by the std: that is Dr. GRPO's variant (scale_rewards='none'); this task "
         "divides by the group's std + 1e-4"),
        (lambda: ((strided - strided.mean(0)) / (strided.std(0) + 1e-4)).reshape(-1), "a group is G CONSECUTIVE "
         "rewards, rewards.view(-1, G) (one row per prompt); you grouped every (N/G)-th reward together"),
        (lambda: (rewards - tiled_mean) / (tiled_std + 1e-4), "mean.repeat(G) tiles [m0, m1, m0, m1, ...]; each mean "
         "must sit next to its own group: repeat_interleave(G), or keep the (prompts, G) shape and broadcast"),
    ]


def _check_baseline(fn, name, reference, mistakes):
    for desc, rewards, G in _group_cases():
        original = rewards.clone()
        call = f"{name}(rewards={_show(rewards)}, group_size={G}) ({desc})"
        got = fn(rewards, G)
        if not torch.equal(rewards, original):
            raise Failure(f"{call} changed rewards; compute a new tensor instead")
        N = rewards.numel()
        why = (f" (flatten the (prompts, G) view back to ({N},))" if torch.is_tensor(got) and got.numel() == N else "")
        _vector(call, got, N, "one advantage per completion", why)
        expected = reference(rewards, G)
        if not _close(got, expected):
            note = _notes(got, mistakes(rewards, G), _close)
            raise Failure(f"{call}:\nexpected {_show(expected, 4)}\ngot      {_show(got, 4)}{note}")


@task("07", "7.2", "group_advantages", "GRPO: each reward against its group's mean and std", "core",
      hint="grouped = rewards.view(-1, group_size) (one row per prompt); (grouped - grouped.mean(1, keepdim=True)) "
           "/ (grouped.std(1, keepdim=True) + 1e-4), then .view(-1). torch's .std() is the unbiased one, as in TRL")
def check_group_advantages(group_advantages):
    _check_baseline(group_advantages, "group_advantages", group_advantages_reference, _group_mistakes)


# --- 7.3 (stretch): RLOO's leave-one-out baseline ------------------------------------------------------


def rloo_advantages_reference(rewards, group_size) -> torch.Tensor:
    return rl.rloo_advantages(rewards, group_size)


def _rloo_mistakes(rewards, G):
    grouped = rewards.view(-1, G)
    others = (grouped.sum(1, keepdim=True) - grouped) / (G - 1)
    strided = rewards.view(G, -1)
    N = rewards.numel()
    return [
        (lambda: (grouped - grouped.mean(1, keepdim=True)).view(-1), "your baseline is the group mean, which "
         "includes the sample itself; leave it out: the mean of the OTHER G − 1 rewards of its group"),
        (lambda: (grouped - (grouped.sum(1, keepdim=True) - grouped) / G).view(-1), "the other rewards are G − 1, "
         "so divide their sum by G − 1, not G"),
        (lambda: (others - grouped).view(-1), "sign reversed: the advantage is reward − baseline"),
        (lambda: (rewards - (rewards.sum() - rewards) / (N - 1)), "you left one out of the whole batch; the "
         "baseline comes from the other completions of the SAME prompt, rewards.view(-1, G)"),
        (lambda: (strided - (strided.sum(0) - strided) / (G - 1)).reshape(-1), "a group is G CONSECUTIVE rewards, "
         "rewards.view(-1, G); you grouped every (N/G)-th reward together"),
        (lambda: ((grouped - others) / (grouped.std(1, keepdim=True) + 1e-4)).view(-1), "RLOO does not divide by "
         "a std: the advantage is the reward minus the mean of the others"),
    ]


@task("07", "7.3", "rloo_advantages", "RLOO: each reward against the mean of the others", "stretch",
      hint="grouped = rewards.view(-1, group_size); others = (grouped.sum(1, keepdim=True) - grouped) / "
           "(group_size - 1): the mean of the other rewards of the group, without a loop; (grouped - others).view(-1)")
def check_rloo_advantages(rloo_advantages):
    _check_baseline(rloo_advantages, "rloo_advantages", rloo_advantages_reference, _rloo_mistakes)
