"""Checks for chapter 04 — parameter-efficient fine-tuning (参数高效微调): LoRA and QLoRA.

The references are the course library's own: :class:`course_utils.lora.LoRALinear` for the
forward pass and merging, :func:`course_utils.lora.count_lora_parameters` for the counts, and
:func:`course_utils.quant.quantize_nf4` / :func:`~course_utils.quant.dequantize_nf4` for NF4.
"""

from __future__ import annotations

import math
from types import SimpleNamespace

import torch
import torch.nn.functional as F
from torch import nn

from ..lora import LoRALinear, count_lora_parameters, llama_linear_shapes
from ..quant import NF4_CODE, dequantize_nf4, quantize_nf4
from .core import Failure, task


def _show(x, decimals: int = 3) -> str:
    """A small tensor as a (nested) list, floats to ``decimals`` places."""
    if not torch.is_tensor(x):
        return repr(x)
    if not x.is_floating_point():
        return str(x.tolist())

    def fmt(v):
        return f"[{', '.join(fmt(e) for e in v)}]" if isinstance(v, list) else f"{v:.{decimals}f}"

    return fmt(x.detach().float().tolist())


def _shapes(**tensors) -> str:
    return ", ".join(f"{k}: {tuple(v.shape)}" for k, v in tensors.items())


def _first_row(x: torch.Tensor) -> torch.Tensor:
    return x.reshape(-1, x.shape[-1])[0] if x.dim() > 0 else x


def _diagnose(got: torch.Tensor, candidates, atol: float = 1e-5) -> str:
    """The note of the first known mistake whose result equals ``got`` ('' if none does).

    ``candidates`` are (function computing the mistaken result, note); a mistake that cannot
    even be computed for these shapes (a transpose of a non-square matrix) is skipped.
    """
    for make, note in candidates:
        try:
            value = make()
        except RuntimeError:
            continue
        if value.shape == got.shape and torch.allclose(got.float(), value, atol=atol):
            return f"\n{note}"
    return ""


def _cases(spec, seed: int):
    """(in, out, r, alpha, x_shape) -> random W (out, in), A (r, in), B (out, r), x; B nonzero, unlike at init."""
    g = torch.Generator().manual_seed(seed)
    for d_in, d_out, r, alpha, x_shape in spec:
        W = torch.randn(d_out, d_in, generator=g) / math.sqrt(d_in)
        A = torch.randn(r, d_in, generator=g) / math.sqrt(d_in)
        B = torch.randn(d_out, r, generator=g) * 0.5  # a zero B (its init) would hide every mistake
        yield W, A, B, alpha, r, torch.randn(*x_shape, generator=g)


# in, out, r, alpha, x shape. The first case is square, so a missing .T gives wrong numbers, not a shape error.
_FORWARD_CASES = [(4, 4, 2, 8, (3, 4)), (6, 5, 2, 4, (2, 6)), (16, 12, 3, 16, (2, 3, 16)), (8, 3, 4, 4, (8,)),
                  (10, 10, 1, 1, (5, 10)), (32, 24, 8, 16, (4, 32))]


def _lora_layer(W, A, B, alpha, r) -> LoRALinear:
    base = nn.Linear(W.shape[1], W.shape[0], bias=False)
    layer = LoRALinear(base, r, alpha)
    with torch.no_grad():
        base.weight.copy_(W)
        layer.lora_A.copy_(A)
        layer.lora_B.copy_(B)
    return layer


def lora_forward_reference(x, W, A, B, alpha, r) -> torch.Tensor:
    with torch.no_grad():
        return _lora_layer(W, A, B, alpha, r)(x)  # (..., out)


@task("04", "4.1", "lora_forward", "LoRA forward: frozen path plus scaled low-rank path", "warm-up",
      hint="h = x @ W.T + (alpha / r) * (x @ A.T) @ B.T: x is (..., in), W (out, in) as in nn.Linear, A (r, in), "
           "B (out, r); the input goes through A first (down to r numbers), then B (up to out)")
def check_lora_forward(lora_forward):
    for W, A, B, alpha, r, x in _cases(_FORWARD_CASES, seed=4):
        originals = [t.clone() for t in (x, W, A, B)]
        got = lora_forward(x, W, A, B, alpha, r)
        call = f"lora_forward({_shapes(x=x, W=W, A=A, B=B)}, alpha={alpha}, r={r})"
        if any(not torch.equal(t, o) for t, o in zip((x, W, A, B), originals)):
            raise Failure(f"{call} changed one of its inputs; compute a new tensor instead")
        expected = lora_forward_reference(x, W, A, B, alpha, r)
        if not torch.is_tensor(got) or got.shape != expected.shape:
            raise Failure(f"{call}: expected a tensor of shape {tuple(expected.shape)} (..., out), got "
                          f"{tuple(got.shape) if torch.is_tensor(got) else type(got).__name__}")
        if not torch.allclose(got.float(), expected, atol=1e-5, rtol=1e-4):
            base = x @ W.T
            path = (x @ A.T) @ B.T
            note = _diagnose(got, [
                (lambda: base + path, "your output equals W x + B A x: the low-rank path must be scaled by alpha / r"),
                (lambda: base + alpha * path, "your output scales B A x by alpha; LoRA scales it by alpha / r"),
                (lambda: base + (r / alpha) * path, "your output scales B A x by r / alpha; LoRA scales it by alpha / r"),
                (lambda: base + (alpha // r) * path, "alpha // r is integer division; use alpha / r"),
                (lambda: base, "your output is only the frozen path W x; add (alpha / r) * B A x"),
                (lambda: (alpha / r) * path, "your output is only the LoRA path; the frozen W x must be added"),
                (lambda: x @ W + (alpha / r) * path, "W is (out, in) like nn.Linear's weight: the frozen path is x @ W.T"),
                (lambda: base + (alpha / r) * x @ (B @ A), "the update B @ A is (out, in): apply it as x @ (B @ A).T, "
                 "i.e. through A first, then B"),
            ])
            raise Failure(f"{call}, first row:\nexpected {_show(_first_row(expected))}\n"
                          f"got      {_show(_first_row(got))}{note}")


# --- 4.2: merge and unmerge ---------------------------------------------------------------------------

def merge_reference(W, A, B, alpha, r) -> torch.Tensor:
    layer = _lora_layer(W, A, B, alpha, r)
    layer.merge()
    return layer.base.weight.detach().clone()  # (out, in)


def unmerge_reference(W_merged, A, B, alpha, r) -> torch.Tensor:
    layer = _lora_layer(W_merged, A, B, alpha, r)
    layer.merged = True  # W_merged already holds the update
    layer.unmerge()
    return layer.base.weight.detach().clone()


_MERGE_CASES = [(4, 4, 2, 8, (3, 4)), (6, 5, 2, 4, (2, 6)), (12, 7, 3, 16, (5, 12)), (32, 16, 8, 16, (4, 32))]


@task("04", "4.2", ("merge", "unmerge"), "Merge the adapter into W, and take it out again", "core",
      hint="merge returns W + (alpha / r) * B @ A as a NEW tensor of shape (out, in) (W stays as it was: it is "
           "the frozen base); unmerge returns W_merged - (alpha / r) * B @ A")
def check_merge(merge, unmerge):
    for W, A, B, alpha, r, x in _cases(_MERGE_CASES, seed=5):
        delta = (alpha / r) * B @ A  # (out, in)
        for name, fn, inp, expected, sign in (("merge", merge, W, merge_reference(W, A, B, alpha, r), 1),
                                               ("unmerge", unmerge, W + delta, unmerge_reference(W + delta, A, B, alpha, r), -1)):
            call = f"{name}({_shapes(W=inp, A=A, B=B)}, alpha={alpha}, r={r})"
            inputs = {"W_merged" if sign < 0 else "W": inp, "A": A, "B": B}
            originals = {k: t.clone() for k, t in inputs.items()}
            got = fn(inp, A, B, alpha, r)
            changed = [k for k, t in inputs.items() if not torch.equal(t, originals[k])]
            if changed:
                raise Failure(f"{call} changed its input {changed[0]} in place ({changed[0]}.add_ / {changed[0]} += ...): "
                              "the caller's weights must stay as they were; return a new tensor (W + ..., or "
                              "W.clone() first)")
            if not torch.is_tensor(got) or got.shape != expected.shape:
                raise Failure(f"{call}: expected a tensor of shape {tuple(expected.shape)} (out, in), got "
                              f"{tuple(got.shape) if torch.is_tensor(got) else type(got).__name__}")
            if not torch.allclose(got.float(), expected, atol=1e-5, rtol=1e-4):
                path = B @ A
                note = _diagnose(got, [
                    (lambda: inp + sign * path, "the update B @ A must be scaled by alpha / r, as in the forward pass"),
                    (lambda: inp + sign * alpha * path, "the update is scaled by alpha / r, not by alpha"),
                    (lambda: inp + sign * (alpha / r) * path.T, "the update is B @ A, of shape (out, in); you added its transpose"),
                    (lambda: inp - sign * (alpha / r) * path, "wrong sign: merge adds the update, unmerge subtracts it"),
                ])
                raise Failure(f"{call}, first row:\nexpected {_show(expected[0])}\ngot      {_show(got[0])}{note}")
        merged = merge(W, A, B, alpha, r)
        out, ref = F.linear(x, merged.float()), lora_forward_reference(x, W, A, B, alpha, r)
        if not torch.allclose(out, ref, atol=1e-5, rtol=1e-4):
            raise Failure(f"x @ merge(W, ...).T must equal the adapter's output on x ({_shapes(x=x)}): "
                          f"expected {_show(_first_row(ref))}, got {_show(_first_row(out))}")
        back = unmerge(merged, A, B, alpha, r)
        if not torch.allclose(back.float(), W, atol=1e-5):
            raise Failure(f"unmerge(merge(W, ...), ...) must give back W (up to rounding); max difference "
                          f"{(back.float() - W).abs().max().item():.3g}")


# --- 4.3: count LoRA's trainable parameters ------------------------------------------------------------

def _targeted(name: str, targets) -> bool:
    return any(name == t or name.endswith("." + t) for t in targets)


def count_lora_params_reference(shapes: dict, targets, r: int) -> int:
    return sum(r * (d_in + d_out) for name, (d_in, d_out) in shapes.items() if _targeted(name, targets))


_LLAMA = SimpleNamespace(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                         intermediate_size=172, head_dim=None)


def _phi3_shapes(h: int = 48, inter: int = 128, layers: int = 2) -> dict:
    """Phi-3 fuses q, k, v into one `qkv_proj` and gate, up into `gate_up_proj`: names that end in 'v_proj'."""
    shapes = {}
    for i in range(layers):
        a, m = f"model.layers.{i}.self_attn", f"model.layers.{i}.mlp"
        shapes |= {f"{a}.qkv_proj": (h, 3 * h), f"{a}.o_proj": (h, h),
                   f"{m}.gate_up_proj": (h, 2 * inter), f"{m}.down_proj": (inter, h)}
    return shapes


_SMALL = {"layers.0.attn.q_proj": (8, 8), "layers.0.attn.v_proj": (8, 4),
          "layers.0.mlp.up_proj": (8, 16), "layers.0.mlp.down_proj": (16, 8)}


def _count_cases():
    llama = llama_linear_shapes(_LLAMA)
    """(description, shapes, targets, r, count_lora_parameters' answer where the library can give one)."""
    yield "_SMALL", _SMALL, ["q_proj", "v_proj"], 2, None
    for targets, r in ((["q_proj", "v_proj"], 8), (["o_proj"], 4), (["gate_proj", "up_proj", "down_proj"], 2),
                       (["self_attn.k_proj"], 16), (["model.layers.1.self_attn.q_proj"], 4),
                       (["q_proj", "self_attn.q_proj"], 8), (("k_proj", "v_proj", "o_proj", "q_proj"), 1)):
        yield "a 2-layer Llama", llama, targets, r, count_lora_parameters(_LLAMA, list(targets), r)
    yield "a 2-layer Llama", llama, ["proj"], 8, None  # names end in '.q_proj', never in '.proj'
    yield "a 2-layer Phi-3", _phi3_shapes(), ["o_proj", "v_proj"], 4, None  # 'qkv_proj' is not 'v_proj'
    yield "a 2-layer Phi-3", _phi3_shapes(), ["qkv_proj", "up_proj"], 8, None


@task("04", "4.3", "count_lora_params", "Count LoRA's trainable parameters without building the model", "core",
      hint="a layer (in, out) gets A (r, in) and B (out, r): r * (in + out) parameters. It is targeted when its "
           "name IS a target or ends with '.' + target (whole name parts: 'v_proj' does not select 'qkv_proj', "
           "'proj' selects nothing); count each layer once, even if two targets select it")
def check_count_lora_params(count_lora_params):
    for desc, shapes, targets, r, library in _count_cases():
        expected = count_lora_params_reference(shapes, targets, r)
        got = count_lora_params(dict(shapes), list(targets), r)
        shown = repr(shapes) if len(shapes) <= 4 else f"<{desc}: {len(shapes)} layers, e.g. {next(iter(shapes))!r}>"
        call = f"count_lora_params(shapes={shown}, targets={list(targets)}, r={r})"
        if isinstance(got, torch.Tensor):
            got = got.item()
        if got != expected:
            chosen = [n for n in shapes if _targeted(n, targets)]
            per_layer = {n: r * sum(s) for n, s in shapes.items()}
            note = _diagnose_count(got, shapes, targets, r, per_layer)
            raise Failure(f"{call}:\nexpected {expected}, got {got}\n"
                          f"targeted layers ({len(chosen)}): {chosen[:6]}{' ...' if len(chosen) > 6 else ''}{note}")


def _diagnose_count(got, shapes, targets, r, per_layer) -> str:
    candidates = [
        (sum(r * i * o for n, (i, o) in shapes.items() if _targeted(n, targets)),
         "r * in * out is not LoRA's count: A is (r, in) and B is (out, r), so r * (in + out) per layer"),
        (sum(per_layer.values()), "you counted every layer; only the layers a target selects get an adapter"),
        (sum(per_layer[n] for n in shapes if any(t in n for t in targets)),
         "you matched targets as substrings of the name; a target must be the whole last part(s) of the name"),
        (sum(per_layer[n] for n in shapes if any(n.endswith(t) for t in targets)),
         "name.endswith(target) also matches 'qkv_proj' for 'v_proj' (or anything for 'proj'): check "
         "name == target or name.endswith('.' + target)"),
        (sum(per_layer[n] for n in shapes for t in targets if n == t or n.endswith("." + t)),
         "a layer selected by two targets got counted twice; it gets only one adapter"),
    ]
    notes = [note for value, note in candidates if value == got]
    if len(notes) > 1:  # with targets=['proj'], matching by substring also selects every layer: say the cause
        notes = [n for n in notes if not n.startswith("you counted every layer")]
    return "".join(f"\n{note}" for note in notes)


# --- 4.4: blockwise absmax quantization to 4-bit codes (NF4) --------------------------------------------

# (shape, blocksize, how the weight is made); the small ones first, so a failure is easy to read
_QUANT_CASES = [((2, 8), 4, "normal"), ((4, 64), 64, "normal"), ((3, 100), 64, "normal"), ((7,), 4, "normal"),
                ((33, 17), 64, "outliers"), ((5, 64), 32, "outliers"), ((2, 130), 64, "normal")]


def _weight(shape, kind: str, g: torch.Generator) -> torch.Tensor:
    w = torch.randn(shape, generator=g) * 0.02
    if kind == "outliers":  # a few large weights, as trained models have: one absmax per block contains them
        flat = w.view(-1)
        flat[torch.randint(0, flat.numel(), (3,), generator=g)] *= 40
    return w


def _tie_or_equal(got_codes, ref_codes, scaled, code) -> torch.Tensor:
    """True where the codes agree, or both are (within rounding) equally near the scaled value."""
    d_got = (scaled - code[got_codes]).abs()
    d_ref = (scaled - code[ref_codes]).abs()
    return (got_codes == ref_codes) | ((d_got - d_ref).abs() < 1e-6)


@task("04", "4.4", ("absmax_quantize_4bit", "dequantize_4bit"), "Blockwise absmax quantization to 16 code values (NF4)",
      "stretch",
      hint="flatten w, zero-pad it to a multiple of blocksize, view it as (n_blocks, blocksize); absmax = "
           "block.abs().amax(dim=1), one per block (the last, partial block too); codes = index of the nearest "
           "code value to block / absmax; dequantize: code[codes] * absmax of each number's block, reshaped")
def check_absmax_quantize(absmax_quantize_4bit, dequantize_4bit):
    g = torch.Generator().manual_seed(44)
    code = NF4_CODE.clone()
    for shape, bs, kind in _QUANT_CASES:
        w = _weight(shape, kind, g)
        n, n_blocks = w.numel(), -(-w.numel() // bs)
        q = quantize_nf4(w, bs)
        ref_codes, ref_absmax = q.codes(), q.absmax  # (n,), (n_blocks,)
        w0 = w.clone()
        got = absmax_quantize_4bit(w, code.clone(), bs)
        blocks_desc = f"{n} numbers in blocks of {bs}: {n_blocks} blocks" + (
            f", the last with only {n - (n_blocks - 1) * bs}" if n % bs else "")
        call = f"absmax_quantize_4bit(w of shape {tuple(shape)}, NF4_CODE, blocksize={bs}) ({blocks_desc})"
        if not torch.equal(w, w0):
            raise Failure(f"{call} changed w in place; the caller's weight must stay as it was")
        if not isinstance(got, (tuple, list)) or len(got) != 2:
            raise Failure(f"{call}: return a pair (codes, absmax), got {type(got).__name__}")
        codes, absmax = (torch.as_tensor(t) for t in got)
        absmax = absmax.reshape(-1).float()
        if absmax.numel() != n_blocks:
            why = (" (one for the whole tensor? each block needs its own absmax)" if absmax.numel() == 1 else
                   " (the last, partial block needs an absmax too)" if absmax.numel() == n_blocks - 1 else "")
            raise Failure(f"{call}: expected one absmax per block, {n_blocks} values, got {absmax.numel()}{why}")
        if not torch.allclose(absmax, ref_absmax, rtol=1e-6, atol=0):
            note = _diagnose(absmax, [
                (lambda: torch.full_like(ref_absmax, w.abs().max().item()), "every block got the absmax of the WHOLE "
                 "tensor: one outlier then squeezes all other blocks into a few codes; use one absmax per block"),
                (lambda: _block_max(w, bs), "that is each block's max; the scale is the max of |x| (abs, then max), so "
                 "negative weights land in [-1, 0) too"),
            ], atol=1e-7)
            raise Failure(f"{call} absmax:\nexpected {_show(ref_absmax, 5)}\ngot      {_show(absmax, 5)}{note}")
        codes = codes.reshape(-1)
        if codes.is_floating_point() or codes.numel() != n:
            raise Failure(f"{call}: codes must be n={n} integer indices into code (one per number of w, no "
                          f"padding), got {codes.numel()} of dtype {codes.dtype}")
        codes = codes.long()
        if codes.min() < 0 or codes.max() >= len(code):
            raise Failure(f"{call}: codes must be indices into code, 0..{len(code) - 1}; got values from "
                          f"{codes.min().item()} to {codes.max().item()}")
        scaled = w.reshape(-1) / ref_absmax.clamp_min(torch.finfo(torch.float32).tiny).repeat_interleave(bs)[:n]
        ok = _tie_or_equal(codes, ref_codes, scaled, code)
        if not ok.all():
            i = int((~ok).nonzero()[0])
            raise Failure(f"{call} codes, at position {i} (block {i // bs}): w={w.reshape(-1)[i].item():.5f}, "
                          f"w / absmax={scaled[i].item():.4f}:\nexpected code {ref_codes[i].item()} "
                          f"(value {code[ref_codes[i]].item():.4f}, the nearest)\ngot      code {codes[i].item()}"
                          f"{f' (value {code[codes[i]].item():.4f})' if 0 <= codes[i] < len(code) else ''}")
        _check_dequantize(dequantize_4bit, q, ref_codes, ref_absmax, code, bs, shape, blocks_desc)
        back = dequantize_4bit(codes, absmax, code.clone(), bs, w.shape)
        if not torch.allclose(torch.as_tensor(back).float(), dequantize_nf4(q), atol=1e-7):
            raise Failure(f"dequantize_4bit(*absmax_quantize_4bit(w, ...), ...) must give quantize_nf4's weights "
                          f"back for w of shape {tuple(shape)}, blocksize {bs}")
    zeros = torch.zeros(2, 8)
    zeros[1] = torch.randn(8, generator=g)  # the first block is all zeros: its absmax is 0
    codes, absmax = absmax_quantize_4bit(zeros, code.clone(), 8)
    codes = torch.as_tensor(codes).reshape(-1)
    if codes.is_floating_point() or not torch.equal(codes[:8].long(), torch.full((8,), 7)):
        raise Failure(f"a block of all zeros has absmax 0: its numbers must get the zero code 7 (NF4_CODE[7] == 0), "
                      f"got codes {_show(codes[:8])}; divide by absmax.clamp_min(tiny) instead of absmax (0/0 is NaN)")


def _block_max(w: torch.Tensor, bs: int) -> torch.Tensor:
    flat = w.reshape(-1)
    return F.pad(flat, (0, -flat.numel() % bs), value=-float("inf")).view(-1, bs).amax(dim=1)


def _check_dequantize(dequantize_4bit, q, ref_codes, ref_absmax, code, bs, shape, blocks_desc) -> None:
    expected = dequantize_nf4(q)  # (shape)
    got = dequantize_4bit(ref_codes.clone(), ref_absmax.clone(), code.clone(), bs, torch.Size(shape))
    call = f"dequantize_4bit(codes (n={ref_codes.numel()}), absmax ({ref_absmax.numel()},), NF4_CODE, blocksize={bs}, " \
           f"shape={tuple(shape)}) ({blocks_desc})"
    if not torch.is_tensor(got) or got.shape != expected.shape:
        raise Failure(f"{call}: expected a tensor of shape {tuple(shape)}, got "
                      f"{tuple(got.shape) if torch.is_tensor(got) else type(got).__name__}")
    if not torch.allclose(got.float(), expected, atol=1e-7):
        i = int(((got.float() - expected).abs() > 1e-7).reshape(-1).nonzero()[0])
        n, values = ref_codes.numel(), code[ref_codes]
        scale_note = ("number i belongs to block i // blocksize: multiply it by absmax[i // blocksize] "
                      "(absmax.repeat_interleave(blocksize); .repeat(blocksize) tiles [a0, a1, a0, a1, ...])")
        note = _diagnose(got.reshape(-1), [
            (lambda: values * ref_absmax[0], scale_note),
            (lambda: values * ref_absmax.repeat(bs)[:n], scale_note),
            (lambda: values, "the codes' values are in [-1, 1]: multiply each by the absmax of its block"),
            (lambda: ref_codes.float() * ref_absmax.repeat_interleave(bs)[:n],
             "codes are indices into `code`: the value of code c is code[c], not c itself"),
        ], atol=1e-7)
        raise Failure(f"{call}, at position {i} (block {i // bs}, code {ref_codes[i].item()}):\n"
                      f"expected {expected.reshape(-1)[i].item():.6f} (= code[{ref_codes[i].item()}] * absmax[{i // bs}])\n"
                      f"got      {got.reshape(-1)[i].item():.6f}{note}")
