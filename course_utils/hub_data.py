"""Map real public datasets onto the tiny world's record schemas (the ``gpu`` profile).

Every chapter reads the same record shapes whatever the profile, so a real dataset
only needs a *mapper*: a pure function from raw rows (dicts, as ``datasets`` yields
them) to our records. Four formats are covered:

=================  ==========================================  ==================
mapper             raw row                                     our schema
=================  ==========================================  ==================
``map_tinystories`` ``{"text"}``                               pretrain
``map_alpaca``      ``{"instruction", "input", "output"}``     SFT
``map_hh_rlhf``     ``{"chosen", "rejected"}`` dialogue text   preference
``map_ultrafeedback`` ``{"prompt", "chosen", "rejected", ...}`` preference
=================  ==========================================  ==================

Each mapper returns ``Mapped(records, dropped)``: rows that are merely empty are
dropped and counted; rows that are malformed (a missing field, a dialogue we cannot
parse) raise :class:`DataError` naming the row index and the field, because a
silent skip would hide a format change upstream. Pass ``errors="skip"`` to drop
(and count) them instead. Record ids keep the source row index.

Real datasets carry no ground truth, so the tiny-world ``meta`` fields are filled
with neutral values (``answer ""``, ``accept []``, ``template_id -1``, qualities
``"unknown"``). hh-rlhf has no scores, only an order: we store 1.0 and 0.0.

Only :func:`load_hub_dataset` touches the network; tests exercise the mappers alone.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import NamedTuple

from .errors import ConfigError, DataError


class Mapped(NamedTuple):
    records: list[dict]
    dropped: int  # rows skipped because their text was empty or None


def _field(row, i: int, name: str, source: str):
    if not isinstance(row, dict):
        raise DataError(f"{source} row {i}: expected a dict, got {type(row).__name__}")
    if name not in row:
        raise DataError(f"{source} row {i}: missing field {name!r} (has {sorted(row)})")
    return row[name]


def _text(value, i: int, name: str, source: str) -> str:
    if value is None:
        return ""
    if not isinstance(value, str):
        raise DataError(f"{source} row {i}: field {name!r} should be text, got {type(value).__name__}")
    return value


def _meta(reference: str, family: str) -> dict:
    """The tiny world's meta keys, filled with "unknown" values for real data."""
    return {"family": family, "answer": "", "accept": [], "harmful": False, "template_id": -1, "reference": reference}


def _preference(rid, family, prompt, chosen, rejected, score_chosen, score_rejected) -> dict:
    meta = {**_meta(chosen, family), "score_chosen": float(score_chosen), "score_rejected": float(score_rejected),
            "chosen_quality": "unknown", "rejected_quality": "unknown", "flipped": False, "duplicate_of": "",
            "is_tie": float(score_chosen) == float(score_rejected)}
    return {"id": rid, "family": family, "prompt": prompt, "chosen": chosen, "rejected": rejected, "meta": meta}


def _map_rows(rows: Iterable[dict], split: str, one, errors: str) -> Mapped:
    """Apply ``one(row, index, split) -> record | None`` to every row; None means "drop"."""
    if errors not in ("raise", "skip"):
        raise ConfigError(f"errors must be 'raise' or 'skip', got {errors!r}")
    records, dropped = [], 0
    for i, row in enumerate(rows):
        try:
            record = one(row, i, split)
        except DataError:
            if errors == "raise":
                raise
            record = None
        if record is None:
            dropped += 1
        else:
            records.append(record)
    return Mapped(records, dropped)


# --------------------------------------------------------------------------- pretraining text
def _tinystories_row(row, i, split):
    text = _text(_field(row, i, "text", "tinystories"), i, "text", "tinystories").strip()
    return {"id": f"tinystories-{split}-{i:06d}", "text": text} if text else None


def map_tinystories(rows: Iterable[dict], split: str = "train", errors: str = "raise") -> Mapped:
    """``{"text"}`` -> ``{"id", "text"}``; empty or None texts are dropped and counted."""
    return _map_rows(rows, split, _tinystories_row, errors)


# --------------------------------------------------------------------------- instructions
def _alpaca_row(row, i, split):
    instruction, extra, output = (_text(_field(row, i, k, "alpaca"), i, k, "alpaca").strip()
                                  for k in ("instruction", "input", "output"))
    if not instruction or not output:
        return None
    prompt = instruction + (f"\n\n{extra}" if extra else "")
    return {"id": f"alpaca-{split}-{i:06d}", "family": "alpaca", "prompt": prompt, "response": output,
            "messages": [{"role": "user", "content": prompt}, {"role": "assistant", "content": output}],
            "quality": "unknown", "meta": _meta(output, "alpaca")}


def map_alpaca(rows: Iterable[dict], split: str = "train", errors: str = "raise") -> Mapped:
    """``{"instruction", "input", "output"}`` -> SFT records (input appended after a blank line)."""
    return _map_rows(rows, split, _alpaca_row, errors)


# --------------------------------------------------------------------------- preferences
HUMAN, ASSISTANT = "\n\nHuman:", "\n\nAssistant:"


def split_hh_dialogue(text: str) -> tuple[str, str]:
    """Split ``"\\n\\nHuman: ... \\n\\nAssistant: ..."`` into (prompt, last assistant reply).

    A one-turn prompt becomes just the human's words; a longer conversation keeps its
    earlier turns as text (``"Human: ...\\n\\nAssistant: ...\\n\\nHuman: ..."``).
    Raises ``ValueError`` when the text is not a Human/Assistant dialogue.
    """
    cut = text.rfind(ASSISTANT)
    if not text.startswith(HUMAN) or cut < 0:
        raise ValueError("expected a dialogue starting with '\\n\\nHuman:' and containing '\\n\\nAssistant:'")
    history, reply = text[:cut], text[cut + len(ASSISTANT):].strip()
    prompt = history[len(HUMAN):].strip() if history.count(HUMAN) == 1 else history.strip()
    if not prompt:
        raise ValueError("the human turn is empty")
    return prompt, reply


def _hh_row(row, i, split):
    sides = [_text(_field(row, i, k, "hh-rlhf"), i, k, "hh-rlhf") for k in ("chosen", "rejected")]
    try:
        (prompt, chosen), (prompt_r, rejected) = (split_hh_dialogue(s) for s in sides)
    except ValueError as e:
        raise DataError(f"hh-rlhf row {i}: cannot parse the dialogue ({e})") from None
    if prompt != prompt_r:
        raise DataError(f"hh-rlhf row {i}: 'chosen' and 'rejected' do not share the same conversation prefix")
    if not chosen or not rejected:
        return None
    return _preference(f"hh-rlhf-{split}-{i:06d}", "hh-rlhf", prompt, chosen, rejected, 1.0, 0.0)


def map_hh_rlhf(rows: Iterable[dict], split: str = "train", errors: str = "raise") -> Mapped:
    """Anthropic hh-rlhf rows -> preference records (prompt = the shared conversation)."""
    return _map_rows(rows, split, _hh_row, errors)


def _last_assistant(messages, i: int, name: str) -> str:
    if not isinstance(messages, list) or not messages:
        raise DataError(f"ultrafeedback row {i}: field {name!r} should be a non-empty list of messages")
    last = messages[-1]
    if not isinstance(last, dict) or last.get("role") != "assistant" or not isinstance(last.get("content"), str):
        raise DataError(f"ultrafeedback row {i}: field {name!r} must end with an assistant message")
    return last["content"].strip()


def _ultrafeedback_row(row, i, split):
    prompt = _text(_field(row, i, "prompt", "ultrafeedback"), i, "prompt", "ultrafeedback").strip()
    chosen, rejected = (_last_assistant(_field(row, i, k, "ultrafeedback"), i, k) for k in ("chosen", "rejected"))
    scores = []
    for k in ("score_chosen", "score_rejected"):
        value = _field(row, i, k, "ultrafeedback")
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise DataError(f"ultrafeedback row {i}: field {k!r} should be a number, got {value!r}")
        scores.append(value)
    if not prompt or not chosen or not rejected:
        return None
    return _preference(f"ultrafeedback-{split}-{i:06d}", "ultrafeedback", prompt, chosen, rejected, *scores)


def map_ultrafeedback(rows: Iterable[dict], split: str = "train", errors: str = "raise") -> Mapped:
    """UltraFeedback-binarized rows (message lists + scores) -> preference records."""
    return _map_rows(rows, split, _ultrafeedback_row, errors)


# --------------------------------------------------------------------------- loading from the hub
MAPPERS = {"tinystories": map_tinystories, "alpaca": map_alpaca, "hh_rlhf": map_hh_rlhf,
           "ultrafeedback": map_ultrafeedback}
DEFAULT_NAMES = {"tinystories": "roneneldan/TinyStories", "alpaca": "yahma/alpaca-cleaned",
                 "hh_rlhf": "Anthropic/hh-rlhf", "ultrafeedback": "HuggingFaceH4/ultrafeedback_binarized"}


def load_hub_dataset(kind: str, name: str | None = None, split: str = "train", limit: int | None = None,
                     errors: str = "raise") -> Mapped:
    """Download (or read from cache) a hub dataset and map it. Needs the network the first time.

    ``kind`` picks the mapper (``tinystories``, ``alpaca``, ``hh_rlhf``, ``ultrafeedback``);
    ``name`` defaults to the dataset the ``gpu`` profile uses; ``limit`` keeps the first rows.
    ``errors="skip"`` drops (and counts) malformed rows instead of raising -- real dumps
    have a few. Note that UltraFeedback's splits are called ``train_prefs`` / ``test_prefs``.
    """
    if kind not in MAPPERS:
        raise ConfigError(f"unknown hub dataset kind {kind!r}; choose one of {', '.join(MAPPERS)}")
    import datasets  # imported here: the offline profiles never need it

    hub_split = f"{split}[:{int(limit)}]" if limit is not None else split
    rows = datasets.load_dataset(name or DEFAULT_NAMES[kind], split=hub_split)
    return MAPPERS[kind](rows, split=split, errors=errors)
