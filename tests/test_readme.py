"""The README's syllabus is the course's table of contents: every notebook, exercise and module it names exists,
every notebook on disk is in it, and every row of the seed outline's sections has a built chapter."""

import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def syllabus_rows() -> list[str]:
    text = (ROOT / "README.md").read_text()
    section = text.split("## Syllabus", 1)[1].split("\n## ", 1)[0]
    return [line for line in section.splitlines() if re.match(r"\| \d\d \|", line)]


def test_every_named_notebook_and_exercise_exists():
    named = [p for row in syllabus_rows() for p in re.findall(r"`((?:notebooks|exercises)/[^`]+\.ipynb)`", row)]
    assert len(named) >= 15
    missing = [p for p in named if not (ROOT / p).exists()]
    assert not missing, f"the README names notebooks that do not exist: {missing}"


def test_every_notebook_on_disk_is_in_the_syllabus():
    rows = "\n".join(syllabus_rows())
    for folder in ("notebooks", "exercises"):
        for nb in sorted((ROOT / folder).glob("[0-9][0-9]_*.ipynb")):
            assert f"`{folder}/{nb.name}`" in rows, f"{folder}/{nb.name} is missing from the README syllabus"


def test_every_named_module_exists():
    modules = {m for row in syllabus_rows() for m in re.findall(r"`([a-z_]+(?:/ch\d\d)?)`", row.rsplit("|", 2)[-2])}
    assert modules
    missing = [m for m in modules if not (ROOT / "course_utils" / f"{m}.py").exists()
               and not (ROOT / m).exists() and not (ROOT / "course_utils" / m).exists()]
    assert not missing, f"the README names modules that do not exist: {missing}"


@pytest.mark.parametrize("term", ["预训练", "指令微调", "奖励建模", "强化学习优化", "直接偏好优化", "分布式训练",
                                  "参数高效训练", "调参策略", "模型评估", "实验追踪", "常见问题排查", "实战路径",
                                  "面试常见问题"])
def test_every_seed_stage_has_its_chinese_term_in_the_syllabus(term):
    assert any(term in row for row in syllabus_rows())
