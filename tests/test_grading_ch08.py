"""Chapter 08 (distributed training) grading bites: references pass, common mistakes fail and say why
(solution 100% and exercise 0 are checked for every chapter in test_grading.py)."""

import pytest
import torch
import torch.nn.functional as F

from course_utils import grading
from course_utils.memory import estimate, llama_7b
from grading_asserts import chapter_tests

pytestmark = pytest.mark.usefixtures("one_thread")  # small tensors: threads only add overhead


# --- references (what the solution notebook has) -----------------------------------------------------

def shard(t, rank, world_size, dim=0):
    if t.size(dim) % world_size:
        raise ValueError(f"{t.size(dim)} is not divisible by {world_size}")
    n = t.size(dim) // world_size
    return t.narrow(dim, rank * n, n)


def all_gather(shards, dim=0):
    return torch.cat(shards, dim)


def column_row_parallel_mlp(x, w1, b1, w2, b2, world_size):
    y = 0
    for w1_r, b1_r, w2_r in zip(w1.chunk(world_size, 0), b1.chunk(world_size, 0), w2.chunk(world_size, 1)):
        y = y + F.linear(F.gelu(F.linear(x, w1_r, b1_r)), w2_r)
    return y + b2


def zero_model_state_bytes(n_params, stage, dp_degree, k=12):
    n = dp_degree
    return (2 * n_params / (n if stage >= 3 else 1) + 2 * n_params / (n if stage >= 2 else 1)
            + k * n_params / (n if stage >= 1 else 1))


def bubble_fraction(stages, microbatches):
    return (stages - 1) / (microbatches + stages - 1)


def pipeline_schedule(stages, microbatches):
    return [[t - s if 0 <= t - s < microbatches else None for s in range(stages)]
            for t in range(microbatches + stages - 1)]


REFERENCES = {"8.1": (shard, all_gather), "8.2": (column_row_parallel_mlp,), "8.3": (zero_model_state_bytes,),
              "8.4": (bubble_fraction, pipeline_schedule)}


# --- common mistakes -----------------------------------------------------------------------------------

def shard_strided(t, rank, world_size, dim=0):
    shard(t, rank, world_size, dim)
    return t.movedim(dim, 0)[rank::world_size].movedim(0, dim)


def shard_dim0(t, rank, world_size, dim=0):
    return shard(t, rank, world_size, 0)


def shard_end_inclusive(t, rank, world_size, dim=0):
    shard(t, rank, world_size, dim)
    n = t.size(dim) // world_size
    return t.movedim(dim, 0)[rank * n : (rank + 1) * n + 1].movedim(0, dim)


def shard_one_based(t, rank, world_size, dim=0):
    shard(t, rank, world_size, dim)
    n = t.size(dim) // world_size
    return t.movedim(dim, 0)[(rank + 1) * n : (rank + 2) * n].movedim(0, dim)


def shard_drops_remainder(t, rank, world_size, dim=0):
    n = t.size(dim) // world_size
    return t.narrow(dim, rank * n, n)


def shard_chunk(t, rank, world_size, dim=0):
    return t.chunk(world_size, dim)[rank]


def shard_wrong_error(t, rank, world_size, dim=0):
    if t.size(dim) % world_size:
        raise RuntimeError("not divisible")
    return shard(t, rank, world_size, dim)


def gather_stack(shards, dim=0):
    return torch.stack(shards, 0)


def gather_dim0(shards, dim=0):
    return torch.cat(shards, 0)


def gather_reversed(shards, dim=0):
    return torch.cat(shards[::-1], dim)


def mlp_bias_every_rank(x, w1, b1, w2, b2, world_size):
    y = 0
    for w1_r, b1_r, w2_r in zip(w1.chunk(world_size, 0), b1.chunk(world_size, 0), w2.chunk(world_size, 1)):
        y = y + F.linear(F.gelu(F.linear(x, w1_r, b1_r)), w2_r, b2)
    return y


def mlp_unsharded(x, w1, b1, w2, b2, world_size):  # right output, but no rank ever held a shard
    return F.linear(F.gelu(F.linear(x, w1, b1)), w2, b2)


def mlp_mean(x, w1, b1, w2, b2, world_size):
    return (column_row_parallel_mlp(x, w1, b1, w2, b2, world_size) - b2) / world_size + b2


def mlp_gelu_after_sum(x, w1, b1, w2, b2, world_size):
    y = 0
    for w1_r, b1_r, w2_r in zip(w1.chunk(world_size, 0), b1.chunk(world_size, 0), w2.chunk(world_size, 1)):
        y = y + F.linear(F.linear(x, w1_r, b1_r), w2_r)
    return F.gelu(y) + b2


def mlp_w2_rows(x, w1, b1, w2, b2, world_size):
    y = 0
    for w1_r, b1_r, w2_r in zip(w1.chunk(world_size, 0), b1.chunk(world_size, 0), w2.chunk(world_size, 0)):
        y = y + F.gelu(F.linear(x, w1_r, b1_r)) @ w2_r
    return y + b2


def mlp_w1_input_columns(x, w1, b1, w2, b2, world_size):
    y = 0
    for x_r, w1_r in zip(x.chunk(world_size, 1), w1.chunk(world_size, 1)):
        y = y + F.linear(F.gelu(F.linear(x_r, w1_r, b1)), w2)
    return y + b2


def zero_stage1_divides_all(n_params, stage, dp_degree, k=12):
    if stage == 1:
        return (4 + k) * n_params / dp_degree
    return zero_model_state_bytes(n_params, stage, dp_degree, k)


def zero_no_master_copy(n_params, stage, dp_degree, k=12):
    return zero_model_state_bytes(n_params, stage, dp_degree, k - 4)


def zero_k_fixed(n_params, stage, dp_degree, k=12):
    return zero_model_state_bytes(n_params, stage, dp_degree, 12)


def zero_stage2_keeps_gradients(n_params, stage, dp_degree, k=12):
    return zero_model_state_bytes(n_params, min(stage, 1) if stage == 2 else stage, dp_degree, k)


def zero_n_minus_1(n_params, stage, dp_degree, k=12):
    return zero_model_state_bytes(n_params, stage, max(dp_degree - 1, 1), k) if dp_degree > 1 else \
        zero_model_state_bytes(n_params, stage, dp_degree, k)


def zero_stage0_sharded(n_params, stage, dp_degree, k=12):
    return zero_model_state_bytes(n_params, 3 if stage == 0 else stage, dp_degree, k)


def zero_gigabytes(n_params, stage, dp_degree, k=12):
    return zero_model_state_bytes(n_params, stage, dp_degree, k) / 1e9


def bubble_over_m(stages, microbatches):
    return (stages - 1) / microbatches


def bubble_m_plus_p(stages, microbatches):
    return (stages - 1) / (microbatches + stages)


def bubble_swapped(stages, microbatches):
    return bubble_fraction(microbatches, stages)


def schedule_transposed(stages, microbatches):
    return [list(c) for c in zip(*pipeline_schedule(stages, microbatches))]


def schedule_t_plus_s(stages, microbatches):
    return [[None if v is None else v + s for s, v in enumerate(r)] for r in pipeline_schedule(stages, microbatches)]


def schedule_idle_minus_one(stages, microbatches):
    return [[-1 if v is None else v for v in r] for r in pipeline_schedule(stages, microbatches)]


def schedule_too_short(stages, microbatches):
    return pipeline_schedule(stages, microbatches)[:microbatches]


# (task, functions with the mistake, words the message must contain)
WRONG = [
    ("8.1", (shard_strided, all_gather), "STRIDED"),
    ("8.1", (shard_dim0, all_gather), "you split dim 0"),
    ("8.1", (shard_end_inclusive, all_gather), "ends BEFORE"),
    ("8.1", (shard_one_based, all_gather), "rank 0 owns the first block"),
    ("8.1", (shard_drops_remainder, all_gather), "dropped the remainder"),
    ("8.1", (shard_chunk, all_gather), "UNEQUAL"),
    ("8.1", (shard_wrong_error, all_gather), "expected ValueError"),
    ("8.1", (shard, gather_stack), "torch.stack"),
    ("8.1", (shard, gather_dim0), "along dim 0"),
    ("8.1", (shard, gather_reversed), "rank order"),
    ("8.2", (mlp_bias_every_rank,), "b2 added on every rank"),
    ("8.2", (mlp_mean,), "SUMS"),
    ("8.2", (mlp_unsharded,), "whole weight matrix"),
    ("8.2", (mlp_gelu_after_sum,), "gelu after the sum"),
    ("8.2", (mlp_w2_rows,), "INPUT dim"),
    ("8.2", (mlp_w1_input_columns,), "INPUT columns"),
    ("8.3", (zero_stage1_divides_all,), "stage 1 shards only the optimizer states"),
    ("8.3", (zero_no_master_copy,), "master copy"),
    ("8.3", (zero_k_fixed,), "the k you are given"),
    ("8.3", (zero_stage2_keeps_gradients,), "also shards the gradients"),
    ("8.3", (zero_n_minus_1,), "not N − 1"),
    ("8.3", (zero_stage0_sharded,), "plain data parallel"),
    ("8.3", (zero_gigabytes,), "return bytes"),
    ("8.4", (bubble_over_m, pipeline_schedule), "USEFUL"),
    ("8.4", (bubble_m_plus_p, pipeline_schedule), "not m + p"),
    ("8.4", (bubble_swapped, pipeline_schedule), "arguments swapped"),
    ("8.4", (bubble_fraction, schedule_transposed), "TIME STEP"),
    ("8.4", (bubble_fraction, schedule_t_plus_s), "not t + s"),
    ("8.4", (bubble_fraction, schedule_idle_minus_one), "None, not -1"),
    ("8.4", (bubble_fraction, schedule_too_short), "m + p − 1"),
]


(test_common_mistake_fails_and_names_it, test_reference_passes,
 test_every_task_has_a_wrong_variant_and_tiers_are_valid) = chapter_tests("08", WRONG, REFERENCES)


def test_an_untouched_stub_is_not_implemented():
    def shard(t, rank, world_size, dim=0):
        raise NotImplementedError("task 8.1: not implemented yet")

    def all_gather(shards, dim=0):
        raise NotImplementedError("task 8.1: not implemented yet")

    row = grading.check("8.1", shard, all_gather)[0]
    assert row.status == "not implemented" and row.earned == 0


def test_zero_reference_is_the_course_memory_estimate():
    """The paper's formula (K = 12) and course_utils.memory.estimate agree, part by part rounded up to whole bytes."""
    from course_utils.grading.ch08 import zero_model_state_bytes_reference

    for n_params in (7_500_000_000, 6_738_415_616, 1_000_003):
        for stage in range(4):
            for n in (1, 4, 16, 64):
                setup = llama_7b(n_params=n_params, mixed_precision=True, zero_stage=stage, dp_degree=n)
                paper = zero_model_state_bytes_reference(n_params, stage, n)
                assert estimate(setup).model_states == pytest.approx(paper, abs=3), (n_params, stage, n)
    gb = [zero_model_state_bytes_reference(7_500_000_000, s, 64) / 1e9 for s in range(4)]
    assert gb == pytest.approx([120, 31.4, 16.6, 1.9], abs=0.05)  # the ZeRO paper, Figure 1


def test_tensor_parallel_reference_equals_the_unsharded_mlp():
    from course_utils.grading.ch08 import _mlp_cases, column_row_parallel_mlp_reference, mlp_reference

    for _, x, w1, b1, w2, b2, world_size in _mlp_cases():
        assert torch.allclose(column_row_parallel_mlp_reference(x, w1, b1, w2, b2, world_size),
                              mlp_reference(x, w1, b1, w2, b2), atol=1e-6)


def test_the_cases_cover_the_edges():
    """World size 1, a non-zero and a negative dim, one stage, one micro-batch, ZeRO on one GPU, a k other than 12."""
    from course_utils.grading.ch08 import _PIPE_CASES, _mlp_cases, _shard_cases, _zero_cases

    shards = list(_shard_cases())
    assert {W for *_, W, _ in shards} >= {1, 5} and {d for *_, d in shards} >= {0, 1, -1}
    assert any(W == 1 for *_, W in _mlp_cases()) and any(w2.size(0) != w2.size(1) for _, _, _, _, w2, _, _ in _mlp_cases())
    assert {1, 4} <= {p for p, _ in _PIPE_CASES} and 1 in {m for _, m in _PIPE_CASES}
    zero = list(_zero_cases())
    assert {s for _, _, s, _, _ in zero} == {0, 1, 2, 3} and any(n == 1 for _, _, _, n, _ in zero)
    assert any(k != 12 for *_, k in zero)


def test_failure_shows_the_call_and_expected_vs_got():
    row = grading.check("8.2", mlp_bias_every_rank)[0]
    assert "world_size=2" in row.message and "expected" in row.message and "2 × b2" in row.message
    row = grading.check("8.4", bubble_fraction, schedule_transposed)[0]
    assert "t=0: [0, None, None, None]" in row.message


def test_checks_are_fast():
    import time

    for task_id, fns in REFERENCES.items():
        t0 = time.monotonic()
        grading.check(task_id, *fns)
        assert time.monotonic() - t0 < 1.0, task_id
