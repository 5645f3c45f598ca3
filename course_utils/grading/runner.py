"""``llm-course grade``: grade a notebook from the shell, robustly.

1. Execute the whole notebook top to bottom in a fresh kernel (nbclient) in its own
   process, under a per-notebook time limit generous enough for training cells.
   This shows whether the notebook runs; it earns no points.
2. Collect the cells tagged ``setup`` and ``task`` into one file and run the chapter's
   checks on it in a separate worker process (:mod:`.worker`). A task that runs past its
   time limit gets its worker killed and is reported as a timeout; the remaining tasks
   continue in a fresh worker. Output beyond a cap is discarded, so a print flood
   cannot exhaust memory. The grader never raises on a learner's notebook.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

from ..errors import ConfigError
from .core import Result, chapter_tasks

OUTPUT_CAP = 20_000  # characters of learner output kept for the report


@dataclass
class GradeReport:
    notebook: str
    chapter: str
    results: list
    notebook_status: str = "not executed"  # ok | error in cell N | timeout | not executed
    notebook_seconds: float = 0.0
    output_excerpt: str = ""
    notes: list = field(default_factory=list)

    @property
    def score(self) -> tuple[int, int]:
        return sum(r.earned for r in self.results), sum(r.points for r in self.results)

    def to_dict(self) -> dict:
        got, possible = self.score
        return {"notebook": self.notebook, "chapter": self.chapter, "score": got, "max_score": possible,
                "notebook_status": self.notebook_status, "notebook_seconds": round(self.notebook_seconds, 1),
                "results": [r.to_dict() for r in self.results], "notes": self.notes}


def chapter_of(path: Path) -> str:
    m = re.match(r"(\d\d)_", path.name)
    if not m:
        raise ConfigError(f"cannot tell the chapter of {path.name}: exercise notebooks are named NN_title.ipynb")
    return m.group(1)


def extract_code(nb) -> tuple[str, dict[int, tuple[int, int]]]:
    """Source of the cells tagged setup/task, and a map from file line to (cell index, line in cell)."""
    lines, where = [], {}
    for idx, cell in enumerate(nb.cells):
        tags = set(cell.get("metadata", {}).get("tags", []))
        if cell.cell_type != "code" or not tags & {"setup", "task"}:
            continue
        lines.append(f"# --- notebook cell {idx} ---")
        for j, line in enumerate(cell.source.splitlines(), start=1):
            if line.lstrip().startswith(("%", "!")):  # IPython magics are not Python
                line = "pass  # " + line
            lines.append(line)
            where[len(lines)] = (idx, j)
        lines.append("")
    return "\n".join(lines) + "\n", where


def _relabel(message: str, where: dict) -> str:
    def sub(m):
        n = int(m.group(1))
        return f"cell {where[n][0]}, line {where[n][1]}" if n in where else m.group(0)

    return re.sub(r"\bline (\d+)", sub, message)


def _drain(stream, sink: list, cap: int) -> None:
    """Read a pipe to the end, keeping at most ``cap`` characters (the rest is discarded)."""
    kept = 0
    for chunk in iter(lambda: stream.read(4096), ""):
        if kept < cap:
            sink.append(chunk[: cap - kept])
        kept += len(chunk)
    sink.append(f"\n[... {kept - cap} more characters of output discarded]" if kept > cap else "")


def _kill(proc: subprocess.Popen) -> None:
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        proc.kill()
    proc.wait()


def run_tasks(source_path: Path, chapter: str, task_ids: list[str], task_timeout: float, output: list) -> dict:
    """Run the worker until every task has a result; a task past its limit is a timeout."""
    results_path = source_path.with_suffix(".results.jsonl")
    done: dict = {}
    pending = list(task_ids)
    while pending:
        results_path.write_text("")
        proc = subprocess.Popen(
            [sys.executable, "-m", "course_utils.grading.worker", str(source_path), chapter, str(results_path), *pending],
            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, text=True,
            errors="replace", start_new_session=True, cwd=source_path.parent,
        )
        reader = threading.Thread(target=_drain, args=(proc.stdout, output, OUTPUT_CAP), daemon=True)
        reader.start()
        started_at, current = time.monotonic(), None  # loading the learner's code counts toward the first task
        while True:
            events = [json.loads(line) for line in results_path.read_text().splitlines() if line.strip()]
            for ev in events:
                if ev["event"] == "done" and ev["task"] not in done:
                    done[ev["task"]] = Result(**{k: v for k, v in ev.items() if k != "event"})
            starts = [ev["task"] for ev in events if ev["event"] == "start"]
            if starts and starts[-1] != current:
                current, started_at = starts[-1], time.monotonic()
            if proc.poll() is not None:
                break
            if time.monotonic() - started_at > task_timeout:
                _kill(proc)
                victim = current if current and current not in done else next(t for t in pending if t not in done)
                t = {t.id: t for t in chapter_tasks(chapter)}[victim]
                done[victim] = Result(t.id, t.title, t.tier, t.points, 0, "timeout",
                                      f"still running after {task_timeout:.0f} s (an endless loop? a sleep?)")
                break
            time.sleep(0.05)
        reader.join(timeout=5)
        remaining = [t for t in pending if t not in done]
        if remaining == pending:  # the worker died without reporting anything: do not loop forever
            for tid in remaining:
                t = {t.id: t for t in chapter_tasks(chapter)}[tid]
                done[tid] = Result(t.id, t.title, t.tier, t.points, 0, "error",
                                   f"the grading process crashed (exit code {proc.returncode})")
            remaining = []
        pending = remaining
    return done


def execute_notebook(path: Path, timeout: float) -> tuple[str, float]:
    """Run the notebook in a fresh kernel in a child process; never raises."""
    script = (
        "import sys, nbformat\n"
        "from nbclient import NotebookClient\n"
        "nb = nbformat.read(sys.argv[1], as_version=4)\n"
        "c = NotebookClient(nb, timeout=None, allow_errors=True, kernel_name='python3',\n"
        "                   resources={'metadata': {'path': sys.argv[2]}})\n"
        "c.execute()\n"
        "bad = [i for i, cell in enumerate(nb.cells) if cell.cell_type == 'code'\n"
        "       and any(o.get('output_type') == 'error' for o in cell.get('outputs', []))]\n"
        "print('FIRST_ERROR_CELL', bad[0] if bad else -1)\n"
    )
    t0 = time.monotonic()
    proc = subprocess.Popen([sys.executable, "-c", script, str(path), str(path.parent)], stdout=subprocess.PIPE,
                            stderr=subprocess.DEVNULL, stdin=subprocess.DEVNULL, text=True, start_new_session=True)
    try:
        out, _ = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        _kill(proc)
        return f"timeout after {timeout:.0f} s", time.monotonic() - t0
    m = re.search(r"FIRST_ERROR_CELL (-?\d+)", out or "")
    if not m:
        return f"could not run (exit code {proc.returncode})", time.monotonic() - t0
    cell = int(m.group(1))
    return ("ok" if cell < 0 else f"error in cell {cell}"), time.monotonic() - t0


def grade_notebook(path, chapter: str | None = None, notebook_timeout: float = 900, task_timeout: float = 60,
                   execute: bool = True) -> GradeReport:
    import nbformat

    path = Path(path)
    chapter = chapter or chapter_of(path)
    tasks = chapter_tasks(chapter)
    report = GradeReport(str(path), chapter, [])
    try:
        nb = nbformat.read(path, as_version=4)
    except Exception as e:  # noqa: BLE001 - a broken file is a grade of 0, not a crash
        report.results = [Result(t.id, t.title, t.tier, t.points, 0, "error", f"cannot read the notebook: {e}") for t in tasks]
        return report
    if execute:
        report.notebook_status, report.notebook_seconds = execute_notebook(path, notebook_timeout)
    source, where = extract_code(nb)
    output: list = []
    with tempfile.TemporaryDirectory(prefix="grade-") as tmp:
        src = Path(tmp) / "learner.py"
        src.write_text(source, encoding="utf-8")
        done = run_tasks(src, chapter, [t.id for t in tasks], task_timeout, output)
        for r in done.values():
            r.message = _relabel(r.message.replace(str(src), "your notebook"), where)
    report.results = [done[t.id] for t in tasks]
    report.output_excerpt = "".join(output)[-2000:]
    return report
