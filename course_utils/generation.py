"""Sampling text from a causal LM, written out so every step is visible.

At each step: run the model on the tokens so far, take the logits of the last
position, divide by the temperature (< 1 sharper, > 1 flatter), keep the ``top_k``
most likely tokens, sample one, append it, stop at EOS. ``temperature=0`` means
greedy decoding (always the most likely token). We re-run the full sequence each
step instead of using a KV cache: slower, but the whole idea fits in ten lines,
and course models are tiny.
"""

from __future__ import annotations

import torch


@torch.no_grad()
def generate(
    model,
    tokenizer,
    prompts: list[str],
    max_new_tokens: int = 40,
    temperature: float = 0.8,
    top_k: int | None = 20,
    seed: int = 0,
    add_bos: bool = True,
) -> list[str]:
    """Continue each prompt; returns only the generated text (special tokens removed)."""
    model.eval()
    device = next(model.parameters()).device
    max_len = getattr(model.config, "max_position_embeddings", None)
    g = torch.Generator(device="cpu").manual_seed(seed)
    outputs = []
    for prompt in prompts:
        ids = tokenizer(prompt, add_special_tokens=False)["input_ids"]
        if add_bos and tokenizer.bos_token_id is not None:
            ids = [tokenizer.bos_token_id, *ids]
        x = torch.tensor([ids], device=device)  # (1, T)
        new = []
        for _ in range(max_new_tokens):
            if max_len and x.shape[1] >= max_len:
                break  # context full
            logits = model(input_ids=x).logits[0, -1].float().cpu()  # (V,)
            if temperature == 0:
                nxt = int(logits.argmax())
            else:
                logits = logits / temperature
                if top_k:
                    kth = torch.topk(logits, min(top_k, logits.numel())).values[-1]
                    logits = logits.masked_fill(logits < kth, float("-inf"))
                nxt = int(torch.multinomial(torch.softmax(logits, -1), 1, generator=g))
            if nxt == tokenizer.eos_token_id:
                break
            new.append(nxt)
            x = torch.cat([x, torch.tensor([[nxt]], device=device)], dim=1)
        outputs.append(tokenizer.decode(new, skip_special_tokens=True))
    return outputs
