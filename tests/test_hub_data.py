"""Tests for the hub mappers, on hand-written rows that mimic each real dataset."""

from pathlib import Path

import datasets
import pytest

from course_utils import hub_data as H
from course_utils.errors import ConfigError, DataError
from course_utils.io import read_jsonl

SAMPLES = Path(__file__).parent / "data" / "hub_samples"
META_KEYS = {"family", "answer", "accept", "harmful", "template_id", "reference"}
PREF_META_KEYS = META_KEYS | {"score_chosen", "score_rejected", "chosen_quality", "rejected_quality", "flipped",
                              "duplicate_of", "is_tie"}


def rows(name):
    return read_jsonl(SAMPLES / f"{name}.jsonl")


def test_tinystories_drops_empty_texts():
    records, dropped = H.map_tinystories(rows("tinystories"))
    assert dropped == 3 and len(records) == 2
    assert records[0] == {"id": "tinystories-train-000000", "text": rows("tinystories")[0]["text"]}
    assert records[1]["id"] == "tinystories-train-000002"  # ids keep the source row index


def test_alpaca_to_sft_schema():
    records, dropped = H.map_alpaca(rows("alpaca"), split="validation")
    assert dropped == 1 and len(records) == 3
    with_input = records[1]
    assert with_input["prompt"] == "Translate the sentence into French.\n\nThe cat is on the table."
    assert with_input["response"] == "Le chat est sur la table."
    assert with_input["messages"][1] == {"role": "assistant", "content": "Le chat est sur la table."}
    for r in records:
        assert r["family"] == "alpaca" and r["quality"] == "unknown" and r["id"].startswith("alpaca-validation-")
        assert r["meta"] == {"family": "alpaca", "answer": "", "accept": [], "harmful": False, "template_id": -1,
                             "reference": r["response"]}
    assert records[0]["prompt"] == "Give three tips for staying healthy."


def test_hh_rlhf_splits_prompt_and_last_reply():
    records, dropped = H.map_hh_rlhf(rows("hh_rlhf"))
    assert dropped == 0 and len(records) == 3
    first, multi, refusal = records
    assert first["prompt"] == "What is a good name for a pet goldfish?"
    assert first["chosen"] == "How about Bubbles or Goldie?" and first["rejected"] == "Fish do not need names."
    assert multi["prompt"].startswith("Human: Can you help me plan a picnic?\n\nAssistant: Sure!")
    assert multi["prompt"].endswith("Human: The beach.")
    assert multi["chosen"].startswith("Pack sunscreen") and multi["rejected"] == "The beach is sandy."
    assert refusal["meta"]["score_chosen"] == 1.0 and refusal["meta"]["score_rejected"] == 0.0
    assert all(set(r["meta"]) == PREF_META_KEYS for r in records)


def test_ultrafeedback_to_preference_schema():
    records, dropped = H.map_ultrafeedback(rows("ultrafeedback"))
    assert dropped == 0 and len(records) == 2
    assert records[0]["prompt"] == "Explain photosynthesis in one sentence."
    assert records[0]["chosen"].startswith("Plants use sunlight") and records[0]["rejected"] == "It is a thing plants do."
    assert records[0]["meta"]["score_chosen"] == 9.0 and not records[0]["meta"]["is_tie"]
    assert records[1]["meta"]["is_tie"]


def test_mapped_records_fit_a_datasets_table():
    from course_utils import world

    sft = H.map_alpaca(rows("alpaca")).records + world.sft_examples(0, 20)
    assert len(datasets.Dataset.from_list(sft)) == len(sft)
    pref = H.map_hh_rlhf(rows("hh_rlhf")).records + H.map_ultrafeedback(rows("ultrafeedback")).records
    assert len(datasets.Dataset.from_list(pref + world.preference_pairs(0, 20))) == len(pref) + 20


@pytest.mark.parametrize("mapper, bad_rows, needle", [
    (H.map_tinystories, [{"text": "ok"}, {"body": "no text field"}], ["row 1", "'text'"]),
    (H.map_tinystories, [{"text": 42}], ["row 0", "'text'"]),
    (H.map_alpaca, [{"instruction": "Hi", "input": "", "output": "Hello."}, {"instruction": "Hi", "output": "x"}],
     ["row 1", "'input'"]),
    (H.map_hh_rlhf, [{"chosen": "\n\nHuman: hi\n\nAssistant: yo", "rejected": "\n\nHuman: hi\n\nAssistant: no"},
                     {"chosen": "just some text", "rejected": "\n\nHuman: hi\n\nAssistant: no"}], ["row 1", "parse"]),
    (H.map_hh_rlhf, [{"chosen": "\n\nHuman: a\n\nAssistant: b", "rejected": "\n\nHuman: c\n\nAssistant: d"}],
     ["row 0", "prefix"]),
    (H.map_hh_rlhf, [{"chosen": "\n\nHuman: a\n\nAssistant: b"}], ["row 0", "'rejected'"]),
    (H.map_ultrafeedback, [{"prompt": "p", "chosen": [{"role": "user", "content": "p"}],
                            "rejected": [{"role": "assistant", "content": "r"}], "score_chosen": 1, "score_rejected": 0}],
     ["row 0", "'chosen'"]),
    (H.map_ultrafeedback, [{"prompt": "p", "chosen": [{"role": "assistant", "content": "c"}],
                            "rejected": [{"role": "assistant", "content": "r"}], "score_chosen": "high",
                            "score_rejected": 0}], ["row 0", "'score_chosen'"]),
])
def test_malformed_rows_raise_naming_the_row(mapper, bad_rows, needle):
    with pytest.raises(DataError) as info:
        mapper(bad_rows)
    for part in needle:
        assert part in str(info.value)
    kept, dropped = mapper(bad_rows, errors="skip")
    assert len(kept) + dropped == len(bad_rows) and dropped >= 1


def test_bad_kind_and_errors_mode():
    with pytest.raises(ConfigError):
        H.load_hub_dataset("wikipedia")
    with pytest.raises(ConfigError):
        H.map_alpaca(rows("alpaca"), errors="ignore")
