"""Chapter 07 (DPO, GRPO, RLOO) grading bites: references pass, common mistakes fail and say why
(solution 100% and exercise 0 are checked for every chapter in test_grading.py)."""

import pytest
import torch
import torch.nn.functional as F

from course_utils import grading
from grading_asserts import chapter_tests

pytestmark = pytest.mark.usefixtures("one_thread")  # small tensors: threads only add overhead


# --- references (what the solution notebook has) -----------------------------------------------------

def _dpo(losses, chosen_rewards, rejected_rewards):
    return {"losses": losses, "chosen_rewards": chosen_rewards, "rejected_rewards": rejected_rewards,
            "margins": chosen_rewards - rejected_rewards,
            "accuracy": (chosen_rewards > rejected_rewards).float().mean()}


def dpo_loss(policy_chosen, policy_rejected, ref_chosen, ref_rejected, beta=0.1):
    chosen_ratio, rejected_ratio = policy_chosen - ref_chosen, policy_rejected - ref_rejected
    losses = -F.logsigmoid(beta * (chosen_ratio - rejected_ratio))
    return _dpo(losses, beta * chosen_ratio.detach(), beta * rejected_ratio.detach())


def group_advantages(rewards, group_size):
    grouped = rewards.view(-1, group_size)
    return ((grouped - grouped.mean(1, keepdim=True)) / (grouped.std(1, keepdim=True) + 1e-4)).view(-1)


def rloo_advantages(rewards, group_size):
    grouped = rewards.view(-1, group_size)
    others = (grouped.sum(1, keepdim=True) - grouped) / (group_size - 1)
    return (grouped - others).view(-1)


REFERENCES = {"7.1": (dpo_loss,), "7.2": (group_advantages,), "7.3": (rloo_advantages,)}


# --- common mistakes -----------------------------------------------------------------------------------

def dpo_no_beta(pc, pr, rc, rr, beta=0.1):
    out = dpo_loss(pc, pr, rc, rr, beta)
    return out | {"losses": -F.logsigmoid((pc - rc) - (pr - rr))}


def dpo_beta_outside(pc, pr, rc, rr, beta=0.1):
    out = dpo_loss(pc, pr, rc, rr, beta)
    return out | {"losses": -beta * F.logsigmoid((pc - rc) - (pr - rr))}


def dpo_swapped(pc, pr, rc, rr, beta=0.1):
    return dpo_loss(pr, pc, rr, rc, beta)


def dpo_no_reference(pc, pr, rc, rr, beta=0.1):
    return dpo_loss(pc, pr, torch.zeros_like(rc), torch.zeros_like(rr), beta)


def dpo_reference_added(pc, pr, rc, rr, beta=0.1):
    return dpo_loss(pc, pr, -rc, -rr, beta)


def dpo_log_of_sigmoid(pc, pr, rc, rr, beta=0.1):
    out = dpo_loss(pc, pr, rc, rr, beta)
    return out | {"losses": -torch.log(torch.sigmoid(beta * ((pc - rc) - (pr - rr))))}


def dpo_mean_loss(pc, pr, rc, rr, beta=0.1):
    out = dpo_loss(pc, pr, rc, rr, beta)
    return out | {"losses": out["losses"].mean()}


def dpo_rewards_not_detached(pc, pr, rc, rr, beta=0.1):
    out = dpo_loss(pc, pr, rc, rr, beta)
    return out | {"chosen_rewards": beta * (pc - rc), "rejected_rewards": beta * (pr - rr)}


def dpo_rewards_no_beta(pc, pr, rc, rr, beta=0.1):
    out = dpo_loss(pc, pr, rc, rr, beta)
    return out | _dpo(out["losses"], (pc - rc).detach(), (pr - rr).detach())


def dpo_rewards_policy_only(pc, pr, rc, rr, beta=0.1):
    out = dpo_loss(pc, pr, rc, rr, beta)
    return out | _dpo(out["losses"], beta * pc.detach(), beta * pr.detach())


def dpo_accuracy_counts_ties(pc, pr, rc, rr, beta=0.1):
    out = dpo_loss(pc, pr, rc, rr, beta)
    return out | {"accuracy": (out["chosen_rewards"] >= out["rejected_rewards"]).float().mean()}


def dpo_accuracy_count(pc, pr, rc, rr, beta=0.1):
    out = dpo_loss(pc, pr, rc, rr, beta)
    return out | {"accuracy": (out["chosen_rewards"] > out["rejected_rewards"]).sum()}


def dpo_tuple(pc, pr, rc, rr, beta=0.1):  # TRL's return value, not course_utils.dpo's
    out = dpo_loss(pc, pr, rc, rr, beta)
    return out["losses"], out["chosen_rewards"], out["rejected_rewards"]


def group_population_std(rewards, group_size):
    grouped = rewards.view(-1, group_size)
    return ((grouped - grouped.mean(1, keepdim=True)) / (grouped.std(1, unbiased=False, keepdim=True) + 1e-4)).view(-1)


def group_no_eps(rewards, group_size):
    grouped = rewards.view(-1, group_size)
    return ((grouped - grouped.mean(1, keepdim=True)) / grouped.std(1, keepdim=True)).view(-1)


def group_eps_1e8(rewards, group_size):
    grouped = rewards.view(-1, group_size)
    return ((grouped - grouped.mean(1, keepdim=True)) / (grouped.std(1, keepdim=True) + 1e-8)).view(-1)


def group_eps_in_sqrt(rewards, group_size):
    grouped = rewards.view(-1, group_size)
    return ((grouped - grouped.mean(1, keepdim=True)) / torch.sqrt(grouped.var(1, keepdim=True) + 1e-4)).view(-1)


def group_whole_batch(rewards, group_size):
    return (rewards - rewards.mean()) / (rewards.std() + 1e-4)


def group_batch_std(rewards, group_size):
    grouped = rewards.view(-1, group_size)
    return (grouped - grouped.mean(1, keepdim=True)).view(-1) / (rewards.std() + 1e-4)


def group_no_std(rewards, group_size):
    grouped = rewards.view(-1, group_size)
    return (grouped - grouped.mean(1, keepdim=True)).view(-1)


def group_strided(rewards, group_size):
    grouped = rewards.view(group_size, -1)
    return ((grouped - grouped.mean(0)) / (grouped.std(0) + 1e-4)).reshape(-1)


def group_repeat_not_interleave(rewards, group_size):
    grouped = rewards.view(-1, group_size)
    return (rewards - grouped.mean(1).repeat(group_size)) / (grouped.std(1).repeat(group_size) + 1e-4)


def group_keeps_2d(rewards, group_size):
    grouped = rewards.view(-1, group_size)
    return (grouped - grouped.mean(1, keepdim=True)) / (grouped.std(1, keepdim=True) + 1e-4)


def group_in_place(rewards, group_size):
    grouped = rewards.view(-1, group_size)
    grouped -= grouped.mean(1, keepdim=True).clone()
    grouped /= grouped.std(1, keepdim=True) + 1e-4
    return rewards


def rloo_includes_itself(rewards, group_size):
    grouped = rewards.view(-1, group_size)
    return (grouped - grouped.mean(1, keepdim=True)).view(-1)


def rloo_divides_by_g(rewards, group_size):
    grouped = rewards.view(-1, group_size)
    return (grouped - (grouped.sum(1, keepdim=True) - grouped) / group_size).view(-1)


def rloo_sign(rewards, group_size):
    return -rloo_advantages(rewards, group_size)


def rloo_whole_batch(rewards, group_size):
    return rewards - (rewards.sum() - rewards) / (rewards.numel() - 1)


def rloo_strided(rewards, group_size):
    grouped = rewards.view(group_size, -1)
    return (grouped - (grouped.sum(0) - grouped) / (group_size - 1)).reshape(-1)


def rloo_normalised(rewards, group_size):
    grouped = rewards.view(-1, group_size)
    return (rloo_advantages(rewards, group_size).view(-1, group_size) / (grouped.std(1, keepdim=True) + 1e-4)).view(-1)


# (task, functions with the mistake, words the message must contain)
WRONG = [
    ("7.1", (dpo_no_beta,), "β is missing"),
    ("7.1", (dpo_beta_outside,), "INSIDE the sigmoid"),
    ("7.1", (dpo_swapped,), "chosen and rejected swapped"),
    ("7.1", (dpo_no_reference,), "subtract the reference"),
    ("7.1", (dpo_reference_added,), "SUBTRACTED"),
    ("7.1", (dpo_log_of_sigmoid,), "F.logsigmoid"),
    ("7.1", (dpo_mean_loss,), "one loss per pair"),
    ("7.1", (dpo_rewards_not_detached,), "detach them"),
    ("7.1", (dpo_rewards_no_beta,), "β is missing"),
    ("7.1", (dpo_rewards_policy_only,), "subtract the reference"),
    ("7.1", (dpo_accuracy_counts_ties,), "a tie is not a win"),
    ("7.1", (dpo_accuracy_count,), "SHARE"),
    ("7.1", (dpo_tuple,), "expected a dict"),
    ("7.2", (group_population_std,), "population std"),
    ("7.2", (group_no_eps,), "no eps"),
    ("7.2", (group_eps_1e8,), "eps = 1e-4"),
    ("7.2", (group_eps_in_sqrt,), "not under the square root"),
    ("7.2", (group_whole_batch,), "whole batch"),
    ("7.2", (group_batch_std,), "scale_rewards='batch'"),
    ("7.2", (group_no_std,), "Dr. GRPO"),
    ("7.2", (group_strided,), "CONSECUTIVE"),
    ("7.2", (group_repeat_not_interleave,), "repeat_interleave"),
    ("7.2", (group_keeps_2d,), "flatten"),
    ("7.2", (group_in_place,), "changed rewards"),
    ("7.3", (rloo_includes_itself,), "includes the sample itself"),
    ("7.3", (rloo_divides_by_g,), "not G"),
    ("7.3", (rloo_sign,), "sign reversed"),
    ("7.3", (rloo_whole_batch,), "whole batch"),
    ("7.3", (rloo_strided,), "CONSECUTIVE"),
    ("7.3", (rloo_normalised,), "does not divide by a std"),
]


(test_common_mistake_fails_and_names_it, test_reference_passes,
 test_every_task_has_a_wrong_variant_and_tiers_are_valid) = chapter_tests("07", WRONG, REFERENCES)


def test_an_untouched_stub_is_not_implemented():
    def rloo_advantages(rewards, group_size):
        raise NotImplementedError("task 7.3: not implemented yet")

    row = grading.check("7.3", rloo_advantages)[0]
    assert row.status == "not implemented" and row.earned == 0


def test_the_cases_cover_the_edges():
    """A group with equal rewards (std 0), groups of 2, a single prompt, and a DPO tie at the first step."""
    from course_utils.grading.ch07 import _dpo_cases, _group_cases

    groups = [(r.view(-1, g), g) for _, r, g in _group_cases()]
    assert any((v.std(1) == 0).any() for v, _ in groups)
    assert {g for _, g in groups} >= {2, 4, 8} and any(v.size(0) == 1 for v, _ in groups)
    assert any(torch.equal(pc, rc) and torch.equal(pr, rr) for _, pc, pr, rc, rr, _ in _dpo_cases())
    assert all(beta != 1 for *_, beta in _dpo_cases())  # a missing β must show


def test_failure_shows_the_call_and_expected_vs_got():
    row = grading.check("7.2", group_no_eps)[0]
    assert "group_size=4" in row.message and "nan" in row.message and "no signal" in row.message
    row = grading.check("7.1", dpo_log_of_sigmoid)[0]
    assert "beta=2.0" in row.message and "inf" in row.message


def test_checks_are_fast():
    import time

    for task_id, fns in REFERENCES.items():
        t0 = time.monotonic()
        grading.check(task_id, *fns)
        assert time.monotonic() - t0 < 1.0, task_id
