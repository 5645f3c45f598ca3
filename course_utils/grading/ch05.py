"""Checks for chapter 05 — reward modeling (奖励建模): the Bradley–Terry loss, last-token pooling,
deduplicating preference pairs, and Kendall's τ-b.

The references are the course library's own, in :mod:`course_utils.reward`: ``pairwise_loss``,
``last_token_index``, the normalisation ``clean_pairs`` uses to find near duplicates, and ``kendall_tau``
(scipy's τ-b).
"""

from __future__ import annotations

import copy
import math
import random

import torch
import torch.nn.functional as F

from .. import reward
from .core import Failure, mistake_notes as _notes, show as _show, task


# --- 5.1: the Bradley–Terry pairwise loss -------------------------------------------------------------


def pairwise_loss_reference(r_chosen, r_rejected, margin=None) -> torch.Tensor:
    return reward.pairwise_loss(r_chosen, r_rejected, margin, reduction="mean")  # ()


def _loss_cases():
    """(description, r_chosen, r_rejected, margin): small batches first, the overflow case last."""
    g = torch.Generator().manual_seed(51)
    yield "4 pairs", 2 * torch.randn(4, generator=g), 2 * torch.randn(4, generator=g), None
    yield "6 pairs", 3 * torch.randn(6, generator=g), 3 * torch.randn(6, generator=g), None
    yield "5 pairs with margins", torch.randn(5, generator=g), torch.randn(5, generator=g), \
        0.5 + 1.5 * torch.rand(5, generator=g)
    yield "3 pairs with margins", torch.tensor([2.0, -1.0, 0.5]), torch.tensor([0.5, 0.0, 0.5]), \
        torch.tensor([1.0, 0.5, 2.0])
    yield "one pair whose difference is -200", torch.tensor([-100.0]), torch.tensor([100.0]), None


def _close(a: float, b: float) -> bool:
    return abs(a - b) < 1e-4 * max(1.0, abs(b))


@task("05", "5.1", "pairwise_loss", "Bradley–Terry loss: −log σ(r_chosen − r_rejected − margin)", "warm-up",
      hint="d = r_chosen - r_rejected (minus margin when one is given); the loss is -F.logsigmoid(d).mean(): "
           "a 0-dim tensor that training can call .backward() on")
def check_pairwise_loss(pairwise_loss):
    for desc, rc, rr, m in _loss_cases():
        call = f"pairwise_loss(r_chosen={_show(rc)}, r_rejected={_show(rr)}" + (
            f", margin={_show(m)})" if m is not None else ")") + f" ({desc})"
        rc_, rr_ = rc.clone().requires_grad_(), rr.clone().requires_grad_()
        got = pairwise_loss(rc_, rr_, m.clone()) if m is not None else pairwise_loss(rc_, rr_)
        if not (torch.equal(rc_.detach(), rc) and torch.equal(rr_.detach(), rr)):
            raise Failure(f"{call} changed its inputs; compute new tensors instead")
        expected = pairwise_loss_reference(rc, rr, m)
        if not torch.is_tensor(got):
            raise Failure(f"{call}: expected a 0-dim tensor, got {type(got).__name__} (the loss must stay a tensor: "
                          "no .item() or float(...), or loss.backward() cannot run)")
        if got.dim() != 0:
            why = " (one loss per pair: return their mean)" if got.numel() == rc.numel() else ""
            raise Failure(f"{call}: expected a 0-dim tensor (the mean over pairs), got shape {tuple(got.shape)}{why}")
        value = got.detach().float()
        if not torch.isfinite(value):
            raise Failure(f"{call}:\nexpected {expected.item():.3f}\ngot      {value.item()}\n"
                          "σ(-200) is about 1e-87, far below the smallest float32 (about 1e-45): torch.sigmoid returns "
                          "0 there and log(0) = -inf. Use F.logsigmoid(d), which computes log σ(d) without forming σ(d)")
        if not _close(value.item(), expected.item()):
            d, mm = rc - rr, (m if m is not None else torch.zeros_like(rc))
            note = _notes(value.item(), [
                (lambda: -F.logsigmoid(rr - rc - mm).mean(), "sign flipped: the loss is -log σ(r_chosen - r_rejected); "
                 "with r_rejected - r_chosen, training would push the rejected response up"),
                (lambda: F.logsigmoid(d - mm).mean(), "a loss is >= 0: it is MINUS log σ(...) (the minus is missing)"),
                (lambda: -F.logsigmoid(d - mm).sum(), "you summed the per-pair losses; return their mean, so the loss "
                 "(and a good learning rate) does not depend on the batch size"),
                (lambda: -F.logsigmoid(d + mm).mean(), "the margin is subtracted: -log σ(r_chosen - r_rejected - margin); "
                 "with + margin a pair counts as won before the chosen side is even ahead"),
                (lambda: -F.logsigmoid(d).mean(), "you ignored margin: when one is given, the chosen reward must beat "
                 "the rejected one by at least margin, -log σ(r_chosen - r_rejected - margin)"),
            ], lambda a, b: _close(a, b.item()))
            raise Failure(f"{call}:\nexpected {expected.item():.4f}\ngot      {value.item():.4f}{note}")
        if not got.requires_grad:
            raise Failure(f"{call} returned a loss without gradients (.detach(), .item() or torch.tensor(...) inside?): "
                          "the loss must stay connected to the rewards, training calls loss.backward() on it")
        got.backward()
        rc_ref, rr_ref = rc.clone().requires_grad_(), rr.clone().requires_grad_()
        pairwise_loss_reference(rc_ref, rr_ref, m).backward()
        if rc_.grad is None or not torch.allclose(rc_.grad, rc_ref.grad, atol=1e-5):
            raise Failure(f"{call}: the loss has the right value, but its gradient with respect to r_chosen is wrong:\n"
                          f"expected {_show(rc_ref.grad, 4)}\ngot      {_show(rc_.grad, 4)}")


# --- 5.2: the hidden state at the last real token ------------------------------------------------------


def pool_last_token_reference(hidden: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    rows = torch.arange(hidden.size(0))
    return hidden[rows, reward.last_token_index(attention_mask)]  # (B, H)


def _pool_cases():
    """(description, attention mask): the three paddings on small batches, then random ones."""
    yield "right padding", [[1, 1, 1, 0, 0], [1, 1, 1, 1, 1], [1, 0, 0, 0, 0]]
    yield "left padding", [[0, 0, 1, 1, 1], [1, 1, 1, 1, 1], [0, 0, 0, 0, 1]]
    yield "no padding", [[1, 1, 1, 1], [1, 1, 1, 1]]
    rng = random.Random(52)
    for side in ("right", "left"):
        lengths = [rng.randint(1, 9) for _ in range(5)] + [9]  # one row without padding
        pad = [[0] * (9 - n) for n in lengths]
        yield f"{side} padding, 6 rows", [[1] * n + p if side == "right" else p + [1] * n for n, p in zip(lengths, pad)]


def _positions(got: torch.Tensor, hidden: torch.Tensor) -> list:
    """For each row b, the position t whose hidden[b, t] the learner returned ('?' if none)."""
    out = []
    for b in range(hidden.size(0)):
        hits = [t for t in range(hidden.size(1)) if torch.allclose(got[b].float(), hidden[b, t], atol=1e-6)]
        out.append(hits[0] if hits else "?")
    return out


@task("05", "5.2", "pool_last_token", "Pool the hidden state of the last real (non-pad) token", "core",
      hint="the last real token of row b is the largest t with attention_mask[b, t] == 1; e.g. "
           "(torch.arange(T) * attention_mask).argmax(dim=1), then hidden[torch.arange(B), last] is (B, H). "
           "It must work for right padding (1 1 1 0 0), left padding (0 0 1 1 1) and none")
def check_pool_last_token(pool_last_token):
    g = torch.Generator().manual_seed(52)
    for desc, rows in _pool_cases():
        mask = torch.tensor(rows)  # (B, T), 0/1 longs as a tokenizer returns them
        B, T = mask.shape
        hidden = torch.randn(B, T, 4, generator=g)  # (B, T, H)
        originals = hidden.clone(), mask.clone()
        call = f"pool_last_token(hidden: {tuple(hidden.shape)}, attention_mask={rows}) ({desc})"
        got = pool_last_token(hidden, mask)
        if not (torch.equal(hidden, originals[0]) and torch.equal(mask, originals[1])):
            raise Failure(f"{call} changed its inputs; compute new tensors instead")
        expected = pool_last_token_reference(hidden, mask)
        if not torch.is_tensor(got) or got.shape != expected.shape:
            raise Failure(f"{call}: expected a tensor of shape {tuple(expected.shape)} (B, H), got "
                          f"{tuple(got.shape) if torch.is_tensor(got) else type(got).__name__}")
        if torch.allclose(got.float(), expected, atol=1e-6):
            continue
        picked, want = _positions(got, hidden), reward.last_token_index(mask).tolist()
        note = _notes(picked, [
            (lambda: [T - 1] * B, "you took position -1, the last column: with right padding that is a pad token. "
             "Find the last position whose mask is 1"),
            (lambda: (mask.sum(1) - 1).tolist(), "mask.sum(1) - 1 is the last real token only with right padding; "
             "with left padding the real tokens end in the last column. Find the last position whose mask is 1"),
            (lambda: mask.argmax(1).tolist(), "mask.argmax(1) finds the FIRST 1 of each row; the reward is read at "
             "the LAST one"),
            (lambda: [0] * B, "you took the first token: under causal attention it has seen nothing of the response; "
             "only the last real token has attended to the whole sequence"),
        ], lambda a, b: a == b)
        if not note and "?" in picked:
            mean = (hidden * mask[..., None]).sum(1) / mask.sum(1, keepdim=True)
            if torch.allclose(got.float(), mean, atol=1e-5):
                note = "\nthat is the mean over the real tokens; a reward model reads the last real token only"
        raise Failure(f"{call}:\nexpected the hidden states at positions {want} (the last 1 of each mask row)\n"
                      f"got      the hidden states at positions {picked}{note}")


# --- 5.3: drop exact and near duplicate pairs -----------------------------------------------------------

_FIELDS = ("prompt", "chosen", "rejected")


def _key(row: dict) -> tuple:
    return tuple(reward._normalise(row[k]) for k in _FIELDS)  # what clean_pairs calls a near duplicate


def _first_by(rows: list[dict], key) -> list[int]:
    """Indices of the rows whose key was not seen before, in order."""
    seen, kept = set(), []
    for i, row in enumerate(rows):
        k = key(row)
        if k not in seen:
            seen.add(k)
            kept.append(i)
    return kept


def dedupe_pairs_reference(rows: list[dict]) -> list[dict]:
    return [rows[i] for i in _first_by(rows, _key)]


_SMALL_ROWS = [
    ("Where does Pip live?", "Pip lives in Mossbrook.", "Pip lives in a castle."),
    ("Where does Pip live?", "In Mossbrook, by the river.", "I do not know."),  # same prompt, another pair: kept
    ("where does pip live?", "Pip  lives in MOSSBROOK", "Pip lives in a castle!"),  # near duplicate of row 0
    ("Where does Pip live?", "Pip lives in Mossbrook.", "Pip lives in a castle."),  # exact duplicate of row 0
    ("What does Tam eat?", "Tam eats berries.", "Tam eats stones."),
    ("WHAT DOES TAM EAT?", "Tam eats berries.", "Tam eats stones."),  # only the case differs from row 4
    ("What does Tam eat? ", "tam eats berries", "Tam eats   stones."),  # near duplicate of row 4
    ("What does Tam eat?", "Tam eats stones.", "Tam eats berries."),  # the sides swapped: another pair, kept
    ("Tell me about Tam's food.", "Tam eats berries.", "Tam eats stones."),  # same sides, another prompt: kept
]

_PROMPTS = {
    "Where does Pip live?": ["Pip lives in Mossbrook.", "In a castle, I think.", "By the river in Mossbrook."],
    "What does Tam eat?": ["Tam eats berries.", "Stones and sand.", "Mostly berries, some nuts."],
    "Name a colour of the sky.": ["Blue.", "Grey, on a rainy day.", "The sky is made of glass."],
    "How many legs has a spider?": ["Eight.", "Six legs.", "A spider has eight legs."],
}


def _perturb(text: str, rng: random.Random) -> str:
    """Change case, spacing or punctuation next to a space or an end: same text once normalised."""
    op = rng.randrange(6)
    if op == 0:
        return text.upper()
    if op == 1:
        return text.lower()
    if op == 2:
        return text.replace(" ", "   ", 1)
    if op == 3:
        return f" {text} "
    if op == 4:
        return text.rstrip(".!?") if text.endswith((".", "!", "?")) else text + "!"
    return text + "?!"


def _random_rows(seed: int, n: int) -> list[tuple]:
    rng = random.Random(seed)
    bases = [(p, a, b) for p, rs in _PROMPTS.items() for a in rs for b in rs if a != b]
    out = []
    for _ in range(n):
        if out and rng.random() < 0.45:
            row = list(rng.choice(out))
            for j in rng.sample(range(3), rng.randint(0, 2)):  # 0 fields changed: an exact duplicate
                row[j] = _perturb(row[j], rng)
            out.append(tuple(row))
        else:
            out.append(rng.choice(bases))
    return out


def _dedupe_cases():
    yield "hand-written", _SMALL_ROWS
    yield "random, over 4 prompts", _random_rows(53, 40)
    yield "an empty list", []


def _diagnose_dedupe(got: list[int], rows: list[dict], expected: list[int]) -> str:
    def last(key):
        first = _first_by(rows[::-1], key)
        return sorted(len(rows) - 1 - i for i in first)

    same = (lambda a, b: a == b)
    candidates = [
        (lambda: _first_by(rows, lambda r: tuple(r[k] for k in _FIELDS)), "you removed exact duplicates only; a row "
         "equal to an earlier one after casefold, removing punctuation and collapsing whitespace is a duplicate too"),
        (lambda: _first_by(rows, lambda r: reward._normalise(r["prompt"])), "you kept one row per prompt: two "
         "different (chosen, rejected) pairs for the same prompt are two comparisons; the key is all three fields"),
        (lambda: _first_by(rows, lambda r: r["prompt"]), "you kept one row per prompt: two different (chosen, "
         "rejected) pairs for the same prompt are two comparisons; the key is all three fields"),
        (lambda: _first_by(rows, lambda r: _key(r)[1:]), "the same two responses to ANOTHER prompt are another "
         "pair: the key is (prompt, chosen, rejected), all three normalised"),
        (lambda: _first_by(rows, lambda r: (_key(r)[0], frozenset(_key(r)[1:]))), "the sides are ordered: "
         "'a over b' and 'b over a' are different rows (they conflict, and label cleaning, not deduplication, "
         "deals with that)"),
    ]
    note = _notes(got, candidates, same)
    if note:
        return note
    if sorted(got) == last(_key):
        return "\nyou kept the LAST row of each group of duplicates; keep the first, as the data set had it"
    if sorted(got) == expected:
        return "\nthe right rows, in another order: keep the order of the input (iterate once, remember what you saw)"
    extra = next((i for i in got if i not in expected), None)
    if extra is not None:
        j = next(j for j in expected if _key(rows[j]) == _key(rows[extra]))
        return (f"\nrow {extra} {_triple(rows[extra])} repeats row {j} {_triple(rows[j])}: both normalise to "
                f"{_key(rows[extra])}")
    missing = next(i for i in expected if i not in got)
    return (f"\nrow {missing} {_triple(rows[missing])} normalises to {_key(rows[missing])}, which no earlier row "
            "does: it is not a duplicate")


def _triple(row: dict) -> str:
    return repr(tuple(row[k] for k in _FIELDS))


@task("05", "5.3", "dedupe_pairs", "Drop exact and near duplicate preference pairs", "core",
      hint="key = (norm(prompt), norm(chosen), norm(rejected)) with norm(s) = ' '.join(re.sub(r'[^\\w\\s]', ' ', "
           "s.casefold()).split()); walk the rows once, keep a row if its key is not in a `seen` set, add the key")
def check_dedupe_pairs(dedupe_pairs):
    for desc, triples in _dedupe_cases():
        rows = [{"id": i, **dict(zip(_FIELDS, t))} for i, t in enumerate(triples)]
        originals = copy.deepcopy(rows)
        call = f"dedupe_pairs(<{len(rows)} rows, {desc}>)"
        got = dedupe_pairs(rows)
        if rows != originals:
            raise Failure(f"{call} changed its input; build the keys from the texts, leave the rows as they were")
        if not isinstance(got, list):
            raise Failure(f"{call}: expected a list of rows, got {type(got).__name__}")
        ids = [originals.index(r) if r in originals else None for r in got]
        if None in ids:
            raise Failure(f"{call} returned {got[ids.index(None)]!r}, which is not one of the input rows: return the "
                          "rows themselves, unchanged")
        expected = _first_by(rows, _key)
        if ids != expected:
            listing = "".join(f"\n  {i}: {_triple(r)}" for i, r in enumerate(rows)) if len(rows) <= 10 else ""
            raise Failure(f"{call}:\nexpected the rows at indices {expected}\n"
                          f"got      the rows at indices {ids}{_diagnose_dedupe(ids, rows, expected)}"
                          + (f"\nthe rows (prompt, chosen, rejected):{listing}" if listing else ""))


# --- 5.4: Kendall's τ-b from scratch ---------------------------------------------------------------------


def kendall_tau_reference(x, y) -> float:
    return reward.kendall_tau(list(x), list(y))  # scipy.stats.kendalltau, τ-b


def _pair_counts(x, y) -> dict:
    """Pairs i < j: concordant, discordant, tied in x only, in y only, in both."""
    c = dict(concordant=0, discordant=0, x_only=0, y_only=0, both=0)
    for i in range(len(x)):
        for j in range(i + 1, len(x)):
            dx, dy = x[i] - x[j], y[i] - y[j]
            kind = ("both" if dx == 0 and dy == 0 else "x_only" if dx == 0 else "y_only" if dy == 0
                    else "concordant" if dx * dy > 0 else "discordant")
            c[kind] += 1
    return c


def _tau_mistakes(x, y):
    c, n = _pair_counts(x, y), len(x)
    n0, s = n * (n - 1) / 2, c["concordant"] - c["discordant"]
    n1, n2 = c["x_only"] + c["both"], c["y_only"] + c["both"]
    tb = s / math.sqrt((n0 - n1) * (n0 - n2))
    diag = "i == j is no pair: the n pairs (i, i) got counted as ties; loop over j > i"
    ties = c["x_only"] + c["y_only"] + c["both"]
    return [
        (lambda: s / n0, "that is τ-a, (concordant - discordant) / (n (n - 1) / 2): it ignores ties. τ-b divides by "
         "sqrt((n0 - n1) (n0 - n2)), leaving out the pairs tied in x (n1) and those tied in y (n2)"),
        (lambda: -tb, "sign reversed: a pair is concordant when x and y order it the same way, "
         "sign(x_i - x_j) * sign(y_i - y_j) > 0"),
        (lambda: 2 * tb, "your value is twice τ-b: looping over all (i, j) with i != j counts each pair twice; "
         "loop over j > i"),
        (lambda: s / math.sqrt((n0 - n1 - n) * (n0 - n2 - n)), diag),
        (lambda: 2 * s / math.sqrt((2 * (n0 - n1) - n) * (2 * (n0 - n2) - n)), diag),
        (lambda: s / math.sqrt((n0 - n1) * (n0 - c["y_only"])), "a pair tied in both x and y counts in n1 AND n2; "
         "an if/elif chain counts it only once"),
        (lambda: s / math.sqrt((n0 - c["x_only"]) * (n0 - n2)), "a pair tied in both x and y counts in n1 AND n2; "
         "an if/elif chain counts it only once"),
        (lambda: (s - ties) / math.sqrt((n0 - n1) * (n0 - n2)), "a tied pair is neither concordant nor discordant "
         "(an `else: discordant += 1` counts it as discordant)"),
        (lambda: (s - ties) / n0, "a tied pair is neither concordant nor discordant, and τ-b leaves ties out of "
         "the denominator too"),
    ], c


def _tau_cases():
    rng = random.Random(54)
    yield "no ties", [0.3, -1.2, 2.5, 0.9, 1.7, -0.4], [0.1, -0.8, 1.9, 1.2, 0.4, -1.5]
    yield "ratings with ties in both", [1, 2, 2, 3, 3, 3, 4, 5], [2, 1, 1, 3, 3, 2, 4, 4]
    yield "same order, with ties", [1, 1, 2, 3, 4], [10, 10, 20, 30, 40]
    yield "ties in y only", [round(rng.gauss(0, 1), 2) for _ in range(10)], [rng.randint(1, 3) for _ in range(10)]
    xs = [round(rng.gauss(0, 1), 2) for _ in range(12)]
    yield "opposite order", xs, [-v for v in xs]
    yield "30 ratings from 1 to 5", [rng.randint(1, 5) for _ in range(30)], [rng.randint(1, 5) for _ in range(30)]
    xs = [round(rng.gauss(0, 1), 3) for _ in range(40)]
    yield "40 noisy scores", xs, [round(v + rng.gauss(0, 1), 3) for v in xs]
    yield "two items", [1.0, 2.0], [3.0, 5.0]


def _short(v: list) -> str:
    shown = ", ".join(f"{a:g}" for a in v[:12])
    return f"[{shown}]" if len(v) <= 12 else f"<{len(v)} numbers: [{shown}, ...]>"


@task("05", "5.4", "kendall_tau", "Kendall's τ-b from scratch, ties included", "stretch",
      hint="over pairs i < j: s = sign(x_i - x_j) * sign(y_i - y_j); concordant if s > 0, discordant if s < 0. "
           "n0 = n (n - 1) / 2, n1 = pairs with x_i == x_j, n2 = pairs with y_i == y_j (a pair tied in both counts "
           "in both); τ-b = (concordant - discordant) / sqrt((n0 - n1) (n0 - n2)), nan when that is 0")
def check_kendall_tau(kendall_tau):
    for desc, x, y in _tau_cases():
        x, y = [float(v) for v in x], [float(v) for v in y]
        call = f"kendall_tau(x={_short(x)}, y={_short(y)}) ({desc})"
        x0, y0 = list(x), list(y)
        got = kendall_tau(x, y)
        if x != x0 or y != y0:
            raise Failure(f"{call} changed x or y (sorted them in place?); work on copies")
        try:
            got = float(got)
        except (TypeError, ValueError):
            raise Failure(f"{call}: expected a float, got {type(got).__name__}") from None
        expected = kendall_tau_reference(x, y)
        if not abs(got - expected) < 1e-6:
            mistakes, c = _tau_mistakes(x, y)
            note = _notes(got, mistakes, lambda a, b: abs(a - b) < 1e-6)
            counts = (f"pairs: {len(x) * (len(x) - 1) // 2}: concordant {c['concordant']}, discordant "
                      f"{c['discordant']}, tied in x only {c['x_only']}, in y only {c['y_only']}, in both {c['both']}")
            raise Failure(f"{call}:\nexpected {expected:.6f} (scipy.stats.kendalltau)\ngot      {got:.6f}\n"
                          f"{counts}{note}")
    x, y = [2.0, 2.0, 2.0, 2.0], [1.0, 2.0, 3.0, 4.0]
    call = f"kendall_tau(x={_short(x)}, y={_short(y)}) (x is constant)"
    try:
        got = float(kendall_tau(x, y))
    except ZeroDivisionError:
        got = "ZeroDivisionError"
    if not (isinstance(got, float) and math.isnan(got)):
        raise Failure(f"{call}:\nexpected nan (as scipy.stats.kendalltau)\ngot      {got}\nevery pair is tied in x, "
                      "so τ-b is 0 / 0: return float('nan') when (n0 - n1) (n0 - n2) is 0")
