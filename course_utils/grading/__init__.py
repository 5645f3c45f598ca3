"""Graded exercises: check your functions in the notebook, or grade a whole notebook from the shell.

In a notebook::

    from course_utils import grading
    grading.check("1.2", prefix_lm_mask)     # one task, right after you wrote it
    grading.grade("01", globals())           # every task of the chapter, as a table

From the shell (fresh kernel, separate process, time limits)::

    llm-course grade 01                      # exercises/01_*.ipynb
    llm-course grade path/to/notebook.ipynb --json result.json

The checks live in one module per chapter (``ch01.py``, ``ch02.py``, ...).
"""

from __future__ import annotations

from .core import REGISTRY, TIERS, Failure, Result, Table, Task, chapter_tasks, get_task, run_check


def check(task_id: str, *functions, timeout: float = 60.0) -> Table:
    """Grade one task with the function(s) you wrote; shows a one-row table."""
    t = get_task(task_id)
    if len(functions) != len(t.names):
        raise TypeError(f"task {task_id} needs {len(t.names)} function(s): {', '.join(t.names)}")
    return Table([run_check(t, functions, timeout)])


def grade(chapter: str, namespace: dict, timeout: float = 60.0) -> Table:
    """Grade every task of ``chapter`` with the functions found in ``namespace`` (pass ``globals()``)."""
    rows = []
    for t in chapter_tasks(chapter):
        missing = [n for n in t.names if not callable(namespace.get(n))]
        if missing:
            rows.append(Result(t.id, t.title, t.tier, t.points, 0, "missing", f"define {', '.join(missing)}"))
            continue
        rows.append(run_check(t, tuple(namespace[n] for n in t.names), timeout))
    return Table(rows)


__all__ = ["check", "grade", "Failure", "Result", "Task", "Table", "TIERS", "REGISTRY", "chapter_tasks", "get_task"]
