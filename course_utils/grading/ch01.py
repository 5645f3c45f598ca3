"""Checks for chapter 01 — tokenizer → dataloader → loss (预训练, part I)."""

from __future__ import annotations

import random

import torch
import torch.nn.functional as F

from ..objectives import prefix_lm_mask as _prefix_ref
from .core import Failure, task


def _show(x) -> str:
    if torch.is_tensor(x):
        return str(x.int().tolist() if x.dtype == torch.bool else x.tolist())
    return repr(x)


def merge_pair_reference(ids: list[int], pair: tuple[int, int], new_id: int) -> list[int]:
    out, i = [], 0
    while i < len(ids):
        if i + 1 < len(ids) and (ids[i], ids[i + 1]) == pair:
            out.append(new_id)
            i += 2
        else:
            out.append(ids[i])
            i += 1
    return out


@task("01", "1.1", "merge_pair", "BPE: apply one merge to a token list", "warm-up",
      hint="scan left to right; after merging a pair, skip both tokens (so 'aaa' with (a,a) gives [X, a])")
def check_merge_pair(merge_pair):
    cases = [([1, 2, 3, 1, 2], (1, 2), 9), ([5, 5, 5], (5, 5), 7), ([5, 5, 5, 5], (5, 5), 7), ([1, 2], (2, 1), 9),
             ([], (1, 2), 9), ([1], (1, 1), 9)]
    rng = random.Random(0)
    cases += [([rng.randrange(4) for _ in range(rng.randrange(12))], (rng.randrange(4), rng.randrange(4)), 99)
              for _ in range(50)]
    for ids, pair, new in cases:
        original = list(ids)
        got = merge_pair(ids, pair, new)
        expected = merge_pair_reference(original, pair, new)
        if ids != original:
            raise Failure(f"merge_pair changed its input list: {original} became {ids}; build a new list instead")
        if list(got) != expected:
            raise Failure(f"merge_pair({original}, {pair}, {new}): expected {expected}, got {got}")


@task("01", "1.2", "prefix_lm_mask", "Prefix-LM attention mask", "core",
      hint="mask[q, k] = True means query q may look at key k: causal everywhere, plus the prefix block all True")
def check_prefix_lm_mask(prefix_lm_mask):
    for T in range(1, 9):
        for P in range(0, T + 1):
            got = prefix_lm_mask(T, P)
            expected = _prefix_ref(T, P)
            if not torch.is_tensor(got) or got.shape != (T, T):
                raise Failure(f"prefix_lm_mask({T}, {P}) must return a ({T}, {T}) tensor, got {_show(got)}")
            if got.dtype != torch.bool:
                raise Failure(f"return a bool tensor (True = may attend), got dtype {got.dtype}")
            if not torch.equal(got, expected):
                raise Failure(f"prefix_lm_mask({T}, {P}):\nexpected {_show(expected)}\ngot      {_show(got)}")


def causal_lm_loss_reference(logits: torch.Tensor, input_ids: torch.Tensor, pad_id: int) -> torch.Tensor:
    targets = input_ids[:, 1:].clone()
    targets[targets == pad_id] = -100
    return F.cross_entropy(logits[:, :-1].reshape(-1, logits.size(-1)), targets.reshape(-1), ignore_index=-100)


@task("01", "1.3", "causal_lm_loss", "Shifted, padding-masked cross-entropy", "core",
      hint="position t predicts token t+1: compare logits[:, :-1] with input_ids[:, 1:], and skip targets that are padding")
def check_causal_lm_loss(causal_lm_loss):
    g = torch.Generator().manual_seed(0)
    for B, T, V in ((1, 4, 5), (2, 7, 11), (3, 16, 50)):
        logits = torch.randn(B, T, V, generator=g)
        ids = torch.randint(1, V, (B, T), generator=g)
        ids[0, -2:] = 0  # right padding on the first row
        got = causal_lm_loss(logits, ids, 0)
        expected = causal_lm_loss_reference(logits, ids, 0)
        if not torch.is_tensor(got) or got.dim() != 0:
            raise Failure(f"return a scalar tensor (the mean loss), got {_show(got)}")
        if not torch.allclose(got.float(), expected, atol=1e-5):
            raise Failure(f"B={B}, T={T}, V={V} with 2 pad tokens: expected {expected.item():.5f}, got {got.item():.5f}")
    logits = torch.randn(2, 6, 9, generator=g, requires_grad=True)
    causal_lm_loss(logits, torch.randint(1, 9, (2, 6), generator=g), 0).backward()
    if logits.grad is None or logits.grad[:, -1].abs().sum() != 0:
        raise Failure("the last position has no next token: it must get no gradient")


def pack_documents_reference(docs: list[list[int]], block_size: int, bos: int, eos: int) -> dict:
    stream, pos = [], []
    for doc in docs:
        piece = [bos, *doc, eos]
        stream += piece
        pos += list(range(len(piece)))
    n = len(stream) // block_size
    ids = torch.tensor(stream[: n * block_size], dtype=torch.long).view(n, block_size)
    positions = torch.tensor(pos[: n * block_size], dtype=torch.long).view(n, block_size)
    return {"input_ids": ids, "position_ids": positions}


@task("01", "1.4", "pack_documents", "Pack documents into blocks, positions restart per document", "stretch",
      hint="stream = [bos, *doc, eos] for each doc; positions count 0,1,2,... from each bos; drop the incomplete tail")
def check_pack_documents(pack_documents):
    rng = random.Random(1)
    cases = [([[5, 6], [7]], 4), ([[5, 6, 7, 8, 9]], 3), ([[3] * 10, [4] * 3, [5]], 5)]
    cases += [([[rng.randrange(3, 20) for _ in range(rng.randrange(0, 9))] for _ in range(rng.randrange(1, 6))],
               rng.randrange(2, 7)) for _ in range(30)]
    for docs, block in cases:
        expected = pack_documents_reference(docs, block, 1, 2)
        got = pack_documents(docs, block, 1, 2)
        if not isinstance(got, dict) or {"input_ids", "position_ids"} - set(got):
            raise Failure("return a dict with 'input_ids' and 'position_ids'")
        for key in ("input_ids", "position_ids"):
            g = got[key]
            if not torch.is_tensor(g) or g.shape != expected[key].shape or not torch.equal(g.long(), expected[key]):
                raise Failure(f"pack_documents({docs}, block_size={block}, bos=1, eos=2)['{key}']:\n"
                              f"expected {_show(expected[key])}\ngot      {_show(g)}")
