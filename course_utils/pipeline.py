"""The end-to-end pipeline behind ``llm-course pipeline``.

tiny world → tokenizer → pretraining → SFT → reward model → PPO and DPO (RLHF) → evaluation → report.
"""

from __future__ import annotations

import time
from pathlib import Path

from .profiles import get_profile, runs_dir
from .tracking import Tracker

STAGES = ("world", "pretrain", "sft", "rm", "ppo", "dpo", "eval", "report")


def run_pipeline(profile: str | None = None, out_dir=None, trackers=None, log=print, sft_overrides: dict | None = None,
                 rm_overrides: dict | None = None, ppo_overrides: dict | None = None, dpo_overrides: dict | None = None,
                 eval_overrides: dict | None = None, **pretrain_overrides) -> dict:
    """Run every stage for ``profile``; return the metrics dict (also written to ``<out>/report``).

    ``sft_overrides`` change the SFT stage's config, e.g. ``{"peft": "lora"}`` (``llm-course pipeline --peft lora``);
    ``rm_overrides`` the reward model's, e.g. ``{"label_noise": 0.2}``; ``ppo_overrides`` and ``dpo_overrides`` those of
    the two RLHF stages, e.g. ``{"kl_beta": 0.0}``; ``eval_overrides`` the evaluation's, e.g. ``{"prompts": 50}``.
    """
    from . import dpo, evaluation, ppo, pretrain, reward, sft
    from .report import write_report
    from .stages import STAGES as STAGE_DIRS
    from .stages import load_model_dir, run_once
    from .world import write_world

    p = get_profile(profile)
    out = Path(out_dir) if out_dir else runs_dir(p)
    trackers = p.trackers if trackers is None else tuple(trackers)
    t_start = time.perf_counter()
    metrics = {"profile": p.name, "stages": {}, "stage_seconds": {}}
    log(f"LLM Training Lab pipeline — profile {p.name!r}: {p.description}")
    log(f"artifacts: {out}")

    t = time.perf_counter()
    if p.offline:
        counts = write_world(p, out / "world")
        log(f"[1/8] tiny world written to {out / 'world'}: {counts}")
        metrics["stages"]["world"] = counts
    else:
        log(f"[1/8] gpu profile: data comes from the hub ({', '.join(p.hub_datasets.values())})")
    metrics["stage_seconds"]["world"] = time.perf_counter() - t

    def stage(name: str, cfg, main, **inputs) -> None:
        """Run one stage with its own tracker; record its metrics and wall time. The stage's folder also gets
        ``result.json`` (:func:`course_utils.stages.run_once`), which notebooks reuse instead of training again."""
        t = time.perf_counter()
        tracker = Tracker(name, config=vars(cfg), backends=trackers, log_dir=out / "tracking")
        try:
            metrics["stages"][name] = run_once(main, cfg, out / name, fresh=True, log=log, tracker=tracker, **inputs)
        finally:
            tracker.finish()
        metrics["stage_seconds"][name] = time.perf_counter() - t

    log("[2/8] pretraining (预训练): tokenizer → DataLoader → loss → checkpoint")
    stage("pretrain", pretrain.PretrainConfig.for_profile(p.name, **pretrain_overrides), pretrain.main)

    log("[3/8] supervised fine-tuning, SFT (指令微调): chat template, loss on the assistant's tokens only")
    stage("sft", sft.SFTConfig.for_profile(p.name, **(sft_overrides or {})), sft.main,
          base=load_model_dir(out / "pretrain" / "final"))

    log("[4/8] reward model, RM (奖励建模): clean the preference pairs, Bradley–Terry loss, accuracy / AUC / Kendall τ")
    stage("rm", reward.RewardConfig.for_profile(p.name, **(rm_overrides or {})), reward.main,
          sft=load_model_dir(out / "sft" / "final"))

    def after_rm():
        return {"sft": load_model_dir(out / "sft" / "final"), "rm": load_model_dir(out / "rm" / "final", reward=True)}

    log("[5/8] RLHF with PPO (近端策略优化): rollouts scored by the RM, KL penalty to the frozen SFT model, clipped updates")
    stage("ppo", ppo.PPOConfig.for_profile(p.name, **(ppo_overrides or {})), ppo.main, **after_rm())
    log("[6/8] DPO (直接偏好优化): pairs of the SFT model's own answers ranked by the RM, a classification loss, "
        "no RL loop")
    stage("dpo", dpo.DPOConfig.for_profile(p.name, **(dpo_overrides or {})), dpo.main, **after_rm())
    log("[7/8] evaluation (模型评估): every model on held-out prompts with every metric, ranked against the truth")
    finished = {name: load_model_dir(out / STAGE_DIRS[name] / "final") for name in evaluation.MODELS
                if (out / STAGE_DIRS[name] / "final" / "manifest.json").exists()}  # as notebook 10 loads them
    stage("eval", evaluation.EvalConfig.for_profile(p.name, **(eval_overrides or {})), evaluation.main,
          models=finished, rm=load_model_dir(out / "rm" / "final", reward=True))
    if trackers:
        log(f"  metrics also sent to {', '.join(trackers)} under {out / 'tracking'}")

    metrics["seconds"] = time.perf_counter() - t_start
    report = write_report(out / "report", metrics)
    log(f"[8/8] report: {report}  (numbers: {report.parent / 'metrics.json'})")
    metrics["report"] = str(report)
    return metrics
