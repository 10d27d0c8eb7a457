"""Evaluation metrics, written out here so their definitions are in plain sight (no extra packages).

- `bleu`: corpus BLEU-1..4 as coco-caption computes it: clipped n-gram counts summed over the
  corpus, brevity penalty against the reference length closest to each candidate (ties go to the
  shorter reference). coco-caption adds 1e-15/1e-9 to every precision; here a corpus with no
  matching n-gram of some order scores exactly 0.
- `cider_d`: CIDEr-D (Vedantam et al. 2015) as coco-caption's CiderD: tf-idf n-gram vectors
  (n = 1..4) with document frequencies from the references of the evaluated corpus, clipped
  candidate weights, a Gaussian length penalty (sigma 6), averaged over references, times 10.
- `roc_auc`: the Mann-Whitney statistic, P(score of a positive > score of a negative), ties 1/2.
- `binary_counts`: confusion counts with precision, recall and F1.
- `recall_at_k`: share of queries whose first correct answer is ranked within the top k.

Texts are tokenised as lower-case words (`tokenize`), in place of coco-caption's Java PTB
tokenizer, which also lower-cases and drops punctuation.
"""

from __future__ import annotations

import math
import re
from collections import Counter
from collections.abc import Sequence

import numpy as np

_WORD = re.compile(r"[a-z0-9]+(?:'[a-z]+)?")


def tokenize(text: str) -> list[str]:
    """Lower-case words and numbers; punctuation is dropped."""
    return _WORD.findall(text.lower())


def _ngrams(words: list[str], n: int) -> Counter:
    return Counter(tuple(words[i:i + n]) for i in range(len(words) - n + 1))


def bleu(candidates: Sequence[str], references: Sequence[Sequence[str]], max_n: int = 4) -> list[float]:
    """Corpus BLEU-1..max_n of `candidates[i]` against the reference list `references[i]`."""
    if len(candidates) != len(references):
        raise ValueError(f"{len(candidates)} candidates but {len(references)} reference lists")
    matched = [0] * max_n  # clipped n-gram matches, summed over the corpus
    total = [0] * max_n  # candidate n-grams, summed over the corpus
    cand_len = ref_len = 0
    for cand, refs in zip(candidates, references):
        if not refs:
            raise ValueError(f"candidate {cand!r} has no reference")
        words = tokenize(cand)
        ref_words = [tokenize(r) for r in refs]
        cand_len += len(words)
        # The reference length closest to the candidate's; ties go to the shorter one.
        ref_len += min((abs(len(r) - len(words)), len(r)) for r in ref_words)[1]
        for n in range(1, max_n + 1):
            counts = _ngrams(words, n)
            most = Counter()  # each n-gram may match as often as it occurs in one reference
            for r in ref_words:
                most |= _ngrams(r, n)
            matched[n - 1] += sum(min(c, most[g]) for g, c in counts.items())
            total[n - 1] += sum(counts.values())
    if cand_len == 0:
        return [0.0] * max_n
    brevity = 1.0 if cand_len > ref_len else math.exp(1.0 - ref_len / cand_len)
    scores, log_sum = [], 0.0
    for n in range(max_n):
        if matched[n] == 0:  # no match of this order: this and every higher BLEU are 0
            scores.extend([0.0] * (max_n - n))
            break
        log_sum += math.log(matched[n] / total[n])
        scores.append(brevity * math.exp(log_sum / (n + 1)))
    return scores


def cider_d(candidates: Sequence[str], references: Sequence[Sequence[str]], max_n: int = 4,
            sigma: float = 6.0) -> tuple[float, list[float]]:
    """CIDEr-D of the corpus and of each candidate, as coco-caption's CiderD scorer."""
    if len(candidates) != len(references):
        raise ValueError(f"{len(candidates)} candidates but {len(references)} reference lists")
    if not candidates:
        raise ValueError("CIDEr-D of an empty corpus is undefined")

    def counts(text: str) -> tuple[Counter, int]:
        words = tokenize(text)
        grams = Counter()
        for n in range(1, max_n + 1):
            grams.update(_ngrams(words, n))
        return grams, len(words)

    cands = [counts(c) for c in candidates]
    refs = [[counts(r) for r in rs] for rs in references]
    # Document frequency: in how many images' reference sets an n-gram occurs.
    doc_freq = Counter()
    for rs in refs:
        doc_freq.update(set().union(*(set(g) for g, _ in rs)))
    log_docs = math.log(float(len(refs)))

    def vector(grams: Counter) -> tuple[list[dict], list[float]]:
        vec = [dict() for _ in range(max_n)]  # per n: n-gram -> tf-idf weight
        for gram, tf in grams.items():
            vec[len(gram) - 1][gram] = tf * (log_docs - math.log(max(1.0, doc_freq[gram])))
        norms = [math.sqrt(sum(w * w for w in v.values())) for v in vec]
        return vec, norms

    per_image = []
    for (cgrams, clen), rs in zip(cands, refs):
        cvec, cnorm = vector(cgrams)
        total = np.zeros(max_n)
        for rgrams, rlen in rs:
            rvec, rnorm = vector(rgrams)
            penalty = math.exp(-((clen - rlen) ** 2) / (2 * sigma**2))
            for n in range(max_n):
                # "-D": the candidate's weight is clipped at the reference's, so repeating an
                # n-gram gains nothing.
                dot = sum(min(w, rvec[n].get(g, 0.0)) * rvec[n].get(g, 0.0) for g, w in cvec[n].items())
                if cnorm[n] and rnorm[n]:
                    total[n] += penalty * dot / (cnorm[n] * rnorm[n])
        per_image.append(float(total.mean() / len(rs) * 10.0))
    return float(np.mean(per_image)), per_image


def roc_auc(scores: Sequence[float], labels: Sequence[bool]) -> float:
    """Area under the ROC curve: P(a positive scores above a negative), ties counted 1/2."""
    scores = np.asarray(scores, dtype=np.float64)
    labels = np.asarray(labels, dtype=bool)
    if scores.shape != labels.shape:
        raise ValueError(f"{scores.shape[0]} scores but {labels.shape[0]} labels")
    n_pos, n_neg = int(labels.sum()), int((~labels).sum())
    if n_pos == 0 or n_neg == 0:
        raise ValueError(f"ROC-AUC needs both classes; got {n_pos} positives and {n_neg} negatives")
    # Rank-sum form: average ranks of tied scores, then count how many negatives each positive beats.
    order = np.argsort(scores, kind="mergesort")
    sorted_scores = scores[order]
    ranks = np.empty(len(scores))
    start = 0
    while start < len(scores):
        end = start
        while end + 1 < len(scores) and sorted_scores[end + 1] == sorted_scores[start]:
            end += 1
        ranks[order[start:end + 1]] = (start + end) / 2.0 + 1.0  # 1-based average rank
        start = end + 1
    return float((ranks[labels].sum() - n_pos * (n_pos + 1) / 2.0) / (n_pos * n_neg))


def binary_counts(predicted: Sequence[bool], actual: Sequence[bool]) -> dict[str, float | int | None]:
    """Confusion counts, precision, recall and F1 of `predicted` against `actual` (True = positive)."""
    predicted = np.asarray(predicted, dtype=bool)
    actual = np.asarray(actual, dtype=bool)
    if predicted.shape != actual.shape:
        raise ValueError(f"{predicted.shape[0]} predictions but {actual.shape[0]} labels")
    tp = int((predicted & actual).sum())
    fp = int((predicted & ~actual).sum())
    fn = int((~predicted & actual).sum())
    tn = int((~predicted & ~actual).sum())
    precision = tp / (tp + fp) if tp + fp else None  # None: nothing was predicted positive
    recall = tp / (tp + fn) if tp + fn else None  # None: there was no positive
    f1 = (2 * precision * recall / (precision + recall)
          if precision is not None and recall is not None and precision + recall else None)
    return {"tp": tp, "fp": fp, "fn": fn, "tn": tn, "precision": precision, "recall": recall, "f1": f1}


def first_hit_ranks(ranked: np.ndarray, positives: Sequence[set[int]]) -> np.ndarray:
    """0-based rank of the first correct id in each row of `ranked` [Q, k]; inf when none is there
    (a correct answer outside the k candidates is a miss at every cut-off)."""
    ranks = np.full(len(ranked), np.inf)
    for q, (row, good) in enumerate(zip(ranked, positives)):
        hits = np.flatnonzero(np.isin(row, list(good)))
        if hits.size:
            ranks[q] = hits[0]
    return ranks


def recall_at_k(ranks: np.ndarray, ks: Sequence[int] = (1, 5, 10)) -> dict[str, float]:
    """{"r1": share of ranks < 1, "r5": ..., ...} from 0-based first-hit ranks."""
    ranks = np.asarray(ranks)
    return {f"r{k}": float((ranks < k).mean()) for k in ks}
