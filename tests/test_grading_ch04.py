"""Chapter 04 (LoRA / QLoRA) grading bites: references pass, common mistakes fail and say why
(solution 100% and exercise 0 are checked for every chapter in test_grading.py)."""


import pytest
import torch
import torch.nn.functional as F

from course_utils import grading
from grading_asserts import chapter_tests


pytestmark = pytest.mark.usefixtures("one_thread")  # small tensors: threads only add overhead


# --- references (what the solution notebook has) -----------------------------------------------------

def lora_forward(x, W, A, B, alpha, r):
    return x @ W.T + (alpha / r) * (x @ A.T) @ B.T


def merge(W, A, B, alpha, r):
    return W + (alpha / r) * (B @ A)


def unmerge(W_merged, A, B, alpha, r):
    return W_merged - (alpha / r) * (B @ A)


def count_lora_params(shapes, targets, r):
    return sum(r * (i + o) for name, (i, o) in shapes.items() if any(name == t or name.endswith("." + t) for t in targets))


def _quantize(w, code, blocksize, *, per_block=True, absfn=torch.abs, pad=True, clamp=True):
    flat = w.reshape(-1).float()
    n = flat.numel()
    if not pad:
        flat = flat[: n // blocksize * blocksize]
    blocks = F.pad(flat, (0, -flat.numel() % blocksize)).view(-1, blocksize)  # (n_blocks, blocksize)
    absmax = absfn(blocks).amax(dim=1) if per_block else absfn(flat).max().expand(blocks.shape[0])
    scale = absmax.clamp_min(torch.finfo(torch.float32).tiny) if clamp else absmax
    codes = (blocks / scale[:, None]).reshape(-1, 1).sub(code).abs().argmin(dim=1)
    return codes[: flat.numel() if not pad else n], absmax


def absmax_quantize_4bit(w, code, blocksize):
    return _quantize(w, code, blocksize)


def dequantize_4bit(codes, absmax, code, blocksize, shape):
    n = codes.numel()
    return (code[codes.long()] * absmax.repeat_interleave(blocksize)[:n]).reshape(shape)


REFERENCES = {"4.1": (lora_forward,), "4.2": (merge, unmerge), "4.3": (count_lora_params,),
              "4.4": (absmax_quantize_4bit, dequantize_4bit)}


# --- common mistakes -----------------------------------------------------------------------------------

def forward_no_scaling(x, W, A, B, alpha, r):
    return x @ W.T + (x @ A.T) @ B.T


def forward_alpha_not_over_r(x, W, A, B, alpha, r):
    return x @ W.T + alpha * (x @ A.T) @ B.T


def forward_delta_not_transposed(x, W, A, B, alpha, r):  # x @ (B A) instead of x @ (B A).T
    return x @ W.T + (alpha / r) * x @ (B @ A)


def forward_no_frozen_path(x, W, A, B, alpha, r):
    return (alpha / r) * (x @ A.T) @ B.T


def merge_no_scaling(W, A, B, alpha, r):
    return W + B @ A


def merge_in_place(W, A, B, alpha, r):
    return W.add_((alpha / r) * (B @ A))


def merge_transposed(W, A, B, alpha, r):  # A.T @ B.T is (B A).T: runs when W is square, gives the wrong matrix
    return W + (alpha / r) * (A.T @ B.T)


def unmerge_adds(W_merged, A, B, alpha, r):
    return W_merged + (alpha / r) * (B @ A)


def unmerge_in_place(W_merged, A, B, alpha, r):
    W_merged -= (alpha / r) * (B @ A)
    return W_merged


def count_full_rank(shapes, targets, r):
    return sum(r * i * o for name, (i, o) in shapes.items() if any(name == t or name.endswith("." + t) for t in targets))


def count_every_layer(shapes, targets, r):
    return sum(r * (i + o) for i, o in shapes.values())


def count_substring(shapes, targets, r):
    return sum(r * (i + o) for name, (i, o) in shapes.items() if any(t in name for t in targets))


def count_plain_endswith(shapes, targets, r):
    return sum(r * (i + o) for name, (i, o) in shapes.items() if any(name.endswith(t) for t in targets))


def count_twice(shapes, targets, r):
    return sum(r * (i + o) for t in targets for name, (i, o) in shapes.items() if name == t or name.endswith("." + t))


def quantize_one_absmax(w, code, blocksize):
    return _quantize(w, code, blocksize, per_block=False)


def quantize_one_scalar_absmax(w, code, blocksize):
    codes, absmax = _quantize(w, code, blocksize, per_block=False)
    return codes, absmax[:1]


def quantize_by_max(w, code, blocksize):
    return _quantize(w, code, blocksize, absfn=lambda t: t)


def quantize_drops_partial_block(w, code, blocksize):
    return _quantize(w, code, blocksize, pad=False)


def quantize_nan_on_zero_block(w, code, blocksize):
    return _quantize(w, code, blocksize, clamp=False)


def dequantize_first_absmax(codes, absmax, code, blocksize, shape):
    return (code[codes.long()] * absmax[0]).reshape(shape)


def dequantize_absmax_tiled(codes, absmax, code, blocksize, shape):  # repeat() tiles [a0, a1, a0, a1, ...]
    n = codes.numel()
    return (code[codes.long()] * absmax.repeat(blocksize)[:n]).reshape(shape)


# (task, functions with the mistake, words the message must contain)
WRONG = [
    ("4.1", (forward_no_scaling,), "scaled by alpha / r"),
    ("4.1", (forward_alpha_not_over_r,), "by alpha; LoRA scales it by alpha / r"),
    ("4.1", (forward_delta_not_transposed,), "(out, in)"),
    ("4.1", (forward_no_frozen_path,), "frozen W x"),
    ("4.2", (merge_no_scaling, unmerge), "scaled by alpha / r"),
    ("4.2", (merge_in_place, unmerge), "in place"),
    ("4.2", (merge_transposed, unmerge), "transpose"),
    ("4.2", (merge, unmerge_adds), "wrong sign"),
    ("4.2", (merge, unmerge_in_place), "in place"),
    ("4.3", (count_full_rank,), "r * (in + out)"),
    ("4.3", (count_every_layer,), "every layer"),
    ("4.3", (count_substring,), "substrings"),
    ("4.3", (count_plain_endswith,), "'.' + target"),
    ("4.3", (count_twice,), "counted twice"),
    ("4.4", (quantize_one_absmax, dequantize_4bit), "WHOLE tensor"),
    ("4.4", (quantize_one_scalar_absmax, dequantize_4bit), "one for the whole tensor"),
    ("4.4", (quantize_by_max, dequantize_4bit), "max of |x|"),
    ("4.4", (quantize_drops_partial_block, dequantize_4bit), "partial block"),
    ("4.4", (quantize_nan_on_zero_block, dequantize_4bit), "all zeros"),
    ("4.4", (absmax_quantize_4bit, dequantize_first_absmax), "i // blocksize"),
    ("4.4", (absmax_quantize_4bit, dequantize_absmax_tiled), "repeat_interleave"),
]


(test_common_mistake_fails_and_names_it, test_reference_passes,
 test_every_task_has_a_wrong_variant_and_tiers_are_valid) = chapter_tests("04", WRONG, REFERENCES)


def test_count_reference_follows_the_library():
    """The grader's rule for 4.3 is count_lora_parameters' rule, wherever the library can answer."""
    from course_utils.grading.ch04 import _count_cases, count_lora_params_reference

    checked = 0
    for _, shapes, targets, r, library in _count_cases():
        if library is not None:
            assert library == count_lora_params_reference(shapes, targets, r) == count_lora_params(shapes, targets, r)
            checked += 1
    assert checked >= 5


def test_failure_shows_the_call_and_expected_vs_got():
    row = grading.check("4.1", forward_no_scaling)[0]
    assert "lora_forward(x: (3, 4), W: (4, 4), A: (2, 4), B: (4, 2), alpha=8, r=2)" in row.message
    assert "expected [" in row.message and "got      [" in row.message
    row = grading.check("4.4", quantize_drops_partial_block, dequantize_4bit)[0]
    assert "blocksize=64" in row.message and "the last with only 44" in row.message


def test_checks_are_fast():
    import time

    for task_id, fns in REFERENCES.items():
        t0 = time.monotonic()
        grading.check(task_id, *fns)
        assert time.monotonic() - t0 < 1.0, task_id
