"""The checks every chapter's grader tests share: a known mistake fails and is named, the reference passes,
and every task of the chapter has both (imported by tests/test_grading_chNN.py)."""

import pytest

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


def chapter_tests(chapter: str, wrong: list, references: dict) -> tuple:
    """The three tests of a chapter's grader file, parametrized over its tables; assign them to module names.

    ``wrong`` rows are (task id, functions, words the failure message must contain); ``references`` maps each task
    id to the reference functions.
    """
    ids = [f"{t}-{'+'.join(f.__name__ for f in fns)}" for t, fns, _ in wrong]

    @pytest.mark.parametrize("task_id,fns,words", wrong, ids=ids)
    def test_common_mistake_fails_and_names_it(task_id, fns, words):
        assert_mistake_fails(task_id, fns, words)

    @pytest.mark.parametrize("task_id", sorted(references))
    def test_reference_passes(task_id):
        assert_reference_passes(task_id, references[task_id])

    def test_every_task_has_a_wrong_variant_and_tiers_are_valid():
        assert_tasks_covered(chapter, {t for t, _, _ in wrong}, set(references))

    return test_common_mistake_fails_and_names_it, test_reference_passes, test_every_task_has_a_wrong_variant_and_tiers_are_valid
