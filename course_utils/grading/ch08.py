"""Checks for chapter 08 — distributed training (分布式训练), as plain tensor and number functions that run in one
process: sharding and all-gather (数据并行 data parallel), a Megatron MLP on simulated ranks (张量并行 tensor
parallel), the ZeRO paper's memory formula (零冗余优化器 ZeRO), and GPipe's bubble (流水线并行 pipeline parallel).

References: ``torch.chunk`` / ``torch.cat`` (8.1); the unsharded MLP ``F.linear(F.gelu(F.linear(x, w1, b1)), w2,
b2)`` (8.2); the ZeRO paper's Figure 1 formula, which ``course_utils.memory.estimate`` reproduces for K = 12
(``tests/test_grading_ch08.py`` checks they agree) (8.3); the GPipe schedule (8.4).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from .core import Failure, close as _close, mistake_notes as _notes, show as _show, task


def _shape(x) -> str:
    return str(tuple(x.shape)) if torch.is_tensor(x) else type(x).__name__


def _slice(t: torch.Tensor, dim: int, index) -> torch.Tensor:
    """t[..., index, ...] along ``dim``, Python slicing (a slice past the end is short, it does not raise)."""
    return t.movedim(dim, 0)[index].movedim(0, dim)


# --- 8.1 (warm-up): shard and all-gather -----------------------------------------------------------------


def shard_reference(t: torch.Tensor, rank: int, world_size: int, dim: int = 0) -> torch.Tensor:
    if t.size(dim) % world_size:
        raise ValueError(f"size {t.size(dim)} along dim {dim} is not divisible by world_size {world_size}")
    return t.chunk(world_size, dim)[rank]


def all_gather_reference(shards, dim: int = 0) -> torch.Tensor:
    return torch.cat(list(shards), dim)


def _shard_cases():
    """(description, t, world_size, dim)."""
    g = torch.Generator().manual_seed(81)
    yield "8 rows over 4 ranks", torch.arange(24).view(8, 3), 4, 0
    yield "a (4, 6) weight split along dim 1 over 2 ranks", torch.randn(4, 6, generator=g), 2, 1
    yield "a (2, 6, 4) batch split along its sequence dim over 3 ranks", torch.randn(2, 6, 4, generator=g), 3, 1
    yield "12 columns along dim=-1 over 3 ranks", torch.arange(24.0).view(2, 12), 3, -1
    yield "5 values over 5 ranks (one each)", torch.arange(10, 15), 5, 0
    yield "one rank: the whole tensor", torch.randn(3, 2, generator=g), 1, 0


def _shard_mistakes(t, rank, W, dim):
    n = t.size(dim) // W
    return [
        (lambda: _slice(t, dim, slice(rank, None, W)), "that is a STRIDED shard (every world_size-th row, "
         "t[rank::world_size]); a rank owns one contiguous block: rows rank·n to (rank+1)·n, n = size / world_size"),
        (lambda: _slice(t, 0, slice(rank * (t.size(0) // W), (rank + 1) * (t.size(0) // W))), "you split dim 0; "
         "split along `dim` (t.narrow(dim, rank * n, n) or t.chunk(world_size, dim)[rank])"),
        (lambda: _slice(t, dim, slice(rank * n, (rank + 1) * n + 1)), "off by one: the block ends BEFORE (rank+1)·n "
         "(Python slices exclude their end)"),
        (lambda: _slice(t, dim, slice(rank * n + 1, (rank + 1) * n + 1)), "off by one: rank r's block starts at "
         "r·n, ranks count from 0"),
        (lambda: _slice(t, dim, slice((rank + 1) * n, (rank + 2) * n)), "off by one: ranks count from 0, rank 0 "
         "owns the first block"),
    ]


def _check_one_shard(shard, desc, t, W, dim):
    original = t.clone()
    for rank in range(W):
        shown = _show(t) if t.numel() <= 24 else f"<shape {_shape(t)}>"
        call = f"shard(t={shown}, rank={rank}, world_size={W}, dim={dim}) ({desc})"
        got = shard(t, rank, W, dim=dim)
        if not torch.equal(t, original):
            raise Failure(f"{call} changed t; a shard is a slice of it, never a modification")
        expected = shard_reference(t, rank, W, dim)
        if not torch.is_tensor(got) or got.shape != expected.shape or not torch.equal(got, expected):
            note = _notes(got, _shard_mistakes(t, rank, W, dim),
                          lambda a, b: torch.is_tensor(a) and a.shape == b.shape and torch.equal(a, b))
            if not note and torch.is_tensor(got) and got.dim() == t.dim() + 1:
                note = "\none shard keeps t's number of dimensions (torch.stack adds one)"
            raise Failure(f"{call}:\nexpected shape {_shape(expected)}: {_show(expected)}\ngot      shape "
                          f"{_shape(got)}: {_show(got) if torch.is_tensor(got) else repr(got)}{note}")


def _check_remainder(shard):
    t = torch.arange(14).view(7, 2)
    for W, rank in ((2, 0), (3, 2)):
        call = f"shard(t=<7 rows>, rank={rank}, world_size={W}, dim=0)"
        try:
            got = shard(t, rank, W, dim=0)
        except ValueError:
            continue
        except Exception as e:  # noqa: BLE001 - a wrong exception type is a wrong answer here
            raise Failure(f"{call}: expected ValueError (7 rows do not split into {W} equal shards), got "
                          f"{type(e).__name__}: {e}") from None
        n = 7 // W
        why = (f"\nyou silently dropped the remainder: {7 - n * W} row(s) would be on no rank, and training would "
               "never see them" if torch.is_tensor(got) and got.size(0) == n else
               "\ntorch.chunk gives UNEQUAL pieces when the size does not divide; check `size % world_size` first"
               if torch.is_tensor(got) else "")
        raise Failure(f"{call}: expected ValueError (7 rows do not split into {W} equal shards), but it returned "
                      f"shape {_shape(got)}{why}")


def _check_gather(all_gather, desc, t, W, dim):
    shards = [shard_reference(t, r, W, dim) for r in range(W)]
    originals = [s.clone() for s in shards]
    call = f"all_gather([{W} shards of shape {_shape(shards[0])}], dim={dim}) ({desc})"
    got = all_gather(list(shards), dim=dim)
    if not all(torch.equal(s, o) for s, o in zip(shards, originals)):
        raise Failure(f"{call} changed a shard; build a new tensor (torch.cat)")
    if not torch.is_tensor(got) or got.shape != t.shape or not torch.equal(got, t):
        note = _notes(got, [
            (lambda: torch.stack(shards, 0), "torch.stack adds a new dimension; all-gather CONCATENATES along dim "
             "(torch.cat)"),
            (lambda: torch.cat(shards, 0), "you concatenated along dim 0; gather along `dim`, the dim they were "
             "sharded along"),
            (lambda: torch.cat(shards[::-1], dim), "the shards come in rank order: rank 0's block first"),
        ], lambda a, b: torch.is_tensor(a) and a.shape == b.shape and torch.equal(a, b))
        small = torch.is_tensor(got) and got.numel() <= 24
        raise Failure(f"{call}:\nexpected the original tensor, shape {_shape(t)}: {_show(t) if small else '...'}\n"
                      f"got      shape {_shape(got)}: {_show(got) if small else '...'}{note}")


@task("08", "8.1", ("shard", "all_gather"), "shard a tensor into contiguous blocks, all-gather them back", "warm-up",
      hint="n = t.size(dim) // world_size after checking t.size(dim) % world_size == 0 (else raise ValueError); "
           "shard = t.narrow(dim, rank * n, n); all_gather = torch.cat(shards, dim)")
def check_shard_and_gather(shard, all_gather):
    cases = list(_shard_cases())
    for desc, t, W, dim in cases:
        _check_one_shard(shard, desc, t, W, dim)
    _check_remainder(shard)
    for desc, t, W, dim in cases:
        _check_gather(all_gather, desc, t, W, dim)
    desc, t, W, dim = cases[2]
    back = all_gather([shard(t, r, W, dim=dim) for r in range(W)], dim=dim)
    if not torch.equal(back, t):
        raise Failure(f"all_gather([shard(t, r, {W}, dim={dim}) for r in range({W})], dim={dim}) must rebuild t "
                      f"({desc})")


# --- 8.2 (core): a Megatron MLP on simulated ranks ----------------------------------------------------------


def mlp_reference(x, w1, b1, w2, b2) -> torch.Tensor:
    return F.linear(F.gelu(F.linear(x, w1, b1)), w2, b2)


def column_row_parallel_mlp_reference(x, w1, b1, w2, b2, world_size) -> torch.Tensor:
    partial = [F.linear(F.gelu(F.linear(x, w1_r, b1_r)), w2_r)  # (B, out): rank r's share of the output
               for w1_r, b1_r, w2_r in zip(w1.chunk(world_size, 0), b1.chunk(world_size, 0), w2.chunk(world_size, 1))]
    return torch.stack(partial).sum(0) + b2  # the all-reduce, then b2 once


def _mlp_cases():
    """(description, x (B, in), w1 (hidden, in), b1 (hidden,), w2 (out, hidden), b2 (out,), world_size)."""
    g = torch.Generator().manual_seed(82)

    def case(B, d_in, hidden, d_out):
        return (torch.randn(B, d_in, generator=g), torch.randn(hidden, d_in, generator=g) / d_in**0.5,
                torch.randn(hidden, generator=g), torch.randn(d_out, hidden, generator=g) / hidden**0.5,
                torch.randn(d_out, generator=g))

    yield ("B = 3, in 4, hidden 8, out 8, 2 ranks", *case(3, 4, 8, 8), 2)
    yield ("B = 2, in 6, hidden 12, out 5, 4 ranks", *case(2, 6, 12, 5), 4)
    yield ("B = 5, in 8, hidden 6, out 3, 3 ranks", *case(5, 8, 6, 3), 3)
    yield ("B = 2, in 3, hidden 4, out 2, 1 rank (no split)", *case(2, 3, 4, 2), 1)


def _mlp_mistakes(x, w1, b1, w2, b2, W):
    pre = F.linear(x, w1, b1)
    right = mlp_reference(x, w1, b1, w2, b2)
    h_chunks = F.gelu(pre).chunk(W, 1)
    in_slices = x.chunk(W, 1), w1.chunk(W, 1)
    return [
        (lambda: right + (W - 1) * b2, f"b2 added on every rank: after the all-reduce the output holds "
         f"world_size × b2 ({W} × b2); add b2 ONCE, after the sum (only rank 0 adds it, or after the reduce)"),
        (lambda: (right - b2) / W + b2, "the all-reduce SUMS the partial outputs (each rank holds part of the "
         "sum over hidden units); averaging divides them by world_size"),
        (lambda: right - b2, "b2 is missing: add it once, after the sum"),
        (lambda: F.gelu(F.linear(pre, w2)) + b2, "gelu after the sum: gelu acts on the HIDDEN units, which rank r "
         "owns whole after the column split; apply it on each rank, before the second matmul"),
        (lambda: F.gelu(F.linear(pre, w2, b2)), "gelu acts on the hidden units, before the second Linear; "
         "y = W2·gelu(W1·x + b1) + b2"),
        (lambda: sum(h @ w2_r for h, w2_r in zip(h_chunks, w2.chunk(W, 0))) + b2, "W2 is stored (out, hidden), as "
         "nn.Linear keeps it: RowwiseParallel splits its INPUT dim, w2.chunk(world_size, dim=1), and F.linear "
         "multiplies by its transpose; you took rows of W2 (its output dim) without transposing"),
        (lambda: sum(F.linear(F.gelu(F.linear(xr, w1r) + b1), w2) for xr, w1r in zip(*in_slices)) + b2,
         "you split W1 by its INPUT columns: each rank then holds only a partial sum of the pre-activation, and "
         "gelu of a partial sum is not part of gelu of the sum. ColwiseParallel splits W1's OUTPUT rows, "
         "w1.chunk(world_size, dim=0), with b1 likewise"),
        (lambda: sum(F.linear(F.gelu(F.linear(xr, w1r, b1)), w2) for xr, w1r in zip(*in_slices)) + b2,
         "you split W1 by its INPUT columns; ColwiseParallel splits its OUTPUT rows, w1.chunk(world_size, dim=0)"),
    ]


class _MatmulShapes(torch.overrides.TorchFunctionMode):
    """Records (storage address, shape) of the 2-D operands of every matrix multiply run inside it."""

    OPS = {F.linear, torch.matmul, torch.mm, torch.addmm, torch.Tensor.__matmul__, torch.Tensor.matmul,
           torch.Tensor.mm}

    def __init__(self):
        super().__init__()
        self.shapes = set()

    def __torch_function__(self, func, types, args=(), kwargs=None):
        if func in self.OPS:
            self.shapes |= {(a.data_ptr(), tuple(a.shape)) for a in args if torch.is_tensor(a) and a.dim() == 2}
        return func(*args, **(kwargs or {}))


@task("08", "8.2", "column_row_parallel_mlp", "tensor parallel MLP: W1 by columns, W2 by rows, one all-reduce",
      "core", hint="for each rank r: h_r = F.gelu(F.linear(x, w1.chunk(W, 0)[r], b1.chunk(W, 0)[r])) (B, hidden/W); "
      "partial_r = F.linear(h_r, w2.chunk(W, 1)[r]) (B, out), no bias; y = sum of the partials + b2")
def check_column_row_parallel_mlp(column_row_parallel_mlp):
    for desc, x, w1, b1, w2, b2, W in _mlp_cases():
        inputs = (x, w1, b1, w2, b2)
        originals = tuple(t.clone() for t in inputs)
        call = (f"column_row_parallel_mlp(x {_shape(x)}, w1 {_shape(w1)}, b1 {_shape(b1)}, w2 {_shape(w2)}, "
                f"b2 {_shape(b2)}, world_size={W}) ({desc})")
        try:
            with _MatmulShapes() as seen:
                got = column_row_parallel_mlp(x, w1, b1, w2, b2, W)
        except RuntimeError as e:
            if "shape" not in str(e) and "size" not in str(e):
                raise
            raise Failure(f"{call} raised RuntimeError: {str(e).splitlines()[0]}\nexpected a ({x.size(0)}, "
                          f"{w2.size(0)}) output. Shapes, as F.linear wants them: W1 (hidden, in) is split by rows, "
                          "w1.chunk(W, dim=0) with b1.chunk(W, 0), giving h_r (B, hidden/W); W2 (out, hidden) is "
                          "split by columns, w2.chunk(W, dim=1), and F.linear(h_r, w2_r) is (B, out)") from None
        if not all(torch.equal(a, o) for a, o in zip(inputs, originals)):
            raise Failure(f"{call} changed one of its inputs; slice them, do not modify them")
        expected = mlp_reference(*inputs)
        if not torch.is_tensor(got) or tuple(got.shape) != tuple(expected.shape):
            raise Failure(f"{call}: expected a tensor of shape {_shape(expected)} (B, out), got {_shape(got)}")
        if not _close(got, expected, atol=1e-5):
            note = _notes(got, _mlp_mistakes(*inputs, W), lambda a, b: _close(a, b, atol=1e-5))
            raise Failure(f"{call}: must equal the unsharded MLP F.linear(F.gelu(F.linear(x, w1, b1)), w2, b2)\n"
                          f"expected {_show(expected[0])} (row 0)\ngot      {_show(got[0])}{note}")
        whole = {(w.data_ptr(), shape) for w in (w1, w2) for shape in (tuple(w.shape), tuple(w.t().shape))}
        if W > 1 and seen.shapes & whole:  # a shard is a view: same storage, smaller shape
            raise Failure(f"{call}: the output is right, but a matrix multiply used a whole weight matrix "
                          f"(shape {sorted(s for _, s in seen.shapes & whole)}): no simulated rank may hold all of W1 "
                          "or W2. Each rank must multiply "
                          "its own shard, w1.chunk(W, 0)[r] and w2.chunk(W, 1)[r], and the partial outputs are summed")


# --- 8.3 (core): ZeRO's model-state memory per GPU ----------------------------------------------------------


def zero_model_state_bytes_reference(n_params: int, stage: int, dp_degree: int, k: float = 12) -> float:
    """ZeRO paper (Rajbhandari et al., 2020), Figure 1: fp16 weights 2Ψ + fp16 grads 2Ψ + optimizer KΨ."""
    psi, n = n_params, dp_degree
    weights, grads, opt = 2 * psi, 2 * psi, k * psi
    if stage >= 1:
        opt /= n
    if stage >= 2:
        grads /= n
    if stage >= 3:
        weights /= n
    return weights + grads + opt


def _zero_cases():
    """(description, n_params, stage, dp_degree, k)."""
    for s in range(4):
        yield f"the paper's 7.5B model on 64 GPUs, stage {s}", 7_500_000_000, s, 64, 12
    yield "stage 0 (plain data parallel) on 8 GPUs", 1_000_000, 0, 8, 12
    for s in (1, 2, 3):
        yield f"one GPU, stage {s}: nothing to share with", 3_000_000, s, 1, 12
    yield "a 1.3B model, stage 2 on 4 GPUs", 1_300_000_000, 2, 4, 12
    yield "Adam with 8-bit states (k = 6), stage 1 on 16 GPUs", 2_000_000, 1, 16, 6
    yield "k = 8 (no fp32 master copy), stage 3 on 4 GPUs", 4_000_000, 3, 4, 8


def _zero_mistakes(psi, s, n, k):
    ref = zero_model_state_bytes_reference
    return [
        (lambda: (4 + k) * psi / n if s == 1 else None, "stage 1 shards only the optimizer states: the 16-bit "
         "weights and gradients stay whole on every GPU, 2Ψ + 2Ψ + KΨ/N"),
        (lambda: ref(psi, s, n, k - 4), "K = 12 counts the fp32 master weights (4 bytes) + Adam's momentum (4) "
         "+ variance (4): you left out the master copy (K = 8); use the k you are given"),
        (lambda: ref(psi, s, n, 12), "use the k you are given: K depends on the optimizer (12 for mixed-precision "
         "Adam)"),
        (lambda: ref(psi, 1, n, k) if s == 2 else None, "stage 2 also shards the gradients: 2Ψ + (2 + K)Ψ/N"),
        (lambda: ref(psi, s, n - 1, k), "the states are split over all N GPUs: divide by N, not N − 1"),
        (lambda: ref(psi, 3, n, k) if s == 0 else None, "stage 0 is plain data parallel: every GPU holds everything, "
         "(2 + 2 + K)Ψ, whatever N"),
        (lambda: (2 + 2 / n + k) * psi if s == 1 else None, "stage 1 shards the optimizer states (the K part), "
         "not the gradients"),
        *[(lambda d=d: ref(psi, s, n, k) / d, "return bytes (not GB or GiB)") for d in (1e9, 2**30)],
    ]


@task("08", "8.3", "zero_model_state_bytes", "ZeRO stages 0-3: model-state bytes per GPU", "core",
      hint="weights 2Ψ, gradients 2Ψ, optimizer states kΨ; stage >= 1 divides the optimizer states by N, stage >= 2 "
           "also the gradients, stage 3 also the weights; return the sum in bytes")
def check_zero_model_state_bytes(zero_model_state_bytes):
    for desc, psi, s, n, k in _zero_cases():
        call = f"zero_model_state_bytes(n_params={psi:_}, stage={s}, dp_degree={n}, k={k}) ({desc})"
        got = zero_model_state_bytes(psi, s, n, k=k)
        try:
            value = float(got)
        except (TypeError, ValueError, RuntimeError):
            raise Failure(f"{call}: expected a number of bytes, got {type(got).__name__}") from None
        want = zero_model_state_bytes_reference(psi, s, n, k)
        close = lambda a, b: b is not None and math.isclose(a, b, rel_tol=1e-9, abs_tol=4)  # noqa: E731
        if not close(value, want):
            note = _notes(value, _zero_mistakes(psi, s, n, k), close)
            raise Failure(f"{call}:\nexpected {want:,.0f} bytes ({want / 1e9:.2f} GB)\ngot      {value:,.0f} "
                          f"({value / 1e9:.2f} GB){note}")


# --- 8.4 (stretch): GPipe's bubble and schedule --------------------------------------------------------------


def bubble_fraction_reference(stages: int, microbatches: int) -> float:
    return (stages - 1) / (microbatches + stages - 1)


def pipeline_schedule_reference(stages: int, microbatches: int) -> list:
    """GPipe's forward pass: at time step t, stage s runs micro-batch t − s (None when idle); (m + p − 1) steps."""
    return [[t - s if 0 <= t - s < microbatches else None for s in range(stages)]
            for t in range(microbatches + stages - 1)]


_PIPE_CASES = ((4, 8), (2, 2), (3, 5), (8, 32), (1, 4), (4, 1), (5, 2))  # (stages p, micro-batches m)


def _bubble_mistakes(p, m):
    return [
        (lambda: (p - 1) / m, "(p − 1)/m is the bubble relative to the USEFUL time (GPipe's paper bound); the "
         "fraction of the whole run is idle / total = (p − 1)/(m + p − 1)"),
        (lambda: (p - 1) / (m + p), "the run takes m + p − 1 steps, not m + p: the last micro-batch enters stage 1 "
         "at step m − 1 and leaves stage p at step m + p − 2"),
        (lambda: (m - 1) / (m + p - 1), "arguments swapped: bubble_fraction(stages, microbatches)"),
        (lambda: p / (m + p - 1), "each stage waits p − 1 steps (stage 1 waits none on the way in), not p"),
    ]


def _schedule_text(rows) -> str:
    return "\n".join(f"  t={t}: {row}" for t, row in enumerate(rows)) if isinstance(rows, list) else repr(rows)


@task("08", "8.4", ("bubble_fraction", "pipeline_schedule"), "GPipe: the bubble fraction and the forward schedule",
      "stretch", hint="bubble = (stages - 1) / (microbatches + stages - 1); schedule: for t in range(microbatches + "
      "stages - 1), row t = [t - s if 0 <= t - s < microbatches else None for s in range(stages)]")
def check_pipeline(bubble_fraction, pipeline_schedule):
    for p, m in _PIPE_CASES:
        call = f"bubble_fraction(stages={p}, microbatches={m})"
        got = bubble_fraction(p, m)
        try:
            value = float(got)
        except (TypeError, ValueError, RuntimeError):
            raise Failure(f"{call}: expected a number between 0 and 1, got {type(got).__name__}") from None
        want = bubble_fraction_reference(p, m)
        close = lambda a, b: math.isclose(a, b, abs_tol=1e-9)  # noqa: E731
        if not close(value, want):
            note = _notes(value, _bubble_mistakes(p, m), close)
            raise Failure(f"{call}:\nexpected {want:.4f}\ngot      {value:.4f}{note}")
    for p, m in _PIPE_CASES[:3] + _PIPE_CASES[4:6]:
        call = f"pipeline_schedule(stages={p}, microbatches={m})"
        got = pipeline_schedule(p, m)
        want = pipeline_schedule_reference(p, m)
        nested = isinstance(got, (list, tuple)) and all(isinstance(r, (list, tuple)) for r in got)
        rows = [list(r) for r in got] if nested else got
        if rows == want:
            continue
        note = _notes(rows, [
            (lambda: [list(c) for c in zip(*want)], "one row per TIME STEP, one entry per stage: schedule[t][s]"),
            (lambda: [[None if v is None else v + s for s, v in enumerate(r)] for r in want], "stage s starts micro-"
             "batch b at step b + s, so at step t it runs t − s (not t + s)"),
            (lambda: [[-1 if v is None else v for v in r] for r in want], "an idle stage is None, not -1"),
            (lambda: [[0 if v is None else v for v in r] for r in want], "an idle stage is None, not 0 (0 is the "
             "first micro-batch)"),
            (lambda: want[:m], f"the forward pass takes m + p − 1 = {m + p - 1} steps: the last micro-batch still "
             "has to go through the later stages"),
            (lambda: pipeline_schedule_reference(m, p), "arguments swapped: "
             "pipeline_schedule(stages, microbatches)"),
        ], lambda a, b: a == b)
        raise Failure(f"{call}:\nexpected (schedule[t][s] = the micro-batch stage s runs forward at step t)\n"
                      f"{_schedule_text(want)}\ngot\n{_schedule_text(rows)}{note}")
    for p, m in _PIPE_CASES[:4]:
        sched = pipeline_schedule(p, m)
        idle = sum(v is None for row in sched for v in row) / (len(sched) * p)
        if not math.isclose(idle, bubble_fraction(p, m), abs_tol=1e-9):
            raise Failure(f"the share of idle slots in pipeline_schedule({p}, {m}) must equal bubble_fraction({p}, "
                          f"{m}): got {idle:.4f} and {float(bubble_fraction(p, m)):.4f}")
