"""Profiles: one place that decides how big everything is.

A profile bundles the sizes every stage reads (world, tokenizer, model, steps)
and which data and model to use:

=========  ===============================================================
``smoke``  tests and CI. Every notebook runs in well under 90 s. Nothing learns much.
``tiny``   the default without a GPU: an offline synthetic world and a ~1M-parameter
           Llama that really learns in minutes on 2 CPU cores.
``gpu``    the default with CUDA: a real hub base model (135M parameters), real public
           datasets, bf16. Needs a network the first time (weights and data are cached).
=========  ===============================================================

Resolution order: an explicit ``name`` argument > :func:`use_profile` (e.g. in a
notebook's first cell) > the ``LLM_COURSE_PROFILE`` environment variable > ``gpu``
if CUDA is available, else ``tiny``.
"""

from __future__ import annotations

import os
from dataclasses import asdict, dataclass, field
from pathlib import Path

from .errors import ConfigError

ENV_VAR = "LLM_COURSE_PROFILE"
RUNS_ENV_VAR = "LLM_COURSE_RUNS"


@dataclass(frozen=True)
class WorldSize:
    """How many records the tiny world generates per stage (train split; eval splits use ``eval_examples``)."""

    pretrain_docs: int  # documents in the pretraining corpus
    sft_examples: int  # instruction -> response pairs
    pref_pairs: int  # preference pairs (prompt, chosen, rejected)
    rl_prompts: int  # prompts for PPO / GRPO rollouts
    eval_examples: int  # size of each held-out split (validation, test)


@dataclass(frozen=True)
class ModelSize:
    """Shape of the from-scratch Llama used by the offline profiles."""

    hidden_size: int
    num_layers: int
    num_heads: int
    intermediate_size: int
    context_length: int  # max tokens per training sequence (and position range)


@dataclass(frozen=True)
class Profile:
    name: str
    description: str
    seed: int
    world: WorldSize
    tokenizer_vocab_size: int  # BPE vocabulary incl. special tokens (offline profiles)
    model: ModelSize
    # gpu profile only: real hub assets. None means "use the offline tiny world".
    base_model: str | None = None
    hub_datasets: dict = field(default_factory=dict)
    precision: str = "auto"  # "auto" -> bf16 on a bf16-capable GPU, else fp32
    trackers: tuple = ("wandb",)  # metric sinks used by the pipeline command

    @property
    def offline(self) -> bool:
        return self.base_model is None

    def to_dict(self) -> dict:
        return asdict(self)


PROFILES: dict[str, Profile] = {
    "smoke": Profile(
        name="smoke",
        description="CI and tests: every notebook < 90 s on 2 cores; checks that code runs, not that it learns",
        seed=0,
        world=WorldSize(pretrain_docs=300, sft_examples=200, pref_pairs=200, rl_prompts=64, eval_examples=48),
        tokenizer_vocab_size=320,
        model=ModelSize(hidden_size=32, num_layers=2, num_heads=2, intermediate_size=64, context_length=64),
        trackers=(),
    ),
    "tiny": Profile(
        name="tiny",
        description="default on CPU: offline tiny world, ~1M-parameter Llama, real learning in minutes",
        seed=0,
        world=WorldSize(pretrain_docs=6000, sft_examples=4000, pref_pairs=20000, rl_prompts=512, eval_examples=400),
        tokenizer_vocab_size=1024,
        model=ModelSize(hidden_size=128, num_layers=4, num_heads=4, intermediate_size=384, context_length=128),
    ),
    "gpu": Profile(
        name="gpu",
        description="default with CUDA: real 135M hub base model and public datasets, bf16",
        seed=0,
        world=WorldSize(pretrain_docs=20000, sft_examples=20000, pref_pairs=20000, rl_prompts=2000, eval_examples=500),
        tokenizer_vocab_size=49152,
        model=ModelSize(hidden_size=576, num_layers=30, num_heads=9, intermediate_size=1536, context_length=512),
        base_model="HuggingFaceTB/SmolLM2-135M",
        hub_datasets={
            "pretrain": "roneneldan/TinyStories",
            "sft": "yahma/alpaca-cleaned",
            "preference": "Anthropic/hh-rlhf",
            "preference_alt": "HuggingFaceH4/ultrafeedback_binarized",
        },
    ),
}

_override: str | None = None


def _cuda_available() -> bool:
    try:
        import torch

        return torch.cuda.is_available()
    except Exception:  # torch missing or broken: offline profiles still work
        return False


def resolve_profile_name(name: str | None = None) -> str:
    """Return the profile name in force (see the module docstring for the order)."""
    chosen = name or _override or os.environ.get(ENV_VAR) or ("gpu" if _cuda_available() else "tiny")
    chosen = chosen.strip().lower()
    if chosen not in PROFILES:
        raise ConfigError(
            f"unknown profile {chosen!r}; choose one of {', '.join(PROFILES)} "
            f"(set it with {ENV_VAR}=... or course_utils.use_profile(...))"
        )
    return chosen


def get_profile(name: Profile | str | None = None) -> Profile:
    """The profile called ``name`` (a :class:`Profile` is returned as it is; None: the default order)."""
    if isinstance(name, Profile):
        return name
    return PROFILES[resolve_profile_name(name)]


def use_profile(name: str | None) -> Profile:
    """Pin the profile for this process (and child processes). ``None`` keeps the default order."""
    global _override
    if name is None:
        return get_profile()
    profile = get_profile(name)
    _override = profile.name
    os.environ[ENV_VAR] = profile.name
    return profile


def _repo_root(start: Path) -> Path | None:
    for folder in (start, *start.parents):
        if (folder / "pyproject.toml").exists() and (folder / "course_utils").is_dir():
            return folder
    return None


def runs_dir(profile: Profile | str | None = None) -> Path:
    """Folder where a profile's artifacts (tokenizer, checkpoints, reports) live.

    ``$LLM_COURSE_RUNS`` if set, else ``<repo>/runs`` when inside the course checkout,
    else ``~/.cache/llm_course/runs``; one sub-folder per profile.
    """
    if not isinstance(profile, Profile):
        profile = get_profile(profile)
    base = os.environ.get(RUNS_ENV_VAR)
    if base:
        root = Path(base)
    else:
        repo = _repo_root(Path.cwd().resolve())
        root = repo / "runs" if repo else Path.home() / ".cache" / "llm_course" / "runs"
    return root / profile.name
