"""The grading system bites: solutions score 100%, untouched exercises 0, common mistakes fail."""

import json
import math
import time
from pathlib import Path

import nbformat
import pytest
import torch
import torch.nn.functional as F
from nbformat.v4 import new_code_cell, new_notebook

from course_utils import grading
from course_utils.grading.core import chapter_tasks, run_check
from course_utils.grading.runner import grade_notebook
from course_utils.grading.stubs import build_exercises, stub_source

ROOT = Path(__file__).resolve().parents[1]


# --- common mistakes: each must be graded as failing -----------------------------------------------

def merge_no_skip(ids, pair, new_id):  # forgets to skip the second token of a merged pair
    out = []
    for i in range(len(ids)):
        if i + 1 < len(ids) and (ids[i], ids[i + 1]) == pair:
            out.append(new_id)
        else:
            out.append(ids[i])
    return out


def merge_in_place(ids, pair, new_id):  # right answer, but destroys the caller's list
    i = 0
    while i < len(ids) - 1:
        if (ids[i], ids[i + 1]) == pair:
            ids[i : i + 2] = [new_id]
        i += 1
    return ids


def mask_wrong_side(T, P):  # upper triangle: attends to the future
    m = torch.triu(torch.ones(T, T, dtype=torch.bool))
    m[:P, :P] = True
    return m


def mask_prefix_off_by_one(T, P):
    m = torch.tril(torch.ones(T, T, dtype=torch.bool))
    m[: P + 1, : P + 1] = True
    return m


def loss_no_shift(logits, ids, pad):
    t = ids.clone()
    t[t == pad] = -100
    return F.cross_entropy(logits.reshape(-1, logits.size(-1)), t.reshape(-1), ignore_index=-100)


def loss_counts_padding(logits, ids, pad):
    return F.cross_entropy(logits[:, :-1].reshape(-1, logits.size(-1)), ids[:, 1:].reshape(-1))


def pack_positions_not_reset(docs, block, bos, eos):
    stream = [t for d in docs for t in (bos, *d, eos)]
    n = len(stream) // block
    ids = torch.tensor(stream[: n * block]).view(n, block)
    return {"input_ids": ids, "position_ids": torch.arange(block).repeat(n, 1)}


def lr_warmup_from_zero(step, peak, W, N, m):  # transformers' convention: wastes step 0 at lr = 0
    if step < W:
        return peak * step / W
    p = min(1.0, (step - W) / max(1, N - W))
    return peak * (m + (1 - m) * 0.5 * (1 + math.cos(math.pi * p)))


def lr_cosine_over_total(step, peak, W, N, m):
    if step < W:
        return peak * (step + 1) / W
    return peak * (m + (1 - m) * 0.5 * (1 + math.cos(math.pi * min(1.0, step / N))))


def clip_per_tensor(params, max_norm):
    norms = [torch.nn.utils.clip_grad_norm_([p], max_norm) for p in params if p.grad is not None]
    return float(torch.sqrt(sum(n**2 for n in norms)))


def clip_returns_post_norm(params, max_norm):
    torch.nn.utils.clip_grad_norm_(params, max_norm)
    return float(torch.linalg.vector_norm(torch.cat([p.grad.flatten() for p in params if p.grad is not None])))


def capture_without_rng(model, opt):
    import copy

    return {"m": copy.deepcopy(model.state_dict()), "o": copy.deepcopy(opt.state_dict())}


def restore_without_rng(state, model, opt):
    model.load_state_dict(state["m"])
    opt.load_state_dict(state["o"])


def capture_references(model, opt):  # no copies: later training changes the "saved" state
    return {"m": model.state_dict(), "o": opt.state_dict(), "rng": torch.get_rng_state()}


def restore_references(state, model, opt):
    model.load_state_dict(state["m"])
    opt.load_state_dict(state["o"])
    torch.set_rng_state(state["rng"])


def capture_no_optimizer(model, opt):
    import copy

    return {"m": copy.deepcopy(model.state_dict()), "rng": torch.get_rng_state()}


def restore_no_optimizer(state, model, opt):
    model.load_state_dict(state["m"])
    torch.set_rng_state(state["rng"])


WRONG = [
    ("1.1", (merge_no_skip,)), ("1.1", (merge_in_place,)),
    ("1.2", (mask_wrong_side,)), ("1.2", (mask_prefix_off_by_one,)),
    ("1.3", (loss_no_shift,)), ("1.3", (loss_counts_padding,)),
    ("1.4", (pack_positions_not_reset,)),
    ("2.1", (lr_warmup_from_zero,)), ("2.1", (lr_cosine_over_total,)),
    ("2.2", (clip_per_tensor,)), ("2.2", (clip_returns_post_norm,)),
    ("2.3", (capture_without_rng, restore_without_rng)), ("2.3", (capture_references, restore_references)),
    ("2.3", (capture_no_optimizer, restore_no_optimizer)),
]


@pytest.mark.parametrize("task_id,fns", WRONG, ids=[f"{t}-{f[0].__name__}" for t, f in WRONG])
def test_common_mistake_fails(task_id, fns):
    row = grading.check(task_id, *fns)[0]
    assert row.status == "fail" and row.earned == 0, row
    assert "expected" in row.message or "restore" in row.message or "changed" in row.message


def test_every_task_has_a_wrong_variant_and_tiers_are_valid():
    tasks = chapter_tasks("01") + chapter_tasks("02")
    assert len(tasks) >= 5
    assert {t.id for t in tasks} <= {t for t, _ in WRONG}
    assert {t.tier for t in tasks} == {"warm-up", "core", "stretch"}


def test_references_agree_with_libraries():
    """The checks' own references are cross-checked: loss vs transformers, clipping vs torch (inside the check)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from course_utils.grading.ch01 import causal_lm_loss_reference

    cfg = LlamaConfig(vocab_size=40, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                      num_key_value_heads=2, intermediate_size=32, pad_token_id=0)
    model = LlamaForCausalLM(cfg)
    ids = torch.randint(1, 40, (2, 9))
    ids[1, -3:] = 0
    labels = ids.masked_fill(ids == 0, -100)
    out = model(input_ids=ids, labels=labels)
    assert torch.allclose(causal_lm_loss_reference(out.logits, ids, 0), out.loss, atol=1e-6)


# --- in-notebook checks -----------------------------------------------------------------------------

def test_in_notebook_error_names_the_learners_line():
    def merge_pair(ids, pair, new_id):
        return ids[len(ids) + 5]  # IndexError here

    row = grading.check("1.1", merge_pair)[0]
    assert row.status == "error" and "IndexError" in row.message and "ids[len(ids) + 5]" in row.message


def test_in_notebook_timeout():
    def lr_at(*a):
        time.sleep(30)

    t0 = time.monotonic()
    row = run_check(grading.get_task("2.1"), (lr_at,), timeout=0.5)
    assert row.status == "timeout" and time.monotonic() - t0 < 5


def test_grade_reports_missing_functions():
    table = grading.grade("01", {"merge_pair": lambda ids, p, n: ids})
    statuses = {r.task: r.status for r in table}
    assert statuses["1.2"] == "missing" and statuses["1.1"] == "fail"
    assert "score: 0 / 8" in repr(table) and "<table>" in table._repr_html_()


# --- one source for exercise and solution ----------------------------------------------------------

def test_committed_exercises_are_generated_from_solutions():
    assert build_exercises(ROOT, check_only=True) == [], "run `llm-course exercises` and commit the result"


def test_stub_replaces_solution_at_its_indentation():
    src = "def f(x):\n    ### BEGIN SOLUTION\n    return x + 1\n    ### END SOLUTION\n\nprint(1)"
    stub = stub_source(src, "task 9.9")
    assert "return x + 1" not in stub and '    raise NotImplementedError("task 9.9: not implemented yet")' in stub
    assert stub.endswith("print(1)")
    for bad in ("### BEGIN SOLUTION\nx", "x\n### END SOLUTION", "### BEGIN SOLUTION\n### BEGIN SOLUTION\n### END SOLUTION"):
        with pytest.raises(ValueError):
            stub_source(bad)


# --- CLI grading: separate process, time limits, never crashes ----------------------------------------

@pytest.mark.parametrize("folder,expected", [("solutions", 1.0), ("exercises", 0.0)])
@pytest.mark.parametrize("chapter", sorted(p.name[:2] for p in (ROOT / "solutions").glob("[0-9][0-9]_*.ipynb")))
def test_solutions_score_full_and_exercises_zero(folder, expected, chapter):
    from course_utils.grading.core import chapter_tasks

    (nb,) = (ROOT / folder).glob(f"{chapter}_*.ipynb")
    report = grade_notebook(nb, execute=False, task_timeout=60)
    got, possible = report.score
    assert possible == sum(t.points for t in chapter_tasks(chapter))
    assert got == expected * possible, [(r.task, r.status, r.message) for r in report.results]
    if folder == "exercises":
        assert {r.status for r in report.results} == {"not implemented"}


def _notebook(tmp_path, *cells, name="01_test.ipynb"):
    nb = new_notebook(cells=[new_code_cell(c) for c in cells])
    nb.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3", "language": "python"}
    for c in nb.cells:
        c.metadata["tags"] = ["task"]
    path = tmp_path / name
    nbformat.write(nb, path)
    return path


SOLUTION_01 = '''
import torch, torch.nn.functional as F
def prefix_lm_mask(T, P):
    m = torch.tril(torch.ones(T, T, dtype=torch.bool)); m[:P, :P] = True; return m
'''


def test_cli_grader_survives_hang_raise_and_flood(tmp_path):
    path = _notebook(
        tmp_path,
        SOLUTION_01,
        "import time\ndef merge_pair(ids, pair, new_id):\n    while True:\n        time.sleep(1)",
        "def causal_lm_loss(logits, ids, pad):\n    raise ValueError('my own bug')",
        "def pack_documents(docs, block, bos, eos):\n    for _ in range(200000):\n        print('flood' * 20)\n    return {}",
    )
    t0 = time.monotonic()
    report = grade_notebook(path, execute=False, task_timeout=4)
    elapsed = time.monotonic() - t0
    rows = {r.task: r for r in report.results}
    assert rows["1.1"].status == "timeout"
    assert rows["1.2"].status == "pass" and rows["1.2"].earned == 2
    assert rows["1.3"].status == "error" and "my own bug" in rows["1.3"].message
    assert "cell 2, line 2" in rows["1.3"].message and "raise ValueError('my own bug')" in rows["1.3"].message
    assert rows["1.4"].status in ("fail", "timeout")
    assert len(report.output_excerpt) <= 2000
    assert elapsed < 40


def test_cli_grader_detects_tampering(tmp_path):
    path = _notebook(tmp_path, SOLUTION_01 + "\ntorch.allclose = lambda *a, **k: True\ntorch.equal = lambda *a, **k: True")
    report = grade_notebook(path, execute=False, task_timeout=20)
    assert all(r.status == "fail" and "grading is void" in r.message for r in report.results)


def test_cli_grader_redefining_helpers_changes_nothing(tmp_path):
    path = _notebook(tmp_path, SOLUTION_01 + (
        "\nfrom course_utils import grading\nimport course_utils.grading.ch01 as ch\n"
        "ch.check_prefix_lm_mask = lambda f: None\ngrading.check = lambda *a, **k: None\n"
        "def merge_pair(ids, pair, new_id):\n    return ids\n"))
    rows = {r.task: r for r in grade_notebook(path, execute=False, task_timeout=20).results}
    assert rows["1.1"].status == "fail" and rows["1.2"].status == "pass"


def test_cli_grader_handles_code_that_does_not_even_run(tmp_path):
    path = _notebook(tmp_path, "def merge_pair(:\n    pass")
    report = grade_notebook(path, execute=False, task_timeout=20)
    assert all(r.status == "error" and "SyntaxError" in r.message and "cell 0" in r.message for r in report.results)
    broken = tmp_path / "01_broken.ipynb"
    broken.write_text("{not json")
    assert all(r.status == "error" for r in grade_notebook(broken, execute=False).results)


def test_cli_grade_executes_notebook_and_writes_json(tmp_path, capsys):
    from course_utils.cli import main as cli

    path = _notebook(tmp_path, SOLUTION_01, "1 / 0")
    out = tmp_path / "result.json"
    assert cli(["grade", str(path), "--json", str(out), "--timeout", "120", "--task-timeout", "20"]) == 0
    result = json.loads(out.read_text())
    assert result["notebook_status"] == "error in cell 1"
    assert result["max_score"] == 8 and result["score"] == 2
    assert "score: 2 / 8" in capsys.readouterr().out


def test_notebook_that_never_ends_is_cut_off(tmp_path):
    from course_utils.grading.runner import execute_notebook

    path = _notebook(tmp_path, "import time\ntime.sleep(600)")
    t0 = time.monotonic()
    status, _ = execute_notebook(path, timeout=8)
    assert status.startswith("timeout") and time.monotonic() - t0 < 20


def test_cli_grade_rejects_unclear_targets(tmp_path, capsys):
    from course_utils.cli import main as cli

    assert cli(["grade", "abc"]) == 2
    odd = tmp_path / "notes.ipynb"
    odd.write_text("{}")
    assert cli(["grade", str(odd)]) == 2
    assert "NN_title.ipynb" in capsys.readouterr().err
