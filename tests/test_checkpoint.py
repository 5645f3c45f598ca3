import json
import random

import numpy as np
import pytest
import torch

from course_utils import checkpoint as ckpt
from course_utils.errors import CheckpointError
from course_utils.pretrain import PretrainConfig, train
from course_utils.training import make_optimizer

CFG = dict(max_steps=12, warmup_steps=2, eval_every=0, progress=False, log_every=1, block_size=32)


def _trained(make_model, tokenizer, packed, tmp_path):
    model = make_model()
    opt = make_optimizer(model, 1e-3, 0.1)
    x = torch.randint(0, 300, (2, 16))
    model(input_ids=x, labels=x).loss.backward()
    opt.step()
    path = ckpt.save_checkpoint(tmp_path / "step_000001", model, opt, step=1, state={"note": "hi"}, tokenizer=tokenizer)
    return model, opt, path


def test_roundtrip_restores_weights_optimizer_and_rng(make_model, tokenizer, packed, tmp_path):
    model, opt, path = _trained(make_model, tokenizer, packed, tmp_path)
    expected_next = (torch.rand(3), random.random(), np.random.rand())
    fresh = make_model(seed=99)
    fresh_opt = make_optimizer(fresh, 1e-3, 0.1)
    torch.manual_seed(1234)  # scramble the RNGs
    state = ckpt.load_checkpoint(path, fresh, fresh_opt)
    assert state["step"] == 1 and state["note"] == "hi"
    for k, v in model.state_dict().items():
        assert torch.equal(v, fresh.state_dict()[k]), k
    for pa, pb in zip(model.parameters(), fresh.parameters()):
        sa, sb = opt.state[pa], fresh_opt.state[pb]
        assert sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)
    got_next = (torch.rand(3), random.random(), np.random.rand())
    assert torch.equal(expected_next[0], got_next[0]) and expected_next[1:] == got_next[1:]


def test_only_safe_formats_on_disk(make_model, tokenizer, packed, tmp_path):
    _, _, path = _trained(make_model, tokenizer, packed, tmp_path)
    suffixes = {p.suffix for p in path.iterdir()}
    assert suffixes <= {".safetensors", ".json", ".jinja"}, suffixes  # never a pickle (.bin/.pt)
    manifest = json.loads((path / "manifest.json").read_text())
    assert {"model.safetensors", "optimizer.safetensors", "rng.safetensors", "trainer_state.json"} <= set(manifest)


def test_checkpoint_loads_with_from_pretrained(make_model, tokenizer, packed, tmp_path):
    from transformers import AutoModelForCausalLM

    model, _, path = _trained(make_model, tokenizer, packed, tmp_path)
    again = AutoModelForCausalLM.from_pretrained(path)
    x = torch.randint(0, 300, (1, 8))
    assert torch.allclose(model(input_ids=x).logits, again(input_ids=x).logits, atol=1e-6)


@pytest.mark.parametrize("victim", ["model.safetensors", "optimizer.safetensors", "trainer_state.json"])
def test_missing_file_is_named(make_model, tokenizer, packed, tmp_path, victim):
    _, _, path = _trained(make_model, tokenizer, packed, tmp_path)
    (path / victim).unlink()
    with pytest.raises(CheckpointError, match=f"missing {victim}"):
        ckpt.load_checkpoint(path, make_model())


@pytest.mark.parametrize("victim", ["model.safetensors", "optimizer.json"])
def test_corrupt_file_is_named(make_model, tokenizer, packed, tmp_path, victim):
    _, _, path = _trained(make_model, tokenizer, packed, tmp_path)
    data = bytearray((path / victim).read_bytes())
    data[len(data) // 2] ^= 0xFF  # flip one byte
    (path / victim).write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match=f"{victim} is corrupt"):
        ckpt.load_checkpoint(path, make_model())


def test_trainer_state_reads_a_verified_checkpoints_state(make_model, tokenizer, packed, tmp_path):
    _, _, path = _trained(make_model, tokenizer, packed, tmp_path)
    state = ckpt.trainer_state(path)
    assert state["step"] == 1 and state["note"] == "hi"
    (path / "trainer_state.json").write_text(json.dumps({**state, "step": 2}))  # edited after saving
    with pytest.raises(CheckpointError, match="trainer_state.json is corrupt"):
        ckpt.trainer_state(path)


def test_folder_without_manifest(tmp_path, make_model):
    (tmp_path / "x").mkdir()
    with pytest.raises(CheckpointError, match="no manifest.json"):
        ckpt.load_checkpoint(tmp_path / "x", make_model())
    with pytest.raises(CheckpointError, match="does not exist"):
        ckpt.load_checkpoint(tmp_path / "nope", make_model())


def test_crash_during_save_leaves_previous_checkpoint_intact(make_model, tokenizer, packed, tmp_path, monkeypatch):
    model, opt, path = _trained(make_model, tokenizer, packed, tmp_path)
    before = (path / "model.safetensors").read_bytes()

    def boom(*a, **k):
        raise OSError("disk full")

    monkeypatch.setattr(ckpt, "save_file", boom)
    with pytest.raises(OSError, match="disk full"):
        ckpt.save_checkpoint(path, make_model(seed=5), opt, step=2)
    assert (path / "model.safetensors").read_bytes() == before
    ckpt.verify_checkpoint(path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["step_000001"]  # no half-written folder


def test_resume_ends_exactly_like_an_uninterrupted_run(make_model, tokenizer, packed, tmp_path):
    cfg = PretrainConfig.for_profile("smoke", **CFG)
    straight = train(cfg, make_model(), tokenizer, packed[0])

    first = train(cfg, make_model(), tokenizer, packed[0], out_dir=tmp_path, stop_at=5)
    assert first["steps"] == 5 and ckpt.latest_checkpoint(tmp_path).name == "step_000005"
    torch.manual_seed(777)  # anything the process does in between must not matter
    resumed = train(cfg, make_model(seed=42), tokenizer, packed[0], out_dir=tmp_path, resume=True)
    assert resumed["steps"] == cfg.max_steps
    assert abs(resumed["final_loss"] - straight["final_loss"]) <= 1e-6
    assert [r["step"] for r in resumed["history"]] == list(range(1, cfg.max_steps + 1))


def test_resume_of_mlm_replays_the_same_masks(make_model, tokenizer, packed, tmp_path):
    cfg = PretrainConfig.for_profile("smoke", objective="mlm", **CFG)
    straight = train(cfg, make_model(), tokenizer, packed[0])
    train(cfg, make_model(), tokenizer, packed[0], out_dir=tmp_path, stop_at=7)
    resumed = train(cfg, make_model(), tokenizer, packed[0], out_dir=tmp_path, resume=True)
    assert abs(resumed["final_loss"] - straight["final_loss"]) <= 1e-6


def test_same_seed_same_metrics_different_seed_differs(make_model, tokenizer, packed):
    cfg = PretrainConfig.for_profile("smoke", **CFG)
    a = train(cfg, make_model(), tokenizer, packed[0])["history"]
    b = train(cfg, make_model(), tokenizer, packed[0])["history"]
    strip = lambda h: [{k: v for k, v in r.items() if k != "tokens_per_s"} for r in h]  # noqa: E731 (timing varies)
    assert strip(a) == strip(b)
    c = train(PretrainConfig.for_profile("smoke", seed=1, **CFG), make_model(seed=1), tokenizer, packed[0])["history"]
    assert strip(a) != strip(c)


def test_only_the_last_checkpoints_are_kept(make_model, tokenizer, packed, tmp_path):
    cfg = PretrainConfig.for_profile("smoke", ckpt_every=3, **CFG)
    train(cfg, make_model(), tokenizer, packed[0], out_dir=tmp_path)
    assert sorted(p.name for p in tmp_path.glob("step_*")) == ["step_000009", "step_000012"]
