"""Stages hand off through checkpoints, asked for by name.

``load_stage("base")`` returns the pretrained model and its tokenizer. If the
checkpoint does not exist yet, it is built first (seconds in the ``smoke``
profile, minutes in ``tiny``), so any notebook can start from any chapter.
"ppo" and "dpo" are the two RLHF policies (chapters 06–07).
"""

from __future__ import annotations

import os
from pathlib import Path

from .errors import ConfigError
from .profiles import Profile, get_profile, runs_dir

# stage name -> folder under runs/<profile>/; "rm" holds a sequence classifier (one reward)
STAGES = {"base": "pretrain", "sft": "sft", "rm": "rm", "ppo": "ppo", "dpo": "dpo"}
NO_BUILD_VAR = "LLM_COURSE_NO_BUILD"  # set: load_stage raises instead of building a missing stage


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
        if os.environ.get(NO_BUILD_VAR):  # `llm-course course`: the pipeline builds it, maybe right now
            raise ConfigError(f"stage {stage!r} is not built yet and building is off here: add it to this notebook's "
                              "needs in course_utils.course.NEEDS")
        build_stage(stage, profile)
    return load_model_dir(final, device, reward=stage == "rm")


def build_stage(stage: str, profile: Profile | str | None = None) -> None:
    """Train a missing stage with its profile's preset (and, through ``load_stage``, the stages it starts from).

    A lock file per stage makes a second process — another notebook open at the same time, a parallel test — wait
    for the first one's checkpoint instead of training the same stage beside it."""
    import importlib

    from filelock import FileLock

    profile = get_profile(profile)
    folder = stage_dir(stage, profile)
    folder.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(str(folder.parent / f".{folder.name}.lock")):
        if (folder / "final" / "manifest.json").exists():  # built by another process while this one waited
            return
        print(f"stage {stage!r} not found for profile {profile.name!r}: building it now ...")
        module, config = {"base": ("pretrain", "PretrainConfig"), "sft": ("sft", "SFTConfig"),
                          "rm": ("reward", "RewardConfig"), "ppo": ("ppo", "PPOConfig"),
                          "dpo": ("dpo", "DPOConfig")}[stage]
        module = importlib.import_module(f"course_utils.{module}")
        module.main(getattr(module, config).for_profile(profile.name))


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


RECORD = "result.json"  # beside a run's final/: what its main() returned, keyed by config and input models
SHOWN_ONLY = ("progress",)  # config fields that change how a run is shown, not what it computes


def run_key(cfg, inputs: dict) -> dict:
    """What decides a run's result: its config and the exact weights of the models it starts from."""
    import json
    from dataclasses import asdict

    from .checkpoint import parameters_digest

    def identity(value):
        if isinstance(value, dict):  # e.g. the evaluation's {name: model}
            return {k: identity(v) for k, v in value.items()}
        model = value[0] if isinstance(value, tuple) else value
        return parameters_digest(model) if hasattr(model, "state_dict") else str(value)

    digests = {name: identity(value) for name, value in inputs.items() if value is not None}
    config = {k: v for k, v in asdict(cfg).items() if k not in SHOWN_ONLY}
    return json.loads(json.dumps({"config": config, "inputs": digests}, default=str))


def find_run(cfg, folders, key: dict | None = None, **inputs) -> Path | None:
    """The first of ``folders`` holding a finished run of ``cfg`` on these inputs (its record, and its checkpoint
    ``final/`` if it saved one). ``key``: :func:`run_key` if already computed (it hashes every input weight)."""
    import json

    key = key or run_key(cfg, inputs)
    for folder in map(Path, folders):
        record = folder / RECORD
        if record.exists():
            saved = json.loads(record.read_text())
            has_checkpoint = (folder / "final" / "manifest.json").exists()
            if saved.get("key") == key and (has_checkpoint or not saved.get("checkpoint", True)):
                return folder
    return None


def run_once(main, cfg, out_dir, reuse=(), fresh: bool = False, log=print, tracker=None, **inputs) -> dict:
    """``main(cfg, out_dir=out_dir, log=log, tracker=tracker, **inputs)`` — a stage's main, e.g. ``ppo.main`` with
    ``sft=(model, tokenizer), rm=(model, tokenizer)`` — unless ``out_dir`` or one of the ``reuse`` folders (e.g. the
    pipeline's ``stage_dir("ppo")``) holds a finished run with the same config and bit-identical input models: then
    that run's saved result is returned and nothing is trained. Training on CPU is deterministic, so a second run
    would only reproduce it. ``fresh=True`` trains anyway. Either way the result is what JSON holds (tuples become
    lists)."""
    import json

    from .io import atomic_open

    key = run_key(cfg, inputs)  # before main runs: a stage may train its input model in place (SFT does)
    found = None if fresh else find_run(cfg, (out_dir, *reuse), key=key)
    if found is not None:
        saved = json.loads((found / RECORD).read_text())["result"]
        log(f"  same config and same input weights as the finished run in {found}: reusing its result "
            f"({saved.get('seconds', float('nan')):.0f} s when it ran); fresh=True trains again")
        return saved
    result = json.loads(json.dumps(main(cfg, out_dir=out_dir, log=log, tracker=tracker, **inputs), default=str))
    record = {"key": key, "result": result,
              "checkpoint": (Path(out_dir) / "final" / "manifest.json").exists()}
    with atomic_open(Path(out_dir) / RECORD) as f:  # keys in their own order (write_json sorts them)
        json.dump(record, f, indent=1, ensure_ascii=False)
    return result
