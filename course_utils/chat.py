"""Chat formatting for SFT (指令微调): templates, BOS/EOS, loss masks, padding side.

A conversation is a list of ``{"role", "content"}`` messages. Before a model can learn from
it, it must become one token sequence, plus a mask saying which tokens the loss is computed
on. Two conventions are used in practice:

* **ChatML** (Qwen, SmolLM, our tokenizer's own ``chat_template``)::

      <|bos|><|im_start|>user
      Where does Pip live?<|im_end|>
      <|im_start|>assistant
      Pip lives in Mossbrook.<|im_end|><|eos|>

* **Alpaca** (the 2023 instruction-tuning format)::

      <|bos|>### Instruction:
      Where does Pip live?

      ### Response:
      Pip lives in Mossbrook.<|eos|>

Only the assistant's words *and the tokens that end its turn* carry loss: the model must
learn to say ``<|eos|>`` or it never stops. Prompt tokens and padding get label -100.
"""

from __future__ import annotations

from dataclasses import dataclass

from .errors import ConfigError, DataError
from .objectives import IGNORE_INDEX
from .tokenizer import IM_END, IM_START

ROLES = ("system", "user", "assistant")
FORMATS = ("chatml", "alpaca")
OVERFLOW = ("error", "drop")


def to_messages(record: dict, row: int = 0) -> list[dict]:
    """A validated message list from a record holding ``messages`` or ``prompt`` + ``response``."""
    if not isinstance(record, dict):
        raise DataError(f"row {row}: expected a dict, got {type(record).__name__}")
    if "messages" in record and record["messages"] is not None:
        messages = record["messages"]
    elif "prompt" in record and "response" in record:
        messages = [{"role": "user", "content": record["prompt"]}, {"role": "assistant", "content": record["response"]}]
    else:
        raise DataError(f"row {row}: needs 'messages' or both 'prompt' and 'response' (has {sorted(record)})")
    if not isinstance(messages, list) or not messages:
        raise DataError(f"row {row}: 'messages' must be a non-empty list")
    for j, m in enumerate(messages):
        if not isinstance(m, dict) or "role" not in m or "content" not in m:
            raise DataError(f"row {row}, message {j}: needs 'role' and 'content'")
        if m["role"] not in ROLES:
            raise DataError(f"row {row}, message {j}: unknown role {m['role']!r}; allowed: {', '.join(ROLES)}")
        if not isinstance(m["content"], str):
            raise DataError(f"row {row}, message {j}: content must be a string, got {type(m['content']).__name__}")
        if m["role"] == "assistant" and not m["content"].strip():
            raise DataError(f"row {row}, message {j}: empty assistant turn (nothing to learn from)")
    if messages[-1]["role"] != "assistant":
        raise DataError(f"row {row}: the last message must be the assistant's (it is {messages[-1]['role']!r})")
    return messages


def render(messages: list[dict], tokenizer, fmt: str = "chatml", add_generation_prompt: bool = False,
           add_eos: bool = True) -> tuple[str, list[tuple[int, int]]]:
    """Conversation → (text, character spans that carry loss).

    ``add_generation_prompt`` ends the text with the assistant header, ready for generation.
    ``add_eos=False`` is the classic bug: the model is never shown how to stop.
    """
    if fmt not in FORMATS:
        raise ConfigError(f"unknown chat format {fmt!r}; choose one of {FORMATS}")
    bos, eos = tokenizer.bos_token or "", tokenizer.eos_token if add_eos else ""
    text, spans = bos, []
    for m in messages:
        if fmt == "chatml":
            head = f"{IM_START}{m['role']}\n"
            if m["role"] == "assistant":
                text += head
                start = len(text)
                text += m["content"] + IM_END + eos  # the end-of-turn markers are learned too
                spans.append((start, len(text)))
                text += "\n"
            else:
                text += head + m["content"] + IM_END + "\n"
        else:  # alpaca
            if m["role"] == "assistant":
                text += "### Response:\n"
                start = len(text)
                text += m["content"] + eos
                spans.append((start, len(text)))
                text += "\n\n"
            else:
                label = "System" if m["role"] == "system" else "Instruction"
                text += f"### {label}:\n{m['content']}\n\n"
    if add_generation_prompt:
        text += f"{IM_START}assistant\n" if fmt == "chatml" else "### Response:\n"
    return text, spans


@dataclass
class Encoded:
    input_ids: list[int]
    labels: list[int]  # = input_ids on assistant tokens, IGNORE_INDEX elsewhere (not shifted)
    truncated: bool = False


def encode(messages: list[dict], tokenizer, fmt: str = "chatml", max_length: int | None = None,
           loss_on_prompt: bool = False, add_eos: bool = True, row: int = 0) -> Encoded:
    """Tokenize a conversation and build its loss mask from character offsets.

    Truncation policy when the sequence exceeds ``max_length``: the response is what we learn from,
    so keep it whole and cut the *prompt* from the left (keeping BOS, dropping the oldest context).
    If the assistant part alone does not fit, raise ``DataError`` naming the row (callers may catch it
    and drop the row, see ``SFTConfig.on_overflow``).
    """
    text, spans = render(messages, tokenizer, fmt, add_eos=add_eos)
    enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    ids, offsets = enc["input_ids"], enc["offset_mapping"]
    in_span = [any(s <= a and b <= e for s, e in spans) and b > a for a, b in offsets]
    labels = [t if (keep or loss_on_prompt) else IGNORE_INDEX for t, keep in zip(ids, in_span)]
    truncated = False
    if max_length is not None and len(ids) > max_length:
        first_loss = next((i for i, keep in enumerate(in_span) if keep), len(ids))
        n_bos = 1 if ids and ids[0] == tokenizer.bos_token_id else 0
        answer_len = len(ids) - first_loss
        if answer_len + n_bos > max_length:
            raise DataError(f"row {row}: the response alone is {answer_len} tokens, longer than the context "
                            f"of {max_length}; shorten it, raise max_length, or drop the row")
        cut = len(ids) - max_length  # drop this many of the oldest prompt tokens (after BOS)
        ids = ids[:n_bos] + ids[n_bos + cut:]
        labels = labels[:n_bos] + labels[n_bos + cut:]
        truncated = True
    return Encoded(ids, labels, truncated)


def pad_batch(examples: list[Encoded], pad_id: int, side: str = "right") -> dict:
    """Stack examples into tensors, padding to the longest. Training pads on the right; batched
    generation needs the *left* so that every prompt ends at the last position."""
    input_ids, attention_mask = pad_ids([e.input_ids for e in examples], pad_id, side)
    labels, _ = pad_ids([e.labels for e in examples], IGNORE_INDEX, side)
    return {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels}


def pad_ids(ids: list[list[int]], pad_id: int, side: str = "left"):
    """(input_ids, attention_mask) tensors for token-id lists of different lengths, padded on ``side``;
    generation pads prompts on the left so that every one ends in the last column."""
    import torch

    if side not in ("left", "right"):
        raise ConfigError(f"padding side must be 'left' or 'right', got {side!r}")
    T = max(map(len, ids))
    rows = [([pad_id] * (T - len(i)) + i, [0] * (T - len(i)) + [1] * len(i)) if side == "left"
            else (i + [pad_id] * (T - len(i)), [1] * len(i) + [0] * (T - len(i))) for i in ids]
    return torch.tensor([r[0] for r in rows]), torch.tensor([r[1] for r in rows])


def show_loss_mask(enc: Encoded, tokenizer, html: bool = True):
    """Colour each token: green = carries loss (assistant), grey = no loss (prompt, BOS)."""
    tokens = [tokenizer.decode([t]) for t in enc.input_ids]
    if not html:
        return "".join(f"[{t}]" if lab != IGNORE_INDEX else t for t, lab in zip(tokens, enc.labels))
    from html import escape

    from IPython.display import HTML

    cells = []
    for tok, lab in zip(tokens, enc.labels):
        colour = "#b7e4c7" if lab != IGNORE_INDEX else "#e9ecef"
        shown = escape(tok).replace("\n", "↵<br>")
        cells.append(f"<span style='background:{colour};border:1px solid #ccc;margin:1px;padding:0 2px;"
                     f"font-family:monospace;white-space:pre'>{shown}</span>")
    legend = ("<p><span style='background:#b7e4c7'>&nbsp;loss&nbsp;</span> "
              "<span style='background:#e9ecef'>&nbsp;no loss&nbsp;</span></p>")
    return HTML(legend + "<div style='line-height:2'>" + "".join(cells) + "</div>")
