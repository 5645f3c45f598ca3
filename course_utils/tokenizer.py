"""Byte-level BPE tokenizer, trained on the course corpus and wrapped for transformers.

Byte-level means the base alphabet is the 256 byte values, so *any* text can be
encoded (no unknown token); BPE then learns merges of frequent byte pairs until the
vocabulary reaches ``vocab_size``. We add the special tokens every later chapter needs:

====================  ==========================================================
``<|bos|>``           beginning of a document / conversation
``<|eos|>``           end of a document / of an assistant answer (generation stops here)
``<|pad|>``           filler that makes sequences the same length; never gets loss
``<|mask|>``          the corruption token of masked-LM pretraining
``<|im_start|>`` …    ChatML turn markers used by the chat template (chapter 03)
====================  ==========================================================

The tokenizer adds no special tokens by itself: the packer and the chat template
place BOS/EOS explicitly, so you can always see where they are.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Iterable
from pathlib import Path

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import AutoTokenizer, PreTrainedTokenizerFast

from .errors import ConfigError, DataError

BOS, EOS, PAD, MASK = "<|bos|>", "<|eos|>", "<|pad|>", "<|mask|>"
IM_START, IM_END = "<|im_start|>", "<|im_end|>"
SPECIAL_TOKENS = [PAD, BOS, EOS, MASK, IM_START, IM_END]

# ChatML-style template: <|bos|><|im_start|>user\n...<|im_end|>\n<|im_start|>assistant\n...<|im_end|><|eos|>
# The assistant turn ends with <|im_end|> followed by EOS, so a model learns to emit EOS and stop.
CHAT_TEMPLATE = (
    "{{ bos_token }}"
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' }}"
    "{% if message['role'] == 'assistant' %}{{ eos_token }}{% endif %}"
    "{{ '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)


def _checked_texts(texts: Iterable) -> list[str]:
    out = []
    for i, t in enumerate(texts):
        if isinstance(t, dict):
            t = t.get("text")
        if t is None:
            raise DataError(f"text record {i} is None; every record needs a non-empty 'text' string")
        if not isinstance(t, str):
            raise DataError(f"text record {i} is {type(t).__name__}, expected str")
        if not t.strip():
            raise DataError(f"text record {i} is empty; drop it or fill it before training")
        out.append(t)
    if not out:
        raise DataError("no text records to train the tokenizer on")
    return out


def train_tokenizer(texts: Iterable, vocab_size: int, min_frequency: int = 2) -> PreTrainedTokenizerFast:
    """Train a byte-level BPE on ``texts`` (strings or ``{"text": ...}`` records)."""
    texts = _checked_texts(texts)
    alphabet = pre_tokenizers.ByteLevel.alphabet()
    if vocab_size < len(alphabet) + len(SPECIAL_TOKENS):
        raise ConfigError(
            f"vocab_size={vocab_size} is too small: a byte-level BPE needs at least "
            f"{len(alphabet) + len(SPECIAL_TOKENS)} (256 bytes + {len(SPECIAL_TOKENS)} special tokens)"
        )
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=min_frequency,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=alphabet,
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer=trainer)
    return wrap_tokenizer(tok)


def wrap_tokenizer(tok: Tokenizer) -> PreTrainedTokenizerFast:
    """Wrap a raw ``tokenizers.Tokenizer`` as a transformers fast tokenizer with our specials."""
    hf = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token=BOS,
        eos_token=EOS,
        pad_token=PAD,
        mask_token=MASK,
        additional_special_tokens=[IM_START, IM_END],
        padding_side="right",
        model_max_length=1_000_000,
    )
    hf.chat_template = CHAT_TEMPLATE
    return hf


def require_pad_token(tokenizer) -> int:
    """Return the pad id, or raise a clear error: batching needs a pad token."""
    if tokenizer.pad_token_id is None:
        raise ConfigError(
            f"tokenizer {type(tokenizer).__name__} has no pad token; batches of unequal length cannot be "
            "padded. Set one, e.g. tokenizer.pad_token = tokenizer.eos_token (and mask it out of the loss)"
        )
    return tokenizer.pad_token_id


def save_tokenizer(tokenizer, path: str | os.PathLike) -> Path:
    """Save atomically: write into a temporary sibling folder, then rename it into place."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.tmp-", dir=path.parent))
    try:
        tokenizer.save_pretrained(tmp)
        if path.exists():
            shutil.rmtree(path)
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp)
    return path


def load_tokenizer(path: str | os.PathLike) -> PreTrainedTokenizerFast:
    path = Path(path)
    if not (path / "tokenizer.json").exists():
        raise ConfigError(f"{path} holds no tokenizer.json; train one with course_utils.train_tokenizer")
    return AutoTokenizer.from_pretrained(path, trust_remote_code=False)
