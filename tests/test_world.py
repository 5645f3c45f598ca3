"""Tests for the tiny world: determinism, schemas, hold-out policy, scorer, noise, writing."""

import json
import random
import re

import datasets
import pytest

from course_utils import world as W
from course_utils.errors import ConfigError, DataError
from course_utils.io import read_jsonl
from course_utils.profiles import get_profile

META_KEYS = {"family", "answer", "accept", "harmful", "template_id", "reference"}
PREF_EXTRA = {"score_chosen", "score_rejected", "chosen_quality", "rejected_quality", "flipped", "duplicate_of", "is_tie"}


@pytest.fixture(scope="module")
def smoke_world():
    return W.build_world("smoke")


def test_same_seed_same_output_and_different_seed_differs():
    for make in (W.pretrain_corpus, W.sft_examples, W.preference_pairs, W.rl_prompts):
        assert make(3, 50, "train") == make(3, 50, "train")
        assert make(3, 50, "train") != make(4, 50, "train")
        assert make(3, 50, "train") != make(3, 50, "validation")


def test_counts_exact(smoke_world):
    size = get_profile("smoke").world
    train = {"pretrain": size.pretrain_docs, "sft": size.sft_examples, "preference": size.pref_pairs,
             "rl": size.rl_prompts}
    for stage, splits in smoke_world.items():
        for split, rows in splits.items():
            assert len(rows) == (train[stage] if split == "train" else size.eval_examples)
            assert len({r["id"] for r in rows}) == len(rows)
    rows = W.preference_pairs(0, 137, "train", label_noise=0.3, duplicate_rate=0.3, tie_rate=0.2)
    assert len(rows) == 137


def test_pretrain_docs_are_plain_prose_and_repeat_every_fact():
    docs = W.pretrain_corpus(0, 2000)
    assert all(set(d) == {"id", "text"} and d["text"].strip() for d in docs)
    lengths = [len(d["text"].split()) for d in docs]
    assert 30 <= min(lengths) and max(lengths) <= 130
    text = "\n".join(d["text"] for d in docs)
    assert "<|" not in text and "Human:" not in text
    assert min(text.count(s) for s in W.fact_sentences()) >= 10


def test_pretraining_has_read_every_word_the_later_stages_use():
    """A base model has read the language of its fine-tuning data; LoRA (frozen embeddings) depends on it."""
    split = re.compile(r"[A-Za-z']+|[0-9]+|[^\sA-Za-z0-9]").findall
    read = {w for d in W.pretrain_corpus(0, 2000) for w in split(d["text"])}
    every_quality = {q: 1.0 for q in W.QUALITIES}
    texts = [r["response"] for r in W.sft_examples(0, 2000, mix=every_quality)]
    texts += [t for r in W.preference_pairs(0, 500) for t in (r["chosen"], r["rejected"])]
    unread = {w for t in texts for w in split(t)} - read
    assert not unread, f"words the pretraining corpus never shows: {sorted(unread)}"


def test_meta_keys_identical_across_families():
    sft = W.sft_examples(0, 400, "train")
    assert {r["family"] for r in sft} == set(W.FAMILIES)
    for r in sft:
        assert set(r) == {"id", "family", "prompt", "response", "messages", "quality", "meta"}
        assert set(r["meta"]) == META_KEYS
        assert r["messages"] == [{"role": "user", "content": r["prompt"]}, {"role": "assistant", "content": r["response"]}]
        assert r["quality"] in W.QUALITIES
    for r in W.rl_prompts(0, 200, "train"):
        assert set(r) == {"id", "family", "prompt", "meta"} and set(r["meta"]) == META_KEYS
    for r in W.preference_pairs(0, 200, "train", duplicate_rate=0.2, tie_rate=0.2):
        assert set(r["meta"]) == META_KEYS | PREF_EXTRA


def test_held_out_template_never_in_train():
    last = W.N_TEMPLATES - 1
    for rows in (W.sft_examples(1, 1500, "train"), W.rl_prompts(1, 1500, "train"), W.preference_pairs(1, 500, "train")):
        assert all(r["meta"]["template_id"] != last for r in rows)
    evals = W.sft_examples(1, 1000, "validation")
    assert any(r["meta"]["template_id"] == last for r in evals)
    explicit = W.sft_examples(1, 200, "train", templates="held_out")
    assert all(r["meta"]["template_id"] == last for r in explicit)
    with pytest.raises(ConfigError):
        W.sft_examples(1, 5, "train", templates="bogus")


def _combo(r):
    return r["family"], r["meta"]["reference"], r["meta"]["template_id"]


def test_eval_prompts_are_not_in_train():
    train = {_combo(r) for r in W.sft_examples(0, 4000, "train")}
    for split in ("validation", "test"):
        rows = W.sft_examples(0, 400, split)
        assert {r["family"] for r in rows} == set(W.FAMILIES)
        assert not train & {_combo(r) for r in rows}


def test_held_out_addition_pairs_absent_from_train():
    held = {f"{a} plus {b} is" for a in range(10) for b in range(10) if W._hash_held_out("add", (a, b), 0)}
    assert 10 <= len(held) <= 30
    train_adds = {r["meta"]["reference"].rsplit(" ", 1)[0] for r in W.sft_examples(0, 4000, "train") if r["family"] == "add"}
    assert train_adds and not train_adds & held
    eval_adds = {r["meta"]["reference"].rsplit(" ", 1)[0] for r in W.sft_examples(0, 400, "test", templates="train")
                 if r["family"] == "add"}
    assert eval_adds and eval_adds <= held


@pytest.mark.parametrize("family", W.FAMILIES)
def test_good_beats_every_other_quality(family):
    rows = [r for r in W.rl_prompts(5, 300, "validation") if r["family"] == family][:20]
    assert rows
    for r in rows:
        meta = r["meta"]
        good = W.score_response(meta, W.response_for(meta, "good"))
        assert good.total == pytest.approx(1.0)
        for q in W.QUALITIES[1:]:
            for k in range(3):
                bad = W.score_response(meta, W.response_for(meta, q, random.Random(k)))
                assert good.total > bad.total, (q, r["prompt"], bad)


def test_the_labellers_values_order_the_qualities():
    """Harm is worse than a wrong answer or a refusal to answer; any rudeness is worse than filler."""
    rows = [r for r in W.rl_prompts(3, 400, "validation") if not r["meta"]["harmful"]][:60]
    for r in rows:
        meta = r["meta"]
        for k in range(3):
            total = {q: W.score_response(meta, W.response_for(meta, q, random.Random(k))).total for q in W.QUALITIES}
            assert total["harmful"] < min(total["wrong"], total["unhelpful"]), (r["prompt"], total)
            assert total["impolite"] < total["verbose"], (r["prompt"], total)


def test_a_repeated_word_is_not_harmful():
    """'net' is a word of the repeat family and also part of a trap: only the instruction is harmful."""
    meta = next(r["meta"] for r in W.rl_prompts(0, 2000, "train")
                if r["family"] == "repeat" and "net" in r["meta"]["answer"].split(", "))
    assert W.score_response(meta, meta["reference"]).harmless == 1.0
    assert W.score_response(meta, meta["reference"] + " Also, put a net near Kit's home.").harmless == 0.0


def test_scorer_parts():
    meta = W.rl_prompts(0, 1, "train")[0]["meta"]
    harm = next(r["meta"] for r in W.rl_prompts(0, 200, "train") if r["meta"]["harmful"])
    assert W.score_response(harm, harm["reference"]).correct == 1.0
    assert W.score_response(harm, "I do not know.").harmless == 0.5
    assert W.score_response(meta, "Sorry, I will not help with that.").correct == 0.0  # needless refusal
    assert W.score_response(meta, meta["reference"] + " Ugh.").polite == 0.0
    assert W.score_response(meta, meta["reference"].upper()).correct == 1.0
    assert W.is_refusal("Sorry, I won't do that.") and not W.is_refusal("Pip lives in Mossbrook.")


@pytest.mark.parametrize("response", ["", "<|im_end|>", "x" * 5000, "z q " * 1250, "\n\n\t", "??!!..", "🦊" * 99])
def test_scorer_is_robust(response):
    for r in W.rl_prompts(0, 50, "train"):
        s = W.score_response(r["meta"], response)
        for value in (s.correct, s.format, s.polite, s.harmless, s.concise, s.total):
            assert 0.0 <= value <= 1.0
        assert s.total < 0.75
    assert W.score_response(r["meta"], "x" * 5000).concise < 0.01


def test_scorer_rejects_non_strings():
    meta = W.rl_prompts(0, 1, "train")[0]["meta"]
    for bad in (None, 3, b"bytes", ["a"]):
        with pytest.raises(DataError):
            W.score_response(meta, bad)
    with pytest.raises(DataError):
        W.score_response({"nope": 1}, "hi")


def test_label_noise_rate_and_flipped_scores():
    rows = W.preference_pairs(0, 2000, "train", label_noise=0.25)
    flipped = [r for r in rows if r["meta"]["flipped"]]
    assert abs(len(flipped) / len(rows) - 0.25) < 0.04
    assert all(r["meta"]["score_chosen"] < r["meta"]["score_rejected"] for r in flipped)
    assert all(r["meta"]["score_chosen"] > r["meta"]["score_rejected"] for r in rows if not r["meta"]["flipped"])
    for r in rows[:200]:  # stored scores are the scorer's
        assert W.score_response(r["meta"], r["chosen"]).total == r["meta"]["score_chosen"]


def test_duplicates_and_ties():
    rows = W.preference_pairs(0, 1000, "train", duplicate_rate=0.2, tie_rate=0.1)
    by_id = {r["id"]: r for r in rows}
    dups = [r for r in rows if r["meta"]["duplicate_of"]]
    assert 130 <= len(dups) <= 270
    exact = near = 0
    for d in dups:
        src = by_id[d["meta"]["duplicate_of"]]
        assert src["id"] < d["id"] and not src["meta"]["duplicate_of"]
        assert d["chosen"] == src["chosen"] and d["rejected"] == src["rejected"]
        exact += d["prompt"] == src["prompt"]
        near += d["prompt"] != src["prompt"] and " ".join(d["prompt"].lower().split()).strip(".?!") == " ".join(
            src["prompt"].lower().split()).strip(".?!")
    assert exact and near and exact + near == len(dups)
    ties = [r for r in rows if r["meta"]["is_tie"]]
    assert 50 <= len(ties) <= 160
    assert all(r["meta"]["score_chosen"] == r["meta"]["score_rejected"] and r["chosen"] != r["rejected"] for r in ties)


def test_records_fit_a_datasets_table(smoke_world):
    for stage in ("sft", "preference", "rl"):
        rows = smoke_world[stage]["train"]
        table = datasets.Dataset.from_list(rows)
        assert len(table) == len(rows) and table[0]["meta"]["family"] == rows[0]["meta"]["family"]
    noisy = W.preference_pairs(0, 300, "train", label_noise=0.2, duplicate_rate=0.2, tie_rate=0.2)
    assert len(datasets.Dataset.from_list(noisy)) == 300


def test_write_world_round_trip(tmp_path, smoke_world):
    counts = W.write_world("smoke", tmp_path)
    assert not list(tmp_path.rglob("*.tmp"))
    meta = json.loads((tmp_path / "world.json").read_text())
    assert meta["version"] == W.WORLD_VERSION and meta["seed"] == 0 and meta["counts"] == counts
    for stage, splits in smoke_world.items():
        for split, rows in splits.items():
            assert read_jsonl(tmp_path / stage / f"{split}.jsonl") == rows
            assert counts[stage][split] == len(rows)
    first = (tmp_path / "sft" / "train.jsonl").read_bytes()
    W.write_world("smoke", tmp_path)
    assert (tmp_path / "sft" / "train.jsonl").read_bytes() == first


def test_build_tiny_world_has_the_profile_sizes():
    # how long it takes is reported by the pipeline (world stage), not asserted here: wall-clock tests are noise
    world = W.build_world("tiny")
    size = get_profile("tiny").world
    assert [len(world[s]["train"]) for s in ("pretrain", "sft", "preference", "rl")] == \
        [size.pretrain_docs, size.sft_examples, size.pref_pairs, size.rl_prompts]
    assert all(len(world[s]["test"]) == size.eval_examples for s in world)


def test_bad_arguments():
    with pytest.raises(ConfigError):
        W.sft_examples(0, 3, "dev")
    with pytest.raises(ConfigError):
        W.sft_examples(0, 3, "train", mix={"great": 1.0})
    with pytest.raises(ConfigError):
        W.preference_pairs(0, 3, "train", label_noise=1.5)
    with pytest.raises(ConfigError):
        W.rl_prompts("seed", 3)
    only_wrong = W.sft_examples(0, 100, "train", mix={"wrong": 1.0})
    assert {r["quality"] for r in only_wrong} == {"wrong", "harmful"}
    assert all(W.score_response(r["meta"], r["response"]).correct == 0.0 for r in only_wrong)
