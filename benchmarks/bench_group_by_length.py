"""Reward-model training with length-grouped batches next to randomly mixed ones, in one run.

Both arms train the same tiny-profile reward model from the same initial weights on the same
tiny-world preference pairs with ``reward.train``; the only difference is
``RewardConfig.group_by_length``. A random batch of pairs is padded to its longest sequence, so
most of its rows carry padding; grouped batches hold pairs of similar length. Printed: padded
tokens per step (what the model computes on) and seconds per step, best of the alternating
rounds, and their ratios.

    python benchmarks/bench_group_by_length.py              # tiny sizes, ~2 minutes on 2 cores
    python benchmarks/bench_group_by_length.py --steps 10 --rounds 1
"""

from __future__ import annotations

import argparse
import time
from dataclasses import replace

import torch

from course_utils import reward
from course_utils.data import LengthGroupedStepSampler, StepBatchSampler
from course_utils.model import build_model, make_config
from course_utils.profiles import get_profile
from course_utils.tokenizer import train_tokenizer
from course_utils.world import preference_pairs, pretrain_corpus


def padded_tokens(sampler, pairs, steps: int) -> float:
    """Mean tokens per step once each batch of 2B sequences is padded to its longest one."""
    total = 0
    for step in range(steps):
        rows = [pairs[i] for i in sampler.indices(step)]
        total += 2 * len(rows) * max(max(len(c.input_ids), len(r.input_ids)) for c, r, _ in rows)
    return total / steps


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--profile", default="tiny", help="model and batch sizes from this profile")
    ap.add_argument("--steps", type=int, default=40, help="optimizer steps per timed run")
    ap.add_argument("--rounds", type=int, default=4, help="alternating A/B rounds")
    args = ap.parse_args()

    p = get_profile(args.profile)
    tok = train_tokenizer(pretrain_corpus(p.seed, min(p.world.pretrain_docs, 2000), "train"), p.tokenizer_vocab_size)
    lm = build_model(make_config(p.model, tok), seed=0)
    cfg = reward.RewardConfig.for_profile(p.name, max_steps=args.steps, warmup_steps=3, progress=False, log_every=10)
    rows, _ = reward.clean_pairs(preference_pairs(p.seed, p.world.pref_pairs, "train"))
    pairs, _ = reward.encode_pairs(rows, tok, cfg)
    lengths = [max(len(c.input_ids), len(r.input_ids)) for c, r, _ in pairs]
    pad = {"mixed": padded_tokens(StepBatchSampler(len(pairs), cfg.batch_size, cfg.seed), pairs, args.steps),
           "grouped": padded_tokens(LengthGroupedStepSampler(lengths, cfg.batch_size, cfg.seed), pairs, args.steps)}
    print(f"profile {p.name}: {len(pairs)} pairs, batch {cfg.batch_size} pairs, {args.steps} steps per run, "
          f"torch threads {torch.get_num_threads()}")
    real = cfg.batch_size * sum(len(c.input_ids) + len(r.input_ids) for c, r, _ in pairs) / len(pairs)
    print(f"padded tokens per step: mixed {pad['mixed']:.0f}, grouped {pad['grouped']:.0f} (real tokens {real:.0f})")

    def run(grouped: bool) -> None:
        reward.train(replace(cfg, group_by_length=grouped), reward.reward_model_from(lm, tok, seed=0), tok, pairs)

    run(True)  # warm-up
    best = {"mixed": float("inf"), "grouped": float("inf")}
    for r in range(args.rounds):
        for name in ("mixed", "grouped") if r % 2 == 0 else ("grouped", "mixed"):
            t = time.perf_counter()
            run(name == "grouped")
            best[name] = min(best[name], time.perf_counter() - t)
        print(f"round {r + 1}: best so far mixed {best['mixed'] / args.steps:.3f} s/step, "
              f"grouped {best['grouped'] / args.steps:.3f} s/step")
    print(f"padding: grouped batches compute on {pad['grouped'] / pad['mixed']:.2f}x the tokens of mixed ones; "
          f"speed-up {best['mixed'] / best['grouped']:.2f}x (best of {args.rounds})")


if __name__ == "__main__":
    main()
