"""``llm-course gpu-smoke``: the gpu profile, briefly, on a CUDA machine.

Loads the profile's real base model in bf16, continues pretraining for a few steps on
real TinyStories text, and prints held-out perplexity before/after, tokens/s and peak
memory. Needs CUDA and network access to the Hugging Face Hub (first run only).
"""

from __future__ import annotations

import time

import torch

from .errors import ConfigError


def run_gpu_smoke(steps: int = 20) -> int:
    if not torch.cuda.is_available():
        raise ConfigError("gpu-smoke needs a CUDA GPU; this machine has none (use the tiny profile here)")
    from .pretrain import PretrainConfig, build_data, evaluate, train
    from transformers import AutoModelForCausalLM

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
    return 0
