"""When does the tiny model learn to copy? A measurement of the induction-head phase change.

After SFT the tiny model answers facts, sums, antonyms and refusals, but it cannot *repeat a word
list it has never seen* ("Repeat these words: cup, kite." -> "The words are: cup, kite."). Copying
an unseen sequence needs induction heads (one head marks "which token came before me", a second
finds the earlier occurrence of the current token and copies what followed it). Small transformers
form them abruptly, after a plateau (Olsson et al., 2022, "In-context learning and induction heads").

This script trains the tiny profile's model from scratch on *nothing but* copy examples, one per
row, and measures greedy copy accuracy on fresh word lists every ``--eval-every`` steps. Compare
``--words 20`` (the original word pool: every word recurs everywhere, so "find this word earlier"
is ambiguous) with ``--words 60``. The pipeline's pretraining mixes copy paragraphs into a larger
corpus for 500 steps, at the edge of the plateau measured here, which is why the ``repeat`` family
is the weakest after SFT in the tiny profile and swings with small changes of the corpus (0% before the
"manners" paragraphs were added to it, about a third after).

    python benchmarks/copy_phase_change.py                 # 60 words, 1000 steps, a few minutes on 2 cores
    python benchmarks/copy_phase_change.py --words 20      # the small pool
"""

from __future__ import annotations

import argparse
import random
import time

import torch

from course_utils import training
from course_utils.model import build_model, make_config
from course_utils.profiles import get_profile
from course_utils.tokenizer import train_tokenizer
from course_utils.world import WORDS


def example(rng: random.Random, pool: list[str]) -> tuple[str, str]:
    words = ", ".join(rng.sample(pool, rng.randint(2, 4)))
    return f"Repeat these words: {words}.\nThe words are:", f" {words}."


@torch.no_grad()
def copy_accuracy(model, tok, pool: list[str], n: int = 100) -> float:
    """Greedy continuation starts with the exact word list, on ``n`` fresh lists (fixed seed)."""
    model.eval()
    rng, hits = random.Random(1234), 0
    for _ in range(n):
        prompt, answer = example(rng, pool)
        x = tok(prompt, add_special_tokens=False, return_tensors="pt")["input_ids"]
        out = model.generate(x, max_new_tokens=len(tok(answer)["input_ids"]) + 1, do_sample=False,
                             pad_token_id=tok.pad_token_id)
        hits += tok.decode(out[0, x.shape[1]:]).startswith(answer)
    model.train()
    return hits / n


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--words", type=int, default=60, help=f"size of the word pool (at most {len(WORDS)})")
    ap.add_argument("--steps", type=int, default=1000)
    ap.add_argument("--eval-every", type=int, default=100)
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--lr", type=float, default=3e-3, help="peak LR (the tiny profile's pretraining LR)")
    ap.add_argument("--weight-decay", type=float, default=0.1)
    args = ap.parse_args()
    if not 4 <= args.words <= len(WORDS):
        ap.error(f"--words must be between 4 and {len(WORDS)}")
    pool = list(WORDS[: args.words])
    torch.manual_seed(0)
    rng = random.Random(0)
    corpus = ["".join(example(rng, pool)) for _ in range(4000)]
    tok = train_tokenizer(corpus, 512)
    profile = get_profile("tiny")
    model = build_model(make_config(profile.model, tok), seed=0)
    opt = training.make_optimizer(model, args.lr, args.weight_decay)
    pad = tok.pad_token_id
    print(f"{args.words} words, {args.steps} steps, batch {args.batch_size}, lr {args.lr}")
    print(f"{'step':>6} {'loss':>8} {'copy acc':>9} {'seconds':>8}")
    t0 = time.perf_counter()
    for step in range(1, args.steps + 1):
        for g in opt.param_groups:
            g["lr"] = args.lr * training.warmup_cosine(step - 1, 30, args.steps, 0.1)
        rows = [tok("".join(example(rng, pool)), add_special_tokens=False)["input_ids"] for _ in range(args.batch_size)]
        T = max(map(len, rows))
        x = torch.tensor([r + [pad] * (T - len(r)) for r in rows])
        labels = x.masked_fill(x == pad, -100)  # one example per row: no loss on padding
        loss = model(input_ids=x, labels=labels).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        if step % args.eval_every == 0 or step == args.steps:
            print(f"{step:>6} {loss.item():>8.3f} {copy_accuracy(model, tok, pool):>9.0%} {time.perf_counter() - t0:>8.0f}",
                  flush=True)


if __name__ == "__main__":
    main()
