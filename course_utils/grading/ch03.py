"""Checks for chapter 03 — supervised fine-tuning, SFT (指令微调): loss masks, masked means, padding."""

from __future__ import annotations

import functools
import random

import torch

from ..chat import Encoded, encode
from ..chat import pad_batch as _pad_batch_ref
from ..objectives import IGNORE_INDEX
from .core import Failure, task


def _show(x) -> str:
    if torch.is_tensor(x):
        return str(x.int().tolist() if x.dtype == torch.bool else x.tolist())
    return repr(x)


def _as_list(x) -> list:
    return x.tolist() if torch.is_tensor(x) else list(x)


def build_example_reference(prompt_ids: list[int], response_ids: list[int], bos_id: int, eos_id: int):
    input_ids = [bos_id, *prompt_ids, *response_ids, eos_id]
    labels = [IGNORE_INDEX] * (1 + len(prompt_ids)) + [*response_ids, eos_id]
    return input_ids, labels


@task("03", "3.1", "build_example", "One SFT example: input ids and loss labels", "warm-up",
      hint="input = [bos, *prompt, *response, eos]; labels = -100 for bos and every prompt token, "
           "the token id itself for every response token AND for eos (the model must learn to stop)")
def check_build_example(build_example):
    cases = [([5, 6], [7, 8, 9]), ([10], [11]), ([], [12, 13]), ([14, 15, 16], [])]
    rng = random.Random(3)
    cases += [([rng.randrange(3, 50) for _ in range(rng.randrange(0, 8))],
               [rng.randrange(3, 50) for _ in range(rng.randrange(1, 8))]) for _ in range(30)]
    for prompt, response in cases:
        p0, r0 = list(prompt), list(response)
        got = build_example(prompt, response, 1, 2)
        if prompt != p0 or response != r0:
            raise Failure(f"build_example changed its input lists ({p0}, {r0}); build new lists instead")
        if not isinstance(got, (tuple, list)) or len(got) != 2:
            raise Failure(f"return a pair (input_ids, labels), got {_show(got)}")
        ids, labels = (_as_list(g) for g in got)
        exp_ids, exp_labels = build_example_reference(p0, r0, 1, 2)
        call = f"build_example(prompt_ids={p0}, response_ids={r0}, bos_id=1, eos_id=2)"
        if ids != exp_ids:
            raise Failure(f"{call} input_ids:\nexpected {exp_ids}\ngot      {ids}")
        if labels != exp_labels:
            raise Failure(f"{call} labels:\nexpected {exp_labels}\ngot      {labels}")


def masked_mean_reference(values: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    m = mask.bool()
    return values[m].mean() if m.any() else values.new_zeros(())


@task("03", "3.2", "masked_mean", "Mean over the masked positions only", "core",
      hint="sum(values * mask) / (number of True positions), over all dimensions; an empty mask gives 0.0 "
           "(not NaN): divide by count.clamp(min=1). Dividing by values.numel() also counts the masked-out positions")
def check_masked_mean(masked_mean):
    g = torch.Generator().manual_seed(0)
    cases = [(torch.tensor([1.0, 2.0, 3.0, 4.0]), torch.tensor([True, True, False, False]))]
    for shape in ((7,), (2, 5), (3, 4, 6)):
        v = torch.randn(shape, generator=g)
        cases.append((v, torch.rand(shape, generator=g) < 0.4))
    v = torch.randn(2, 6, generator=g)
    m = torch.zeros(2, 6, dtype=torch.bool)
    m[1, 2:5] = True
    cases += [(v, m), (v, m.long()), (v, m.float()), (v, torch.ones(2, 6, dtype=torch.bool))]
    for values, mask in cases:
        expected = masked_mean_reference(values, mask)
        got = masked_mean(values.clone(), mask.clone())
        desc = f"values={_show(values.round(decimals=2))}, mask={_show(mask)} (dtype {mask.dtype})"
        if not torch.is_tensor(got) or got.dim() != 0:
            raise Failure(f"return a scalar tensor, got {_show(got)} for {desc}")
        if not torch.allclose(got.float(), expected, atol=1e-6):
            raise Failure(f"masked_mean({desc}):\nexpected {expected.item():.6f}, got {got.item():.6f}")
    empty = torch.zeros(2, 3, dtype=torch.bool)
    got = masked_mean(torch.randn(2, 3, generator=g), empty)
    if not torch.is_tensor(got) or got.dim() != 0 or torch.isnan(got) or got.item() != 0.0:
        raise Failure(f"an all-False mask must give tensor(0.) (nothing to average, and no NaN), got {_show(got)}")
    values = torch.randn(3, 4, generator=g, requires_grad=True)
    mask = torch.rand(3, 4, generator=g) < 0.5
    mask[0, 0] = True
    out = masked_mean(values, mask)
    if not torch.is_tensor(out) or not out.requires_grad:
        raise Failure("the result must carry a gradient back to `values` (it is a loss): build it with torch "
                      "operations on `values`, no .item(), no Python floats, no new torch.tensor(...)")
    out.backward()
    expected_grad = mask.float() / mask.sum()
    if values.grad is None or not torch.allclose(values.grad, expected_grad, atol=1e-6):
        raise Failure("the gradient must reach every masked-in value with weight 1/count and no other value; "
                      "build the result from `values` with torch operations (no .item(), no Python floats)")


@task("03", "3.3", "pad_batch", "Pad a batch on the right (training) or the left (generation)", "core",
      hint="side='right': [*seq, pad, pad]; side='left': [pad, pad, *seq], so every prompt ends at the last "
           "position; attention_mask is 1 on real tokens and 0 on padding; both LongTensors (B, longest)")
def check_pad_batch(pad_batch):
    rng = random.Random(4)
    cases = [[[5, 6, 7], [8]], [[9], [10, 11]], [[3, 4], [5, 6]], [[7]]]
    cases += [[[rng.randrange(3, 40) for _ in range(rng.randrange(1, 9))] for _ in range(rng.randrange(1, 5))]
              for _ in range(20)]
    for seqs in cases:
        for side in ("right", "left"):
            original = [list(s) for s in seqs]
            got = pad_batch(seqs, 0, side)
            if seqs != original:
                raise Failure(f"pad_batch changed its input lists {original}; build new lists instead")
            ref = _pad_batch_ref([Encoded(list(s), list(s)) for s in original], 0, side)
            call = f"pad_batch({original}, pad_id=0, side={side!r})"
            if not isinstance(got, (tuple, list)) or len(got) != 2:
                raise Failure(f"{call}: return a pair (input_ids, attention_mask), got {_show(got)}")
            for name, g, e in (("input_ids", got[0], ref["input_ids"]), ("attention_mask", got[1], ref["attention_mask"])):
                if not torch.is_tensor(g) or g.dtype != torch.long:
                    raise Failure(f"{call}: {name} must be a LongTensor (torch.long), got "
                                  f"{g.dtype if torch.is_tensor(g) else type(g).__name__}")
                if g.shape != e.shape or not torch.equal(g, e):
                    raise Failure(f"{call} {name}:\nexpected {_show(e)}\ngot      {_show(g)}")


# --- 3.4: the assistant mask of a ChatML conversation ---------------------------------------------------

_TEXTS = [
    "Pip lives in Mossbrook. The assistant answers questions about the village.",
    "Where does Pip live? Who bakes the bread? How many apples are in the basket?",
    "You are a helpful assistant. Answer in one short sentence.",
    "Tam keeps three goats and a red boat by the river.",
]

_CONVERSATIONS = [
    ([{"role": "user", "content": "Where does Pip live?"},
      {"role": "assistant", "content": "Pip lives in Mossbrook."}], True),
    ([{"role": "system", "content": "You are a helpful assistant."},
      {"role": "user", "content": "Who bakes the bread?"},
      {"role": "assistant", "content": "Tam bakes the bread."}], True),
    ([{"role": "user", "content": "Where does Pip live?"},
      {"role": "assistant", "content": "In Mossbrook."},
      {"role": "user", "content": "And Tam?"},
      {"role": "assistant", "content": "By the river."}], True),
    ([{"role": "system", "content": "Answer in one short sentence."},
      {"role": "user", "content": "How many goats?"},
      {"role": "assistant", "content": "Three."},
      {"role": "user", "content": "What colour is the boat?"},
      {"role": "assistant", "content": "Red."},
      {"role": "user", "content": "Thanks!"},
      {"role": "assistant", "content": "You are welcome."}], True),
    ([{"role": "user", "content": "Where does Pip live?"},
      {"role": "assistant", "content": "Mossbrook."},
      {"role": "user", "content": "And the apples?"},
      {"role": "assistant", "content": "In the basket."}], False),  # rendered without EOS
    ([{"role": "user", "content": "assistant\nwho bakes the bread?"},  # the header text inside a user turn
      {"role": "assistant", "content": "Tam."}], True),
]


@functools.lru_cache(maxsize=1)
def _chat_cases():
    """A throwaway tokenizer, the ids the check needs, and (ids, expected mask) per conversation."""
    from ..tokenizer import IM_END, IM_START, train_tokenizer

    tok = train_tokenizer(_TEXTS * 3, 300)
    im_start, im_end = tok.convert_tokens_to_ids(IM_START), tok.convert_tokens_to_ids(IM_END)
    header = tok("assistant\n", add_special_tokens=False)["input_ids"]
    cases = []
    for messages, add_eos in _CONVERSATIONS:
        enc = encode(messages, tok, add_eos=add_eos)
        cases.append((enc.input_ids, [lab != IGNORE_INDEX for lab in enc.labels], messages, add_eos))
    return tok, im_start, im_end, tok.eos_token_id, header, cases


def _marked(tok, ids: list[int], mask: list[bool]) -> str:
    """The conversation as text, with the tokens that carry loss in [brackets]."""
    out = []
    for t, m in zip(ids, mask):
        piece = tok.decode([t]).replace("\n", "↵")
        out.append(f"[{piece}]" if m else piece)
    return "".join(out)


@task("03", "3.4", "assistant_token_mask", "Loss mask of a multi-turn ChatML conversation", "stretch",
      hint="find each <|im_start|> followed by the assistant header tokens ('assistant\\n'); mark the tokens after "
           "the header up to and including the next <|im_end|>, plus an <|eos|> right after it; do this for EVERY "
           "assistant turn, and never mark the header, the system or user turns, or the '\\n' between turns")
def check_assistant_token_mask(assistant_token_mask):
    tok, im_start, im_end, eos, header, cases = _chat_cases()
    for ids, expected, messages, add_eos in cases:
        got = assistant_token_mask(list(ids), im_start, im_end, list(header), eos)
        got = [bool(x) for x in _as_list(got)]
        if got != expected:
            turns = sum(m["role"] == "assistant" for m in messages)
            raise Failure(
                f"a conversation with {len(messages)} messages ({turns} assistant turn{'s' if turns > 1 else ''}"
                f"{'' if add_eos else ', rendered without <|eos|>'}); tokens in [brackets] carry loss:\n"
                f"expected {_marked(tok, ids, expected)}\n"
                f"got      {_marked(tok, ids, got)}\n"
                f"(ids={ids}, im_start_id={im_start}, im_end_id={im_end}, assistant_header_ids={header}, eos_id={eos})")
