"""Throughput of the course's training loop next to a bare PyTorch loop, in one run.

Both loops train the same tiny-profile model from the same initial weights on the same
batches (same sampler), with AdamW, the warmup+cosine LR, and global-norm clipping. The
course loop adds what the course needs (objective dispatch, exact accumulation
normalisation, logging, progress bar); this shows what that costs. Rounds alternate
A/B so that machine noise hits both alike. The headline ratio compares each loop's
fastest run (as ``timeit`` does: noise only ever adds time, so the minimum is the best
estimate of a loop's own cost); the median of the per-round ratios is printed too.

    python benchmarks/bench_train_loop.py            # tiny profile sizes, ~3 minutes on 2 cores
    python benchmarks/bench_train_loop.py --steps 10 --rounds 1   # quick look
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
import torch.nn.functional as F

from course_utils import training
from course_utils.data import make_dataloader, tokenize_and_pack
from course_utils.model import build_model, make_config
from course_utils.pretrain import PretrainConfig, train
from course_utils.profiles import get_profile
from course_utils.tokenizer import train_tokenizer
from course_utils.world import pretrain_corpus


def bare_loop(model, ds, cfg: PretrainConfig) -> None:
    """The shortest correct loop: what a PyTorch tutorial would write."""
    opt = training.make_optimizer(model, cfg.lr, cfg.weight_decay)
    loader = iter(make_dataloader(ds, cfg.batch_size, cfg.seed))
    model.train()
    for step in range(cfg.max_steps):
        for g in opt.param_groups:
            g["lr"] = cfg.lr * training.warmup_cosine(step, cfg.warmup_steps, cfg.max_steps, cfg.min_lr_ratio)
        x = next(loader)["input_ids"]
        logits = model(input_ids=x).logits
        loss = F.cross_entropy(logits[:, :-1].reshape(-1, logits.size(-1)), x[:, 1:].reshape(-1))
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
        opt.step()
        opt.zero_grad(set_to_none=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--profile", default="tiny", help="model and batch sizes from this profile")
    ap.add_argument("--steps", type=int, default=40, help="optimizer steps per timed run")
    ap.add_argument("--rounds", type=int, default=6, help="alternating A/B rounds")
    args = ap.parse_args()

    p = get_profile(args.profile)
    docs = pretrain_corpus(p.seed, min(p.world.pretrain_docs, 2000), "train")
    tok = train_tokenizer(docs, p.tokenizer_vocab_size)
    cfg = PretrainConfig.for_profile(p.name, max_steps=args.steps, warmup_steps=3, eval_every=0,
                                     log_every=10, progress=False)
    ds = tokenize_and_pack(docs, tok, cfg.block_size)
    mcfg = make_config(p.model, tok)
    tokens = args.steps * cfg.batch_size * cfg.block_size
    print(f"profile {p.name}: batch {cfg.batch_size} x {cfg.block_size} tokens, {args.steps} steps per run, "
          f"torch threads {torch.get_num_threads()}")

    def course():
        train(cfg, build_model(mcfg, seed=0), tok, ds)

    def bare():
        bare_loop(build_model(mcfg, seed=0), ds, cfg)

    bare_loop(build_model(mcfg, seed=0), ds, PretrainConfig.for_profile(p.name, max_steps=4, warmup_steps=1))  # warm-up
    ratios, best = [], {"course": float("inf"), "bare": float("inf")}
    for r in range(args.rounds):
        times = {}
        for name, fn in (("course", course), ("bare", bare)) if r % 2 == 0 else (("bare", bare), ("course", course)):
            t = time.perf_counter()
            fn()
            times[name] = time.perf_counter() - t
            best[name] = min(best[name], times[name])
        ratio = times["bare"] / times["course"]  # = course tokens/s / bare tokens/s
        ratios.append(ratio)
        print(f"round {r + 1}: course {tokens / times['course']:8.0f} tok/s | bare {tokens / times['bare']:8.0f} tok/s "
              f"| ratio {ratio:.3f}")
    headline = best["bare"] / best["course"]
    print(f"best-of-{args.rounds}: course {tokens / best['course']:.0f} tok/s, bare {tokens / best['bare']:.0f} tok/s")
    print(f"ratio course/bare = {headline:.3f} (target >= 0.95): {'OK' if headline >= 0.95 else 'BELOW TARGET'}; "
          f"median of per-round ratios {statistics.median(ratios):.3f}")


if __name__ == "__main__":
    main()
