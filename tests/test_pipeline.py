"""The main command end to end in the smoke profile, the CLI, tracking and sampling."""

import copy
import json

import pytest
import torch

from course_utils.cli import main as cli
from course_utils.generation import generate
from course_utils.pipeline import run_pipeline
from course_utils.tracking import Tracker


@pytest.fixture(scope="module")
def smoke_run(tmp_path_factory):
    tmp_path = tmp_path_factory.mktemp("pipeline")
    return tmp_path, run_pipeline("smoke", out_dir=tmp_path, trackers=(), log=lambda *_: None)


def test_pipeline_smoke_writes_report_and_checkpoint(smoke_run):
    tmp_path, metrics = smoke_run
    report = tmp_path / "report" / "report.md"
    saved = json.loads((tmp_path / "report" / "metrics.json").read_text())
    pre = saved["stages"]["pretrain"]
    assert pre["val_ppl_after"] < pre["val_ppl_before"]
    assert saved["stages"]["world"]["sft"]["train"] == 200
    text = report.read_text()
    assert "Samples before and after" in text and (tmp_path / "report" / "plots" / "pretrain_loss.png").stat().st_size > 1000
    assert len(pre["samples"]) == 4 and all({"prompt", "before", "after"} <= set(s) for s in pre["samples"])
    assert (tmp_path / "pretrain" / "final" / "manifest.json").exists()
    assert metrics["report"] == str(report)
    rm = saved["stages"]["rm"]  # the reward-model stage ran after SFT, cleaned its data and is in the report
    assert rm["removed"]["tie"] > 0 and rm["kept"] < rm["rows"] and 0.0 <= rm["after"]["accuracy"] <= 1.0
    assert "## Reward model (奖励建模)" in text and (tmp_path / "report" / "plots" / "rm_rewards.png").exists()
    assert (tmp_path / "rm" / "final" / "manifest.json").exists()
    for stage in ("ppo", "dpo"):  # RLHF ran after the RM, kept its reference frozen, and was judged against SFT
        m = saved["stages"][stage]
        assert m["reference_unchanged"] and (tmp_path / stage / "final" / "manifest.json").exists()
        assert 0.0 <= m["comparison"]["policies"][stage]["vs_baseline"]["win_rate"] <= 1.0
    assert "## RLHF: PPO (近端策略优化) and DPO (直接偏好优化)" in text and (tmp_path / "report" / "plots" / "ppo.png").exists()
    ev = saved["stages"]["eval"]  # every pipeline model evaluated, the RM too, and the section written
    assert set(ev["models"]) == {"base", "sft", "ppo", "dpo"} and 0.0 <= ev["rm"]["accuracy"] <= 1.0
    assert "## Evaluation (模型评估)" in text and (tmp_path / "report" / "plots" / "evaluation.png").exists()


def test_a_stage_run_is_reused_only_with_the_same_config_and_input_weights(smoke_run, tmp_path):
    from dataclasses import replace

    from course_utils import ppo
    from course_utils.stages import RECORD, load_model_dir, run_once

    runs, _ = smoke_run
    saved = json.loads((runs / "report" / "metrics.json").read_text())["stages"]["ppo"]
    assert json.loads((runs / "ppo" / RECORD).read_text())["result"] == saved  # the pipeline recorded what it returned
    inputs = {"sft": load_model_dir(runs / "sft" / "final"), "rm": load_model_dir(runs / "rm" / "final", reward=True)}
    cfg = ppo.PPOConfig.for_profile("smoke")
    calls = []

    def main(cfg, out_dir, **kw):  # stands in for ppo.main: a reuse must not call it
        calls.append(cfg)
        (out_dir / "final").mkdir(parents=True)
        (out_dir / "final" / "manifest.json").write_text("{}")
        return {"trained": True, "seconds": 0.0}

    assert run_once(main, cfg, tmp_path / "a", reuse=[runs / "ppo"], **inputs) == saved and not calls
    assert run_once(main, cfg, tmp_path / "b", reuse=[runs / "ppo"], fresh=True, **inputs)["trained"]
    assert run_once(main, replace(cfg, steps=cfg.steps + 1), tmp_path / "c", reuse=[runs / "ppo"], **inputs)["trained"]
    with torch.no_grad():  # one weight of the reward model changed by one step of float32: a different input
        p = next(inputs["rm"][0].parameters())
        p.view(-1)[0] = torch.nextafter(p.view(-1)[0], torch.tensor(float("inf")))
    assert run_once(main, cfg, tmp_path / "d", reuse=[runs / "ppo"], **inputs)["trained"] and len(calls) == 3
    again = run_once(main, cfg, tmp_path / "d", **inputs)  # its own record now, keys in the order main gave them
    assert again == {"trained": True, "seconds": 0.0} and list(again) == ["trained", "seconds"] and len(calls) == 3


def test_a_run_that_trains_its_input_in_place_is_keyed_by_the_weights_it_started_from(tmp_path):
    from course_utils import sft
    from course_utils.stages import find_run, run_once

    model = torch.nn.Linear(2, 2)
    start = copy.deepcopy(model)
    cfg = sft.SFTConfig.for_profile("smoke")

    def trains_in_place(cfg, out_dir, base, **kw):  # as sft.main does with a full fine-tuning run
        with torch.no_grad():
            base.weight.add_(1.0)
        return {"seconds": 0.0}

    run_once(trains_in_place, cfg, tmp_path, base=model)
    assert find_run(cfg, [tmp_path], base=start) == tmp_path  # found again from the weights it started from
    assert find_run(cfg, [tmp_path], base=model) is None  # not from the weights it ended with


def test_the_evaluation_judge_is_saved_and_reused_not_trained_again(smoke_run, tmp_path, monkeypatch):
    from dataclasses import replace

    from course_utils import evaluation
    from course_utils.checkpoint import parameters_digest
    from course_utils.stages import load_model_dir

    runs, _ = smoke_run
    sft_lm, tok = load_model_dir(runs / "sft" / "final")
    cfg = evaluation.EvalConfig.for_profile("smoke")
    saved = load_model_dir(runs / "eval" / "judge" / "final")[0]

    def no_training(*a, **kw):
        raise AssertionError("the judge was trained again")

    monkeypatch.setattr(evaluation, "train_judge", no_training)
    judge, judge_tok, check = evaluation.load_judge(cfg, sft_lm, tok, log=lambda *_: None, folder=tmp_path / "j",
                                                    reuse=[runs / "eval" / "judge"])
    assert parameters_digest(judge) == parameters_digest(saved) and judge_tok is tok and 0.0 <= check["exact_grade"] <= 1
    monkeypatch.undo()  # another config (more judge steps): trained and saved in its own folder
    other = evaluation.load_judge(replace(cfg, judge_steps=cfg.judge_steps + 1), sft_lm, tok, log=lambda *_: None,
                                  folder=tmp_path / "j", reuse=[runs / "eval" / "judge"])[0]
    assert parameters_digest(other) != parameters_digest(saved) and (tmp_path / "j" / "final" / "manifest.json").exists()


def test_load_stage_builds_missing_base(tmp_path, monkeypatch):
    from course_utils.stages import load_stage

    monkeypatch.setenv("LLM_COURSE_RUNS", str(tmp_path))
    model, tok = load_stage("base", "smoke")
    assert (tmp_path / "smoke" / "pretrain" / "final" / "model.safetensors").exists()
    again, _ = load_stage("base", "smoke", build_if_missing=False)  # second call only loads
    x = torch.tensor([[tok.bos_token_id, 10, 11]])
    assert torch.allclose(model(input_ids=x).logits, again(input_ids=x).logits)


def test_cli_world_and_unknown_profile(tmp_path, capsys, monkeypatch):
    assert cli(["--profile", "smoke", "world", "--out", str(tmp_path / "w")]) == 0
    assert (tmp_path / "w" / "sft" / "train.jsonl").exists()
    with pytest.raises(SystemExit):  # argparse rejects it before anything runs
        cli(["--profile", "huge", "env"])
    monkeypatch.setattr("course_utils.profiles._override", None)
    monkeypatch.setenv("LLM_COURSE_PROFILE", "huge")
    assert cli(["env"]) == 2
    assert "unknown profile 'huge'" in capsys.readouterr().err


def test_cli_help_teaches(capsys):
    with pytest.raises(SystemExit):
        cli(["pretrain", "--help"])
    out = capsys.readouterr().out
    assert "raise this to keep the effective batch" in out and "--grad-accum" in out


def test_gpu_smoke_refuses_clearly_without_cuda(capsys):
    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    assert cli(["gpu-smoke"]) == 2
    assert "needs a CUDA GPU" in capsys.readouterr().err


def test_tracker_memory_and_tensorboard(tmp_path):
    t = Tracker("run", config={"lr": 1}, backends=("tensorboard",), log_dir=tmp_path)
    t.log({"loss": 2.0}, step=1)
    t.log({"loss": 1.0, "val_loss": 1.5}, step=2)
    t.finish()
    assert t.series("loss") == ([1, 2], [2.0, 1.0]) and t.series("val_loss") == ([2], [1.5])
    assert list((tmp_path / "tensorboard" / "run").glob("events.out.tfevents.*"))
    with pytest.raises(ValueError, match="unknown tracking backend"):
        Tracker("x", backends=("mlflowz",), log_dir=tmp_path)


def test_wandb_runs_offline_without_login(tmp_path, monkeypatch):
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    monkeypatch.delenv("WANDB_MODE", raising=False)
    monkeypatch.setenv("HOME", str(tmp_path))  # no ~/.netrc -> not logged in
    from course_utils.tracking import wandb_logged_in

    assert not wandb_logged_in()
    t = Tracker("offline-check", config={"lr": 1e-3}, backends=("wandb",), log_dir=tmp_path)
    assert t._wandb.settings.mode == "offline"
    t.log({"loss": 1.0}, step=1)
    t.finish()
    assert list((tmp_path / "wandb").glob("offline-run-*"))


def test_generate_greedy_is_deterministic_and_bounded(make_model, tokenizer):
    model = make_model()
    a = generate(model, tokenizer, ["Pip the"], max_new_tokens=5, temperature=0)
    b = generate(model, tokenizer, ["Pip the"], max_new_tokens=5, temperature=0)
    assert a == b and len(tokenizer(a[0], add_special_tokens=False)["input_ids"]) <= 5


def test_generate_stops_at_eos(make_model, tokenizer):
    model = make_model()
    with torch.no_grad():  # make EOS the only plausible next token
        model.lm_head.weight.zero_()
        model.lm_head.weight[tokenizer.eos_token_id] = 1.0
        model.model.norm.weight.fill_(1.0)
    model.config.tie_word_embeddings = False
    out = generate(model, tokenizer, ["Pip"], max_new_tokens=10, temperature=0)
    assert out == [""]


def test_bad_corpus_fails_before_writing_anything(tmp_path, monkeypatch):
    from course_utils import world
    from course_utils.errors import DataError
    from course_utils.pretrain import PretrainConfig, main

    real = world.pretrain_corpus

    def corpus_with_a_hole(seed, n, split="train"):
        docs = real(seed, n, split)
        docs[3] = {"id": docs[3]["id"], "text": None}
        return docs

    monkeypatch.setattr(world, "pretrain_corpus", corpus_with_a_hole)
    with pytest.raises(DataError, match="record 3 is None"):
        main(PretrainConfig.for_profile("smoke", progress=False), out_dir=tmp_path / "stage", log=lambda *_: None)
    assert not (tmp_path / "stage").exists()


def test_gpu_profile_code_path_runs_on_cpu(tmp_path, monkeypatch, tokenizer, make_model):
    """Everything of the gpu profile except the downloads: hub rows → mapper → hub tokenizer/model → train → save.

    The two network calls (datasets.load_dataset and from_pretrained of the hub id) are replaced by local
    stand-ins; every line of course code between them runs as it would on a GPU machine.
    """
    import datasets
    import transformers

    from course_utils.io import read_jsonl
    from course_utils.pretrain import PretrainConfig, main
    from course_utils.tokenizer import save_tokenizer

    rows = read_jsonl("tests/data/hub_samples/tinystories.jsonl") * 40
    asked = []

    def fake_load_dataset(name, split):
        asked.append((name, split))
        return [r for r in rows]

    local, local_tok = tmp_path / "hub-model", tmp_path / "hub-tokenizer"
    make_model().save_pretrained(local)
    save_tokenizer(tokenizer, local_tok)
    real_model_loader = transformers.AutoModelForCausalLM.from_pretrained
    real_tok_loader = transformers.AutoTokenizer.from_pretrained
    monkeypatch.setattr(datasets, "load_dataset", fake_load_dataset)
    monkeypatch.setattr(transformers.AutoModelForCausalLM, "from_pretrained",
                        lambda name, **kw: real_model_loader(local, **kw))
    monkeypatch.setattr(transformers.AutoTokenizer, "from_pretrained", lambda name, **kw: real_tok_loader(local_tok, **kw))

    cfg = PretrainConfig.for_profile("gpu", max_steps=3, warmup_steps=1, batch_size=2, block_size=32,
                                     eval_batches=1, eval_every=0, progress=False)
    assert cfg.grad_accum == 4 and cfg.precision == "auto"  # the gpu preset's accumulation is exercised
    metrics = main(cfg, out_dir=tmp_path / "stage", log=lambda *_: None)
    assert asked == [("roneneldan/TinyStories", "train[:20000]"), ("roneneldan/TinyStories", "validation[:500]")]
    assert metrics["steps"] == 3 and metrics["fact_recall_after"] is None  # no world facts for real data
    assert (tmp_path / "stage" / "final" / "model.safetensors").exists()


def test_pipeline_peft_flag_runs_the_sft_stage_with_lora(tmp_path):
    assert cli(["--profile", "smoke", "pipeline", "--out", str(tmp_path), "--trackers", "none", "--peft", "lora"]) == 0
    sft = json.loads((tmp_path / "report" / "metrics.json").read_text())["stages"]["sft"]
    assert sft["peft"] == "lora" and sft["config"]["peft"] == "lora"
    assert 0 < sft["trainable_parameters"] < 0.5 * sft["total_parameters"]
    assert "LoRA r=" in (tmp_path / "report" / "report.md").read_text()
    with pytest.raises(SystemExit):
        cli(["--profile", "smoke", "pipeline", "--peft", "dora"])


def test_cli_rm_stage_flags(capsys):
    with pytest.raises(SystemExit):
        cli(["rm", "--help"])
    out = capsys.readouterr().out
    assert "--label-noise" in out and "--noise-threshold" in out and "tiny world only" in out
    with pytest.raises(SystemExit):
        cli(["pipeline", "--help"])
    assert "--rm-label-noise" in capsys.readouterr().out


def test_rm_label_noise_flag_also_turns_on_the_filter(monkeypatch):
    seen = {}
    monkeypatch.setattr("course_utils.pipeline.run_pipeline", lambda *a, **k: seen.update(k) or {})
    cli(["--profile", "smoke", "pipeline", "--rm-label-noise", "0.2"])
    assert seen["rm_overrides"] == {"label_noise": 0.2, "noise_filter": True}
    cli(["--profile", "smoke", "pipeline", "--rm-label-noise", "0"])
    assert seen["rm_overrides"] == {"label_noise": 0.0, "noise_filter": False}
