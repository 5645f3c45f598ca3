"""Chapter 03 (SFT) grading bites: references pass, common mistakes fail (solution 100% and exercise 0 are
checked for every chapter in test_grading.py)."""


import pytest
import torch

from course_utils import grading
from grading_asserts import assert_mistake_fails, assert_reference_passes, assert_tasks_covered


# --- references (what the solution notebook has) -----------------------------------------------------

def build_example(prompt_ids, response_ids, bos_id, eos_id):
    return [bos_id, *prompt_ids, *response_ids, eos_id], [-100] * (1 + len(prompt_ids)) + [*response_ids, eos_id]


def masked_mean(values, mask):
    mask = mask.to(values.dtype)
    return (values * mask).sum() / mask.sum().clamp(min=1)


def pad_batch(seqs, pad_id, side="right"):
    T = max(len(s) for s in seqs)
    ids = [(list(s) + [pad_id] * (T - len(s))) if side == "right" else ([pad_id] * (T - len(s)) + list(s)) for s in seqs]
    mask = [([1] * len(s) + [0] * (T - len(s))) if side == "right" else ([0] * (T - len(s)) + [1] * len(s)) for s in seqs]
    return torch.tensor(ids), torch.tensor(mask)


def _assistant_mask(ids, im_start_id, im_end_id, header, eos_id, *, keep_header=False, last_only=False,
                    need_im_start=True, with_eos=True):
    mask, h, i, turns = [False] * len(ids), len(header), 0, []
    while i < len(ids):
        at_header = list(ids[i + 1 : i + 1 + h]) == list(header)
        if at_header and (ids[i] == im_start_id or not need_im_start):
            start = i + 1 if keep_header else i + 1 + h
            j = i + 1 + h
            while j < len(ids) and ids[j] != im_end_id:
                j += 1
            end = j + 1 if with_eos and j + 1 < len(ids) and ids[j + 1] == eos_id else j
            turns.append((start, end))
            i = j + 1
        else:
            i += 1
    for start, end in turns[-1:] if last_only else turns:
        for k in range(start, min(end, len(ids) - 1) + 1):
            mask[k] = True
    return mask


def assistant_token_mask(ids, im_start_id, im_end_id, header, eos_id):
    return _assistant_mask(ids, im_start_id, im_end_id, header, eos_id)


REFERENCES = {"3.1": build_example, "3.2": masked_mean, "3.3": pad_batch, "3.4": assistant_token_mask}


# --- common mistakes -----------------------------------------------------------------------------------

def example_loss_on_prompt(p, r, bos, eos):
    ids = [bos, *p, *r, eos]
    return ids, [-100, *ids[1:]]


def example_no_eos(p, r, bos, eos):
    return [bos, *p, *r], [-100] * (1 + len(p)) + list(r)


def example_eos_ignored(p, r, bos, eos):
    return [bos, *p, *r, eos], [-100] * (1 + len(p)) + [*r, -100]


def mean_over_all_positions(values, mask):
    return (values * mask).mean()


def mean_nan_on_empty(values, mask):
    return values[mask.bool()].mean()


def mean_detached(values, mask):
    m = mask.bool()
    return torch.tensor(values[m].mean().item() if m.any() else 0.0)


def pad_always_right(seqs, pad_id, side="right"):
    return pad_batch(seqs, pad_id, "right")


def pad_mask_on_pads(seqs, pad_id, side="right"):
    ids, _ = pad_batch(seqs, pad_id, side)
    return ids, torch.ones_like(ids)


def pad_left_mask_not_flipped(seqs, pad_id, side="right"):  # left-pads the ids, but the mask stays right-padded
    ids, _ = pad_batch(seqs, pad_id, side)
    return ids, pad_batch(seqs, pad_id, "right")[1]


def pad_float_mask(seqs, pad_id, side="right"):
    ids, mask = pad_batch(seqs, pad_id, side)
    return ids, mask.float()


def mask_with_header(ids, s, e, h, eos):
    return _assistant_mask(ids, s, e, h, eos, keep_header=True)


def mask_last_turn_only(ids, s, e, h, eos):
    return _assistant_mask(ids, s, e, h, eos, last_only=True)


def mask_header_anywhere(ids, s, e, h, eos):  # matches 'assistant\n' even inside a user message
    return _assistant_mask(ids, s, e, h, eos, need_im_start=False)


def mask_without_eos(ids, s, e, h, eos):
    return _assistant_mask(ids, s, e, h, eos, with_eos=False)


WRONG = [
    ("3.1", example_loss_on_prompt), ("3.1", example_no_eos), ("3.1", example_eos_ignored),
    ("3.2", mean_over_all_positions), ("3.2", mean_nan_on_empty), ("3.2", mean_detached),
    ("3.3", pad_always_right), ("3.3", pad_mask_on_pads), ("3.3", pad_left_mask_not_flipped), ("3.3", pad_float_mask),
    ("3.4", mask_with_header), ("3.4", mask_last_turn_only), ("3.4", mask_header_anywhere), ("3.4", mask_without_eos),
]


@pytest.mark.parametrize("task_id,fn", WRONG, ids=[f"{t}-{f.__name__}" for t, f in WRONG])
def test_common_mistake_fails(task_id, fn):
    assert_mistake_fails(task_id, (fn,))


@pytest.mark.parametrize("task_id", sorted(REFERENCES))
def test_reference_passes(task_id):
    assert_reference_passes(task_id, (REFERENCES[task_id],))


def test_every_task_has_a_wrong_variant_and_tiers_are_valid():
    assert_tasks_covered("03", {t for t, _ in WRONG}, set(REFERENCES))


def test_assistant_mask_failure_shows_the_conversation():
    row = grading.check("3.4", mask_with_header)[0]
    assert "[brackets]" in row.message and "assistant_header_ids=" in row.message and row.message.count("[") > 3


def test_checks_are_fast():
    import time

    from course_utils.grading.ch03 import _chat_cases

    _chat_cases.cache_clear()
    for task_id, fn in REFERENCES.items():
        t0 = time.monotonic()
        grading.check(task_id, fn)
        assert time.monotonic() - t0 < (3.0 if task_id == "3.4" else 1.0), task_id
