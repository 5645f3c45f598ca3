"""``llm-course course``: the whole course — the pipeline and every notebook — in one command, on every core.

The pipeline builds the stages (base → SFT → RM → PPO, DPO → evaluation); each notebook needs some of them.
A notebook starts as soon as the stages it loads are finished, and up to ``jobs`` processes run at once, each
with ``cores // jobs`` threads. On two cores, two single-thread processes finish the same work 1.05–1.2× sooner
than one two-thread process (``benchmarks/bench_course_parallel.py``: the tiny model's matrices keep a second
thread only partly busy), and a notebook that needs no stage runs while the pipeline trains. Results do not depend
on the thread count: training on CPU here gives bit-identical weights with 1 or 2 threads.

Each task's output goes to ``runs/<profile>/course/<task>.log``; the timings to ``course/times.json`` and a table.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from .errors import ConfigError
from .profiles import get_profile, runs_dir
from .stages import NO_BUILD_VAR

# What each notebook needs finished before it starts (file-name prefix → stages). A stage counts as finished when
# the pipeline has written its result.json in this run; "pipeline" = the whole pipeline incl. its report and W&B runs.
# A notebook not listed waits for the whole pipeline. tests/test_course.py checks this against the notebooks' code.
NEEDS: dict[str, tuple[str, ...]] = {
    "notebooks/00": (),
    "notebooks/01": (),
    "notebooks/02": ("base",),
    "notebooks/03": ("base", "sft"),
    "notebooks/04": ("base", "sft"),
    "notebooks/05": ("base", "sft", "rm"),
    "notebooks/06": ("sft", "rm", "ppo"),
    "notebooks/07": ("sft", "rm", "ppo", "dpo"),
    "notebooks/08": ("base",),
    "notebooks/09": (),
    "notebooks/10": ("pipeline",),
    "notebooks/11": ("pipeline",),
    "notebooks/12": ("base", "sft"),
    "notebooks/13": ("base", "sft", "rm", "ppo"),
    "notebooks/14": ("base", "sft", "rm", "ppo", "dpo"),
    **{f"solutions/{n:02d}": () for n in range(1, 11)},
}
# Minutes each took in `make course` (tiny, one thread each on 2 cores): the longest ready task starts first, so no
# long one is left for the end.
MINUTES = {"pipeline": 18, "notebooks/05": 6, "notebooks/07": 4.5, "notebooks/04": 4.3, "notebooks/09": 4.3,
           "notebooks/13": 3.7, "notebooks/03": 3.3, "notebooks/06": 2.2, "notebooks/02": 2, "notebooks/01": 1.4}


@dataclass
class Task:
    name: str  # "pipeline" or "notebooks/05" (folder / number)
    command: list[str]
    needs: tuple[str, ...]
    minutes: float = 1.0
    process: subprocess.Popen | None = None
    started: float | None = None
    finished: float | None = None
    returncode: int | None = None
    log_path: Path | None = None


def _cli() -> list[str]:
    return [sys.executable, "-m", "course_utils.cli"]


def notebook_key(path: Path) -> str:
    return f"{path.parent.name}/{path.name[:2]}"


def build_tasks(profile: str, names=()) -> list[Task]:
    """The pipeline plus the notebooks ``llm-course notebooks`` would execute (all, or those in ``names``)."""
    from .notebooks import notebook_paths

    tasks = [Task("pipeline", [*_cli(), "--profile", profile, "pipeline"], (), MINUTES["pipeline"])]
    for path in notebook_paths(names):
        key = notebook_key(path)
        tasks.append(Task(key, [*_cli(), "--profile", profile, "notebooks", str(path)], NEEDS.get(key, ("pipeline",)),
                          MINUTES.get(key, 1.0)))
    return tasks


def finished_stages(runs: Path, since: float) -> set[str]:
    """Stages whose record the pipeline wrote after ``since`` (a time.time())."""
    from .stages import RECORD, STAGES

    done = set()
    for stage, folder in {**STAGES, "eval": "eval"}.items():
        record = runs / folder / RECORD
        if record.exists() and record.stat().st_mtime >= since:
            done.add(stage)
    return done


def run_course(profile: str | None = None, names=(), jobs: int | None = None, log=print, poll: float = 2.0) -> dict:
    """Run the pipeline and the notebooks (tiny outputs written in place); return and save the timings."""
    p = get_profile(profile)
    cores = os.cpu_count() or 1
    jobs = jobs or (min(2, cores) if p.offline else 1)
    if jobs < 1:
        raise ConfigError(f"jobs must be >= 1, got {jobs}")
    threads = max(1, cores // jobs)
    runs = runs_dir(p)
    out = runs / "course"
    out.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads), NO_BUILD_VAR: "1",
           "LLM_COURSE_PROFILE": p.name, "PYTHONUNBUFFERED": "1"}
    tasks = build_tasks(p.name, names)
    log(f"course, profile {p.name!r}: {len(tasks)} tasks, {jobs} at a time × {threads} thread(s); logs in {out}")
    t0 = time.perf_counter()
    running: list[Task] = []
    try:
        schedule(tasks, jobs, lambda since: finished_stages(runs, since), lambda task: start(task, out, env),
                 running, log, poll)
    finally:
        for task in running:  # interrupted: leave no orphan training processes behind
            if task.process.poll() is None:
                task.process.kill()
    result = {"profile": p.name, "jobs": jobs, "threads": threads, "cores": cores, "seconds": time.perf_counter() - t0,
              "ok": all(t.returncode == 0 for t in tasks),
              "tasks": [{"name": t.name, "needs": list(t.needs), "start": t.started, "end": t.finished,
                         "seconds": None if t.started is None else t.finished - t.started, "returncode": t.returncode}
                        for t in sorted(tasks, key=lambda t: (t.started is None, t.started or 0))]}
    (out / "times.json").write_text(json.dumps(result, indent=2) + "\n")
    log(timing_table(result))
    return result


def start(task: Task, out: Path, env: dict) -> None:
    task.log_path = out / (task.name.replace("/", "_") + ".log")
    with task.log_path.open("w") as f:
        task.process = subprocess.Popen(task.command, stdout=f, stderr=subprocess.STDOUT, env=env)


def schedule(tasks: list[Task], jobs: int, finished_stages, start, running: list, log=print, poll: float = 2.0) -> None:
    """Start every ready task, longest first, while fewer than ``jobs`` run; note when each one ends.

    ``finished_stages(since)`` names the stages finished since ``since`` (a time.time()); ``start(task)`` sets
    ``task.process`` (anything with ``poll()`` and ``returncode``)."""
    pending, done = list(tasks), []
    pipeline = next(t for t in tasks if t.name == "pipeline")
    t0_wall, t0 = time.time(), time.perf_counter()
    while pending or running:
        for task in list(running):
            if task.process.poll() is not None:
                task.finished, task.returncode = time.perf_counter() - t0, task.process.returncode
                running.remove(task)
                done.append(task)
                status = "ok" if task.returncode == 0 else f"FAILED (exit {task.returncode}, see {task.log_path})"
                log(f"[{task.finished / 60:5.1f} min] {task.name}: {status}, {task.finished - task.started:.0f} s "
                    f"({len(done)}/{len(tasks)})")
        finished = set(finished_stages(t0_wall))
        if pipeline.returncode == 0:
            finished.add("pipeline")
        elif pipeline.returncode is not None:  # the pipeline failed: what needs a stage it did not finish cannot run
            for task in [t for t in pending if not set(t.needs) <= finished]:
                pending.remove(task)
                task.returncode = -1
                log(f"{task.name}: skipped, the pipeline failed before {sorted(set(task.needs) - finished)}")
        ready = sorted((t for t in pending if set(t.needs) <= finished), key=lambda t: -t.minutes)
        while ready and len(running) < jobs:
            task = ready.pop(0)
            pending.remove(task)
            task.started = time.perf_counter() - t0
            start(task)
            running.append(task)
            log(f"[{task.started / 60:5.1f} min] {task.name}: started")
        if running:
            time.sleep(poll)
        elif pending:  # nothing running and nothing ready: the needs can never be met
            raise ConfigError(f"tasks wait for stages that nothing builds: {[(t.name, t.needs) for t in pending]}")


def timing_table(result: dict) -> str:
    lines = [f"{'task':18s}{'start':>8s}{'end':>8s}{'seconds':>9s}  status"]
    for t in result["tasks"]:
        if t["start"] is None:
            lines.append(f"{t['name']:18s}{'':>8s}{'':>8s}{'':>9s}  skipped")
            continue
        lines.append(f"{t['name']:18s}{t['start'] / 60:7.1f}m{t['end'] / 60:7.1f}m{t['seconds']:9.0f}  "
                     + ("ok" if t["returncode"] == 0 else f"exit {t['returncode']}"))
    busy = sum(t["seconds"] or 0 for t in result["tasks"])
    lines.append(f"whole course: {result['seconds'] / 60:.1f} min wall on {result['cores']} cores "
                 f"({result['jobs']} processes × {result['threads']} thread(s); {busy / 60:.1f} process-minutes)")
    return "\n".join(lines)
