"""One source for exercise and solution: the exercise notebook is generated from the solution.

In a solution notebook, the learner's part of a code cell sits between two marker lines::

    def merge_pair(ids, pair, new_id):
        ### BEGIN SOLUTION
        ...reference code...
        ### END SOLUTION

:func:`make_stub` replaces everything between the markers (markers included) with a
``raise NotImplementedError`` at the same indentation, clears outputs, and keeps every
other cell as it is. ``llm-course exercises`` regenerates ``exercises/`` from ``solutions/``;
a test fails if a committed exercise differs from what the generator makes.
"""

from __future__ import annotations

import re
from pathlib import Path

BEGIN, END = "### BEGIN SOLUTION", "### END SOLUTION"
_TASK = re.compile(r"#\s*task\s+(\d+\.\d+)", re.I)


def stub_source(source: str, label: str = "this task") -> str:
    """Replace each BEGIN/END SOLUTION region of a code cell's source."""
    out, inside, indent = [], False, ""
    for line in source.splitlines():
        stripped = line.strip()
        if stripped == BEGIN:
            if inside:
                raise ValueError(f"nested {BEGIN} in:\n{source}")
            inside, indent = True, line[: len(line) - len(line.lstrip())]
            out.append(f"{indent}# YOUR CODE HERE")
            out.append(f'{indent}raise NotImplementedError("{label}: not implemented yet")')
        elif stripped == END:
            if not inside:
                raise ValueError(f"{END} without {BEGIN} in:\n{source}")
            inside = False
        elif not inside:
            out.append(line)
    if inside:
        raise ValueError(f"{BEGIN} without {END} in:\n{source}")
    return "\n".join(out)


def make_stub(solution_nb):
    """Return a new notebook: solutions stubbed out, all outputs and execution counts cleared."""
    import copy

    nb = copy.deepcopy(solution_nb)
    # canonical metadata: running the solution notebook (timings, versions) must not change the exercise
    nb.metadata = {"kernelspec": solution_nb.metadata.get("kernelspec", {}), "language_info": {"name": "python"}}
    for cell in nb.cells:
        tags = cell.get("metadata", {}).get("tags")
        cell.metadata = {"tags": tags} if tags else {}
        if cell.cell_type != "code":
            continue
        m = _TASK.search(cell.source)
        cell.source = stub_source(cell.source, f"task {m.group(1)}" if m else "this task")
        cell.outputs, cell.execution_count = [], None
    return nb


def solution_to_exercise_path(path: Path) -> Path:
    return path.parent.parent / "exercises" / path.name


def build_exercises(root: Path, check_only: bool = False) -> list[Path]:
    """Write ``exercises/X.ipynb`` for every ``solutions/X.ipynb``; return the paths that changed (or would)."""
    import nbformat

    changed = []
    for sol in sorted((root / "solutions").glob("[0-9][0-9]_*.ipynb")):
        stub = make_stub(nbformat.read(sol, as_version=4))
        target = solution_to_exercise_path(sol)
        new_text = nbformat.writes(stub) + "\n"
        if not target.exists() or target.read_text() != new_text:
            changed.append(target)
            if not check_only:
                target.write_text(new_text)
    return changed
