"""Chapter 10 (evaluation) grading bites: references pass, common mistakes fail and say why, and the graders'
references are sacrebleu's and rouge-score's (solution 100% and exercise 0 are checked for every chapter in
test_grading.py)."""

import math
import random
from collections import Counter

import numpy as np
import pytest
import torch

from course_utils import grading
from grading_asserts import assert_reference_passes, chapter_tests

# --- references (what the solution notebook has) -----------------------------------------------------


def ngram_precision(candidate_tokens, reference_tokens, n):
    def ngrams(tokens):
        return Counter(tuple(tokens[i:i + n]) for i in range(len(tokens) - n + 1))

    cand, ref = ngrams(candidate_tokens), ngrams(reference_tokens)
    return sum(min(k, ref[g]) for g, k in cand.items()), sum(cand.values())


def bleu(candidate_tokens, reference_tokens, max_n=4):
    c, r = len(candidate_tokens), len(reference_tokens)
    log_p = 0.0
    for n in range(1, max_n + 1):
        matches, total = ngram_precision(candidate_tokens, reference_tokens, n)
        if matches == 0:
            return 0.0
        log_p += math.log(matches / total)
    return 100 * (1.0 if c >= r else math.exp(1 - r / c)) * math.exp(log_p / max_n)


def lcs_length(a, b, first=1, last=0):  # first=2 or last=1: the table's loops off by one (mistakes below)
    table = [[0] * (len(b) + 1) for _ in range(len(a) + 1)]
    for i in range(first, len(a) + 1 - last):
        for j in range(first, len(b) + 1 - last):
            table[i][j] = table[i - 1][j - 1] + 1 if a[i - 1] == b[j - 1] else max(table[i - 1][j], table[i][j - 1])
    return table[len(a) - last][len(b) - last]


def _prf(lcs, m, n, f=lambda p, r: 2 * p * r / (p + r)):
    if lcs == 0:
        return {"precision": 0.0, "recall": 0.0, "f": 0.0}
    p, r = lcs / m, lcs / n
    return {"precision": p, "recall": r, "f": f(p, r)}


def rouge_l(candidate_tokens, reference_tokens):
    return _prf(lcs_length(candidate_tokens, reference_tokens), len(candidate_tokens), len(reference_tokens))


def win_rate(scores_a, scores_b, tol=0.0, z=1.96, ties=0.5, ddof=0, clip=True, strict=False):
    a, b = np.asarray(scores_a, dtype=float), np.asarray(scores_b, dtype=float)
    tie = ((np.abs(a - b) < tol) | (a == b)) if strict else np.abs(a - b) <= tol
    win, loss = (a > b) & ~tie, (a < b) & ~tie
    o = np.where(tie, ties, win.astype(float))  # per-item outcomes 1, ½, 0
    rate, half = o.mean(), z * math.sqrt(o.var(ddof=ddof) / len(o))
    low, high = (max(0.0, rate - half), min(1.0, rate + half)) if clip else (rate - half, rate + half)
    return {"win": int(win.sum()), "tie": int(tie.sum()), "loss": int(loss.sum()), "win_rate": float(rate),
            "low": low, "high": high}


def _logsumexp(xs):
    m = max(xs)
    return m + math.log(sum(math.exp(x - m) for x in xs))


def mc_scores(logprobs, correct):
    best = max(range(len(logprobs)), key=logprobs.__getitem__)
    right = [lp for lp, c in zip(logprobs, correct) if c]
    return {"mc1": float(correct[best]), "mc2": math.exp(_logsumexp(right) - _logsumexp(logprobs))}


REFERENCES = {"10.1": (ngram_precision,), "10.2": (bleu,), "10.3": (rouge_l,), "10.4": (win_rate,),
              "10.5": (mc_scores,)}


# --- common mistakes -----------------------------------------------------------------------------------

def _precision_with(name, *, clip=True, last=1, sets=False, ref_total=False, all_total=False):
    def ngram_precision(candidate_tokens, reference_tokens, n):
        def ngrams(tokens):
            grams = [tuple(tokens[i:i + n]) for i in range(len(tokens) - n + last)]
            return set(grams) if sets else Counter(grams)

        cand, ref = ngrams(candidate_tokens), ngrams(reference_tokens)
        if sets:
            matches = len(cand & ref)
        else:
            matches = sum(min(k, ref[g]) if clip else k for g, k in cand.items() if g in ref)
        if ref_total:
            total = len(reference_tokens) - n + 1
        elif all_total:
            total = max(0, len(candidate_tokens) - n + 1)
        else:
            total = len(cand) if sets else cand.total()
        return matches, total

    ngram_precision.__name__ = name
    return ngram_precision


def precision_ratio(candidate_tokens, reference_tokens, n):
    matches, total = ngram_precision(candidate_tokens, reference_tokens, n)
    return matches / total if total else 0.0


def precision_pops(candidate_tokens, reference_tokens, n):
    answer = ngram_precision(candidate_tokens, reference_tokens, n)
    while candidate_tokens:
        candidate_tokens.pop()
    return answer


def _bleu_with(name, bp="short", arithmetic=False, scale=100.0, effective=False, precision=ngram_precision):
    def bleu(candidate_tokens, reference_tokens, max_n=4):
        c, r = len(candidate_tokens), len(reference_tokens)
        stats = [precision(candidate_tokens, reference_tokens, n) for n in range(1, max_n + 1)]
        p = [m / t for m, t in stats if t]  # effective order: leave out the orders without n-grams
        if not p or (not effective and len(p) < max_n):
            return 0.0
        mean = sum(p) / len(p) if arithmetic else (math.exp(sum(map(math.log, p)) / len(p)) if min(p) else 0.0)
        penalty = {"short": math.exp(1 - r / c) if c < r else 1.0, "none": 1.0, "always": math.exp(1 - r / c),
                   "swapped": math.exp(1 - c / r) if c < r else 1.0}[bp]
        return scale * penalty * mean

    bleu.__name__ = name
    return bleu


def bleu_divides_by_zero(candidate_tokens, reference_tokens, max_n=4):
    precisions = [m / t for m, t in (ngram_precision(candidate_tokens, reference_tokens, n)
                                     for n in range(1, max_n + 1))]
    c, r = len(candidate_tokens), len(reference_tokens)
    mean = math.exp(sum(math.log(p) if p else -math.inf for p in precisions) / max_n)
    return 100 * (math.exp(1 - r / c) if c < r else 1.0) * mean


def bleu_numpy(candidate_tokens, reference_tokens, max_n=4):  # 0 / 0 in numpy is NaN
    stats = np.array([ngram_precision(candidate_tokens, reference_tokens, n) for n in range(1, max_n + 1)], float)
    with np.errstate(divide="ignore", invalid="ignore"):
        p = stats[:, 0] / stats[:, 1]
        c, r = len(candidate_tokens), len(reference_tokens)
        bp = np.exp(1 - r / np.float64(c)) if c < r else 1.0
        return float(100 * bp * np.exp(np.log(p).mean()))


def _rouge_with(name, length=lcs_length, swap=False, arithmetic=False):
    def rouge_l(candidate_tokens, reference_tokens):
        m, n = len(candidate_tokens), len(reference_tokens)
        return _prf(length(candidate_tokens, reference_tokens), *((n, m) if swap else (m, n)),
                    **({"f": lambda p, r: (p + r) / 2} if arithmetic else {}))

    rouge_l.__name__ = name
    return rouge_l


def longest_common_substring(a, b):
    return max((k for i in range(len(a)) for j in range(len(b)) for k in range(1, min(len(a) - i, len(b) - j) + 1)
                if a[i:i + k] == b[j:j + k]), default=0)


def rouge_divides_by_zero(candidate_tokens, reference_tokens):
    lcs = lcs_length(candidate_tokens, reference_tokens)
    p, r = lcs / max(1, len(candidate_tokens)), lcs / len(reference_tokens)
    return {"precision": p, "recall": r, "f": 2 * p * r / (p + r)}


def rouge_tuple(candidate_tokens, reference_tokens):
    return tuple(rouge_l(candidate_tokens, reference_tokens).values())


def _win_with(name, **mistake):
    def win_rate_(scores_a, scores_b, tol=0.0):
        return win_rate(scores_a, scores_b, tol, **mistake)

    win_rate_.__name__ = name
    return win_rate_


def win_swapped(scores_a, scores_b, tol=0.0):
    return win_rate(scores_b, scores_a, tol)


def win_no_tolerance(scores_a, scores_b, tol=0.0):
    return win_rate(scores_a, scores_b, 0.0)


def win_ties_dropped(scores_a, scores_b, tol=0.0):
    keep = [abs(a - b) > tol for a, b in zip(scores_a, scores_b)]
    out = win_rate([a for a, k in zip(scores_a, keep) if k], [b for b, k in zip(scores_b, keep) if k], tol)
    return {**out, "tie": len(keep) - sum(keep)}


def _half_width_with(name, half_width):
    """The right counts and win-rate, with the interval's half-width ``half_width(outcomes, result)``."""
    def win_rate_(scores_a, scores_b, tol=0.0):
        out = win_rate(scores_a, scores_b, tol)
        o = np.repeat([1.0, 0.5, 0.0], [out["win"], out["tie"], out["loss"]])  # the outcomes, sorted
        half = half_width(o, out)
        return {**out, "low": max(0.0, out["win_rate"] - half), "high": min(1.0, out["win_rate"] + half)}

    win_rate_.__name__ = name
    return win_rate_


def win_sorts(scores_a, scores_b, tol=0.0):
    out = win_rate(scores_a, scores_b, tol)
    scores_a.sort()
    return out


def _mc_with(name, mc2):
    def mc_scores_(logprobs, correct):
        right = [lp for lp, c in zip(logprobs, correct) if c]
        return {"mc1": mc_scores(logprobs, correct)["mc1"], "mc2": mc2(right, logprobs)}

    mc_scores_.__name__ = name
    return mc_scores_


def mc_argmin(logprobs, correct):
    worst = min(range(len(logprobs)), key=logprobs.__getitem__)
    return {"mc1": float(correct[worst]), "mc2": mc_scores(logprobs, correct)["mc2"]}


def mc_numpy_naive(logprobs, correct):
    p = np.exp(np.array(logprobs))
    with np.errstate(invalid="ignore"):
        return {"mc1": float(correct[int(np.argmax(logprobs))]), "mc2": float(p[np.array(correct)].sum() / p.sum())}


def mc_torch_float32(logprobs, correct):  # accepted: softmax is stable, float32 is within the tolerance
    probs = torch.softmax(torch.tensor(logprobs), dim=0)
    return {"mc1": float(correct[int(probs.argmax())]), "mc2": float(probs[torch.tensor(correct)].sum())}


def _exp_sum(xs):
    return sum(math.exp(x) for x in xs)


# (task, functions with the mistake, words the message must contain)
WRONG = [
    ("10.1", (_precision_with("precision_no_clip", clip=False),), "no clipping"),
    ("10.1", (_precision_with("precision_reference_total", ref_total=True),), "number of CANDIDATE n-grams"),
    ("10.1", (_precision_with("precision_off_by_one", last=0),), "you missed the last"),
    ("10.1", (_precision_with("precision_sets", sets=True),), "you used sets"),
    ("10.1", (_precision_with("precision_set_matches", sets=True, all_total=True),), "sets for the matches"),
    ("10.1", (precision_ratio,), "expected a pair"),
    ("10.1", (precision_pops,), "changed a list"),
    ("10.2", (_bleu_with("bleu_no_brevity_penalty", bp="none"),), "brevity penalty is missing"),
    ("10.2", (_bleu_with("bleu_penalty_when_longer", bp="always"),), "would reward padding"),
    ("10.2", (_bleu_with("bleu_penalty_swapped", bp="swapped"),), "not exp(1 − c/r)"),
    ("10.2", (_bleu_with("bleu_arithmetic_mean", arithmetic=True),), "GEOMETRIC mean"),
    ("10.2", (_bleu_with("bleu_no_clip", precision=_precision_with("unclipped", clip=False)),), "no clipping"),
    ("10.2", (_bleu_with("bleu_fraction", scale=1.0),), "multiply by 100"),
    ("10.2", (_bleu_with("bleu_effective_order", effective=True),), "use_effective_order=True"),
    ("10.2", (bleu_divides_by_zero,), "raised ZeroDivisionError"),
    ("10.2", (bleu_numpy,), "NaN: 0/0"),
    ("10.3", (_rouge_with("rouge_substring", length=longest_common_substring),), "longest common SUBSTRING"),
    ("10.3", (_rouge_with("rouge_swapped", swap=True),), "precision and recall are swapped"),
    ("10.3", (_rouge_with("rouge_arithmetic_f", arithmetic=True),), "harmonic mean"),
    ("10.3", (_rouge_with("rouge_lcs_skips_last", length=lambda a, b: lcs_length(a, b, last=1)),), "off by one"),
    ("10.3", (_rouge_with("rouge_lcs_skips_first", length=lambda a, b: lcs_length(a, b, first=2)),), "off by one"),
    ("10.3", (rouge_divides_by_zero,), "raised ZeroDivisionError"),
    ("10.3", (rouge_tuple,), "expected a dict"),
    ("10.4", (win_swapped,), "model B's wins"),
    ("10.4", (_win_with("win_tie_strict", strict=True),), "exactly tol is a tie"),
    ("10.4", (win_no_tolerance,), "ties use the tolerance"),
    ("10.4", (_win_with("win_ties_lose", ties=0.0),), "counted them as losses"),
    ("10.4", (win_ties_dropped,), "not win / (win + loss)"),
    ("10.4", (_half_width_with("win_bernoulli", lambda o, _: 1.96 * math.sqrt(o.mean() * (1 - o.mean()) / len(o))),),
     "not the Bernoulli p(1 − p)"),
    ("10.4", (_half_width_with("win_ci_decisive", lambda o, r: 1.96 * math.sqrt(o.var() / (r["win"] + r["loss"]))),),
     "ties included"),
    ("10.4", (_half_width_with("win_ci_over_n", lambda o, _: 1.96 * o.std() / len(o)),), "not sqrt(var) / n"),
    ("10.4", (_win_with("win_not_clipped", clip=False),), "clip low at 0"),
    ("10.4", (win_sorts,), "changed a list"),
    ("10.5", (_mc_with("mc_sums_logprobs", lambda right, lps: sum(right) / sum(lps)),), "added log-probabilities"),
    ("10.5", (_mc_with("mc_normalized_over_correct", lambda right, lps: _exp_sum(right) / _exp_sum(right)),),
     "correct choices only"),
    ("10.5", (_mc_with("mc_unnormalized", lambda right, lps: _exp_sum(right)),), "normalization is missing"),
    ("10.5", (_mc_with("mc_underflow", lambda right, lps: _exp_sum(right) / _exp_sum(lps)),),
     "raised ZeroDivisionError"),
    ("10.5", (mc_numpy_naive,), "NaN: exp(−1000) underflows"),
    ("10.5", (mc_argmin,), "HIGHEST log-prob"),
]


(test_common_mistake_fails_and_names_it, test_reference_passes,
 test_every_task_has_a_wrong_variant_and_tiers_are_valid) = chapter_tests("10", WRONG, REFERENCES)


def test_an_untouched_stub_is_not_implemented():
    def bleu(candidate_tokens, reference_tokens, max_n=4):
        raise NotImplementedError("task 10.2: not implemented yet")

    row = grading.check("10.2", bleu)[0]
    assert row.status == "not implemented" and row.earned == 0


@pytest.mark.parametrize("task_id,fns", [("10.5", (mc_torch_float32,)),
                                         ("10.4", (_win_with("win_scipy_z", z=1.959963984540054),)),
                                         ("10.4", (_win_with("win_sample_variance", ddof=1),))],
                         ids=["float32 softmax", "z from scipy", "variance by n - 1"])
def test_equivalent_answers_are_accepted(task_id, fns):
    assert_reference_passes(task_id, fns)


def test_win_rate_is_the_judges_of_chapter_06():
    """course_utils.judge.win_tie_loss (chapter 06) divides the variance by n − 1; the check accepts that."""
    from course_utils.grading.ch10 import _WIN_CASES
    from course_utils.judge import win_tie_loss

    for a, b, tol in _WIN_CASES:
        ours, judge = win_rate(a, b, tol, ddof=1, clip=False), win_tie_loss(a, b, tol)
        n = len(a)
        assert (ours["win"] / n, ours["tie"] / n, ours["loss"] / n) == pytest.approx((judge["win"], judge["tie"],
                                                                                      judge["loss"]))
        assert ours["win_rate"] == pytest.approx(judge["win_rate"])
        assert ours["high"] - ours["win_rate"] == pytest.approx(judge["ci95"])


# --- the graders' references are the libraries' -----------------------------------------------------------

def _random_pairs(seed, count=150):
    """(candidate, reference) over a 6-word vocabulary, repeated n-grams everywhere: a random reference of 1 to 12
    words, and as candidate either another random sentence (0 to 12 words) or the reference with a few words
    replaced, dropped or added (all precisions > 0 in about half of them)."""
    rng = random.Random(seed)
    vocab = "the cat sat on a mat".split()
    for _ in range(count):
        ref = rng.choices(vocab, k=rng.randint(1, 12))
        edited = rng.random() < 0.7
        cand = list(ref) if edited else rng.choices(vocab, k=rng.randint(0, 12))
        for _ in range(rng.randint(0, 3) if edited else 0):
            i = rng.randrange(len(cand) + 1)
            edit = rng.choice(("replace", "drop", "add")) if i < len(cand) else "add"
            cand[i:i + (edit != "add")] = [] if edit == "drop" else [rng.choice(vocab)]
        yield cand, ref


def test_bleu_references_are_sacrebleu_sentence_bleu():
    """The grader's numbers are sacrebleu.sentence_bleu's with every order counted; with all precisions > 0 its
    default (effective order) gives the same, and so does the solution, on the grader's cases and random ones."""
    import sacrebleu

    from course_utils.grading.ch10 import _BLEU_CASES, _PRECISION_CASES, sacrebleu_sentence

    cases = [(c.split(), r.split(), n) for c, r, n in _BLEU_CASES + _PRECISION_CASES]
    cases += [(c, r, n) for n in (1, 2, 4) for c, r in _random_pairs(n)]
    positive, four = 0, 0
    for cand, ref, max_n in cases:
        hyp, refs = " ".join(cand), [" ".join(ref)]
        library = sacrebleu.BLEU(tokenize="none", smooth_method="none", effective_order=False,
                                 max_ngram_order=max_n).sentence_score(hyp, refs)
        grader = sacrebleu_sentence(cand, ref, max_n)
        assert grader.score == library.score and grader.counts == library.counts and grader.totals == library.totals
        assert bleu(cand, ref, max_n) == pytest.approx(library.score, rel=1e-12, abs=1e-12)
        for n in range(1, max_n + 1):
            assert ngram_precision(cand, ref, n) == (library.counts[n - 1], library.totals[n - 1])
        if max_n == 4:
            plain = sacrebleu.sentence_bleu(hyp, refs, tokenize="none", smooth_method="none", use_effective_order=False)
            default = sacrebleu.sentence_bleu(hyp, refs, tokenize="none", smooth_method="none")
            assert plain.score == library.score
            if all(library.counts) or len(cand) >= max_n:  # effective order only differs for a short candidate
                assert default.score == pytest.approx(library.score, rel=1e-12, abs=1e-12)
            positive, four = positive + all(library.counts), four + 1
    assert 0.25 < positive / four < 0.75  # both kinds are common


def test_rouge_reference_is_rouge_score():
    """rouge-score keeps the grader's lowercase words as they are, and its ROUGE-L is the solution's."""
    from rouge_score import rouge_scorer, tokenize

    from course_utils.grading.ch10 import _ROUGE_CASES, rouge_score_l

    scorer = rouge_scorer.RougeScorer(["rougeL"])
    cases = [(c.split(), r.split()) for c, r in _ROUGE_CASES] + list(_random_pairs(10))
    for cand, ref in cases:
        assert tokenize.tokenize(" ".join(cand), None) == cand and tokenize.tokenize(" ".join(ref), None) == ref
        library = scorer.score(" ".join(ref), " ".join(cand))["rougeL"]
        want = {"precision": library.precision, "recall": library.recall, "f": library.fmeasure}
        assert rouge_score_l(cand, ref) == want
        assert rouge_l(cand, ref) == pytest.approx(want, rel=1e-12, abs=1e-12)


def test_win_rate_interval_by_hand():
    """Outcomes 1, ½, 1, ½, 0: mean 0.6, population variance 0.14, half-width 1.96·sqrt(0.14 / 5)."""
    from course_utils.grading.ch10 import _WIN_CASES, win_rate_reference

    got = win_rate_reference([3, 2, 5, 4, 1], [1, 2, 4, 4, 2], 0.0)
    half = 1.96 * math.sqrt(0.14 / 5)
    assert (got["win"], got["tie"], got["loss"]) == (2, 2, 1) and got["win_rate"] == pytest.approx(0.6)
    assert (got["low"], got["high"]) == pytest.approx((0.6 - half, 0.6 + half))
    assert win_rate_reference([1, 1, 1, 0], [0, 0, 0, 0], 0.0)["high"] == 1.0  # 0.75 + 0.42, clipped
    for a, b, tol in _WIN_CASES:
        assert win_rate_reference(a, b, tol) == pytest.approx(win_rate(a, b, tol), abs=1e-12)


def test_mc_reference_is_a_softmax_over_the_choices():
    from scipy.special import softmax

    from course_utils.grading.ch10 import _MC_CASES, mc_scores_reference

    for logprobs, correct in _MC_CASES:
        got = mc_scores_reference(logprobs, correct)
        assert got["mc1"] == float(correct[int(np.argmax(logprobs))])
        assert got["mc2"] == pytest.approx(softmax(logprobs)[correct].sum(), rel=1e-12)
    assert math.exp(-1001.5) == 0.0  # the underflow case really underflows


def test_checks_are_fast():
    import time

    for task_id, fns in REFERENCES.items():
        grading.check(task_id, *fns)  # the first call imports sacrebleu / rouge-score
        t0 = time.monotonic()
        grading.check(task_id, *fns)
        assert time.monotonic() - t0 < 0.5, task_id
