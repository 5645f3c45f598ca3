"""Chapter 05 (reward modeling) grading bites: references pass, common mistakes fail and say why
(solution 100% and exercise 0 are checked for every chapter in test_grading.py)."""

import math
import re

import pytest
import torch
import torch.nn.functional as F

from course_utils import grading
from grading_asserts import chapter_tests


pytestmark = pytest.mark.usefixtures("one_thread")  # small tensors: threads only add overhead


# --- references (what the solution notebook has) -----------------------------------------------------

def pairwise_loss(r_chosen, r_rejected, margin=None):
    d = r_chosen - r_rejected - (margin if margin is not None else 0.0)
    return -F.logsigmoid(d).mean()


def pool_last_token(hidden, attention_mask):
    positions = torch.arange(attention_mask.size(1))
    last = (positions * attention_mask).argmax(dim=1)  # (B,)
    return hidden[torch.arange(hidden.size(0)), last]


def _norm(text):
    return " ".join(re.sub(r"[^\w\s]", " ", text.casefold()).split())


def _dedupe(rows, key, last=False):
    seen, kept = set(), []
    for row in (reversed(rows) if last else rows):
        k = key(row)
        if k not in seen:
            seen.add(k)
            kept.append(row)
    return kept[::-1] if last else kept


def dedupe_pairs(rows):
    return _dedupe(rows, lambda r: (_norm(r["prompt"]), _norm(r["chosen"]), _norm(r["rejected"])))


def _sign(v):
    return (v > 0) - (v < 0)


def _tau(x, y, *, tie_correction=True, flip=False, from_i=1):
    """τ-b over pairs i < j; from_i=0 also visits (i, i), which a careless loop counts as a tie."""
    n, s, tx, ty = len(x), 0, 0, 0
    for i in range(n):
        for j in range(i + from_i, n):
            s += _sign(x[i] - x[j]) * _sign(y[i] - y[j])
            tx += x[i] == x[j]
            ty += y[i] == y[j]
    n0 = n * (n - 1) / 2
    denominator = math.sqrt((n0 - tx) * (n0 - ty)) if tie_correction else n0
    if denominator == 0:
        return float("nan")
    return (-s if flip else s) / denominator


def kendall_tau(x, y):
    return _tau(x, y)


REFERENCES = {"5.1": (pairwise_loss,), "5.2": (pool_last_token,), "5.3": (dedupe_pairs,), "5.4": (kendall_tau,)}


# --- common mistakes -----------------------------------------------------------------------------------

def loss_sign_flipped(r_chosen, r_rejected, margin=None):
    return pairwise_loss(r_rejected, r_chosen, margin)


def loss_log_of_sigmoid(r_chosen, r_rejected, margin=None):
    d = r_chosen - r_rejected - (margin if margin is not None else 0.0)
    return -torch.log(torch.sigmoid(d)).mean()


def loss_sum(r_chosen, r_rejected, margin=None):
    d = r_chosen - r_rejected - (margin if margin is not None else 0.0)
    return -F.logsigmoid(d).sum()


def loss_margin_added(r_chosen, r_rejected, margin=None):
    d = r_chosen - r_rejected + (margin if margin is not None else 0.0)
    return -F.logsigmoid(d).mean()


def loss_ignores_margin(r_chosen, r_rejected, margin=None):
    return -F.logsigmoid(r_chosen - r_rejected).mean()


def loss_per_pair(r_chosen, r_rejected, margin=None):
    d = r_chosen - r_rejected - (margin if margin is not None else 0.0)
    return -F.logsigmoid(d)


def loss_item(r_chosen, r_rejected, margin=None):
    return torch.tensor(pairwise_loss(r_chosen, r_rejected, margin).item())


def pool_position_minus_one(hidden, attention_mask):
    return hidden[:, -1]


def pool_length_minus_one(hidden, attention_mask):
    return hidden[torch.arange(hidden.size(0)), attention_mask.sum(1) - 1]


def pool_first_token(hidden, attention_mask):
    return hidden[:, 0]


def pool_first_real_token(hidden, attention_mask):
    return hidden[torch.arange(hidden.size(0)), attention_mask.argmax(1)]


def pool_mean(hidden, attention_mask):
    m = attention_mask[..., None].float()
    return (hidden * m).sum(1) / m.sum(1)


def dedupe_exact_only(rows):
    return _dedupe(rows, lambda r: (r["prompt"], r["chosen"], r["rejected"]))


def dedupe_by_prompt(rows):
    return _dedupe(rows, lambda r: _norm(r["prompt"]))


def dedupe_keeps_last(rows):
    return _dedupe(rows, lambda r: (_norm(r["prompt"]), _norm(r["chosen"]), _norm(r["rejected"])), last=True)


def dedupe_reorders(rows):
    kept = dedupe_pairs(rows)
    return sorted(kept, key=lambda r: (r["prompt"], r["chosen"], r["rejected"]))


def dedupe_unordered_sides(rows):
    return _dedupe(rows, lambda r: (_norm(r["prompt"]), frozenset((_norm(r["chosen"]), _norm(r["rejected"])))))


def dedupe_lower_only(rows):
    return _dedupe(rows, lambda r: (r["prompt"].lower(), r["chosen"].lower(), r["rejected"].lower()))


def dedupe_normalises_in_place(rows):
    for r in rows:
        r["prompt"] = _norm(r["prompt"])
    return dedupe_pairs(rows)


def tau_a(x, y):
    return _tau(x, y, tie_correction=False)


def tau_sign_reversed(x, y):
    return _tau(x, y, flip=True)


def tau_counts_i_equals_j(x, y):
    return _tau(x, y, from_i=0)


def tau_all_ordered_pairs(x, y):  # i != j in both orders: each pair twice, denominator from n (n - 1) / 2
    n = len(x)
    s = sum(_sign(x[i] - x[j]) * _sign(y[i] - y[j]) for i in range(n) for j in range(n) if i != j)
    n0 = n * (n - 1) / 2
    tx = sum(x[i] == x[j] for i in range(n) for j in range(i + 1, n))
    ty = sum(y[i] == y[j] for i in range(n) for j in range(i + 1, n))
    return s / math.sqrt((n0 - tx) * (n0 - ty))


def tau_elif_ties(x, y):  # a pair tied in both is counted as tied in x only
    n, s, tx, ty = len(x), 0, 0, 0
    for i in range(n):
        for j in range(i + 1, n):
            if x[i] == x[j]:
                tx += 1
            elif y[i] == y[j]:
                ty += 1
            else:
                s += _sign(x[i] - x[j]) * _sign(y[i] - y[j])
    n0 = n * (n - 1) / 2
    return s / math.sqrt((n0 - tx) * (n0 - ty))


def tau_ties_discordant(x, y):
    n, s, tx, ty = len(x), 0, 0, 0
    for i in range(n):
        for j in range(i + 1, n):
            s += 1 if (x[i] - x[j]) * (y[i] - y[j]) > 0 else -1
            tx += x[i] == x[j]
            ty += y[i] == y[j]
    n0 = n * (n - 1) / 2
    return s / math.sqrt((n0 - tx) * (n0 - ty))


def tau_divides_by_zero(x, y):
    n, s, tx, ty = len(x), 0, 0, 0
    for i in range(n):
        for j in range(i + 1, n):
            s += _sign(x[i] - x[j]) * _sign(y[i] - y[j])
            tx += x[i] == x[j]
            ty += y[i] == y[j]
    n0 = n * (n - 1) / 2
    return s / math.sqrt((n0 - tx) * (n0 - ty))


def tau_sorts_in_place(x, y):
    order = sorted(range(len(x)), key=lambda i: x[i])
    y[:] = [y[i] for i in order]
    x.sort()
    return kendall_tau(x, y)


# (task, functions with the mistake, words the message must contain)
WRONG = [
    ("5.1", (loss_sign_flipped,), "sign flipped"),
    ("5.1", (loss_log_of_sigmoid,), "F.logsigmoid"),
    ("5.1", (loss_sum,), "summed"),
    ("5.1", (loss_margin_added,), "the margin is subtracted"),
    ("5.1", (loss_ignores_margin,), "you ignored margin"),
    ("5.1", (loss_per_pair,), "one loss per pair"),
    ("5.1", (loss_item,), "without gradients"),
    ("5.2", (pool_position_minus_one,), "position -1"),
    ("5.2", (pool_length_minus_one,), "left padding"),
    ("5.2", (pool_first_token,), "first token"),
    ("5.2", (pool_first_real_token,), "FIRST 1"),
    ("5.2", (pool_mean,), "mean over the real tokens"),
    ("5.3", (dedupe_exact_only,), "exact duplicates only"),
    ("5.3", (dedupe_by_prompt,), "one row per prompt"),
    ("5.3", (dedupe_keeps_last,), "LAST row"),
    ("5.3", (dedupe_reorders,), "another order"),
    ("5.3", (dedupe_unordered_sides,), "the sides are ordered"),
    ("5.3", (dedupe_lower_only,), "normalise to"),
    ("5.3", (dedupe_normalises_in_place,), "changed its input"),
    ("5.4", (tau_a,), "τ-a"),
    ("5.4", (tau_sign_reversed,), "sign reversed"),
    ("5.4", (tau_counts_i_equals_j,), "i == j is no pair"),
    ("5.4", (tau_all_ordered_pairs,), "twice"),
    ("5.4", (tau_elif_ties,), "n1 AND n2"),
    ("5.4", (tau_ties_discordant,), "neither concordant nor discordant"),
    ("5.4", (tau_divides_by_zero,), "float('nan')"),
    ("5.4", (tau_sorts_in_place,), "in place"),
]


(test_common_mistake_fails_and_names_it, test_reference_passes,
 test_every_task_has_a_wrong_variant_and_tiers_are_valid) = chapter_tests("05", WRONG, REFERENCES)


def test_dedupe_reference_follows_clean_pairs():
    """The grader's rule for 5.3 is clean_pairs' rule for exact and near duplicates, on the tiny world's rows."""
    from course_utils.grading.ch05 import dedupe_pairs_reference
    from course_utils.reward import clean_pairs, is_tie
    from course_utils.world import preference_pairs

    rows = [r for r in preference_pairs(0, 300, "train", duplicate_rate=0.2) if not is_tie(r)]
    kept, removed = clean_pairs(rows)
    assert removed["exact duplicate"] > 0 and removed["near duplicate"] > 0
    assert [r["id"] for r in dedupe_pairs_reference(rows)] == [r["id"] for r in kept] == \
        [r["id"] for r in dedupe_pairs(rows)]
    assert not any(r["meta"]["duplicate_of"] for r in kept)


def test_tau_reference_is_scipy_tau_b():
    from scipy.stats import kendalltau

    from course_utils.grading.ch05 import _tau_cases, kendall_tau_reference

    for _, x, y in _tau_cases():
        assert kendall_tau_reference(x, y) == pytest.approx(kendalltau(x, y, variant="b").statistic, abs=1e-12)
        assert kendall_tau(x, y) == pytest.approx(kendalltau(x, y).statistic, abs=1e-12)


def test_failure_shows_the_call_and_expected_vs_got():
    row = grading.check("5.1", loss_log_of_sigmoid)[0]
    assert "difference is -200" in row.message and "expected 200.000" in row.message and "inf" in row.message
    row = grading.check("5.2", pool_position_minus_one)[0]
    assert "[[1, 1, 1, 0, 0]," in row.message and "positions [2, 4, 0]" in row.message
    assert "positions [4, 4, 4]" in row.message
    row = grading.check("5.3", dedupe_exact_only)[0]
    assert "expected the rows at indices [0, 1, 4, 7, 8]" in row.message
    row = grading.check("5.4", tau_a)[0]
    assert "scipy.stats.kendalltau" in row.message and "in both 2" in row.message


def test_checks_are_fast():
    import time

    for task_id, fns in REFERENCES.items():
        t0 = time.monotonic()
        grading.check(task_id, *fns)
        assert time.monotonic() - t0 < 1.0, task_id
