"""Does ``llm-course course`` gain by running two single-thread processes instead of one two-thread process?

For each workload of the course (pretraining steps, SFT steps, PPO steps on the tiny profile), in one run:

- sequential: one process with all threads does the workload twice, one after the other;
- parallel: two processes with ``threads / 2`` threads each do it once, at the same time.

The ratio sequential time / parallel time is what the course runner's default (``--jobs 2`` on 2 cores) gains on
that kind of work (> 1: parallel is faster). Small matrices leave a second thread idle part of the time, so the
gain depends on the workload's shapes; this measures it instead of assuming it.

    python benchmarks/bench_course_parallel.py              # about 4 minutes on 2 cores
    python benchmarks/bench_course_parallel.py --steps 10   # quick look
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time

WORKLOADS = ("pretrain", "sft", "ppo")


def work(kind: str, steps: int) -> None:
    """One workload, sized like the tiny profile's stage of that name, built from the same code."""
    import copy
    from dataclasses import replace

    from course_utils.profiles import get_profile

    get_profile("tiny")
    if kind == "pretrain":
        from course_utils.model import build_model, make_config
        from course_utils.pretrain import PretrainConfig, build_data, train

        cfg = replace(PretrainConfig.for_profile("tiny"), max_steps=steps,
                      warmup_steps=max(1, steps // 10), eval_every=0, progress=False)
        tok, train_ds, val_ds, _ = build_data(cfg)
        train(cfg, build_model(make_config(get_profile("tiny").model, tok), seed=0), tok, train_ds, val_ds)
    elif kind == "sft":
        from course_utils import sft
        from course_utils.stages import load_stage

        base, tok = load_stage("base", "tiny")
        cfg = sft.SFTConfig.for_profile("tiny", max_steps=steps, warmup_steps=max(1, steps // 10), progress=False)
        records, _ = sft.build_records(cfg)
        examples, _ = sft.encode_records(records, tok, cfg)
        sft.train(cfg, sft.apply_peft(copy.deepcopy(base), cfg, tok), tok, examples)
    elif kind == "ppo":
        from course_utils import ppo
        from course_utils.reward import RewardConfig, reward_scores
        from course_utils.stages import load_stage

        sft_lm, tok = load_stage("sft", "tiny")
        rm, _ = load_stage("rm", "tiny")
        cfg = ppo.PPOConfig.for_profile("tiny", steps=steps, progress=False, log_every=0)
        rows, _ = ppo.prompt_rows("tiny", 256, 1, cfg.seed)
        rm_cfg = RewardConfig.for_profile("tiny")
        ppo.train(cfg, ppo.PolicyWithValue(copy.deepcopy(sft_lm)), ppo.frozen(copy.deepcopy(sft_lm)), tok, rows,
                  lambda q, t: reward_scores(rm, tok, q, t, rm_cfg), log=lambda *_: None)
    else:
        raise SystemExit(f"unknown workload {kind!r}; choose from {WORKLOADS}")


def spawn(kind: str, steps: int, threads: int, repeat: int) -> subprocess.Popen:
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads)}
    return subprocess.Popen([sys.executable, __file__, "--worker", kind, "--steps", str(steps), "--repeat", str(repeat)],
                            env=env, stdout=subprocess.DEVNULL)


def timed(processes: list[subprocess.Popen]) -> float:
    t0 = time.perf_counter()
    for p in processes:
        if p.wait() != 0:
            raise SystemExit(f"a worker failed (exit {p.returncode})")
    return time.perf_counter() - t0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=None, help="steps per workload (default: ~15 s of work each)")
    ap.add_argument("--only", choices=WORKLOADS, default=None)
    ap.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--repeat", type=int, default=1, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        for _ in range(args.repeat):
            work(args.worker, args.steps)
        return
    cores = os.cpu_count() or 1
    if cores < 2:
        raise SystemExit("needs at least 2 cores")
    from course_utils.stages import load_stage

    load_stage("rm", "tiny")  # build the stages the workloads start from once, outside the timing
    default_steps = {"pretrain": 60, "sft": 100, "ppo": 15}
    print(f"{'workload':10s}{'steps':>7s}{'sequential':>12s}{'parallel':>10s}{'ratio':>8s}   ({cores} cores)")
    for kind in [args.only] if args.only else WORKLOADS:
        steps = args.steps or default_steps[kind]
        timed([spawn(kind, 2, cores, 1)])  # warm the file cache and the import path
        seq = timed([spawn(kind, steps, cores, 2)])
        par = timed([spawn(kind, steps, cores // 2, 1), spawn(kind, steps, cores // 2, 1)])
        print(f"{kind:10s}{steps:7d}{seq:11.1f}s{par:9.1f}s{seq / par:8.2f}")


if __name__ == "__main__":
    main()
