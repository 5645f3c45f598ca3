"""Chapter 14: the interview questions. Every question of the course outline is there verbatim, every question has
both titles and an answer, and notebook 14 has a section for each, titled in both languages."""

import json
import re
from pathlib import Path

import pytest

from course_utils.interview import QUESTIONS, by_id

SEED_QUESTIONS = (
    "什么是 gradient checkpointing？它如何节省显存？",
    "LoRA 和 Adapter 微调的本质差别是什么？",
    "PPO中 KL 控制的意义是什么？为什么要用参考模型？",
    "你如何设计一个 SFT pipeline 支持多模态或多个 prompt 模板？",
    "多机训练中如何处理 parameter sync 和 loss scale？",
)
NOTEBOOK = Path(__file__).resolve().parents[1] / "notebooks" / "14_interview.ipynb"


def _headings() -> list[str]:
    cells = json.loads(NOTEBOOK.read_text(encoding="utf-8"))["cells"]
    return [line for c in cells if c["cell_type"] == "markdown" for line in "".join(c["source"]).splitlines()
            if line.startswith("#")]


@pytest.mark.parametrize("zh", SEED_QUESTIONS)
def test_every_seed_question_is_there_verbatim(zh):
    matches = [q for q in QUESTIONS if q.zh == zh]
    assert len(matches) == 1 and matches[0].source == "seed"


def test_ids_unique_and_fields_filled():
    assert len({q.id for q in QUESTIONS}) == len(QUESTIONS)
    for q in QUESTIONS:
        assert q.zh.strip() and q.en.strip() and q.answer.strip() and q.demo.strip(), q.id
        assert q.source == "seed" or re.fullmatch(r"\d\d", q.source), (q.id, q.source)
    assert sum(q.source == "seed" for q in QUESTIONS) == len(SEED_QUESTIONS)
    assert by_id(QUESTIONS[0].id) is QUESTIONS[0]
    with pytest.raises(KeyError):
        by_id("no such question")


def test_every_question_has_a_bilingual_section_in_notebook_14():
    headings = _headings()
    for q in QUESTIONS:
        assert any(h.startswith("## ") and q.zh in h and q.en in h for h in headings), \
            f"no section heading with both {q.zh!r} and {q.en!r} in {NOTEBOOK.name}"
