"""``llm-course gpu-smoke``: the gpu profile, briefly, on a CUDA machine.

Four checks on the profile's real base model, each printing what it measured:

1. continued pretraining in bf16 for a few steps on real TinyStories text: held-out perplexity
   before/after, tokens/s, peak memory;
2. QLoRA SFT (chapter 04): the same base loaded in 4-bit NF4 through ``BitsAndBytesConfig``, LoRA
   added by PEFT, a few steps on Alpaca rows: 4-bit vs bf16 bytes of the Linear weights, trainable
   parameters, loss before/after, peak memory;
3. reward model (chapter 05): the continued-pretrained model with a score head, a few Bradley–Terry steps on
   hh-rlhf pairs: pairwise loss before/after on a fixed batch, held-out pairwise accuracy;
4. RLHF (chapters 06–07): a few PPO steps of the model against that reward model on hh-rlhf prompts (RM score,
   KL, the reference's bit-identity), then a few DPO steps on hh-rlhf pairs (loss before/after).

Needs CUDA and network access to the Hugging Face Hub (first run only). :func:`qlora_smoke` takes the
model source as an argument, so the tests run its code path on CPU with a local folder; :func:`rm_smoke` and
:func:`rlhf_smoke` take model objects, likewise.
"""

from __future__ import annotations

import time

import torch

from .errors import ConfigError


def run_gpu_smoke(steps: int = 20) -> int:
    if not torch.cuda.is_available():
        raise ConfigError("gpu-smoke needs a CUDA GPU; this machine has none (use the tiny profile here)")
    from transformers import AutoModelForCausalLM

    from .pretrain import PretrainConfig, build_data, evaluate, train
    from .profiles import get_profile

    p = get_profile("gpu")
    cfg = PretrainConfig.for_profile("gpu", max_steps=steps, warmup_steps=max(1, steps // 10), eval_every=0)
    t0 = time.perf_counter()
    tokenizer, train_ds, val_ds, _ = build_data(cfg)
    model = AutoModelForCausalLM.from_pretrained(p.base_model, dtype=torch.float32, trust_remote_code=False).cuda()
    load_s = time.perf_counter() - t0
    torch.cuda.reset_peak_memory_stats()
    before = evaluate(model, val_ds, cfg.batch_size, 8, torch.bfloat16)
    result = train(cfg, model, tokenizer, train_ds)
    after = evaluate(model, val_ds, cfg.batch_size, 8, torch.bfloat16)
    peak = torch.cuda.max_memory_allocated() / 2**30
    print(f"gpu-smoke: {p.base_model} on {torch.cuda.get_device_name(0)}; data+model load {load_s:.0f} s")
    print(f"  held-out perplexity {before['ppl']:.2f} -> {after['ppl']:.2f} after {result['steps']} steps")
    print(f"  {result['tokens_per_s']:.0f} tokens/s, peak memory {peak:.1f} GiB")
    r = rm_smoke(model, tokenizer, steps)
    print(f"  reward model on hh-rlhf: pairwise loss {r['loss_before']:.3f} -> {r['loss_after']:.3f} after "
          f"{r['steps']} steps ({r['seconds']:.0f} s); held-out pairwise accuracy {r['accuracy']:.0%} "
          f"on {r['pairs']} pairs")
    torch.cuda.reset_peak_memory_stats()
    x = rlhf_smoke(model, tokenizer, r["model"], steps=max(2, steps // 2))
    print(f"  PPO against that RM on hh-rlhf prompts: RM score {x['rm_first']:+.3f} -> {x['rm_last']:+.3f}, KL "
          f"{x['kl_last']:.3f} after {x['ppo_steps']} steps ({x['ppo_seconds']:.0f} s; reference unchanged: "
          f"{x['reference_unchanged']}; cut without EOS {x['counts']['truncated']} of {x['counts']['responses']})")
    print(f"  DPO on hh-rlhf pairs: loss {x['dpo_loss_first']:.3f} -> {x['dpo_loss_last']:.3f} after {x['dpo_steps']} "
          f"steps ({x['dpo_seconds']:.0f} s); peak memory {torch.cuda.max_memory_allocated() / 2**30:.1f} GiB")
    del model, r
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()
    q = qlora_smoke(p.base_model, tokenizer, steps)
    print(f"  QLoRA: Linear weights {q['linear_bytes_4bit'] / 2**20:.1f} MiB in NF4 vs "
          f"{q['linear_bytes_16bit'] / 2**20:.1f} MiB in 16 bit ({q['ratio_4bit']:.0%}); "
          f"{q['trainable']:,} trainable of {q['total']:,} ({q['trainable'] / q['total']:.2%})")
    print(f"  QLoRA SFT loss {q['loss_before']:.3f} -> {q['loss_after']:.3f} after {q['steps']} steps "
          f"({q['seconds']:.0f} s), peak memory {torch.cuda.max_memory_allocated() / 2**30:.1f} GiB")
    return 0


def qlora_smoke(model_source, tokenizer, steps: int = 20, n_rows: int = 256) -> dict:
    """Load ``model_source`` (a folder or hub id) in 4-bit, add LoRA, train ``steps`` SFT steps on Alpaca rows.

    The loss before/after is measured on the same fixed batch of training rows (a smoke check, not an
    evaluation): it must go down if the 4-bit forward, the LoRA backward and the optimizer all work.
    """
    import bitsandbytes as bnb

    from .chat import pad_batch
    from .lora import trainable_parameters
    from .quant import linear_weight_bytes
    from .sft import SFTConfig, apply_peft, build_records, encode_records, sft_loss, train
    from .tokenizer import require_pad_token

    cfg = SFTConfig.for_profile("gpu", peft="qlora", max_steps=steps, warmup_steps=max(1, steps // 10),
                                eval_examples=8, progress=False)
    records, _ = build_records(cfg)
    examples, _ = encode_records(records[:n_rows], tokenizer, cfg)
    model = apply_peft(model_source, cfg, tokenizer)
    # the quantized layers (bitsandbytes Linear4bit; PEFT's wrappers only point at them): packed codes + quant
    # states, against the same weights in 16 bit
    quantized = {name: m for name, m in model.named_modules() if isinstance(m, bnb.nn.Linear4bit)}
    if not quantized:
        raise ConfigError("the 4-bit load produced no quantized layer")
    stored = linear_weight_bytes(model)
    bytes_4bit = sum(stored[name] for name in quantized)
    bytes_16 = sum(2 * m.weight.quant_state.shape.numel() for m in quantized.values())
    device = next(model.parameters()).device
    pad = require_pad_token(tokenizer)
    probe = {k: v.to(device) for k, v in pad_batch(examples[: cfg.batch_size], pad, "right").items()}
    with torch.no_grad():
        loss_before = sft_loss(model, probe).item()
    result = train(cfg, model, tokenizer, examples)
    with torch.no_grad():
        loss_after = sft_loss(model, probe).item()
    trainable, total = trainable_parameters(model)
    return {"linear_bytes_4bit": bytes_4bit, "linear_bytes_16bit": bytes_16,
            "ratio_4bit": bytes_4bit / bytes_16, "trainable": trainable, "total": total, "loss_before": loss_before,
            "loss_after": loss_after, "steps": result["steps"], "seconds": result["seconds"]}


def rm_smoke(model, tokenizer, steps: int = 20, n_rows: int = 256, eval_pairs: int = 64, **overrides) -> dict:
    """A reward model from ``model`` (score head added, ``model`` untouched), ``steps`` steps on hh-rlhf pairs.

    As in :func:`qlora_smoke`, the loss before/after is measured on one fixed batch of training pairs; the
    accuracy on ``eval_pairs`` held-out pairs after so few steps is a number to read, not a target.
    ``overrides`` change the gpu preset's ``RewardConfig`` (the tests raise the LR for a tiny model).
    """
    from .reward import RewardConfig, build_pairs, clean_pairs, collate_pairs, encode_pairs, evaluate, loss_sum, \
        reward_model_from, train
    from .tokenizer import require_pad_token

    cfg = RewardConfig.for_profile("gpu", **{"max_steps": steps, "warmup_steps": max(1, steps // 10),
                                             "eval_pairs": eval_pairs, "progress": False, **overrides})
    rows, test_rows = build_pairs(cfg)
    kept, _ = clean_pairs(rows[:n_rows])
    pairs, _ = encode_pairs(kept, tokenizer, cfg)
    rm = reward_model_from(model, tokenizer, cfg.seed)
    device = next(rm.parameters()).device
    probe = {k: v.to(device) for k, v in collate_pairs(pairs[: cfg.batch_size], require_pad_token(tokenizer)).items()}

    def probe_loss() -> float:
        with torch.no_grad():
            s, n = loss_sum(rm.eval(), probe)
        return (s / n).item()

    before = probe_loss()
    result = train(cfg, rm, tokenizer, pairs)
    after = probe_loss()
    ev = evaluate(rm, tokenizer, test_rows, cfg)
    return {"loss_before": before, "loss_after": after, "steps": result["steps"], "seconds": result["seconds"],
            "accuracy": ev["accuracy"], "pairs": ev["pairs"], "model": rm}


def rlhf_smoke(model, tokenizer, rm, steps: int = 10, n_prompts: int = 256, **ppo_overrides) -> dict:
    """A few PPO steps of ``model`` against ``rm`` on hh-rlhf prompts, then a few DPO steps on hh-rlhf pairs.

    Both start from copies (``model`` untouched). Returns the RM score and KL of the first and last PPO steps, the
    reference's bit-identity, and the DPO loss of the first and last steps. ``ppo_overrides`` change the gpu
    preset's ``PPOConfig`` (the tests shrink it for a tiny model).
    """
    import copy

    from . import dpo, ppo
    from .checkpoint import parameters_digest
    from .reward import RewardConfig, build_pairs, clean_pairs, encode_pairs, reward_scores

    cfg = ppo.PPOConfig.for_profile("gpu", **{"steps": steps, "progress": False, "log_every": 0, **ppo_overrides})
    rm_cfg = RewardConfig.for_profile("gpu")
    rows, _ = ppo.prompt_rows("gpu", n_prompts, 1, cfg.seed)
    policy, ref = ppo.PolicyWithValue(copy.deepcopy(model)), ppo.frozen(copy.deepcopy(model))
    digest = parameters_digest(ref)
    t0 = time.perf_counter()
    result = ppo.train(cfg, policy, ref, tokenizer, rows, lambda q, t: reward_scores(rm, tokenizer, q, t, rm_cfg),
                       log=lambda *_: None)
    h = result["history"]
    out = {"ppo_steps": len(h), "ppo_seconds": time.perf_counter() - t0, "rm_first": h[0]["rm_score"],
           "rm_last": h[-1]["rm_score"], "kl_last": h[-1]["kl"], "reference_unchanged": parameters_digest(ref) == digest,
           "counts": result["counts"]}
    del policy
    dcfg = dpo.DPOConfig.for_profile("gpu", max_steps=steps, warmup_steps=1, progress=False, log_every=1,
                                     batch_size=cfg.minibatch)
    pair_rows, _ = build_pairs(RewardConfig.for_profile("gpu", max_pairs=n_prompts, eval_pairs=1))
    pairs, _ = encode_pairs(clean_pairs(pair_rows)[0], tokenizer, rm_cfg)
    t0 = time.perf_counter()
    d = dpo.train(dcfg, copy.deepcopy(model), ref, tokenizer, pairs)["history"]
    return {**out, "dpo_steps": len(d), "dpo_seconds": time.perf_counter() - t0, "dpo_loss_first": d[0]["loss"],
            "dpo_loss_last": d[-1]["loss"], "dpo_accuracy_last": d[-1]["accuracy"]}
