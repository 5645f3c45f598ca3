"""Stages hand off through checkpoints, asked for by name.

``load_stage("base")`` returns the pretrained model and its tokenizer. If the
checkpoint does not exist yet, it is built first (seconds in the ``smoke``
profile, minutes in ``tiny``), so any notebook can start from any chapter.
"ppo" and "dpo" are the two RLHF policies (chapters 06–07).
"""

from __future__ import annotations

from pathlib import Path

from .errors import ConfigError
from .profiles import Profile, get_profile, runs_dir

# stage name -> folder under runs/<profile>/; "rm" holds a sequence classifier (one reward)
STAGES = {"base": "pretrain", "sft": "sft", "rm": "rm", "ppo": "ppo", "dpo": "dpo"}


def stage_dir(stage: str, profile: Profile | str | None = None) -> Path:
    if stage not in STAGES:
        raise ConfigError(f"unknown stage {stage!r}; known stages: {', '.join(STAGES)}")
    return runs_dir(profile) / STAGES[stage]


def load_stage(stage: str, profile: Profile | str | None = None, build_if_missing: bool = True, device=None):
    """(model, tokenizer) of a finished stage; builds it first if missing and allowed."""
    profile = get_profile(profile)
    final = stage_dir(stage, profile) / "final"
    if not (final / "manifest.json").exists():
        if not build_if_missing:
            raise ConfigError(f"stage {stage!r} has no checkpoint at {final}; run `llm-course pipeline` first")
        print(f"stage {stage!r} not found for profile {profile.name!r}: building it now ...")
        if stage == "base":
            from .pretrain import PretrainConfig, main

            main(PretrainConfig.for_profile(profile.name))
        elif stage == "sft":
            from .sft import SFTConfig, main

            main(SFTConfig.for_profile(profile.name))
        elif stage == "rm":
            from .reward import RewardConfig, main

            main(RewardConfig.for_profile(profile.name))
        elif stage == "ppo":
            from .ppo import PPOConfig, main

            main(PPOConfig.for_profile(profile.name))
        elif stage == "dpo":
            from .dpo import DPOConfig, main

            main(DPOConfig.for_profile(profile.name))
    return load_model_dir(final, device, reward=stage == "rm")


def load_model_dir(path, device=None, reward: bool = False):
    """(model, tokenizer) from a verified checkpoint folder; ``reward=True`` loads a one-output sequence classifier."""
    import torch
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

    from .checkpoint import verify_checkpoint
    from .tokenizer import load_tokenizer

    verify_checkpoint(path)
    auto = AutoModelForSequenceClassification if reward else AutoModelForCausalLM
    model = auto.from_pretrained(path, trust_remote_code=False)
    device = device or torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return model.to(device).eval(), load_tokenizer(path)
