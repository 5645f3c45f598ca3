"""Runs inside the grading subprocess: load the learner's code, run the chapter's checks.

    python -m course_utils.grading.worker LEARNER.py CHAPTER RESULTS.jsonl TASK [TASK ...]

The checks are imported *before* the learner's code runs and used through references
kept here, so a notebook that redefines ``check``/``grade`` or patches the chapter module
cannot change the verdict; patching is detected and reported as a failure. Results go
to a file, one JSON line per event, so a flood on stdout cannot corrupt them.
"""

from __future__ import annotations

import builtins
import json
import math
import sys
import time


def _guarded() -> dict:
    """Functions a check relies on; if learner code replaces one, grading is void."""
    import torch

    from . import core

    objs = {"torch.allclose": torch.allclose, "torch.equal": torch.equal, "math.isclose": math.isclose,
            "builtins.abs": builtins.abs, "builtins.isinstance": builtins.isinstance,
            "torch.nn.utils.clip_grad_norm_": torch.nn.utils.clip_grad_norm_}
    for chapter, tasks in core.REGISTRY.items():
        for t in tasks.values():
            objs[f"check {t.id}"] = t.check
    return objs


def _current(name: str):
    import torch

    from . import core

    if name.startswith("check "):
        tid = name.split()[1]
        chapter = f"{int(tid.split('.')[0]):02d}"
        return core.REGISTRY.get(chapter, {}).get(tid, core.Task("", "", (), "", "core", None)).check
    root, _, attr = name.rpartition(".")
    mod = {"torch": torch, "math": math, "builtins": builtins, "torch.nn.utils": torch.nn.utils}[root]
    return getattr(mod, attr, None)


def _cells(source: str) -> list[tuple[int, str]]:
    """Split the runner's file at its '# --- notebook cell N ---' markers: (lines before the cell, cell source)."""
    lines = source.splitlines()
    starts = [i for i, line in enumerate(lines) if line.startswith("# --- notebook cell ")] or [0]
    bounds = [*starts, len(lines)]
    return [(a, "\n".join(lines[a:b])) for a, b in zip(bounds, bounds[1:])]


def main(argv=None) -> int:
    learner_path, chapter, results_path, *task_ids = argv or sys.argv[1:]
    from . import core

    tasks = {t.id: t for t in core.chapter_tasks(chapter)}
    before = _guarded()
    out = open(results_path, "a", buffering=1, encoding="utf-8")

    def emit(**event):
        out.write(json.dumps(event) + "\n")
        out.flush()

    def locate(exc):
        return core.learner_line(exc, learner_path)

    namespace = {"__name__": "learner", "__file__": learner_path}
    cell_errors = []
    for start, chunk in _cells(open(learner_path, encoding="utf-8").read()):
        # run cell by cell, like a notebook with errors allowed: one broken cell does not sink the others.
        # Leading newlines keep line numbers equal to the file's, so errors point at the right line.
        try:
            exec(compile("\n" * start + chunk, learner_path, "exec"), namespace)
        except BaseException as e:  # noqa: BLE001
            where = locate(e)
            cell_errors.append(f"{type(e).__name__}: {e}" + (f" ({where})" if where else ""))
    tampered = [name for name, obj in before.items() if _current(name) is not obj]
    for tid in task_ids:
        t = tasks[tid]
        emit(event="start", task=tid, time=time.time())
        if tampered:
            r = core.Result(t.id, t.title, t.tier, t.points, 0, "fail",
                            f"grading is void: your code replaced {', '.join(tampered)}")
        else:
            missing = [n for n in t.names if not callable(namespace.get(n))]
            if missing and cell_errors:
                r = core.Result(t.id, t.title, t.tier, t.points, 0, "error",
                                f"{', '.join(missing)} not defined; a cell failed: {cell_errors[0]}")
            elif missing:
                r = core.Result(t.id, t.title, t.tier, t.points, 0, "missing", f"define {', '.join(missing)}")
            else:
                try:
                    before[f"check {tid}"](*(namespace[n] for n in t.names))
                    r = core.result_for(t, None)
                except BaseException as e:  # noqa: BLE001
                    r = core.result_for(t, e, locate)
        emit(event="done", **r.to_dict())
    return 0


if __name__ == "__main__":
    sys.exit(main())
