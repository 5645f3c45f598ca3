"""Checks for chapter 10 — evaluation (模型评估): clipped n-gram precision (精确率), sentence BLEU, ROUGE-L by the
longest common subsequence, a win-rate (胜率) with its confidence interval (置信区间), and TruthfulQA's MC1/MC2.

The references are the libraries' where one exists: sacrebleu's n-gram statistics and score (10.1, 10.2; whitespace
tokens, no smoothing, no effective order), rouge-score's ``RougeScorer(["rougeL"])`` on lowercase alphanumeric words,
which it tokenizes exactly as given (10.3). The win-rate interval (10.4; the variance divided by n, or by n − 1 as
``course_utils.judge`` has it) and MC1/MC2 (10.5) are the formulas of the task text; ``tests/test_grading_ch10.py``
checks them on hand-computed cases, against chapter 06's judge and against scipy's softmax.
"""

from __future__ import annotations

import functools
import math
from collections import Counter

from .core import Failure, mistake_notes as _notes, task


def _call(fn, call: str, *args):
    """``fn(*args)``; a Failure if it changed a list it was given."""
    copies = [list(a) if isinstance(a, list) else a for a in args]
    out = fn(*args)
    if any(isinstance(a, list) and a != c for a, c in zip(args, copies)):
        raise Failure(f"{call} changed a list it was given (sort? pop? +=?); read it, do not modify it")
    return out


def _number(call: str, value, what: str) -> float:
    try:
        return float(value)
    except (TypeError, ValueError, RuntimeError):
        raise Failure(f"{call}: expected {what} as a number, got {type(value).__name__} {value!r}") from None


def _near(a: float, b: float, tol: float = 1e-9) -> bool:
    return abs(a - b) <= tol * max(1.0, abs(b))  # NaN is near nothing


def _words(text: str) -> list[str]:
    return text.split()


def _fields(d: dict, keys, spec: str = ".4f") -> str:
    return ", ".join(f"{k} {d[k]:{spec}}" for k in keys)


# --- 10.1 (warm-up): clipped n-gram precision -----------------------------------------------------------------


@functools.cache
def _sacrebleu(max_n: int):
    from sacrebleu.metrics import BLEU

    # tokens joined by spaces come back as they were; no smoothing; every order counts, even one with no n-grams
    return BLEU(tokenize="none", smooth_method="none", effective_order=False, max_ngram_order=max_n)


def sacrebleu_sentence(candidate: list, reference: list, max_n: int = 4):
    """sacrebleu's BLEU of one sentence, tokens joined by spaces (.score, .counts, .totals, .bp).

    A corpus of one sentence: the same statistics and score as ``sentence_score``, without its warning that sentence
    BLEU is usually computed with effective order.
    """
    return _sacrebleu(max_n).corpus_score([" ".join(candidate)], [[" ".join(reference)]])


def _ngrams(tokens, n, last=True) -> Counter:
    return Counter(tuple(tokens[i:i + n]) for i in range(len(tokens) - n + last))


def _precision_variant(cand, ref, n, *, clip=True, last=True, sets=False, set_total=True, ref_total=False):
    """(matches, total) of the task text, or with one of the known mistakes."""
    c, r = _ngrams(cand, n, last), _ngrams(ref, n, last)
    if sets:
        matches = len(c.keys() & r.keys())
        total = len(c) if set_total else c.total()
    else:
        matches = sum(min(k, r[g]) if clip else k * (g in r) for g, k in c.items())
        total = c.total()
    return matches, r.total() if ref_total else total


_PRECISION_MISTAKES = [
    (dict(clip=False), "no clipping: a candidate n-gram counts at most as often as it occurs in the reference, "
     "min(count in candidate, count in reference); unclipped, 'the the the …' scores 100% against 'the cat is on "
     "the mat'"),
    (dict(ref_total=True), "the total is the number of CANDIDATE n-grams: precision (精确率) asks how much of what the "
     "model wrote is in the reference; dividing by the reference's n-grams makes it a recall (召回率)"),
    (dict(last=False), "off by one: L tokens have L − n + 1 n-grams, range(len(tokens) - n + 1); you missed the last"),
    (dict(sets=True), "you used sets: a repeated n-gram counts each time it occurs (a multiset, collections.Counter), "
     "up to its count in the reference"),
    (dict(sets=True, set_total=False), "you used sets for the matches: a repeated n-gram counts each time it occurs "
     "(a multiset, collections.Counter), up to its count in the reference"),
]

_PRECISION_CASES = (  # (candidate, reference, n)
    ("the the the the the the the the", "the cat is on the mat", 1),
    ("the cat the cat on the mat", "the cat is on the mat", 2),
    ("a cat is on the mat", "there is a cat on the mat", 1),
    ("a cat is on the mat", "there is a cat on the mat", 2),
    ("the cat sat on the mat", "the cat sat on the red mat", 3),
    ("we saw the cat and the cat saw us", "the cat saw us and we saw the cat", 2),
    ("on the mat", "the cat is on the mat", 3),
    ("the cat", "the cat is on the mat", 3),
    ("", "the cat", 1),
)


@task("10", "10.1", "ngram_precision", "modified (clipped) n-gram precision, as sacrebleu counts it", "warm-up",
      hint="count the candidate's and the reference's n-grams with collections.Counter over tuple(tokens[i:i + n]) "
           "for i in range(len(tokens) - n + 1); matches = sum(min(k, ref_counts[g]) for g, k in cand_counts.items()); "
           "return matches, sum(cand_counts.values())")
def check_ngram_precision(ngram_precision):
    for cand, ref, n in _PRECISION_CASES:
        cand, ref = _words(cand), _words(ref)
        call = f"ngram_precision({cand}, {ref}, n={n})"
        got = _call(ngram_precision, call, list(cand), list(ref), n)
        if not (isinstance(got, (tuple, list)) and len(got) == 2):
            raise Failure(f"{call}: expected a pair (clipped matches, candidate n-grams), got {got!r}; return both "
                          "counts, not their ratio (BLEU adds them up before dividing at corpus level)")
        stats = sacrebleu_sentence(cand, ref, max_n=n)
        want = stats.counts[n - 1], stats.totals[n - 1]
        if tuple(got) != want:
            note = _notes(tuple(got), [(lambda kw=kw: _precision_variant(cand, ref, n, **kw), note)
                                       for kw, note in _PRECISION_MISTAKES], lambda a, b: a == b)
            raise Failure(f"{call}:\nexpected {want} (sacrebleu's clipped matches and candidate {n}-grams)\n"
                          f"got      {tuple(got)}{note}")


# --- 10.2 (core): sentence BLEU ----------------------------------------------------------------------------------


def _bleu_variant(cand, ref, max_n, *, bp="short", mean="geometric", clip=True, scale=100.0, effective=False):
    """Sentence BLEU of the task text, or with one of the known mistakes."""
    c, r = len(cand), len(ref)
    p = []
    for n in range(1, max_n + 1):
        m, t = _precision_variant(cand, ref, n, clip=clip)
        if t or not effective:
            p.append(m / t if t else 0.0)
    max_n = len(p)
    if mean == "arithmetic":
        core = sum(p) / max_n
    else:
        core = math.exp(sum(map(math.log, p)) / max_n) if min(p) > 0 else 0.0
    penalty = {"short": math.exp(1 - r / c) if c < r else 1.0, "none": 1.0, "always": math.exp(1 - r / c),
               "swapped": math.exp(1 - c / r) if c < r else 1.0}[bp]
    return scale * penalty * core


_BLEU_MISTAKES = [
    (dict(bp="none"), "the brevity penalty is missing: a candidate shorter than the reference (c < r) is multiplied "
     "by exp(1 − r/c); without it, copying a few sure words scores high precision"),
    (dict(bp="always"), "the brevity penalty is 1 when the candidate is at least as long as the reference: for c > r, "
     "exp(1 − r/c) > 1 would reward padding"),
    (dict(bp="swapped"), "the brevity penalty is exp(1 − r/c) (< 1 for a short candidate), not exp(1 − c/r)"),
    (dict(mean="arithmetic"), "BLEU takes the GEOMETRIC mean of the n-gram precisions, exp(Σ log p_n / max_n), not "
     "their arithmetic mean (one precision of 0 makes BLEU 0)"),
    (dict(clip=False), "no clipping: each n-gram matches at most as often as it occurs in the reference (task 10.1)"),
    (dict(scale=1.0), "BLEU is on 0–100, as sacrebleu reports it: multiply by 100"),
    (dict(effective=True), "an order with no n-grams (a candidate shorter than n) has precision 0, so BLEU is 0; you "
     "left that order out, as sacrebleu's sentence_bleu does by default (use_effective_order=True). Here every order "
     "counts (use_effective_order=False)"),
]

_BLEU_CASES = (  # (candidate, reference, max_n): every precision > 0 first, then the cases where BLEU is 0
    ("the cat sat on the mat", "the cat sat on the mat today", 4),
    ("the quick brown fox jumps over the lazy dog", "the quick brown fox jumped over the lazy dog", 4),
    ("a cat is sitting on the mat and it is happy", "the cat is sitting on the mat", 4),
    ("it is a guide to action that ensures that the military always obeys the commands of the party",
     "it is a guide to action which ensures that the military always heeds the party commands", 4),
    ("the the the the the the the", "the cat is on the mat", 1),
    ("cat on the mat", "the cat is on the mat", 2),
    ("there is a cat on the mat", "the cat is on the mat", 4),
    ("the cat", "the cat is on the mat", 4),
    ("", "the cat", 4),
)


@task("10", "10.2", "bleu", "sentence BLEU: clipped precisions, geometric mean, brevity penalty, as sacrebleu",
      "core", hint="p_n = matches / total from ngram_precision for n = 1..max_n; if a total or a match count is 0 "
                   "return 0.0; else BP = exp(1 - r / c) if c < r else 1, BLEU = 100 * BP * exp(sum(log p_n) / max_n)")
def check_bleu(bleu):
    for cand, ref, max_n in _BLEU_CASES:
        cand, ref = _words(cand), _words(ref)
        call = f"bleu({cand}, {ref}, max_n={max_n})"
        want = sacrebleu_sentence(cand, ref, max_n).score
        try:
            got = _number(call, _call(bleu, call, list(cand), list(ref), max_n), "the BLEU score")
        except ZeroDivisionError:
            raise Failure(f"{call} raised ZeroDivisionError: expected {want:.4f}. A candidate shorter than n has no "
                          "n-grams: its precision counts as 0, and BLEU is 0 (c = 0 too); check before you divide") \
                from None
        if not _near(got, want, 1e-7):
            note = _notes(got, [(lambda kw=kw: _bleu_variant(cand, ref, max_n, **kw), note)
                                for kw, note in _BLEU_MISTAKES], lambda a, b: _near(a, b, 1e-7))
            if not note and math.isnan(got):
                note = "\nNaN: 0/0 or log(0); a candidate with no n-grams of some order, or no match, has BLEU 0"
            raise Failure(f"{call}:\nexpected {want:.4f} (sacrebleu.sentence_bleu, tokenize='none', smooth_method="
                          f"'none', use_effective_order=False)\ngot      {got:.4f}\n(c = {len(cand)}, r = {len(ref)})"
                          f"{note}")


# --- 10.3 (core): ROUGE-L ---------------------------------------------------------------------------------------------


@functools.cache
def _rouge_scorer():
    from rouge_score.rouge_scorer import RougeScorer

    return RougeScorer(["rougeL"])


def rouge_score_l(candidate: list, reference: list) -> dict:
    """rouge-score's ROUGE-L of whitespace-joined tokens (lowercase alphanumeric words: its tokenizer keeps them)."""
    s = _rouge_scorer().score(" ".join(reference), " ".join(candidate))["rougeL"]  # score(target, prediction)
    return {"precision": s.precision, "recall": s.recall, "f": s.fmeasure}


def _lcs(a, b) -> int:
    table = [[0] * (len(b) + 1) for _ in range(len(a) + 1)]  # table[i][j]: LCS of a[:i] and b[:j]
    for i, x in enumerate(a, start=1):
        for j, y in enumerate(b, start=1):
            table[i][j] = table[i - 1][j - 1] + 1 if x == y else max(table[i - 1][j], table[i][j - 1])
    return table[-1][-1]


def _substring(a, b) -> int:
    best, row = 0, [0] * (len(b) + 1)  # row[j]: length of the common run ending at the current a token and b[j - 1]
    for x in a:
        row = [0] + [row[j] + 1 if x == y else 0 for j, y in enumerate(b)]
        best = max(best, *row)
    return best


def _rouge_variant(cand, ref, *, length=_lcs, shift=0, swap=False, f="harmonic"):
    lcs = length(cand, ref) + shift
    p, r = (lcs / len(cand), lcs / len(ref)) if cand and ref else (0.0, 0.0)
    if swap:
        p, r = r, p
    f1 = (p + r) / 2 if f == "arithmetic" else (2 * p * r / (p + r) if p + r else 0.0)
    return {"precision": p, "recall": r, "f": f1}


_ROUGE_MISTAKES = [
    (dict(length=_substring), "that is the longest common SUBSTRING (contiguous); ROUGE-L uses the longest common "
     "SUBSEQUENCE: the same words in the same order, with gaps allowed"),
    (dict(swap=True), "precision and recall are swapped: precision = LCS / len(candidate), recall = LCS / "
     "len(reference)"),
    (dict(f="arithmetic"), "F is the harmonic mean 2PR / (P + R) (F1, beta = 1), not the arithmetic mean (P + R) / 2"),
    *[(kw, "off by one in the LCS: in an (m+1)×(n+1) table, row 0 and column 0 are the empty prefixes, i runs "
       "1..m and j runs 1..n, and the LCS is table[m][n]")
      for kw in (dict(length=lambda a, b: _lcs(a[:-1], b[:-1])), dict(length=lambda a, b: _lcs(a[1:], b[1:])),
                 dict(shift=1), dict(shift=-1))],
]

_ROUGE_CASES = (  # (candidate, reference); lowercase alphanumeric words, which rouge-score keeps as they are
    ("the cat was found under the bed", "the cat was under the bed"),
    ("police killed the gunman", "the gunman killed police"),
    ("a b x c d y e", "a b c d e"),
    ("the cat sat on the mat", "a cat is sitting on a mat in the sun"),
    ("we saw the cat and the cat saw us", "the cat saw us and we saw the cat"),
    ("the cat sat", "the cat sat"),
    ("dogs bark loudly", "the cat sat"),
    ("", "the cat sat"),
)


@task("10", "10.3", "rouge_l", "ROUGE-L: precision, recall and F1 of the longest common subsequence, as rouge-score",
      "core", hint="LCS by dynamic programming: table[i][j] = table[i-1][j-1] + 1 if cand[i-1] == ref[j-1] else "
                   "max(table[i-1][j], table[i][j-1]) over an (m+1)×(n+1) table of zeros; precision = lcs / len(cand), "
                   "recall = lcs / len(ref), f = 2PR / (P + R); all 0 when the LCS is 0")
def check_rouge_l(rouge_l):
    for cand, ref in _ROUGE_CASES:
        cand, ref = _words(cand), _words(ref)
        call = f"rouge_l({cand}, {ref})"
        want = rouge_score_l(cand, ref)
        try:
            got = _call(rouge_l, call, list(cand), list(ref))
        except ZeroDivisionError:
            raise Failure(f"{call} raised ZeroDivisionError: expected {want}. With no common word (or an empty "
                          "candidate) precision, recall and F are all 0: check before dividing") from None
        if not (isinstance(got, dict) and {"precision", "recall", "f"} <= got.keys()):
            raise Failure(f"{call}: expected a dict with keys 'precision', 'recall', 'f', got {got!r}")
        got = {k: _number(call, got[k], k) for k in ("precision", "recall", "f")}
        if not all(_near(got[k], want[k]) for k in want):
            note = _notes(got, [(lambda kw=kw: _rouge_variant(cand, ref, **kw), note) for kw, note in _ROUGE_MISTAKES],
                          lambda a, b: all(_near(a[k], b[k]) for k in b))
            raise Failure(f"{call}:\nexpected {_fields(want, want)} (rouge-score's rougeL; LCS {_lcs(cand, ref)})\n"
                          f"got      {_fields(got, want)}{note}")


# --- 10.4 (stretch): win-rate with a 95% confidence interval ---------------------------------------------------------


def _win_variant(a, b, tol, *, tie_le=True, use_tol=True, swap=False, ties="half", bernoulli=False, ddof=0,
                 ci_n="all", clip=True):
    """win_rate of the task text, or with one of the known mistakes."""
    tol = tol if use_tol else 0.0
    diffs = [(y - x) if swap else (x - y) for x, y in zip(a, b)]
    tie = [abs(d) <= tol if tie_le else abs(d) < tol or d == 0 for d in diffs]
    win = sum(d > 0 and not t for d, t in zip(diffs, tie))
    n_tie = sum(tie)
    loss = len(diffs) - win - n_tie
    outcomes = [0.5 if t else float(d > 0) for d, t in zip(diffs, tie)]
    if ties == "loss":
        outcomes = [float(o == 1.0) for o in outcomes]
    elif ties == "drop":
        outcomes = [o for o in outcomes if o != 0.5]
    n = len(outcomes)
    rate = sum(outcomes) / n
    var = rate * (1 - rate) if bernoulli else sum((o - rate) ** 2 for o in outcomes) / (n - ddof)
    n_ci = {"all": n, "decisive": win + loss, "squared": n * n}[ci_n]
    half = 1.96 * math.sqrt(var / n_ci)
    low, high = rate - half, rate + half
    if clip:
        low, high = max(0.0, low), min(1.0, high)
    return {"win": win, "tie": n_tie, "loss": loss, "win_rate": rate, "low": low, "high": high}


win_rate_reference = _win_variant

_WIN_MISTAKES = [
    (dict(swap=True), "a win means scores_a[i] > scores_b[i] by more than tol: you counted model B's wins"),
    (dict(tie_le=False), "a tie is |a − b| <= tol, with <=: a difference of exactly tol is a tie"),
    (dict(use_tol=False), "ties use the tolerance: |a − b| <= tol is a tie, not only a == b"),
    (dict(ties="loss"), "ties count as half a win: win_rate = (win + tie / 2) / n; you counted them as losses"),
    (dict(ties="drop"), "ties count as half a win and stay in the denominator: win_rate = (win + tie / 2) / n, "
     "not win / (win + loss)"),
    (dict(bernoulli=True), "with ties the outcomes take three values (1, ½, 0): the variance is the mean of "
     "(o_i − win_rate)², not the Bernoulli p(1 − p)"),
    (dict(ci_n="decisive"), "the interval uses n = every item, ties included: 1.96·sqrt(var / n)"),
    (dict(ci_n="squared"), "the standard error is sqrt(var / n) (the square root of var / n), not sqrt(var) / n"),
    (dict(clip=False), "a win-rate lies in [0, 1], and so does its interval: clip low at 0 and high at 1"),
]

_WIN_CASES = (  # (scores_a, scores_b, tol)
    ([8, 7, 9, 5, 6, 8, 7, 9, 4, 8], [6, 7, 8, 6, 6, 5, 7, 6, 5, 7], 0.0),
    ([0.9, 0.8, 0.75, 0.6, 0.9, 0.3, 0.5, 0.8], [0.5, 0.8, 0.5, 0.7, 0.25, 0.3, 0.75, 0.8], 0.25),
    ([3, 4, 5, 4, 5, 3, 4, 5, 5, 4, 3, 5], [2, 4, 3, 4, 1, 2, 3, 4, 2, 3, 3, 1], 0.0),
    ([1, 2, 1, 2, 2, 1, 1], [3, 3, 1, 4, 2, 2, 5], 0.0),
    ([2, 3, 4], [2, 3, 4], 0.0),
    ([1, 2, 3, 4, 5, 1, 2, 3, 4, 5, 1, 2, 3, 4, 5, 1, 2, 3, 4, 5, 2, 4, 1, 5, 3, 3, 2, 5, 4, 1],
     [2, 2, 1, 5, 3, 1, 4, 3, 2, 5, 1, 1, 4, 4, 2, 5, 3, 3, 1, 2, 2, 5, 2, 3, 4, 3, 1, 4, 5, 2], 1.0),
)

_CI_TOL = 3e-5  # z = 1.96 or scipy's 1.959964…: both pass


@task("10", "10.4", "win_rate", "win-rate with ties as half, and its 95% confidence interval", "stretch",
      hint="o_i = 1 if a_i - b_i > tol, 0.5 if |a_i - b_i| <= tol, else 0; win_rate = mean(o); var = mean((o - "
           "win_rate)**2); half = 1.96 * sqrt(var / n); low = max(0, win_rate - half), high = min(1, win_rate + half)")
def check_win_rate(win_rate):
    for a, b, tol in _WIN_CASES:
        call = f"win_rate({a}, {b}, tol={tol})"
        want = win_rate_reference(a, b, tol)
        got = _call(win_rate, call, list(a), list(b), tol)
        if not (isinstance(got, dict) and want.keys() <= got.keys()):
            raise Failure(f"{call}: expected a dict with keys {', '.join(want)}, got {got!r}")
        got = {k: _number(call, got[k], k) for k in want}

        def fail(keys, what, eps=1e-9):
            note = _notes(got, [(lambda kw=kw: _win_variant(a, b, tol, **kw), note) for kw, note in _WIN_MISTAKES],
                          lambda x, y: all(_near(x[k], y[k], eps) for k in keys))
            raise Failure(f"{call} → {what}:\nexpected {_fields(want, keys, '.4g')}\n"
                          f"got      {_fields(got, keys, '.4g')}{note}")

        if any(got[k] != want[k] for k in ("win", "tie", "loss")):
            fail(("win", "tie", "loss"), "the counts")
        if not _near(got["win_rate"], want["win_rate"]):
            fail(("win_rate",), f"win_rate = (win + tie / 2) / n with n = {len(a)}")
        accepted = want, _win_variant(a, b, tol, ddof=1)  # var / n, or var / (n − 1) as chapter 06's judge has it
        if not any(all(_near(got[k], w[k], _CI_TOL) for k in ("low", "high")) for w in accepted):
            fail(("low", "high"), "the 95% interval win_rate ± 1.96·sqrt(var / n), clipped to [0, 1]", _CI_TOL)


# --- 10.5 (core): TruthfulQA's MC1 and MC2 ----------------------------------------------------------------------------


def _logsumexp(xs) -> float:
    m = max(xs)
    return m + math.log(sum(math.exp(x - m) for x in xs))


def mc_scores_reference(logprobs, correct) -> dict:
    best = max(range(len(logprobs)), key=logprobs.__getitem__)  # the first of the highest
    mass = _logsumexp([lp for lp, c in zip(logprobs, correct) if c]) - _logsumexp(logprobs)
    return {"mc1": float(correct[best]), "mc2": math.exp(mass)}


def _mc2_variant(logprobs, correct, kind):
    right = [lp for lp, c in zip(logprobs, correct) if c]
    return {"log": lambda: sum(right) / sum(logprobs),
            "correct only": lambda: sum(map(math.exp, right)) / sum(math.exp(x) for x in right),
            "unnormalized": lambda: sum(map(math.exp, right))}[kind]()


_MC2_MISTAKES = [
    ("log", "you added log-probabilities: MC2 adds PROBABILITIES, Σ exp(lp) over the correct choices / Σ exp(lp) over "
     "all choices"),
    ("correct only", "you normalized over the correct choices only (that is always 1): divide by the probability mass "
     "of ALL choices"),
    ("unnormalized", "the normalization is missing: divide by Σ exp(lp) over all choices, so the choices' "
     "probabilities sum to 1 (a softmax over the choices)"),
]

_MC_CASES = (  # (log-probs of the choices, which are correct)
    ([-4.2, -6.1, -5.0, -7.3], [True, False, False, False]),
    ([-12.5, -9.8, -11.0, -15.2], [True, False, False, False]),
    ([-3.1, -2.2, -5.4, -2.9, -4.0], [True, False, True, True, False]),
    ([-8.0, -7.5, -9.1, -6.9], [False, True, True, False]),
    ([-0.4, -1.5, -3.0], [False, False, True]),
    ([-1003.25, -1001.5, -1004.75, -1002.0], [False, True, False, True]),  # exact in float32 too
)


@task("10", "10.5", "mc_scores", "TruthfulQA MC1 (argmax is correct) and MC2 (probability mass on correct)", "core",
      hint="mc1 = 1.0 if correct[argmax(logprobs)] else 0.0; mc2 = exp(logsumexp(lp of the correct choices) - "
           "logsumexp(all lp)), with logsumexp(xs) = m + log(sum(exp(x - m))) and m = max(xs)")
def check_mc_scores(mc_scores):
    for logprobs, correct in _MC_CASES:
        call = f"mc_scores({logprobs}, {correct})"
        want = mc_scores_reference(logprobs, correct)
        try:
            got = _call(mc_scores, call, list(logprobs), list(correct))
        except ZeroDivisionError:
            raise Failure(f"{call} raised ZeroDivisionError: expected mc2 {want['mc2']:.4f}. exp(−1000) underflows "
                          "to 0 in float64, so Σ exp(lp) is 0/0; subtract the largest log-prob first (logsumexp)") \
                from None
        if not (isinstance(got, dict) and {"mc1", "mc2"} <= got.keys()):
            raise Failure(f"{call}: expected a dict with keys 'mc1', 'mc2', got {got!r}")
        mc1, mc2 = _number(call, got["mc1"], "mc1"), _number(call, got["mc2"], "mc2")
        if mc1 != want["mc1"]:
            best = max(range(len(logprobs)), key=logprobs.__getitem__)
            note = ("\nthe most likely choice has the HIGHEST log-prob (closest to 0), not the most negative one"
                    if mc1 == float(correct[min(range(len(logprobs)), key=logprobs.__getitem__)]) else "")
            verdict = "correct" if correct[best] else "wrong"
            raise Failure(f"{call} → mc1:\nexpected {want['mc1']} (choice {best} has the highest log-prob "
                          f"{logprobs[best]}, and it is {verdict})\ngot      {mc1}{note}")
        if not _near(mc2, want["mc2"], 1e-5):  # a float32 softmax passes
            note = _notes(mc2, [(lambda k=k: _mc2_variant(logprobs, correct, k), note) for k, note in _MC2_MISTAKES],
                          lambda a, b: _near(a, b, 1e-5))
            if not note and math.isnan(mc2):
                note = ("\nNaN: exp(−1000) underflows to 0 in float64, so Σ exp(lp) is 0/0; subtract the largest "
                        "log-prob first (logsumexp)")
            raise Failure(f"{call} → mc2 (probability mass on the correct choices):\nexpected {want['mc2']:.6f}\n"
                          f"got      {mc2:.6f}{note}")
