"""The library versions of chapter 07: TRL's ``DPOTrainer``, ``GRPOTrainer`` and ``RLOOTrainer`` on the tiny world.

Plumbing only: each function builds the trainer from the course's models and rows, on the CPU when there is no
GPU, with no hub access and no trackers. The notebooks and tests call these so that the TRL set-up lives in one
place; what the trainers compute is compared with the course's own code there.
"""

from __future__ import annotations

import warnings

from .errors import ConfigError


def quiet(trainer):
    """Without tqdm, transformers prints every log dict; the course reads ``trainer.state.log_history`` instead."""
    from transformers.trainer_callback import PrinterCallback

    trainer.remove_callback(PrinterCallback)
    return trainer


def _common(output_dir, **overrides) -> dict:
    import torch

    gpu = torch.cuda.is_available()
    defaults = dict(output_dir=str(output_dir), report_to="none", save_strategy="no", use_cpu=not gpu,
                    bf16=gpu and torch.cuda.is_bf16_supported(), logging_steps=5, disable_tqdm=True)
    return defaults | overrides


def preference_dataset(rows: list[dict]):
    """TRL's conversational preference format: prompt / chosen / rejected as lists of messages."""
    from datasets import Dataset

    return Dataset.from_list([{"prompt": [{"role": "user", "content": r["prompt"]}],
                               "chosen": [{"role": "assistant", "content": r["chosen"]}],
                               "rejected": [{"role": "assistant", "content": r["rejected"]}]} for r in rows])


def dpo_trainer(policy, ref, tokenizer, rows: list[dict], output_dir, beta: float = 0.1, loss_type: str = "sigmoid",
                **args):
    """A TRL ``DPOTrainer`` for ``policy`` against an explicit frozen ``ref`` on preference ``rows``."""
    from trl import DPOConfig, DPOTrainer

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        config = DPOConfig(**_common(output_dir, beta=beta, loss_type=[loss_type], **args))
        return quiet(DPOTrainer(model=policy, ref_model=ref, args=config, train_dataset=preference_dataset(rows),
                                 processing_class=tokenizer))


def prompt_dataset(rows: list[dict]):
    """Conversational prompts with a ``row`` column, so a reward function can find each prompt's task."""
    from datasets import Dataset

    return Dataset.from_list([{"prompt": [{"role": "user", "content": r["prompt"]}], "row": i}
                              for i, r in enumerate(rows)])


def gold_reward(rows: list[dict]):
    """A TRL reward function (``completions, row, **kw -> list[float]``): the tiny world's true score.

    This is a *programmatic* reward, like the unit tests and answer checkers GRPO is used with for maths and code
    (RL with verifiable rewards): nothing learned, nothing to over-optimise except the checker's own blind spots.
    """
    from .ppo import gold_scores

    def reward(completions, row, **kwargs):
        texts = [c[-1]["content"] if isinstance(c, list) else str(c) for c in completions]
        return gold_scores([rows[i] for i in row], texts)

    reward.__name__ = "true_score"
    return reward


def group_trainer(kind: str, model, tokenizer, rows: list[dict], reward_fn, output_dir, **args):
    """A TRL ``GRPOTrainer`` (``kind="grpo"``) or ``RLOOTrainer`` (``"rloo"``) on prompt ``rows``."""
    if kind == "grpo":
        from trl import GRPOConfig as Config
        from trl import GRPOTrainer as Trainer
    elif kind == "rloo":
        from trl import RLOOConfig as Config
        from trl import RLOOTrainer as Trainer
    else:
        raise ConfigError(f"kind must be 'grpo' or 'rloo', got {kind!r}")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        config = Config(**_common(output_dir, **args))
        return quiet(Trainer(model=model, reward_funcs=[reward_fn], args=config, train_dataset=prompt_dataset(rows),
                              processing_class=tokenizer))
