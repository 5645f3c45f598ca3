"""The course model: a small Llama built from a transformers config.

Same architecture as Llama 2/3, SmolLM and Qwen (RMSNorm, rotary positions,
SwiGLU MLP), only smaller, so everything learned here transfers to the real
models of the ``gpu`` profile.
"""

from __future__ import annotations

import torch
from transformers import LlamaConfig, LlamaForCausalLM

from .errors import ConfigError
from .profiles import ModelSize
from .tokenizer import require_pad_token


def make_config(size: ModelSize, tokenizer) -> LlamaConfig:
    """A ``LlamaConfig`` for ``size`` whose vocabulary and special ids match ``tokenizer``."""
    if size.hidden_size <= 0 or size.num_heads <= 0 or size.num_layers <= 0:
        raise ConfigError(f"model sizes must be positive, got {size}")
    if size.hidden_size % size.num_heads:
        raise ConfigError(
            f"hidden_size={size.hidden_size} is not divisible by num_heads={size.num_heads}: "
            "each attention head gets hidden_size / num_heads dimensions, which must be a whole number"
        )
    if (size.hidden_size // size.num_heads) % 2:
        raise ConfigError(
            f"head dimension {size.hidden_size // size.num_heads} is odd; rotary embeddings rotate pairs of "
            "dimensions, so hidden_size / num_heads must be even"
        )
    return LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=size.hidden_size,
        intermediate_size=size.intermediate_size,
        num_hidden_layers=size.num_layers,
        num_attention_heads=size.num_heads,
        num_key_value_heads=size.num_heads,
        max_position_embeddings=size.context_length,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=require_pad_token(tokenizer),
        tie_word_embeddings=True,  # input embedding = output projection: fewer parameters, standard for small LMs
        attn_implementation="sdpa",  # accepts the 4-D boolean masks of the prefix-LM / MLM objectives
    )


def build_model(config: LlamaConfig, seed: int = 0) -> LlamaForCausalLM:
    """Fresh, randomly initialised model; the same seed always gives the same weights."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = LlamaForCausalLM(config)
    return model


def count_parameters(model: torch.nn.Module, trainable_only: bool = False) -> int:
    """Parameters counted once even when shared (tied embeddings)."""
    seen, total = set(), 0
    for p in model.parameters():
        if id(p) in seen or (trainable_only and not p.requires_grad):
            continue
        seen.add(id(p))
        total += p.numel()
    return total
