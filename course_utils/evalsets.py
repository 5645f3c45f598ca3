"""Evaluation sets written for the tiny world (chapter 10), shaped like the public benchmarks they stand in for.

* :func:`mt_bench_set` — two-turn conversations in five categories, like MT-Bench's 80 two-turn questions;
* :func:`truthful_mc_set` — multiple-choice questions with the fields of TruthfulQA's ``multiple_choice`` config
  (``mc1_targets``: one true answer among false ones; ``mc2_targets``: several true and several false);
* :func:`judge_records` — (question, answer) → a 1–5 grade, to fine-tune the small judge model of G-Eval;
* :func:`toxicity_records` — responses labelled toxic (harmful instructions or insults) or not.

Every set is deterministic (seeded) and uses held-out (test-split) prompts where the world has a split.
"""

from __future__ import annotations

import random

from .errors import ConfigError
from .scoring import score_response
from .world import (BY_NAME, CHARACTERS, FACT_TEMPLATES, N_TEMPLATES, QUALITIES, render_task, rl_prompts,
                    sft_examples)

MT_CATEGORIES = ("fact", "add", "repeat", "antonym", "harmful")
ATTRIBUTES = ("town", "food", "colour", "friend")


def mt_bench_set(seed: int, n: int) -> list[dict]:
    """``n`` two-turn conversations ``{"category", "turns": [{"prompt", "meta"}, {"prompt", "meta"}]}``.

    Fact conversations ask two things about the same character ("Where does Pip live?" → "And what does Pip
    like to eat?"); the other categories ask two questions of the same kind. The second turn is answered with the
    model's own first answer in the context, as in MT-Bench. The tiny models were fine-tuned on single-turn chats
    only, so the second turn also measures how they cope with a longer context they never saw.
    """
    if n < 1:
        raise ConfigError(f"n must be >= 1, got {n}")
    rng = random.Random(f"mt-bench-{seed}")
    pool = {}
    for row in rl_prompts(seed, 40 * n, "test"):
        pool.setdefault(row["family"], []).append(row)
    convs = []
    for i in range(n):
        category = MT_CATEGORIES[i % len(MT_CATEGORIES)]
        if category == "fact":
            who, (a1, a2) = rng.choice(CHARACTERS).name, rng.sample(ATTRIBUTES, 2)
            turns = [render_task("fact", (who, a), rng.randrange(N_TEMPLATES)) for a in (a1, a2)]
            turns = [(turns[0][0], turns[0][1]), ("And " + turns[1][0][0].lower() + turns[1][0][1:], turns[1][1])]
        else:
            first, second = rng.sample(pool[category], 2)
            turns = [(first["prompt"], first["meta"]), (second["prompt"], second["meta"])]
        convs.append({"id": f"mt-{i:04d}", "category": category,
                      "turns": [{"prompt": p, "meta": m} for p, m in turns]})
    return convs


def _fact_sentence(name: str, attribute: str, value: str) -> str:
    return {"town": f"{name} lives in {value}.", "food": f"{name} likes {value}.", "colour": f"{name} is {value}.",
            "friend": f"{name}'s friend is {value}."}[attribute]


def _value(character, attribute: str) -> str:
    return BY_NAME[character.friend].full_name if attribute == "friend" else getattr(character, attribute)


def truthful_mc_set(seed: int = 0, false_answers: int = 3) -> list[dict]:
    """One multiple-choice question per (character, attribute), in TruthfulQA's ``multiple_choice`` layout.

    The false answers are the values of *other* characters: fluent, on-topic, and each true of someone in the
    world, so only a model that knows this character's fact prefers the true one. ``mc2_targets`` adds the bare
    answer ("Mossbrook.") as a second true choice and the bare false values as more false ones.
    """
    rng = random.Random(f"truthful-{seed}")
    items = []
    for c in CHARACTERS:
        for attr in ATTRIBUTES:
            true = _value(c, attr)
            others = sorted({_value(o, attr) for o in CHARACTERS} - {true})
            false = rng.sample(others, min(false_answers, len(others)))
            mc1 = [_fact_sentence(c.name, attr, v) for v in [true, *false]]
            mc2 = mc1 + [f"{v}." for v in [true, *false]]
            items.append({
                "question": FACT_TEMPLATES[attr][0].format(name=c.name),
                "mc1_targets": {"choices": mc1, "labels": [1] + [0] * len(false)},
                "mc2_targets": {"choices": mc2, "labels": ([1] + [0] * len(false)) * 2},
            })
    return items


def judge_records(seed: int, n: int, split: str = "train") -> list[dict]:
    """SFT records teaching a model to grade answers: the user turn shows a question and an answer of any quality,
    the assistant replies with one digit, 1 + round(4 × true score)."""
    from .evaluation import judge_prompt

    rows = sft_examples(seed + 7, n, split, mix={q: 1.0 for q in QUALITIES})
    return [{"prompt": judge_prompt(r["prompt"], r["response"]),
             "response": str(1 + round(4 * score_response(r["meta"], r["response"]).total)), "meta": r["meta"],
             "answer": r["response"]} for r in rows]


def toxicity_records(seed: int, n: int, split: str = "train") -> list[dict]:
    """Responses of every quality, labelled ``toxic`` = 1 when they give harmful instructions or insult the user
    (the two things a toxicity classifier such as Perspective or Detoxify flags), else 0."""
    rows = sft_examples(seed + 11, n, split, mix={q: 1.0 for q in QUALITIES})
    return [{"text": r["response"], "toxic": int(r["quality"] in ("harmful", "impolite")), "quality": r["quality"]}
            for r in rows]


def load_truthfulqa(name: str = "truthfulqa/truthful_qa", limit: int | None = None) -> list[dict]:
    """The real TruthfulQA multiple-choice set (817 questions; gpu profile, needs the network once), in the same
    layout as :func:`truthful_mc_set`."""
    import datasets

    rows = datasets.load_dataset(name, "multiple_choice", split="validation")
    items = [{"question": r["question"], "mc1_targets": dict(r["mc1_targets"]), "mc2_targets": dict(r["mc2_targets"])}
             for r in rows]
    bad = [i for i, it in enumerate(items) if sum(it["mc1_targets"]["labels"]) != 1]
    if bad:
        raise ConfigError(f"rows {bad[:5]} of {name} do not have exactly one true MC1 answer")
    return items[:limit] if limit else items
