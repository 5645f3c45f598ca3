"""SFT: formatting, loss masks, truncation, padding, the loss, the loop and the stage."""

import pytest
import torch

from course_utils.chat import encode, pad_batch, pad_ids, render, to_messages
from course_utils.errors import ConfigError, DataError
from course_utils.objectives import IGNORE_INDEX
from course_utils.sft import (
    SFTConfig, encode_records, evaluate, follows_format, generate_answers, sft_loss, train,
)

CONV = [{"role": "user", "content": "Where does Pip live?"}, {"role": "assistant", "content": "Pip lives in Mossbrook."}]
MULTI = [{"role": "system", "content": "Be brief."}, *CONV,
         {"role": "user", "content": "And Bram?"}, {"role": "assistant", "content": "Bram lives in Fernhill."}]


def labelled_text(enc, tok):
    return tok.decode([t for t, lab in zip(enc.input_ids, enc.labels) if lab != IGNORE_INDEX])


@pytest.mark.parametrize("record,msg", [
    ({"messages": [{"role": "robot", "content": "hi"}, {"role": "assistant", "content": "x"}]}, "row 7, message 0: unknown role 'robot'"),
    ({"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "  "}]}, "row 7, message 1: empty assistant turn"),
    ({"text": "hello"}, "row 7: needs 'messages' or both 'prompt' and 'response'"),
    ({"messages": [{"role": "user", "content": "hi"}]}, "row 7: the last message must be the assistant's"),
    ({"messages": [{"role": "user", "content": 3}, {"role": "assistant", "content": "x"}]}, "content must be a string"),
    ({"messages": []}, "non-empty list"),
])
def test_bad_conversations_name_the_row(record, msg):
    with pytest.raises(DataError, match=msg):
        to_messages(record, 7)


def test_prompt_response_records_become_two_messages():
    assert to_messages({"prompt": "a", "response": "b"}) == [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}]


def test_chatml_equals_the_tokenizers_own_chat_template(tokenizer):
    for conv in (CONV, MULTI):
        assert render(conv, tokenizer, "chatml")[0] == tokenizer.apply_chat_template(conv, tokenize=False)
    prompt = render(CONV[:1], tokenizer, "chatml", add_generation_prompt=True)[0]
    assert prompt == tokenizer.apply_chat_template(CONV[:1], tokenize=False, add_generation_prompt=True)


def test_loss_only_on_assistant_tokens_including_the_end_markers(tokenizer):
    enc = encode(CONV, tokenizer, "chatml")
    assert labelled_text(enc, tokenizer) == "Pip lives in Mossbrook.<|im_end|><|eos|>"
    assert enc.input_ids[0] == tokenizer.bos_token_id and enc.labels[0] == IGNORE_INDEX
    alp = encode(CONV, tokenizer, "alpaca")
    assert labelled_text(alp, tokenizer) == "Pip lives in Mossbrook.<|eos|>"
    assert tokenizer.decode(alp.input_ids).startswith("<|bos|>### Instruction:\nWhere does Pip live?")


def test_every_assistant_turn_of_a_multi_turn_conversation_is_learned(tokenizer):
    enc = encode(MULTI, tokenizer)
    assert labelled_text(enc, tokenizer) == ("Pip lives in Mossbrook.<|im_end|><|eos|>"
                                             "Bram lives in Fernhill.<|im_end|><|eos|>")


def test_the_two_classic_bugs_are_switches(tokenizer):
    no_eos = encode(CONV, tokenizer, add_eos=False)
    assert tokenizer.eos_token_id not in no_eos.input_ids
    on_prompt = encode(CONV, tokenizer, loss_on_prompt=True)
    assert on_prompt.labels == on_prompt.input_ids


def test_truncation_cuts_the_prompt_from_the_left_and_keeps_the_response(tokenizer):
    long_prompt = [{"role": "user", "content": "blah " * 40 + "Where does Pip live?"}, CONV[1]]
    full = encode(long_prompt, tokenizer)
    cut = encode(long_prompt, tokenizer, max_length=30)
    assert len(cut.input_ids) == 30 and cut.truncated and not full.truncated
    assert cut.input_ids[0] == tokenizer.bos_token_id  # BOS survives
    assert cut.input_ids[-20:] == full.input_ids[-20:]  # the end (prompt tail + response) is intact
    assert labelled_text(cut, tokenizer) == labelled_text(full, tokenizer)


def test_response_longer_than_the_context_is_an_error_or_dropped(tokenizer):
    long = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "word " * 80}]
    with pytest.raises(DataError, match="row 3: the response alone is .* longer than the context of 32"):
        encode(long, tokenizer, max_length=32, row=3)
    records = [{"messages": CONV}, {"messages": long}, {"prompt": "a", "response": "b"}]
    with pytest.raises(DataError, match="row 1"):
        encode_records(records, tokenizer, SFTConfig.for_profile("smoke", max_length=32, on_overflow="error"))
    ex, counts = encode_records(records, tokenizer, SFTConfig.for_profile("smoke", max_length=32, on_overflow="drop"))
    assert len(ex) == 2 and counts["rows"] == 3 and counts["dropped"] == 1


def test_padding_sides(tokenizer):
    a, b = encode(CONV, tokenizer), encode([{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello."}], tokenizer)
    pad = tokenizer.pad_token_id
    right, left = pad_batch([a, b], pad, "right"), pad_batch([a, b], pad, "left")
    n = len(a.input_ids) - len(b.input_ids)
    assert n > 0
    assert right["input_ids"][1, -n:].eq(pad).all() and right["attention_mask"][1, -n:].eq(0).all()
    assert left["input_ids"][1, :n].eq(pad).all() and left["attention_mask"][1, :n].eq(0).all()
    assert right["labels"][1, -n:].eq(IGNORE_INDEX).all() and left["labels"][1, :n].eq(IGNORE_INDEX).all()
    for side, batch in (("right", right), ("left", left)):
        ids, mask = pad_ids([a.input_ids, b.input_ids], pad, side)
        assert torch.equal(ids, batch["input_ids"]) and torch.equal(mask, batch["attention_mask"])
    with pytest.raises(ConfigError):
        pad_batch([a], pad, "middle")


def test_sft_loss_equals_transformers_loss(make_model, tokenizer):
    batch = pad_batch([encode(CONV, tokenizer), encode(MULTI, tokenizer)], tokenizer.pad_token_id)
    model = make_model()
    ours = sft_loss(model, batch)
    hf = model(**batch).loss  # transformers shifts labels internally and skips -100
    assert torch.allclose(ours, hf, atol=1e-6)


def test_sft_training_accumulation_invariant_and_learning(make_model, tokenizer):
    from course_utils.world import sft_examples

    records = sft_examples(0, 64, "train")
    cfg = SFTConfig.for_profile("smoke")
    examples, _ = encode_records(records, tokenizer, cfg)
    a, b = make_model(), make_model()
    common = dict(max_steps=2, warmup_steps=1, progress=False, log_every=1)
    ra = train(SFTConfig.for_profile("smoke", batch_size=8, grad_accum=1, **common), a, tokenizer, examples)
    rb = train(SFTConfig.for_profile("smoke", batch_size=2, grad_accum=4, **common), b, tokenizer, examples)
    assert ra["final_loss"] == pytest.approx(rb["final_loss"], abs=1e-5)
    for pa, pb in zip(a.parameters(), b.parameters()):
        assert torch.allclose(pa, pb, atol=1e-5)
    hist = train(SFTConfig.for_profile("smoke", max_steps=30, lr=1e-2, progress=False, log_every=1), make_model(), tokenizer,
                 examples)["history"]
    assert hist[-1]["loss"] < 0.8 * hist[0]["loss"]


def test_sft_batches_follow_group_by_length(make_model, tokenizer, monkeypatch):
    import course_utils.sft as S
    from course_utils.world import sft_examples

    examples, _ = encode_records(sft_examples(0, 96, "train"), tokenizer, SFTConfig.for_profile("smoke"))
    real, spread = S.pad_batch, {}
    for group in (True, False):
        seen = []
        monkeypatch.setattr(S, "pad_batch", lambda rows, *a, **k: seen.append([len(r.input_ids) for r in rows])
                            or real(rows, *a, **k))
        cfg = SFTConfig.for_profile("smoke", batch_size=8, max_steps=6, warmup_steps=1, progress=False,
                                    group_by_length=group)
        train(cfg, make_model(), tokenizer, examples)
        spread[group] = sum(max(b) - min(b) for b in seen) / len(seen)  # padding a batch's shorter rows carry
    assert spread[True] < 0.5 * spread[False], spread


def test_left_padded_batch_generation_equals_one_by_one(make_model, tokenizer):
    from course_utils.world import sft_examples

    model = make_model()
    records = sft_examples(0, 6, "test")
    batched = generate_answers(model, tokenizer, records, max_new_tokens=6, batch_size=6)
    single = [generate_answers(model, tokenizer, [r], max_new_tokens=6)[0] for r in records]
    assert batched == single


def test_follows_format():
    assert follows_format({"raw": "Pip lives in Mossbrook.<|im_end|>", "stopped": True}, "chatml")
    assert not follows_format({"raw": "Pip lives in Mossbrook.<|im_end|>", "stopped": False}, "chatml")
    assert not follows_format({"raw": "Pip.<|im_end|>\n<|im_start|>user", "stopped": True}, "chatml")
    assert follows_format({"raw": "Pip lives in Mossbrook.", "stopped": True}, "alpaca")
    assert not follows_format({"raw": "Pip.\n\n### Instruction: more", "stopped": True}, "alpaca")


def test_evaluate_judges_with_the_ground_truth(make_model, tokenizer):
    from course_utils.world import sft_examples

    records = sft_examples(0, 8, "test")
    ev = evaluate(make_model(), tokenizer, records, SFTConfig.for_profile("smoke"))
    assert set(ev) >= {"accuracy", "true_score", "format_compliance", "accuracy_unseen_phrasing", "accuracy_by_family"}
    assert 0 <= ev["accuracy"] <= 1 and len(ev["answers"]) == 8


def test_config_validation():
    with pytest.raises(ConfigError, match="chat_format"):
        SFTConfig.for_profile("smoke", chat_format="vicuna").validate()
    with pytest.raises(ConfigError, match="prompt_templates"):
        SFTConfig.for_profile("smoke", prompt_templates="some").validate()
    with pytest.raises(ConfigError, match="on_overflow"):
        SFTConfig.for_profile("smoke", on_overflow="ignore").validate()
    gpu = SFTConfig.for_profile("gpu")
    assert gpu.max_length == 512 and gpu.on_overflow == "drop" and gpu.lr == 2e-5


def test_sft_stage_end_to_end_smoke(tmp_path):
    from course_utils.sft import main
    from course_utils.stages import load_stage

    metrics = main(SFTConfig.for_profile("smoke", progress=False), out_dir=tmp_path / "sft", log=lambda *_: None)
    assert (tmp_path / "sft" / "final" / "model.safetensors").exists()
    assert {"accuracy", "format_compliance"} <= set(metrics["after"]) and metrics["steps"] == 20
    assert len(metrics["samples"]) == 6
    model, tok = load_stage("base", "smoke", build_if_missing=False)  # the base was built on the way
    assert model is not None


def test_gpu_profile_sft_path_runs_on_cpu(monkeypatch, tmp_path, make_model, tokenizer):
    """The gpu profile's SFT code on CPU: alpaca rows → mapper → ChatML → train → format compliance (no judge)."""
    import datasets

    from course_utils.io import read_jsonl
    from course_utils.sft import main

    rows = [r for r in read_jsonl("tests/data/hub_samples/alpaca.jsonl")] * 30
    asked = []

    def fake_load_dataset(name, split):
        asked.append((name, split))
        return rows

    monkeypatch.setattr(datasets, "load_dataset", fake_load_dataset)
    cfg = SFTConfig.for_profile("gpu", max_steps=2, warmup_steps=1, batch_size=2, eval_examples=4,
                                max_new_tokens=4, progress=False)
    assert cfg.grad_accum == 4 and cfg.on_overflow == "drop"
    metrics = main(cfg, out_dir=tmp_path / "sft", log=lambda *_: None, base=(make_model(), tokenizer))
    assert asked and asked[0][0] == "yahma/alpaca-cleaned"
    assert "format_compliance" in metrics["after"] and "accuracy" not in metrics["after"]  # real data has no judge
    assert metrics["steps"] == 2 and (tmp_path / "sft" / "final" / "model.safetensors").exists()
