"""The end-to-end pipeline behind ``llm-course pipeline``.

Today: tiny world → tokenizer → pretraining → SFT → evaluation → report. Later chapters
append the reward model and RLHF without changing the command.
"""

from __future__ import annotations

import time
from pathlib import Path

from .profiles import get_profile, runs_dir
from .tracking import Tracker

STAGES = ("world", "pretrain", "sft", "report")


def run_pipeline(profile: str | None = None, out_dir=None, trackers=None, log=print, sft_overrides: dict | None = None,
                 **pretrain_overrides) -> dict:
    """Run every stage for ``profile``; return the metrics dict (also written to ``<out>/report``).

    ``sft_overrides`` change the SFT stage's config, e.g. ``{"peft": "lora"}`` (``llm-course pipeline --peft lora``).
    """
    from . import pretrain, sft
    from .report import write_report
    from .stages import load_model_dir
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
        log(f"[1/4] tiny world written to {out / 'world'}: {counts}")
        metrics["stages"]["world"] = counts
    else:
        log(f"[1/4] gpu profile: data comes from the hub ({', '.join(p.hub_datasets.values())})")
    metrics["stage_seconds"]["world"] = time.perf_counter() - t

    t = time.perf_counter()
    log("[2/4] pretraining (预训练): tokenizer → DataLoader → loss → checkpoint")
    cfg = pretrain.PretrainConfig.for_profile(p.name, **pretrain_overrides)
    tracker = Tracker("pretrain", config=vars(cfg), backends=trackers, log_dir=out / "tracking")
    try:
        metrics["stages"]["pretrain"] = pretrain.main(cfg, out_dir=out / "pretrain", tracker=tracker, log=log)
    finally:
        tracker.finish()
    metrics["stage_seconds"]["pretrain"] = time.perf_counter() - t

    t = time.perf_counter()
    log("[3/4] supervised fine-tuning, SFT (指令微调): chat template, loss on the assistant's tokens only")
    sft_cfg = sft.SFTConfig.for_profile(p.name, **(sft_overrides or {}))
    tracker = Tracker("sft", config=vars(sft_cfg), backends=trackers, log_dir=out / "tracking")
    try:
        base = load_model_dir(out / "pretrain" / "final")
        metrics["stages"]["sft"] = sft.main(sft_cfg, out_dir=out / "sft", tracker=tracker, log=log, base=base)
    finally:
        tracker.finish()
    metrics["stage_seconds"]["sft"] = time.perf_counter() - t
    if trackers:
        log(f"  metrics also sent to {', '.join(trackers)} under {out / 'tracking'}")

    metrics["seconds"] = time.perf_counter() - t_start
    report = write_report(out / "report", metrics)
    log(f"[4/4] report: {report}  (numbers: {report.parent / 'metrics.json'})")
    metrics["report"] = str(report)
    return metrics
