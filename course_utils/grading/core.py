"""The grading core: tasks, results, and running a check without letting it crash or hang the caller.

A *task* is one function (or a few) the learner writes. Its *check* calls the learner's
function on small, random and edge-case inputs and compares with the course's reference
(and the library's version, where one exists). A wrong answer raises :class:`Failure`
with expected vs got on a small case and a hint; anything else the learner's code raises
is reported with the learner's own line, never as a wall of traceback.
"""

from __future__ import annotations

import linecache
import os
import threading
import traceback
from collections.abc import Callable
from dataclasses import asdict, dataclass

TIERS = {"warm-up": 1, "core": 2, "stretch": 3}  # tier -> points
_GRADING_DIR = os.path.dirname(os.path.abspath(__file__))


class Failure(AssertionError):
    """A wrong answer. The message says what was expected, what came back, and a hint."""


@dataclass(frozen=True)
class Task:
    id: str  # "1.2": chapter 1, task 2
    chapter: str  # "01"
    names: tuple  # the function name(s) the learner defines
    title: str
    tier: str  # "warm-up" | "core" | "stretch"
    check: Callable  # check(*learner_functions) -> None, raises Failure
    hint: str = ""

    @property
    def points(self) -> int:
        return TIERS[self.tier]


@dataclass
class Result:
    task: str
    title: str
    tier: str
    points: int
    earned: int
    status: str  # pass | fail | error | timeout | not implemented | missing
    message: str = ""

    def to_dict(self) -> dict:
        return asdict(self)


REGISTRY: dict[str, dict[str, Task]] = {}


def task(chapter: str, id: str, names, title: str, tier: str, hint: str = ""):
    """Register the decorated function as the check of a task."""
    if tier not in TIERS:
        raise ValueError(f"tier must be one of {list(TIERS)}, got {tier!r}")
    names = (names,) if isinstance(names, str) else tuple(names)

    def register(check):
        REGISTRY.setdefault(chapter, {})[id] = Task(id, chapter, names, title, tier, check, hint)
        return check

    return register


def learner_line(exc: BaseException, source_name: str | None = None) -> str:
    """'line N: code' of the deepest frame that belongs to the learner (not the grader, not a library)."""
    frames = traceback.extract_tb(exc.__traceback__)
    mine = [
        f for f in frames
        if (source_name and f.filename == source_name)
        or (not source_name and not f.filename.startswith(_GRADING_DIR) and "site-packages" not in f.filename
            and "/lib/python" not in f.filename)
    ]
    if not mine:
        return ""
    f = mine[-1]
    code = (f.line or linecache.getline(f.filename, f.lineno)).strip()
    return f"line {f.lineno}: `{code}`" if code else f"line {f.lineno}"


def result_for(t: Task, exc: BaseException | None, locate=learner_line) -> Result:
    """Turn the outcome of a check into a Result row."""
    if exc is None:
        return Result(t.id, t.title, t.tier, t.points, t.points, "pass")
    if isinstance(exc, NotImplementedError):
        return Result(t.id, t.title, t.tier, t.points, 0, "not implemented", f"write {', '.join(t.names)} first")
    if isinstance(exc, Failure):
        msg = str(exc) + (f"\nhint: {t.hint}" if t.hint else "")
        return Result(t.id, t.title, t.tier, t.points, 0, "fail", msg)
    where = locate(exc)
    msg = f"{type(exc).__name__}: {exc}" + (f" (your {where})" if where else "")
    return Result(t.id, t.title, t.tier, t.points, 0, "error", msg)


def run_check(t: Task, functions: tuple, timeout: float = 60.0) -> Result:
    """Run ``t.check(*functions)`` in a daemon thread; a check still running after ``timeout`` is a timeout.

    (A thread cannot be killed: a learner function stuck in a loop keeps running in the background of
    the notebook. ``llm-course grade`` runs checks in a separate process that is killed instead.)
    """
    box: dict = {}

    def target():
        try:
            t.check(*functions)
            box["exc"] = None
        except BaseException as e:  # noqa: BLE001 - every learner error becomes a result row
            box["exc"] = e

    worker = threading.Thread(target=target, daemon=True)
    worker.start()
    worker.join(timeout)
    if worker.is_alive():
        return Result(t.id, t.title, t.tier, t.points, 0, "timeout", f"still running after {timeout:.0f} s (an endless loop?)")
    return result_for(t, box["exc"])


def get_task(task_id: str) -> Task:
    chapter = f"{int(task_id.split('.')[0]):02d}"
    _load_chapter(chapter)
    try:
        return REGISTRY[chapter][task_id]
    except KeyError:
        raise KeyError(f"no task {task_id!r}; chapter {chapter} has {sorted(REGISTRY.get(chapter, {}))}") from None


def chapter_tasks(chapter: str) -> list[Task]:
    chapter = f"{int(chapter):02d}"
    _load_chapter(chapter)
    if chapter not in REGISTRY:
        raise KeyError(f"chapter {chapter} has no graded tasks")
    return sorted(REGISTRY[chapter].values(), key=lambda t: [int(x) for x in t.id.split(".")])


def _load_chapter(chapter: str) -> None:
    import importlib

    try:
        importlib.import_module(f"course_utils.grading.ch{chapter}")
    except ModuleNotFoundError:
        pass


# --- tables ---------------------------------------------------------------------------------------

_ICONS = {"pass": "✅", "fail": "❌", "error": "💥", "timeout": "⏱", "not implemented": "…", "missing": "❔"}


def total(results: list[Result]) -> tuple[int, int]:
    return sum(r.earned for r in results), sum(r.points for r in results)


def text_table(results: list[Result]) -> str:
    rows = [f"{'task':6s} {'tier':8s} {'points':>6s}  status            title"]
    for r in results:
        rows.append(f"{r.task:6s} {r.tier:8s} {r.earned:>2d} / {r.points:<2d} {_ICONS.get(r.status, '')} {r.status:16s} {r.title}")
        rows += [f"{'':26s}{line}" for line in r.message.splitlines()]
    got, possible = total(results)
    rows.append(f"score: {got} / {possible}")
    return "\n".join(rows)


def html_table(results: list[Result]) -> str:
    from html import escape

    body = "".join(
        f"<tr><td>{r.task}</td><td>{r.tier}</td><td>{r.earned}/{r.points}</td>"
        f"<td>{_ICONS.get(r.status, '')} {r.status}</td><td>{escape(r.title)}</td>"
        f"<td><pre style='margin:0;white-space:pre-wrap'>{escape(r.message)}</pre></td></tr>"
        for r in results
    )
    got, possible = total(results)
    return ("<table><tr><th>task</th><th>tier</th><th>points</th><th>status</th><th>title</th><th>details</th></tr>"
            f"{body}</table><p><b>score: {got} / {possible}</b></p>")


class Table(list):
    """A list of Results that shows itself as a table in Jupyter and as text elsewhere."""

    def _repr_html_(self):
        return html_table(self)

    def __repr__(self):
        return text_table(self)


# --- helpers the chapters' checks share ---------------------------------------------------------------


def show(x, decimals: int = 3) -> str:
    """A small tensor or list as a (nested) list, floats to ``decimals`` places."""
    import torch

    if torch.is_tensor(x):  # + 0.0 turns -0.0 (say, a negative number times a 0 of a mask) into 0.0
        x = (x.detach().float() + 0.0).tolist() if x.is_floating_point() else x.tolist()
    if isinstance(x, (list, tuple)):
        return f"[{', '.join(show(v, decimals) for v in x)}]"
    return f"{x:.{decimals}f}" if isinstance(x, float) else repr(x)


def unchanged(call: str, inputs, originals, what: str = "one of its inputs") -> None:
    """Fail if a learner's function modified a tensor it was given (compare with copies taken before the call)."""
    import torch

    if not all(torch.equal(x.detach(), o) for x, o in zip(inputs, originals)):
        raise Failure(f"{call} changed {what} (an in-place op such as +=, add_, masked_fill_ or [...] = ?); compute "
                      "new tensors and leave the ones you are given as they are")


def close(a, b, atol: float = 1e-5) -> bool:
    """Same shape and allclose (rtol 1e-5, NaN equal to NaN), compared in float32."""
    import torch

    return a.shape == b.shape and torch.allclose(a.float(), b.float(), atol=atol, rtol=1e-5, equal_nan=True)


def mistake_notes(got, candidates, close) -> str:
    """The notes of the known mistakes whose result ``close(got, result)`` accepts ('' if none does).

    ``candidates`` are (function computing the mistaken result, note); a mistake that cannot even be
    computed for this case (an index past the end, a square root of a negative number) is skipped.
    """
    notes = []
    for make, note in candidates:
        try:
            value = make()
        except (RuntimeError, IndexError, ZeroDivisionError, ValueError):
            continue
        if close(got, value) and note not in notes:
            notes.append(note)
    return "".join(f"\n{note}" for note in notes)
