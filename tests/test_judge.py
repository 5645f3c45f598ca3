"""course_utils.judge: win-rates with ties, per-prompt means, and the side-by-side comparison of policies."""

from __future__ import annotations

import copy
import json

import pytest
import torch

from course_utils import judge
from course_utils.errors import ConfigError
from course_utils.world import rl_prompts

pytestmark = pytest.mark.usefixtures("one_thread")


def test_win_tie_loss_counts_a_tie_as_half():
    r = judge.win_tie_loss([1.0, 0.5, 0.2, 0.9], [0.5, 0.5, 0.7, 0.1])
    assert (r["win"], r["tie"], r["loss"], r["n"]) == (0.5, 0.25, 0.25, 4)
    assert r["win_rate"] == pytest.approx((2 + 0.5) / 4)
    assert judge.win_tie_loss([1.0] * 3, [1.0] * 3)["win_rate"] == 0.5  # all ties: no better, no worse
    assert judge.win_tie_loss([1.0] * 50, [0.0] * 50)["ci95"] == 0.0
    # outcomes 1, 0, 1, 0, ...: sample sd sqrt(0.25 · 100/99), interval 1.96 sd / sqrt(100)
    assert judge.win_tie_loss([1, 0] * 50, [0.5] * 100)["ci95"] == pytest.approx(1.96 * (0.25 * 100 / 99) ** 0.5 / 10)
    with pytest.raises(ConfigError):
        judge.win_tie_loss([1.0], [1.0, 2.0])


def test_per_prompt_means_average_the_sample_blocks():
    # two prompts, three samples each, stored sample-major (all prompts of sample 0, then of sample 1, ...)
    assert judge.per_prompt_means([1, 0, 0, 0, 1, 1], 3) == pytest.approx([2 / 3, 1 / 3])
    with pytest.raises(ConfigError):
        judge.per_prompt_means([1, 2, 3], 2)


def test_compare_judges_policies_against_the_baseline(tokenizer, make_model):
    rows = rl_prompts(0, 6, "test")
    base = make_model(seed=0, context_length=128).eval()
    other = copy.deepcopy(base)
    with torch.no_grad():
        other.lm_head.weight.add_(0.5 * torch.randn_like(other.lm_head.weight))

    def gold(rows_, texts):  # a judge that likes long answers
        assert len(rows_) == len(texts)
        return [float(len(t)) for t in texts]

    result = judge.compare({"sft": base, "new": other, "same": base}, tokenizer, rows, base, "sft", max_new_tokens=6,
                           samples=2, gold_fn=gold, rm_fn=lambda p, t: [0.0] * len(t), show=3)
    sft, new, same = (result["policies"][k] for k in ("sft", "new", "same"))
    assert sft["kl"] == 0.0 and new["kl"] != 0.0
    assert same["vs_baseline"]["tie"] == 1.0 and same["vs_baseline_greedy"]["win_rate"] == 0.5  # same model, seeds
    assert "vs_baseline" not in sft and new["vs_baseline"]["n"] == 6 and new["vs_baseline_per_sample"]["n"] == 12
    assert len(result["samples"]) == 3 and set(result["samples"][0]) == {"prompt", "sft", "new", "same"}
    assert "win-rate vs sft" in judge.summary(result)
    read_back = json.loads(json.dumps(result, sort_keys=True))  # a saved result may come back with its keys sorted
    assert [line.split(":")[0].strip() for line in judge.summary(read_back).splitlines()] == ["sft", "new", "same"]
    with pytest.raises(ConfigError, match="baseline"):
        judge.compare({"a": base}, tokenizer, rows, base, "sft")
