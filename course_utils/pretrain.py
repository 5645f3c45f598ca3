"""Stage 1 — pretraining (预训练): tokenizer → DataLoader → loss → checkpoint.

``main(cfg)`` runs the whole stage: build the corpus, train a BPE tokenizer, pack the
text into blocks, train a fresh Llama with AdamW + warmup/cosine + clipping, measure
held-out perplexity before and after, and save a checkpoint the next stage (SFT)
loads by name (see :mod:`course_utils.stages`).
"""

from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import torch

from . import training
from .checkpoint import save_checkpoint
from .data import make_dataloader, packed_ids, tokenize_and_pack
from .errors import ConfigError
from .objectives import IGNORE_INDEX, OBJECTIVES, make_batch, shifted_targets, token_loss_sum
from .profiles import get_profile


@dataclass
class PretrainConfig:
    # --- what to train on
    profile: str = "tiny"  # sizes of world, tokenizer and model come from this profile
    seed: int = 0  # one seed for weights, data order and masking: same seed -> same run
    objective: str = "clm"  # "clm" (GPT-style), "prefix" (prefix LM) or "mlm" (BERT-style)
    block_size: int = 128  # tokens per training row; at most the model's context length
    # --- optimisation
    batch_size: int = 32  # rows per micro-batch; lower it if you run out of memory...
    grad_accum: int = 1  # ...and raise this to keep the effective batch (batch_size * grad_accum)
    max_steps: int = 500  # optimizer steps
    lr: float = 3e-3  # peak learning rate (tiny models tolerate far more than 7B ones: 1e-5..1e-4)
    min_lr_ratio: float = 0.1  # cosine decays to lr * min_lr_ratio
    warmup_steps: int = 50  # linear warmup from ~0 to lr
    weight_decay: float = 0.1
    grad_clip: float = 1.0  # max global gradient norm; 0 disables clipping
    precision: str = "auto"  # "auto" (bf16 on capable GPUs), "fp32" or "bf16"
    # --- evaluation, logging, checkpoints
    eval_every: int = 100  # steps between held-out evaluations (0: only before/after)
    eval_batches: int = 16  # held-out micro-batches per evaluation
    log_every: int = 10
    ckpt_every: int = 0  # steps between resumable checkpoints (0: only at the end / at stop_at)
    progress: bool = True  # show a progress bar

    @classmethod
    def for_profile(cls, profile: str | None = None, **overrides) -> "PretrainConfig":
        p = get_profile(profile)
        cfg = replace(cls(profile=p.name, seed=p.seed, block_size=p.model.context_length), **PRESETS[p.name])
        return replace(cfg, **overrides)

    def validate(self) -> None:
        if self.objective not in OBJECTIVES:
            raise ConfigError(f"objective must be one of {OBJECTIVES}, got {self.objective!r}")
        training.validate_optim(self, ("batch_size", "grad_accum", "max_steps", "block_size"))


PRESETS = {
    "smoke": dict(max_steps=30, batch_size=8, warmup_steps=5, eval_every=15, eval_batches=4, log_every=5),
    "tiny": dict(max_steps=500, batch_size=32, warmup_steps=50, eval_every=100, eval_batches=16),
    # continued pretraining of a real 135M base: small LR, bf16, accumulation for a 64-row batch
    "gpu": dict(max_steps=200, batch_size=16, grad_accum=4, lr=1e-4, warmup_steps=20, block_size=512, eval_every=50),
}


@torch.no_grad()
def evaluate(model, ds, batch_size: int, max_batches: int, dtype=None) -> dict:
    """Held-out causal-LM loss, perplexity (= exp(mean token loss)) and next-token accuracy (the argmax is the true
    next token) over the first ``max_batches``."""
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    total, count, hits = 0.0, 0, 0
    ids = packed_ids(ds)
    for start in range(0, min(len(ids), batch_size * max_batches), batch_size):
        x = ids[start : start + batch_size].to(device)
        with training.autocast(device, dtype):
            logits = model(input_ids=x).logits
        labels = shifted_targets(x)
        loss_sum, n = token_loss_sum(logits, labels)
        keep = labels != IGNORE_INDEX
        total, count = total + loss_sum.item(), count + int(n)
        hits += int((logits.argmax(-1)[keep] == labels[keep]).sum())
    model.train(was_training)
    loss = total / max(count, 1)
    return {"loss": loss, "ppl": math.exp(min(loss, 50.0)), "accuracy": hits / max(count, 1)}


def train(
    cfg: PretrainConfig,
    model,
    tokenizer,
    train_ds,
    val_ds=None,
    out_dir=None,
    resume: bool = False,
    stop_at: int | None = None,
    tracker=None,
) -> dict:
    """Train ``model`` in place; return {"final_loss", "steps", "history", "tokens_per_s", "seconds"}.

    ``stop_at=k`` saves a checkpoint after step k and returns (as if the machine stopped);
    calling again with ``resume=True`` continues from the latest checkpoint in ``out_dir``
    and ends exactly where an uninterrupted run would have (see :func:`training.fit`).
    """
    cfg.validate()
    loader = None

    def micro_batches(step: int) -> list[dict]:
        nonlocal loader
        if loader is None:  # created at the first step actually run, which is later after a resume
            # micro-batch i of the run is always the same rows: step s uses micro-batches s*A .. s*A+A-1
            loader = iter(make_dataloader(train_ds, cfg.batch_size, cfg.seed, start=step * cfg.grad_accum))
        # masking randomness (prefix split, MLM corruption) is seeded by the step, so resume replays it
        gen = torch.Generator().manual_seed(cfg.seed * 7919 + step)
        return [make_batch(cfg.objective, next(loader)["input_ids"], tokenizer, gen) for _ in range(cfg.grad_accum)]

    def loss_sum(model, b):
        logits = model(input_ids=b["input_ids"], attention_mask=b["attention_mask"]).logits  # (B, T, V)
        return token_loss_sum(logits, b["labels"])

    def held_out(model, dtype):
        ev = evaluate(model, val_ds, cfg.batch_size, cfg.eval_batches, dtype)
        return {"val_loss": ev["loss"], "val_ppl": ev["ppl"]}

    return training.fit(cfg, model, micro_batches, loss_sum, lambda b: int((b["labels"] != -100).sum()),
                        held_out if val_ds is not None else None, out_dir, resume, stop_at, tracker,
                        desc=f"pretrain[{cfg.objective}]")


def build_data(cfg: PretrainConfig, tokenizer=None):
    """Corpus → (tokenizer, packed train set, packed validation set, raw validation docs)."""
    from .tokenizer import train_tokenizer
    from .world import pretrain_corpus

    profile = get_profile(cfg.profile)
    if not profile.offline:
        from .hub_data import load_hub_dataset
        from transformers import AutoTokenizer

        n = profile.world.pretrain_docs
        name = profile.hub_datasets["pretrain"]
        train_docs = load_hub_dataset("tinystories", name, "train", n, errors="skip").records
        val_docs = load_hub_dataset("tinystories", name, "validation", profile.world.eval_examples, errors="skip").records
        tokenizer = tokenizer or AutoTokenizer.from_pretrained(profile.base_model, trust_remote_code=False)
    else:
        train_docs = pretrain_corpus(profile.seed, profile.world.pretrain_docs, "train")
        val_docs = pretrain_corpus(profile.seed, profile.world.eval_examples, "validation")
        tokenizer = tokenizer or train_tokenizer(train_docs, profile.tokenizer_vocab_size)
    return tokenizer, tokenize_and_pack(train_docs, tokenizer, cfg.block_size), tokenize_and_pack(val_docs, tokenizer, cfg.block_size), val_docs


def sample_prompts(val_docs: list, n: int = 4, words: int = 4) -> list[str]:
    """The first few words of some held-out documents: prompts for before/after samples."""
    return [" ".join(d["text"].split()[:words]) for d in val_docs[:n]]


def fact_recall(model, tokenizer, probes: list[tuple[str, str]]) -> float:
    """Share of (prompt, answer) probes whose greedy continuation starts with the answer's first word.

    "This is Pip the fox. Pip lives in" → " Mossbrook." counts; perplexity says the model knows the
    *style* of the text, this says it knows the *facts* (see ``world.fact_probes``).
    """
    from .generation import generate

    outs = generate(model, tokenizer, [p for p, _ in probes], max_new_tokens=4, temperature=0)
    hits = [[w.strip(".,!?") for w in out.split()[:1]] == answer.split()[:1] for out, (_, answer) in zip(outs, probes)]
    return sum(hits) / max(len(hits), 1)


def main(cfg: PretrainConfig | None = None, out_dir=None, tracker=None, log=print) -> dict:
    """Run the whole pretraining stage; save ``<out_dir>/final`` (model + tokenizer). Returns metrics."""
    from .generation import generate
    from .model import build_model, count_parameters, make_config
    from .stages import stage_dir
    from .tokenizer import save_tokenizer

    cfg = cfg or PretrainConfig.for_profile()
    cfg.validate()
    profile = get_profile(cfg.profile)
    out_dir = Path(out_dir) if out_dir else stage_dir("base", profile)
    t0 = time.perf_counter()
    tokenizer, train_ds, val_ds, val_docs = build_data(cfg)
    save_tokenizer(tokenizer, out_dir / "tokenizer")
    log(f"  tokenizer: {len(tokenizer)} tokens; packed {len(train_ds)} train / {len(val_ds)} held-out blocks of {cfg.block_size}")
    device = training.default_device()
    if profile.offline:
        model = build_model(make_config(profile.model, tokenizer), seed=cfg.seed).to(device)
    else:
        from transformers import AutoModelForCausalLM

        model = AutoModelForCausalLM.from_pretrained(profile.base_model, dtype=torch.float32, trust_remote_code=False).to(device)
    log(f"  model: {count_parameters(model):,} parameters on {device}")
    dtype = training.resolve_precision(cfg.precision, device)
    prompts = sample_prompts(val_docs)
    facts = []
    if profile.offline:
        from .world import fact_probes

        facts = fact_probes()
    recall_before = fact_recall(model, tokenizer, facts) if facts else None
    before = evaluate(model, val_ds, cfg.batch_size, cfg.eval_batches, dtype)
    samples_before = generate(model, tokenizer, prompts, max_new_tokens=30, seed=cfg.seed)
    log(f"  before training: held-out loss {before['loss']:.3f}, perplexity {before['ppl']:.1f}")
    result = train(cfg, model, tokenizer, train_ds, val_ds, tracker=tracker)
    after = evaluate(model, val_ds, cfg.batch_size, cfg.eval_batches, dtype)
    samples_after = generate(model, tokenizer, prompts, max_new_tokens=30, seed=cfg.seed)
    recall_after = fact_recall(model, tokenizer, facts) if facts else None
    log(f"  after {result['steps']} steps: held-out loss {after['loss']:.3f}, perplexity {after['ppl']:.2f} "
        f"({before['ppl'] / after['ppl']:.0f}x lower), {result['tokens_per_s']:.0f} tokens/s")
    if facts:
        log(f"  fact recall ({len(facts)} world facts, greedy): {recall_before:.0%} before -> {recall_after:.0%} after")
    save_checkpoint(out_dir / "final", model, step=result["steps"], tokenizer=tokenizer,
                    state={"history": result["history"], "config": asdict(cfg)})
    return {
        "parameters": count_parameters(model),
        "train_blocks": len(train_ds),
        "vocab_size": len(tokenizer),
        "val_loss_before": before["loss"],
        "val_ppl_before": before["ppl"],
        "val_loss_after": after["loss"],
        "val_ppl_after": after["ppl"],
        "ppl_reduction": before["ppl"] / after["ppl"],
        "fact_recall_before": recall_before,
        "fact_recall_after": recall_after,
        "final_train_loss": result["final_loss"],
        "steps": result["steps"],
        "tokens_per_s": result["tokens_per_s"],
        "seconds": time.perf_counter() - t0,
        "history": result["history"],
        "samples": [{"prompt": p, "before": b, "after": a} for p, b, a in zip(prompts, samples_before, samples_after)],
        "checkpoint": str(out_dir / "final"),
        "config": asdict(cfg),
    }
