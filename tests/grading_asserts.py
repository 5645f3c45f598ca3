"""The checks every chapter's grader tests share: a known mistake fails and is named, the reference passes,
and every task of the chapter has both (imported by tests/test_grading_chNN.py)."""

from course_utils import grading
from course_utils.grading.core import chapter_tasks

# a failure message says what was expected, or what the function did wrong
FAILURE_WORDS = ("expected", "must", "changed", "gradient")


def assert_mistake_fails(task_id: str, fns: tuple, words: str = "") -> None:
    row = grading.check(task_id, *fns)[0]
    assert row.status == "fail" and row.earned == 0, row
    assert any(w in row.message for w in FAILURE_WORDS), row.message
    assert words in row.message, row.message


def assert_reference_passes(task_id: str, fns: tuple) -> None:
    row = grading.check(task_id, *fns)[0]
    assert row.status == "pass" and row.earned == row.points, row


def assert_tasks_covered(chapter: str, wrong_ids: set, reference_ids: set, min_tasks: int = 3) -> None:
    tasks = chapter_tasks(chapter)
    assert len(tasks) >= min_tasks
    assert {t.id for t in tasks} == wrong_ids == reference_ids
    assert {t.tier for t in tasks} == {"warm-up", "core", "stretch"}
