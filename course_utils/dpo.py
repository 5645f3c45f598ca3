"""Direct preference optimisation (DPO) from scratch: the loss, its implicit rewards, sequence log-probs.

DPO (Rafailov et al. 2023) skips the reward model and the RL loop. For a pair (chosen y_w, rejected y_l)
and a frozen reference π_ref (the SFT model), the policy's *implicit reward* of a response is
β·(log π(y|x) − log π_ref(y|x)), and the loss is Bradley–Terry on those rewards:

    L = −log σ( β·[(log π(y_w) − log π_ref(y_w)) − (log π(y_l) − log π_ref(y_l))] )

``loss_type="ipo"`` switches to IPO (Azar et al. 2023): a squared loss that pulls the per-token log-ratio
margin to 1/(2β) instead of pushing it to infinity, so it does not over-fit deterministic preferences.
``tests/test_dpo.py`` checks both against TRL's ``DPOTrainer`` on the same batch.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .errors import ConfigError, DataError
from .rl import token_logprobs

LOSS_TYPES = ("sigmoid", "ipo")


def sequence_logprobs(model, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                      completion_mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(sum of log π over each row's completion tokens, number of completion tokens), both (B,).

    ``completion_mask`` marks the response tokens of ``input_ids`` (prompt and padding 0). The logits at
    position t predict token t+1, hence the shift by one.
    """
    if completion_mask.shape != input_ids.shape:
        raise ConfigError(f"completion_mask {tuple(completion_mask.shape)} must match input_ids "
                          f"{tuple(input_ids.shape)}")
    logits = model(input_ids=input_ids, attention_mask=attention_mask).logits[:, :-1]
    mask = completion_mask[:, 1:]
    if bool((mask.sum(1) == 0).any()):
        raise DataError("a row has no completion token: its log-probability is undefined")
    return token_logprobs(logits, input_ids[:, 1:], mask).sum(1), mask.sum(1)


def dpo_loss(policy_chosen: torch.Tensor, policy_rejected: torch.Tensor, ref_chosen: torch.Tensor,
             ref_rejected: torch.Tensor, beta: float = 0.1, loss_type: str = "sigmoid",
             chosen_tokens: torch.Tensor | None = None, rejected_tokens: torch.Tensor | None = None) -> dict:
    """Per-pair DPO (or IPO) losses from sequence log-probs, with the implicit rewards and their margins.

    Returns ``{"losses", "chosen_rewards", "rejected_rewards", "margins", "accuracy"}``: rewards are
    β·(log π − log π_ref) (no gradient), ``accuracy`` the share of pairs whose chosen side has the larger
    implicit reward. IPO needs the completion lengths (``chosen_tokens``, ``rejected_tokens``): it compares
    log-ratios per token.
    """
    if loss_type not in LOSS_TYPES:
        raise ConfigError(f"loss_type must be one of {LOSS_TYPES}, got {loss_type!r}")
    if beta <= 0:
        raise ConfigError(f"beta must be > 0, got {beta}")
    chosen_ratio, rejected_ratio = policy_chosen - ref_chosen, policy_rejected - ref_rejected
    if loss_type == "sigmoid":
        losses = -F.logsigmoid(beta * (chosen_ratio - rejected_ratio))
    else:
        if chosen_tokens is None or rejected_tokens is None:
            raise ConfigError("loss_type='ipo' needs chosen_tokens and rejected_tokens (completion lengths)")
        per_token = chosen_ratio / chosen_tokens.clamp(min=1) - rejected_ratio / rejected_tokens.clamp(min=1)
        losses = (per_token - 1.0 / (2.0 * beta)) ** 2
    chosen_rewards, rejected_rewards = beta * chosen_ratio.detach(), beta * rejected_ratio.detach()
    return {"losses": losses, "chosen_rewards": chosen_rewards, "rejected_rewards": rejected_rewards,
            "margins": chosen_rewards - rejected_rewards,
            "accuracy": (chosen_rewards > rejected_rewards).float().mean()}
