"""``llm-course``: the course's command line.

    llm-course pipeline              # every stage, default profile, writes a report
    llm-course pretrain --max-steps 200 --lr 1e-3
    llm-course rm --label-noise 0.2  # only the reward model (builds the SFT model first if missing)
    llm-course ppo --kl-beta 0       # only PPO (chapter 06), here the no-KL-penalty ablation
    llm-course dpo --beta 0.5        # only DPO (chapter 07)
    llm-course world --out data/     # write the tiny world's JSONL files
    llm-course notebooks             # re-execute notebooks in place (tiny profile outputs)
    llm-course course --clean        # the whole course from nothing: pipeline + every notebook, on all cores
    llm-course env                   # what this machine has, which profile is in force
    llm-course gpu-smoke             # a short run of the gpu profile (needs CUDA + network)
    llm-course grade 01              # grade exercises/01_*.ipynb in a fresh kernel
    llm-course exercises             # regenerate exercises/ from solutions/

Every subcommand takes ``--profile {smoke,tiny,gpu}``.
"""

from __future__ import annotations

import argparse
import dataclasses
import inspect
import re
import sys
from pathlib import Path

from .profiles import ENV_VAR, PROFILES, use_profile


def _field_help(cls) -> dict[str, str]:
    """The ``# comment`` after each dataclass field becomes its --help text (``%`` escaped: argparse formats help)."""
    src = inspect.getsource(cls)
    return {m.group(1): m.group(2).strip().replace("%", "%%")
            for m in re.finditer(r"^\s+(\w+): [^=\n]+= [^#\n]*# (.*)$", src, re.M)}


def _add_config_flags(parser: argparse.ArgumentParser, cls) -> None:
    helps = _field_help(cls)
    for f in dataclasses.fields(cls):
        if f.name == "profile":
            continue
        kind = type(f.default)
        flag = "--" + f.name.replace("_", "-")
        if kind is bool:
            parser.add_argument(flag, type=lambda s: s.lower() in ("1", "true", "yes"), default=None, help=helps.get(f.name))
        else:
            parser.add_argument(flag, type=kind, default=None, help=f"{helps.get(f.name, '')} (profile default)")


def _overrides(args, cls) -> dict:
    return {f.name: getattr(args, f.name) for f in dataclasses.fields(cls)
            if f.name != "profile" and getattr(args, f.name, None) is not None}


def cmd_pipeline(args) -> int:
    from .pipeline import run_pipeline
    from .pretrain import PretrainConfig

    trackers = None if args.trackers is None else tuple(t for t in args.trackers.split(",") if t and t != "none")
    rm = {} if args.rm_label_noise is None else {"label_noise": args.rm_label_noise,
                                                   "noise_filter": args.rm_label_noise > 0}
    run_pipeline(args.profile, out_dir=args.out, trackers=trackers, sft_overrides={"peft": args.peft}, rm_overrides=rm,
                 **_overrides(args, PretrainConfig))
    return 0


def cmd_pretrain(args) -> int:
    from .pretrain import PretrainConfig, main

    cfg = PretrainConfig.for_profile(args.profile, **_overrides(args, PretrainConfig))
    metrics = main(cfg, out_dir=args.out)
    print(f"checkpoint: {metrics['checkpoint']}")
    return 0


def cmd_rm(args) -> int:
    from .reward import RewardConfig, main

    cfg = RewardConfig.for_profile(args.profile, **_overrides(args, RewardConfig))
    metrics = main(cfg, out_dir=args.out)
    print(f"checkpoint: {metrics['checkpoint']}")
    return 0


def cmd_ppo(args) -> int:
    from .ppo import PPOConfig, main

    metrics = main(PPOConfig.for_profile(args.profile, **_overrides(args, PPOConfig)), out_dir=args.out)
    print(f"checkpoint: {metrics['checkpoint']}")
    return 0


def cmd_dpo(args) -> int:
    from .dpo import DPOConfig, main

    metrics = main(DPOConfig.for_profile(args.profile, **_overrides(args, DPOConfig)), out_dir=args.out)
    print(f"checkpoint: {metrics['checkpoint']}")
    return 0


def cmd_world(args) -> int:
    from .profiles import get_profile
    from .world import write_world

    counts = write_world(get_profile(args.profile), Path(args.out))
    print(f"wrote the tiny world to {args.out}: {counts}")
    return 0


def cmd_notebooks(args) -> int:
    from .notebooks import execute_notebooks

    return execute_notebooks(args.names, profile=args.profile or "tiny", timeout=args.timeout)


def cmd_course(args) -> int:
    import shutil

    from .course import run_course
    from .profiles import runs_dir

    profile = args.profile or "tiny"
    if args.clean:
        print(f"--clean: deleting {runs_dir(profile)} (every checkpoint and run of profile {profile!r})")
        shutil.rmtree(runs_dir(profile), ignore_errors=True)
    return 0 if run_course(profile, args.names, jobs=args.jobs)["ok"] else 1


def cmd_env(args) -> int:
    from .envcheck import environment_report

    print(environment_report())
    return 0


def cmd_gpu_smoke(args) -> int:
    from .gpu_smoke import run_gpu_smoke

    return run_gpu_smoke(steps=args.steps)


def cmd_grade(args) -> int:
    from .grading.core import text_table
    from .grading.runner import grade_notebook
    from .io import write_json
    from .profiles import _repo_root

    target = Path(args.target)
    if target.suffix != ".ipynb":
        root = _repo_root(Path.cwd().resolve()) or Path.cwd()
        folder = root / ("solutions" if args.solutions else "exercises")
        if not args.target.isdigit():
            print(f"error: {args.target!r} is neither a chapter number nor a .ipynb path", file=sys.stderr)
            return 2
        matches = sorted(folder.glob(f"{int(args.target):02d}_*.ipynb"))
        if not matches:
            print(f"error: no notebook for chapter {args.target} in {folder}", file=sys.stderr)
            return 2
        target = matches[0]
    report = grade_notebook(target, notebook_timeout=args.timeout, task_timeout=args.task_timeout,
                            execute=not args.no_execute)
    took = "" if args.no_execute else f" ({report.notebook_seconds:.0f} s)"
    print(f"{target} — notebook run: {report.notebook_status}{took}")
    print(text_table(report.results))
    if args.json:
        write_json(args.json, report.to_dict())
        print(f"wrote {args.json}")
    return 0


def cmd_exercises(args) -> int:
    from .grading.stubs import build_exercises
    from .profiles import _repo_root

    root = _repo_root(Path.cwd().resolve())
    if root is None:
        print("error: run this inside the course checkout", file=sys.stderr)
        return 2
    changed = build_exercises(root, check_only=args.check)
    verb = "out of date" if args.check else "written"
    print("\n".join(f"{verb}: {p.relative_to(root)}" for p in changed) or "exercises are up to date")
    return 1 if (args.check and changed) else 0


def build_parser() -> argparse.ArgumentParser:
    from .dpo import DPOConfig
    from .ppo import PPOConfig
    from .pretrain import PretrainConfig
    from .reward import RewardConfig

    parser = argparse.ArgumentParser(prog="llm-course", description="LLM Training Lab: train language models end to end.")
    profile_help = f"sizes and data: smoke (CI), tiny (CPU default), gpu (CUDA default); or set {ENV_VAR}"
    parser.add_argument("--profile", choices=list(PROFILES), default=None, help=profile_help)
    # the same flag is also accepted after the subcommand (llm-course pipeline --profile smoke)
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--profile", choices=list(PROFILES), default=argparse.SUPPRESS, help=profile_help)
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("pipeline", parents=[common], help="run every stage end to end and write a report")
    p.add_argument("--out", default=None, help="artifact folder (default: runs/<profile>)")
    p.add_argument("--trackers", default=None, help="comma list of wandb,tensorboard,mlflow or 'none' (default: the profile's)")
    p.add_argument("--peft", choices=("none", "lora", "qlora"), default="none",
                   help="SFT stage: full fine-tuning (none), LoRA, or QLoRA on a 4-bit base (chapter 04)")
    p.add_argument("--rm-label-noise", type=float, default=None,
                   help="reward-model stage: share of training pairs with flipped labels, > 0 also turns on the "
                        "disagreement filter that looks for them (tiny world; chapter 05)")
    _add_config_flags(p, PretrainConfig)
    p.set_defaults(func=cmd_pipeline)

    p = sub.add_parser("pretrain", parents=[common], help="only the pretraining stage")
    p.add_argument("--out", default=None, help="stage folder (default: runs/<profile>/pretrain)")
    _add_config_flags(p, PretrainConfig)
    p.set_defaults(func=cmd_pretrain)

    p = sub.add_parser("rm", parents=[common], help="only the reward-model stage (builds the SFT model if missing)")
    p.add_argument("--out", default=None, help="stage folder (default: runs/<profile>/rm)")
    _add_config_flags(p, RewardConfig)
    p.set_defaults(func=cmd_rm)

    p = sub.add_parser("ppo", parents=[common], help="only the PPO stage (builds the SFT model and RM if missing)")
    p.add_argument("--out", default=None, help="stage folder (default: runs/<profile>/ppo)")
    _add_config_flags(p, PPOConfig)
    p.set_defaults(func=cmd_ppo)

    p = sub.add_parser("dpo", parents=[common], help="only the DPO stage (builds the SFT model and RM if missing)")
    p.add_argument("--out", default=None, help="stage folder (default: runs/<profile>/dpo)")
    _add_config_flags(p, DPOConfig)
    p.set_defaults(func=cmd_dpo)

    p = sub.add_parser("world", parents=[common], help="write the tiny world's JSONL files")
    p.add_argument("--out", required=True)
    p.set_defaults(func=cmd_world)

    p = sub.add_parser("notebooks", parents=[common], help="re-execute notebooks in place (default profile: tiny)")
    p.add_argument("names", nargs="*", help="notebook paths or number prefixes like 02 (default: all)")
    p.add_argument("--timeout", type=int, default=1800, help="seconds per cell")
    p.set_defaults(func=cmd_notebooks)

    p = sub.add_parser("course", parents=[common],
                       help="the pipeline and every notebook, several at once (default profile: tiny)")
    p.add_argument("names", nargs="*", help="only these notebooks (paths or prefixes like 02); the pipeline runs too")
    p.add_argument("--jobs", type=int, default=None, help="processes at once (default: 2 on a CPU with 2+ cores)")
    p.add_argument("--clean", action="store_true", help="delete runs/<profile> first: measure the course from nothing")
    p.set_defaults(func=cmd_course)

    p = sub.add_parser("grade", parents=[common], help="grade an exercise notebook in a fresh kernel (table; --json for machines)")
    p.add_argument("target", help="chapter number (01) for exercises/01_*.ipynb, or a notebook path")
    p.add_argument("--json", default=None, help="also write the result as JSON to this file")
    p.add_argument("--timeout", type=float, default=900, help="seconds for running the whole notebook (training cells!)")
    p.add_argument("--task-timeout", type=float, default=60, help="seconds per graded task")
    p.add_argument("--no-execute", action="store_true", help="skip running the notebook; only grade the task cells")
    p.add_argument("--solutions", action="store_true", help="with a chapter number: grade solutions/ instead")
    p.set_defaults(func=cmd_grade)

    p = sub.add_parser("exercises", parents=[common], help="regenerate exercises/ from solutions/ (the single source)")
    p.add_argument("--check", action="store_true", help="only report stubs that are out of date (exit 1 if any)")
    p.set_defaults(func=cmd_exercises)

    p = sub.add_parser("env", parents=[common], help="print versions, devices and the profile in force")
    p.set_defaults(func=cmd_env)

    p = sub.add_parser("gpu-smoke", parents=[common], help="short gpu-profile run on a CUDA machine (downloads a 135M model)")
    p.add_argument("--steps", type=int, default=20)
    p.set_defaults(func=cmd_gpu_smoke)
    return parser


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    if args.profile:
        use_profile(args.profile)
    try:
        return args.func(args)
    except ValueError as e:  # our errors name the problem; a traceback would only hide it
        from .errors import CourseError

        if isinstance(e, CourseError):
            print(f"error: {e}", file=sys.stderr)
            return 2
        raise


if __name__ == "__main__":
    sys.exit(main())
