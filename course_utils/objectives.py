"""Pretraining objectives side by side: causal LM, prefix LM, masked LM.

All three train the *same* Llama; they differ only in

1. the attention mask: who may look at whom (``mask[q, k] = True`` means query
   position ``q`` may attend to key position ``k``), and
2. the labels: which positions are predicted, and of what.

============  =========================================  =====================================
objective     attention                                  loss on
============  =========================================  =====================================
causal (CLM)  each token sees itself and the past        every next token (GPT, Llama)
prefix LM     prefix fully bidirectional, rest causal    next tokens after the prefix (T5/UniLM/GLM)
masked (MLM)  everything sees everything                 the ~15% corrupted positions (BERT)
============  =========================================  =====================================
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

IGNORE_INDEX = -100  # label value that ``cross_entropy`` skips (PyTorch's and transformers' convention)
OBJECTIVES = ("clm", "prefix", "mlm")


def causal_mask(T: int) -> torch.Tensor:
    """(T, T) bool, lower-triangular: position q sees keys 0..q."""
    return torch.tril(torch.ones(T, T, dtype=torch.bool))


def prefix_lm_mask(T: int, prefix_len: int) -> torch.Tensor:
    """(T, T) bool: causal, plus every prefix position sees the whole prefix."""
    mask = causal_mask(T)
    mask[:prefix_len, :prefix_len] = True
    return mask


def bidirectional_mask(T: int) -> torch.Tensor:
    """(T, T) bool, all True: the MLM encoder sees the whole sequence."""
    return torch.ones(T, T, dtype=torch.bool)


def shifted_targets(input_ids: torch.Tensor) -> torch.Tensor:
    """Labels for next-token prediction: position t is scored on token t+1; the last has no target."""
    labels = torch.full_like(input_ids, IGNORE_INDEX)
    labels[:, :-1] = input_ids[:, 1:]
    return labels


def token_loss_sum(logits: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Sum of cross-entropy over labelled positions, and how many there were.

    ``logits`` (B, T, V) at position t are compared with ``labels`` (B, T) at t (already shifted).
    Returning the sum and the count, not the mean, lets gradient accumulation divide by the
    token count of the *whole* accumulated batch, so 4 micro-batches of 8 equal one batch of 32.
    """
    loss = F.cross_entropy(
        logits.reshape(-1, logits.size(-1)).float(), labels.reshape(-1), ignore_index=IGNORE_INDEX, reduction="sum"
    )
    return loss, (labels != IGNORE_INDEX).sum()


def mlm_corrupt(
    input_ids: torch.Tensor,
    mask_token_id: int,
    vocab_size: int,
    special_ids: list[int],
    generator: torch.Generator,
    prob: float = 0.15,
) -> tuple[torch.Tensor, torch.Tensor]:
    """BERT's recipe: choose ``prob`` of non-special tokens; of those 80% → [MASK], 10% → random, 10% kept.

    Returns (corrupted inputs, labels) with labels = original token at chosen positions, else IGNORE_INDEX.
    """
    special = torch.isin(input_ids, torch.tensor(special_ids))
    chosen = (torch.rand(input_ids.shape, generator=generator) < prob) & ~special
    labels = torch.where(chosen, input_ids, torch.full_like(input_ids, IGNORE_INDEX))
    roll = torch.rand(input_ids.shape, generator=generator)
    inputs = input_ids.clone()
    inputs[chosen & (roll < 0.8)] = mask_token_id
    random_pos = chosen & (roll >= 0.8) & (roll < 0.9)
    inputs[random_pos] = torch.randint(vocab_size, input_ids.shape, generator=generator)[random_pos]
    return inputs, labels


def make_batch(objective: str, input_ids: torch.Tensor, tokenizer, generator: torch.Generator) -> dict:
    """Model inputs for one objective: ``input_ids``, ``attention_mask`` (None = causal default), ``labels``.

    ``labels`` are aligned with ``logits`` (already shifted for CLM / prefix LM).
    """
    B, T = input_ids.shape
    if objective == "clm":
        return {"input_ids": input_ids, "attention_mask": None, "labels": shifted_targets(input_ids)}
    if objective == "prefix":
        # a random split point per batch; the prefix is context only (no loss), the rest is generated
        prefix_len = int(torch.randint(1, T - 1, (1,), generator=generator))
        labels = shifted_targets(input_ids)
        labels[:, : prefix_len - 1] = IGNORE_INDEX  # positions that predict prefix tokens carry no loss
        mask = prefix_lm_mask(T, prefix_len)[None, None].expand(B, 1, T, T)  # (B, 1, T, T)
        return {"input_ids": input_ids, "attention_mask": mask, "labels": labels}
    if objective == "mlm":
        special = [i for i in (tokenizer.bos_token_id, tokenizer.eos_token_id, tokenizer.pad_token_id) if i is not None]
        inputs, labels = mlm_corrupt(input_ids, tokenizer.mask_token_id, len(tokenizer), special, generator)
        mask = bidirectional_mask(T)[None, None].expand(B, 1, T, T)
        return {"input_ids": inputs, "attention_mask": mask, "labels": labels}
    raise ValueError(f"unknown objective {objective!r}; choose one of {OBJECTIVES}")


def plot_masks(T: int = 8, prefix_len: int = 3, mlm_positions: tuple = (2, 5)):
    """Draw the three attention masks (rows = queries, columns = keys) and which positions carry loss."""
    import matplotlib.pyplot as plt

    panels = [
        ("causal LM", causal_mask(T), [f"t{i}→t{i + 1}" if i < T - 1 else "-" for i in range(T)]),
        ("prefix LM", prefix_lm_mask(T, prefix_len), ["-" if i < prefix_len - 1 or i == T - 1 else "loss" for i in range(T)]),
        ("masked LM", bidirectional_mask(T), ["loss" if i in mlm_positions else "-" for i in range(T)]),
    ]
    fig, axes = plt.subplots(1, 3, figsize=(12, 4))
    for ax, (title, mask, loss_on) in zip(axes, panels):
        ax.imshow(mask.numpy(), cmap="Blues", vmin=0, vmax=1.3)
        ax.set_title(title)
        ax.set_xlabel("key position (attended to)")
        ax.set_ylabel("query position")
        ax.set_xticks(range(T))
        ax.set_yticks(range(T), [f"{i} ({loss_on[i]})" for i in range(T)], fontsize=7)
    fig.tight_layout()
    return fig
