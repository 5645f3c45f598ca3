"""`llm-course course`: what each notebook waits for, and the scheduler that runs them two at a time."""

import json
import re
from pathlib import Path

import pytest

from course_utils import course
from course_utils.errors import ConfigError
from course_utils.stages import load_stage

ROOT = Path(__file__).resolve().parents[1]
NOTEBOOKS = sorted(ROOT.glob("notebooks/[0-9][0-9]_*.ipynb")) + sorted(ROOT.glob("solutions/[0-9][0-9]_*.ipynb"))


def code_of(path: Path) -> str:
    return "\n".join("".join(c["source"]) for c in json.loads(path.read_text())["cells"] if c["cell_type"] == "code")


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: course.notebook_key(p))
def test_every_notebook_waits_for_the_stages_its_code_loads(path):
    key = course.notebook_key(path)
    assert key in course.NEEDS, f"{key} is missing from course.NEEDS (it would wait for the whole pipeline)"
    needs = set(course.NEEDS[key])
    code = code_of(path)
    loaded = set(re.findall(r'load_stage\("(\w+)"', code))
    loaded |= {"base", "sft", "rm", "ppo", "dpo"} if "evaluation.MODELS" in code else set()
    loaded |= {"base", "sft", "rm", "ppo"} if "roadmap.step3" in code else set()
    if "pipeline" not in needs:
        assert loaded <= needs, f"{key} loads {sorted(loaded - needs)} but does not wait for it"
    for stage, folder in (("ppo", "ppo"), ("dpo", "dpo"), ("sft", "sft")):  # reusing a stage's run needs it finished
        if f'stage_dir("{folder}"' in code:
            assert stage in needs or "pipeline" in needs, key


def test_a_notebook_cannot_build_a_stage_while_the_course_runs(tmp_path, monkeypatch):
    monkeypatch.setenv("LLM_COURSE_RUNS", str(tmp_path))
    monkeypatch.setenv(course.NO_BUILD_VAR, "1")
    with pytest.raises(ConfigError, match="NEEDS"):
        load_stage("sft", "smoke")
    assert not any(tmp_path.iterdir())


def test_two_processes_missing_a_stage_build_it_once(tmp_path, monkeypatch):
    import threading
    import time

    from course_utils import pretrain
    from course_utils.stages import build_stage

    monkeypatch.setenv("LLM_COURSE_RUNS", str(tmp_path))
    calls = []

    def slow_main(cfg):  # stands in for pretrain.main: takes a while, then writes the checkpoint's manifest
        calls.append(cfg)
        time.sleep(0.5)
        final = tmp_path / "smoke" / "pretrain" / "final"
        final.mkdir(parents=True)
        (final / "manifest.json").write_text("{}")

    monkeypatch.setattr(pretrain, "main", slow_main)
    threads = [threading.Thread(target=build_stage, args=("base", "smoke")) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(calls) == 1  # the second waited on the lock, then found the checkpoint


class FakeProcess:
    def __init__(self, polls: int, code: int = 0):
        self.left, self.code, self.returncode = polls, code, None

    def poll(self):
        self.left -= 1
        if self.left <= 0:
            self.returncode = self.code
        return self.returncode


def fake_course(durations: dict, needs: dict, stage_done_at: dict, jobs: int = 2, fail: tuple = ()):
    """Run the scheduler on fake tasks; a 'clock' counts scheduler rounds. Returns tasks and the start log."""
    tasks = [course.Task(name, [], tuple(needs.get(name, ())), minutes=durations[name]) for name in durations]
    clock, started, running = [0], [], []

    def finished(_since):
        clock[0] += 1
        return {s for s, t in stage_done_at.items() if clock[0] >= t}

    def start(task):
        started.append((clock[0], task.name, [t.name for t in running]))
        task.process = FakeProcess(durations[task.name], 1 if task.name in fail else 0)

    course.schedule(tasks, jobs, finished, start, running, log=lambda *a: None, poll=0)
    return tasks, started


def test_schedule_waits_for_stages_runs_longest_first_and_never_more_than_jobs():
    durations = {"pipeline": 20, "nb/short": 2, "nb/long": 8, "nb/needs_rm": 5, "nb/needs_all": 3}
    needs = {"nb/needs_rm": ("rm",), "nb/needs_all": ("pipeline",)}
    tasks, started = fake_course(durations, needs, {"rm": 10})
    order = [name for _, name, _ in started]
    assert order[:3] == ["pipeline", "nb/long", "nb/short"]  # the longest ready notebook first
    assert all(len(others) < 2 for _, _, others in started)  # a third never starts beside two
    at = {name: when for when, name, _ in started}
    assert at["nb/needs_rm"] >= 10 and at["nb/needs_all"] > at["nb/needs_rm"]
    assert all(t.returncode == 0 for t in tasks)


def test_a_failed_pipeline_skips_what_needs_its_unfinished_stages():
    durations = {"pipeline": 6, "nb/free": 2, "nb/needs_sft": 2, "nb/needs_ppo": 2}
    needs = {"nb/needs_sft": ("sft",), "nb/needs_ppo": ("ppo",)}
    tasks, started = fake_course(durations, needs, {"sft": 2}, jobs=3, fail=("pipeline",))
    codes = {t.name: t.returncode for t in tasks}
    assert codes == {"pipeline": 1, "nb/free": 0, "nb/needs_sft": 0, "nb/needs_ppo": -1}
    assert "nb/needs_ppo" not in [name for _, name, _ in started]


def test_a_need_nothing_builds_is_an_error_not_a_hang():
    with pytest.raises(ConfigError, match="nothing builds"):
        fake_course({"pipeline": 1, "nb/x": 1}, {"nb/x": ("no_such_stage",)}, {}, jobs=2)


def test_timing_table_reports_wall_time_and_process_minutes():
    result = {"seconds": 600.0, "cores": 2, "jobs": 2, "threads": 1,
              "tasks": [{"name": "pipeline", "start": 0.0, "end": 540.0, "seconds": 540.0, "returncode": 0},
                        {"name": "notebooks/02", "start": 0.0, "end": 600.0, "seconds": 600.0, "returncode": 1},
                        {"name": "notebooks/10", "start": None, "end": None, "seconds": None, "returncode": -1}]}
    text = course.timing_table(result)
    assert "whole course: 10.0 min wall" in text and "19.0 process-minutes" in text
    assert "exit 1" in text and "skipped" in text
