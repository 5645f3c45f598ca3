"""Chapter 12: each seeded failure of the debug checklist fails for its reason and `diagnose` names that reason; a
healthy setup gives no finding; the NaN guard stops at the first non-finite loss and names it."""

import math
import random
from dataclasses import dataclass, replace

import pytest
import torch

from course_utils import debug, world
from course_utils.chat import encode, pad_batch
from course_utils.memory import TrainingSetup

pytestmark = pytest.mark.usefixtures("one_thread")  # small models: threads only add overhead


@pytest.fixture(scope="module")
def sft():
    from course_utils.stages import load_stage

    return load_stage("sft", "smoke")


@pytest.fixture(scope="module")
def records():
    return world.sft_examples(0, 200, "train")


def _batches(records, tok, n=4, size=8, labels=None):
    out = []
    for i in range(n):
        b = pad_batch([encode(r["messages"], tok) for r in records[i * size : (i + 1) * size]], tok.pad_token_id)
        if labels is not None:
            b["labels"] = labels(b)
        out.append(b)
    return out


def _shift_twice(b):
    shifted = torch.full_like(b["labels"], -100)
    shifted[:, :-1] = b["labels"][:, 1:]
    return shifted


@dataclass
class Cfg:
    lr: float = 1e-3
    warmup_steps: int = 10
    grad_clip: float = 1.0
    chat_format: str = "chatml"
    max_length: int = 128


def codes(findings):
    return {f.code for f in findings}


def test_healthy_setup_has_no_finding(sft, records, capsys):
    lm, tok = sft
    random.Random(0).shuffle(records := list(records))
    found = debug.diagnose(records=records, tokenizer=tok, config=Cfg(max_length=256), model=lm, batch=_batches(records, tok)[0],
                           memory_setup=TrainingSetup.from_config(lm.config, batch_size=8, seq_len=64),
                           memory_budget_gib=1.0, probe=records[:8])
    assert found == [] and "no problem found" in capsys.readouterr().out


def test_nan_guard_stops_at_the_first_non_finite_loss_and_names_it(sft, records):
    from course_utils.stages import load_stage

    lm, tok = sft
    batches = _batches(records, tok)
    unguarded = debug.train_steps(load_stage("sft", "smoke")[0], batches, lr=100.0, steps=12, optimizer="sgd",
                                  guard=False)["history"]
    first_bad = next(h["step"] for h in unguarded if not math.isfinite(h["loss"]))
    run = debug.train_steps(load_stage("sft", "smoke")[0], batches, lr=100.0, steps=12, optimizer="sgd")
    err = run["error"]
    assert isinstance(err, debug.NonFiniteError) and err.step == first_bad and len(run["history"]) == first_bad - 1
    assert "loss is nan" in str(err) and err.where and err.where.startswith("output of model.")
    assert debug.check_config(Cfg(lr=100.0, warmup_steps=0, grad_clip=0.0), 31_000)  # diagnose names the LR
    assert codes(debug.check_config(Cfg(lr=100.0, warmup_steps=0, grad_clip=0.0), 31_000)) == {
        "lr_too_high", "no_warmup_no_clipping"}


def test_broken_token_mask_gives_nan_and_is_named(sft, records):
    lm, tok = sft
    batches = _batches(records, tok, labels=lambda b: torch.full_like(b["labels"], -100))
    err = debug.train_steps(lm, batches, lr=1e-3, steps=2)["error"]
    assert err.step == 1 and "nan" in str(err)
    assert codes(debug.check_batch(batches[0])) == {"all_labels_masked"}


def test_labels_shifted_twice_are_named_and_shown(sft, records):
    lm, tok = sft
    batch = _batches(records, tok, n=1, labels=_shift_twice)[0]
    assert codes(debug.check_batch(batch)) == {"labels_shifted"}
    assert debug.check_batch(_batches(records, tok, n=1)[0]) == []
    text = debug.show_tokens(batch, tok)
    assert "·" in text and "→" in text


def test_unshuffled_low_quality_and_uncovered_data_are_named(sft, records):
    _, tok = sft
    ordered = sorted(records, key=lambda r: r["family"])
    assert codes(debug.check_records(ordered)) == {"unshuffled"}
    bad = world.sft_examples(0, 200, "train", mix={"wrong": 1.0, "impolite": 1.0, "good": 0.2})
    assert "low_quality" in codes(debug.check_records(bad))
    foreign = [{**r, "prompt": "皮普住在哪里？", "response": "皮普住在苔藓溪。"} for r in records[:50]]
    assert "tokenizer_coverage" in codes(debug.check_records(foreign, tok, key="id"))


def test_out_of_memory_is_predicted_with_fixes():
    setup = TrainingSetup(hidden_size=1024, num_layers=12, num_heads=16, intermediate_size=4096, vocab_size=32000,
                          batch_size=32, seq_len=1024, flash_attention=False)
    (finding,) = debug.check_memory(setup, budget_gib=8.0)
    assert finding.code == "out_of_memory" and "activations" in finding.message
    assert "gradient checkpointing →" in finding.fix and "LoRA r=8 →" in finding.fix
    assert debug.check_memory(replace(setup, gradient_checkpointing=True, batch_size=4), budget_gib=8.0) == []


def test_template_mismatch_is_found_by_probing(records):
    from course_utils.stages import load_stage

    lm, tok = load_stage("base", "smoke")  # fine-tune it briefly in ChatML so the template matters
    assert debug.train_steps(lm, _batches(records, tok, n=8), lr=3e-3, steps=120, grad_clip=1.0)["error"] is None
    probe = records[100:116]
    (finding,) = debug.check_template(lm, tok, "alpaca", probe)
    assert finding.code == "template_mismatch" and "'chatml'" in finding.message
    assert debug.check_template(lm, tok, "chatml", probe) == []


def test_frozen_model_and_non_finite_weights_are_named(sft):
    import copy

    lm = copy.deepcopy(sft[0])
    for p in lm.parameters():
        p.requires_grad_(False)
    assert codes(debug.check_model(lm)) == {"nothing_trainable"}
    with torch.no_grad():
        next(lm.parameters())[0, 0] = float("nan")
    assert "non_finite_weights" in codes(debug.check_model(lm))
