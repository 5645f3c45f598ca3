"""The SFT stage's one-flag LoRA / QLoRA variants (chapter 04)."""

from dataclasses import replace

import pytest
import torch

from course_utils.chat import pad_batch
from course_utils.errors import ConfigError
from course_utils.quant import linear_weight_bytes
from course_utils.sft import SFTConfig, apply_peft, build_records, encode_records, main, merged_model, train

# widths that are multiples of 64: bitsandbytes' CPU 4-bit kernel is exact there (see quant.bnb_cpu_dequant_matches)
SIZE = dict(hidden_size=64, intermediate_size=128)


def _cfg(**kw):
    return SFTConfig.for_profile("smoke", progress=False, max_steps=4, **kw)


def _batch(tokenizer, cfg, n=4):
    examples, _ = encode_records(build_records(cfg)[0][:n], tokenizer, cfg)
    return examples, pad_batch(examples, tokenizer.pad_token_id, "right")


def test_lora_trains_only_the_adapters_and_the_merged_model_computes_the_same(make_model, tokenizer):
    cfg = _cfg(peft="lora", lora_r=4, lora_targets="q_proj,v_proj")
    base = make_model(**SIZE)
    frozen = {k: v.clone() for k, v in base.state_dict().items()}
    model = apply_peft(base, cfg)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(".lora_A." in n or ".lora_B." in n for n in trainable)
    assert all("q_proj" in n or "v_proj" in n for n in trainable)
    examples, batch = _batch(tokenizer, cfg)
    train(cfg, model, tokenizer, examples * 8)
    for name, p in model.get_base_model().state_dict().items():  # the base weights did not move
        key = name.replace(".base_layer", "")
        if key in frozen:
            assert torch.equal(p, frozen[key]), name
    with torch.no_grad():
        before_merge = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        merged = merged_model(model, cfg)
        after_merge = merged(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    assert type(merged).__name__ == "LlamaForCausalLM"
    assert (before_merge - after_merge).abs().max() < 1e-5
    assert not torch.equal(merged.model.layers[0].self_attn.q_proj.weight, frozen["model.layers.0.self_attn.q_proj.weight"])


def test_qlora_stage_runs_on_cpu_with_4bit_weights_and_saves_a_plain_model(make_model, tokenizer, tmp_path):
    pytest.importorskip("bitsandbytes")
    from course_utils.quant import bnb_4bit_available

    if not bnb_4bit_available("cpu")[0]:
        pytest.skip("bitsandbytes cannot run 4-bit here")
    cfg = _cfg(peft="qlora", lora_r=4)
    base = make_model(**SIZE)
    fp32_bytes = sum(linear_weight_bytes(base).values())
    q = apply_peft(base, cfg)
    q_bytes = sum(v for k, v in linear_weight_bytes(q).items() if "lora_" not in k)  # the base layers only
    assert q_bytes <= 0.35 * fp32_bytes
    assert any(type(m).__name__ == "Linear4bit" for m in q.modules())
    metrics = main(cfg, out_dir=tmp_path / "sft", log=lambda *_: None, base=(base, tokenizer))
    assert metrics["peft"] == "qlora" and metrics["steps"] == 4
    assert 0 < metrics["trainable_parameters"] < 0.5 * metrics["total_parameters"]
    from course_utils.stages import load_model_dir

    saved, _ = load_model_dir(tmp_path / "sft" / "final")
    assert not any(type(m).__name__ == "Linear4bit" for m in saved.modules())  # merged into the fp32 base


def test_qlora_adapter_merged_into_the_fp32_base_approximates_the_4bit_model(make_model, tokenizer):
    pytest.importorskip("bitsandbytes")
    cfg = _cfg(peft="qlora", lora_r=4)
    base = make_model(**SIZE)
    q = apply_peft(base, cfg)
    for n, p in q.named_parameters():
        if "lora_B" in n:
            torch.nn.init.normal_(p, std=0.05)  # a non-trivial adapter
    _, batch = _batch(tokenizer, cfg)
    with torch.no_grad():
        plain = base(input_ids=batch["input_ids"]).logits
        quantized = q(input_ids=batch["input_ids"]).logits
        merged = merged_model(q, cfg, full_precision_base=base)(input_ids=batch["input_ids"]).logits  # merges into `base`
    # the only difference left is NF4 rounding of the base weights, far smaller than the adapter's effect
    assert (quantized - merged).abs().mean() < 0.5 * (merged - plain).abs().mean()


@pytest.mark.parametrize("kw,msg", [
    (dict(peft="adapters"), "peft must be one of"),
    (dict(peft="lora", lora_r=0), "lora_r > 0"),
    (dict(peft="lora", lora_dropout=1.0), "lora_dropout"),
    (dict(peft="lora", lora_steps=-1), "lora_steps must be >= 0"),
])
def test_bad_peft_settings_are_rejected(kw, msg):
    with pytest.raises(ConfigError, match=msg):
        _cfg(**kw).validate()


def test_lora_lr_and_steps_replace_lr_and_max_steps_only_with_peft_on():
    from course_utils.sft import effective_config

    cfg = _cfg(lora_lr=0.5, lora_steps=7)
    assert effective_config(cfg) == cfg  # full fine-tuning ignores them
    on = effective_config(replace(cfg, peft="lora"))
    assert (on.lr, on.max_steps) == (0.5, 7)
    kept = effective_config(_cfg(peft="lora"))  # 0 = keep the stage's own values
    assert (kept.lr, kept.max_steps) == (_cfg().lr, 4)


def test_a_lora_target_that_matches_nothing_is_a_clear_error(make_model):
    with pytest.raises(ConfigError, match="lora_targets='nope_proj'"):
        apply_peft(make_model(), _cfg(peft="lora", lora_targets="nope_proj"))


def test_qlora_without_a_working_bitsandbytes_is_a_clear_error(make_model, monkeypatch):
    from course_utils import quant

    monkeypatch.setattr(quant, "bnb_4bit_available", lambda device="cpu": (False, "bitsandbytes cannot be imported"))
    with pytest.raises(ConfigError, match="4-bit loading needs a working bitsandbytes"):
        apply_peft(make_model(), _cfg(peft="qlora"))


def test_lora_also_trains_the_chat_token_rows_and_only_those(make_model, tokenizer):
    from course_utils.tokenizer import IM_END, IM_START

    cfg = _cfg(peft="lora", lora_r=4)
    base = make_model(**SIZE)
    emb_before = base.get_input_embeddings().weight.detach().clone()
    model = apply_peft(base, cfg, tokenizer)
    examples, _ = _batch(tokenizer, cfg)
    train(cfg, model, tokenizer, examples * 8)
    merged = merged_model(model, cfg)
    changed = (merged.get_input_embeddings().weight - emb_before).abs().sum(-1).nonzero().flatten().tolist()
    chat = sorted({tokenizer.bos_token_id, tokenizer.eos_token_id, *tokenizer.convert_tokens_to_ids([IM_START, IM_END])})
    assert changed == chat  # <|im_end|> and EOS must become predictable; every other row stays frozen
    assert merged.lm_head.weight is merged.get_input_embeddings().weight  # still tied after merging


def test_gpu_smoke_qlora_path_runs_on_cpu(make_model, tokenizer, tmp_path, monkeypatch):
    """gpu-smoke's QLoRA check with the two downloads (Alpaca rows, the hub model) replaced by local stand-ins."""
    pytest.importorskip("bitsandbytes")
    from course_utils.quant import bnb_4bit_available

    if not bnb_4bit_available("cpu")[0]:
        pytest.skip("bitsandbytes cannot run 4-bit here")
    import datasets
    import transformers

    from course_utils.gpu_smoke import qlora_smoke
    from course_utils.io import read_jsonl
    from course_utils.profiles import get_profile

    rows = read_jsonl("tests/data/hub_samples/alpaca.jsonl") * 20
    monkeypatch.setattr(datasets, "load_dataset", lambda name, split: list(rows))
    local = tmp_path / "hub-model"
    make_model(context_length=512, **SIZE).save_pretrained(local)
    asked, real_loader = [], transformers.AutoModelForCausalLM.from_pretrained

    def fake_from_pretrained(name, **kw):
        asked.append((name, type(kw.get("quantization_config")).__name__))
        return real_loader(local, **kw)

    monkeypatch.setattr(transformers.AutoModelForCausalLM, "from_pretrained", fake_from_pretrained)
    torch.manual_seed(0)
    out = qlora_smoke(get_profile("gpu").base_model, tokenizer, steps=6, n_rows=64)
    assert asked == [(get_profile("gpu").base_model, "BitsAndBytesConfig")]  # the hub id, loaded in 4 bit
    assert out["steps"] == 6 and out["loss_after"] < out["loss_before"]
    # 4 bits per weight + one 8-bit absmax per 64 + fixed per-layer state (code table, nested absmax), vs 16 bits:
    # ~0.27 on a real model, a little more on these 8k-weight layers where the fixed part weighs more
    assert 0.25 <= out["ratio_4bit"] <= 0.40
    assert 0 < out["trainable"] < 0.5 * out["total"]  # r=16 on 64-wide layers: a large share here, ~1% on 135M
