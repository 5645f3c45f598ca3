"""Interview questions (面试常见问题), chapter 14: each one answered in a few sentences and backed by a demo that
runs in ``notebooks/14_interview.ipynb``.

:data:`QUESTIONS` holds the five questions of the course outline (``source="seed"``, the Chinese titles verbatim)
and the ones the chapters raised along the way (``source`` = the chapter that raised it). ``demo`` names the demo
of the notebook section that answers the question; ``tests/test_interview.py`` checks that every question has its
section, titled in both languages.

:func:`ddp_loss_scaling` is the one worker function the notebook launches in separate processes (spawned workers
need a function that lives in a module).
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class Question:
    id: str
    zh: str  # Chinese title (for the outline's questions: verbatim)
    en: str  # English title
    source: str  # "seed" (the course outline) or the chapter that raised it, e.g. "09"
    answer: str  # the short answer, a few sentences
    demo: str  # what the notebook section runs to back the answer

    def heading(self, number: int) -> str:
        """The notebook's section heading for this question."""
        return f"## {number}. {self.zh} — {self.en}"


QUESTIONS: list[Question] = [
    # --- the five questions of the course outline ---------------------------------------------------------------
    Question(
        "gradient_checkpointing", "什么是 gradient checkpointing？它如何节省显存？",
        "What is gradient checkpointing, and how does it save GPU memory?", "seed",
        "The backward pass needs the intermediate tensors of the forward pass, so normally every layer keeps all of "
        "them until the backward pass reaches it; that activation memory grows with batch size × sequence length × "
        "layers and on long sequences outgrows the weights. Gradient checkpointing keeps only each layer's input and, "
        "during the backward pass, runs that layer's forward again to rebuild the rest. Memory falls to one input "
        "per layer plus one layer's worth of intermediates; the cost is roughly one extra forward pass per step. "
        "The gradients do not change: it is recomputation, not an approximation.",
        "saved activations and step time with and without checkpointing; gradients compared"),
    Question(
        "lora_vs_adapter", "LoRA 和 Adapter 微调的本质差别是什么？",
        "What is the essential difference between LoRA and adapter fine-tuning?", "seed",
        "Both freeze the base model, train a few percent of new parameters and start as the identity. LoRA learns a "
        "low-rank change ΔW = (α/r)·B·A of existing weight matrices: the change is linear and sits inside a layer, "
        "so after training it can be added into W, and the model has its original shape, size and speed (no extra "
        "inference latency); unmerging swaps tasks. A bottleneck adapter inserts new small layers (down-projection, "
        "nonlinearity, up-projection, residual) between existing ones; because of the nonlinearity it can never be "
        "folded into a matrix, so its layers stay and run at inference. LoRA reparameterises weights, an adapter "
        "adds modules.",
        "trainable parameters, LoRA merged into a plain model, an adapter that cannot be merged, forward FLOPs"),
    Question(
        "ppo_kl_reference", "PPO中 KL 控制的意义是什么？为什么要用参考模型？",
        "What is KL control for in PPO, and why use a reference model?", "seed",
        "The reward model is a proxy that is reliable only near the kind of text it was trained on, the SFT "
        "model's answers. PPO maximises it, and without a brake the policy drifts towards answers the RM over-rates: "
        "the RM score keeps rising while the true quality falls (reward over-optimisation). The penalty "
        "−β·KL(π‖π_ref) to a frozen reference, normally the SFT model, charges for every step away from that "
        "text, so the policy improves where the RM can be trusted and keeps SFT's fluency and format. The "
        "reference stays frozen so that the drift cannot accumulate unnoticed; PPO's clipping only limits each "
        "update relative to the previous policy, never the total distance. β is fixed or adapted to hold a target "
        "KL.",
        "per-token KL-shaped rewards of real samples; the KL-regularised optimum for a range of β"),
    Question(
        "sft_pipeline", "你如何设计一个 SFT pipeline 支持多模态或多个 prompt 模板？",
        "How would you design an SFT pipeline that supports multimodal input or several prompt templates?", "seed",
        "Keep the data in one canonical form, a list of role/content messages (plus typed non-text parts such as "
        "images), and keep templates out of the data: one renderer per template turns messages into text and the "
        "character spans that carry loss, the template is chosen per example or dataset, and it is saved with the "
        "checkpoint so training, evaluation and serving render alike. Loss masks come from those spans (the "
        "assistant's words and its end-of-turn tokens), never from fixed positions. For images, an encoder gives "
        "feature vectors, a small projector maps them into the LM's embedding space, and they enter the sequence "
        "as inputs_embeds at their place, with label −100. Mix templates and phrasings in training and evaluate "
        "per template, including one held out.",
        "one conversation in ChatML and Alpaca with its loss mask, a mixed batch, a toy image through a projector"),
    Question(
        "multi_node_sync_loss_scale", "多机训练中如何处理 parameter sync 和 loss scale？",
        "In multi-node training, how do you handle parameter sync and loss scaling?", "seed",
        "Weights are not copied after the start: every replica begins from the same weights (same seed or a "
        "broadcast from rank 0), and every step the gradients are averaged across ranks (all-reduce in DDP, "
        "reduce-scatter and all-gather under ZeRO/FSDP), so each rank applies the same update and the replicas "
        "stay identical. Whatever a rank decides must therefore be decided on global numbers: the fp16 loss scaler "
        "checks the averaged gradients for inf/NaN, so all ranks skip an overflowing step and halve the scale "
        "together (with sharded gradients the overflow flag itself is all-reduced), and clipping uses the global "
        "norm. bf16 has fp32's exponent range and needs no loss scaling.",
        "DDP on two processes with identical weight hashes; dynamic loss scaling with an overflow on one rank"),
    # --- questions the chapters raised ----------------------------------------------------------------------------
    Question(
        "warmup", "为什么要对学习率做 warmup？", "Why warm up the learning rate?", "02",
        "Adam divides each gradient by a running estimate of its size, and in the first steps that estimate rests "
        "on one or a few gradients: every weight moves by about the full learning rate in a direction chosen by "
        "very little data. With a large peak learning rate those first steps throw the weights into a region where "
        "the loss spikes or never recovers. Warmup raises the learning rate from near zero over the first steps "
        "(hundreds to thousands in pretraining) until the moment estimates are reliable.",
        "Adam's first step is full-size whatever the gradient; the same high LR with and without warmup"),
    Question(
        "eos_never_stops", "SFT 模型答对了却停不下来，要检查什么？",
        "Your SFT model answers correctly but never stops: what do you check?", "03",
        "That the template writes EOS (or the end-of-turn token) after every assistant answer; that this token "
        "carries loss rather than label −100; that it is not masked as padding, the classic case being "
        "pad_token = eos_token with padding masked by token id; and that generation stops on the same token id "
        "the model was trained to produce. Then count how many answers end with EOS.",
        "the labels at the end of an answer, the pad = EOS bug, the share of SFT answers that stop"),
    Question(
        "reward_model", "奖励模型为什么用成对排序损失？怎么判断它训练得好不好？",
        "Why is a reward model trained with a pairwise loss, and how do you tell whether it is good?", "05",
        "People compare two answers more consistently than they grade one, so the data are preference pairs. "
        "Bradley–Terry turns them into a likelihood, P(chosen wins) = σ(r_chosen − r_rejected), trained with "
        "−log σ(Δr) computed by logsigmoid. Only differences are learned: the absolute level of a reward means "
        "nothing, which is why PPO normalises it. Judge an RM on held-out pairs with pairwise accuracy, ROC-AUC "
        "and calibration, with Kendall τ where a trusted ranking exists, and read the accuracy per kind of pair: "
        "what it gets wrong is what RLHF will exploit.",
        "the loss ignores a shift of both rewards; the pipeline's RM on held-out pairs"),
    Question(
        "dpo_or_ppo", "DPO 和 PPO 怎么选？", "DPO or PPO: which would you choose?", "07",
        "DPO when you have preference pairs and little compute: it is supervised learning on pairs, with two "
        "models in memory (policy and frozen reference), forward passes only and no RM to over-optimise. Its "
        "weakness is that it learns from answers the model may never write; pairs sampled from the model itself "
        "and ranked by an RM fix that, at the cost of sampling again each round. PPO learns from its own samples "
        "every step with a reward that generalises to new answers, but needs policy, value head, reference and RM "
        "in memory and has many knobs. GRPO and RLOO keep the on-policy learning without a value head.",
        "DPO's loss and implicit rewards on held-out pairs; one DPO step against one PPO step, timed"),
    Question(
        "llm_learning_rate", "为什么大模型的学习率通常在 1e-5 到 1e-4？",
        "Why do LLMs train with learning rates of 1e-5 to 1e-4?", "09",
        "A layer's output sums over its input width d. An Adam step moves every weight by about the learning rate, "
        "and those moves add up coherently over the d inputs, so the same learning rate changes a wider layer's "
        "output about d times more: going from width 64 to 4096 asks for a learning rate tens of times smaller. "
        "Fine-tuning sits lower still (1e-5–2e-5 for full fine-tuning, 1e-4–2e-4 for LoRA), because the weights "
        "are already good. μP reparameterises the model so that the best learning rate carries over across widths.",
        "the change one Adam-sized step makes to a layer's output, at widths from 64 to 4096"),
    Question(
        "loss_spike", "训练中 loss 突然飙升且回不来，怎么办？",
        "The loss spiked and did not come back: what do you do?", "09",
        "Go back to the last checkpoint before the spike (weights and optimizer state) and resume with a lower "
        "peak learning rate or a longer warmup, skipping the batches around the spike in case one of them is bad. "
        "Check that gradient clipping is on and the data near the spike are clean. Log the gradient norm every "
        "step, because it usually jumps before the loss does; in fp16 also watch the loss scale, and prefer bf16.",
        "a run that spikes and never recovers, its gradient norm, and the same run restarted with a lower LR"),
    Question(
        "adam_memory", "显存被 Adam 的优化器状态占满了，有哪些办法？",
        "GPU memory is full because of Adam: what are your options?", "09",
        "AdamW keeps two fp32 moments per parameter, 8 bytes, plus a 4-byte fp32 master copy in mixed precision, "
        "so for a 7B model the optimizer alone needs over 80 GB. Options: 8-bit AdamW (moments in 8 bits with "
        "blockwise scales, a quarter of the state); Adafactor (a factored second moment, almost no state); ZeRO-1 "
        "to shard the state across data-parallel GPUs (ZeRO-2/3 and FSDP also shard gradients and weights); "
        "offloading it to CPU memory; or LoRA/QLoRA, so that only the adapters have optimizer state.",
        "optimizer-state bytes per parameter measured for AdamW, 8-bit AdamW and Adafactor; 7B estimates"),
    Question(
        "search_strategy", "网格搜索、随机搜索和贝叶斯优化怎么选？",
        "Grid, random or Bayesian search: which do you use?", "09",
        "Usually only one or two hyper-parameters matter, and a grid spends most of its trials repeating the same "
        "few values of them; random search tries a new value of every parameter in each trial, so for the same "
        "budget it covers the important ones far better. Bayesian optimisation (TPE, Gaussian processes) goes "
        "further once a handful of trials are in, by sampling where good results were. Early stopping of bad "
        "trials (pruning) makes any of them cheaper. Search the learning rate first, on a log scale.",
        "grid, random and TPE search with the same budget on a function where one parameter matters most"),
    Question(
        "metrics_by_task", "不同任务该用什么评估指标？", "Which evaluation metric for which task?", "10",
        "Classifiers and reward models: accuracy at a threshold, ROC-AUC without one, Kendall τ when the order "
        "matters. Generation with narrow right answers (translation, summaries): BLEU, ROUGE, chrF, BERTScore, "
        "which measure closeness to a reference, not correctness. Open dialogue: pairwise win-rate with ties and "
        "an interval, or an LLM judge (G-Eval, MT-Bench) that has been checked against people. Alignment: "
        "toxicity, harmlessness (refusing harmful requests, read next to helpfulness), TruthfulQA. Check any "
        "metric against a trusted judgement on a sample, and report several.",
        "BLEU against the true score on six kinds of answer; a win-rate with ties and its interval"),
]


def by_id(qid: str) -> Question:
    for q in QUESTIONS:
        if q.id == qid:
            return q
    raise KeyError(f"no interview question {qid!r}; ids: {', '.join(q.id for q in QUESTIONS)}")


# --- the worker the notebook launches (section 5) ------------------------------------------------------------


def ddp_loss_scaling(rank: int, world_size: int, cfg_dict: dict, overflow_step: int = 3, overflow_rank: int = 1,
                     init_scale: float = 2.0**16, growth_interval: int = 2) -> dict:
    """Chapter 08's DDP run (:func:`course_utils.distributed.ddp`), then the same DDP training with
    ``torch.amp.GradScaler`` (dynamic loss scaling), in one launch.

    At ``overflow_step`` only rank ``overflow_rank`` sees a batch whose scaled loss overflows (its loss × 1e36,
    then × the scale, is beyond float32). DDP averages gradients inside ``backward()``, so the inf reaches every
    rank before the scaler looks: all ranks skip that step and halve the scale together. Returns, per step, the
    scale, whether the optimizer step ran and whether this rank's own batch overflowed, and the weights' hash
    (``ddp_weights_sha256``: the hash after the plain DDP run).
    """
    import torch.nn.functional as F
    from torch.nn.parallel import DistributedDataParallel

    from . import distributed as D

    plain = D.ddp(rank, world_size, cfg_dict)
    cfg = D.DistConfig(**cfg_dict)
    model = DistributedDataParallel(D.make_model(cfg))
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr)
    scaler = torch.amp.GradScaler("cpu", init_scale=init_scale, growth_interval=growth_interval)
    steps = []
    for step, (x, y) in enumerate(D.make_batches(cfg)):
        loss = F.mse_loss(model(D.shard(x, rank, world_size)), D.shard(y, rank, world_size))
        local_overflow = step == overflow_step and rank == overflow_rank
        if local_overflow:
            loss = loss * 1e36
        opt.zero_grad()
        scaler.scale(loss).backward()  # DDP all-reduces the (scaled) gradients here
        before = [p.detach().clone() for p in model.parameters()]
        scale = scaler.get_scale()
        scaler.step(opt)  # unscales, checks for inf/NaN, skips the update if it finds any
        scaler.update()
        stepped = any(not torch.equal(b, p) for b, p in zip(before, model.parameters()))
        steps.append({"step": step, "scale": scale, "stepped": stepped, "local_overflow": local_overflow})
    digest = hashlib.sha256()
    for p in model.parameters():
        digest.update(p.detach().contiguous().view(torch.uint8).numpy().tobytes())
    return {"steps": steps, "weights_sha256": digest.hexdigest()[:16], "ddp_weights_sha256": plain["weights_sha256"]}
