"""Metrics against values worked out by hand (the arithmetic is in the comments)."""

from __future__ import annotations

import itertools
import math

import numpy as np
import pytest

from capfilt import metrics


def test_tokenize_lowercases_and_drops_punctuation():
    assert metrics.tokenize("A Red circle, on the LEFT!") == ["a", "red", "circle", "on", "the", "left"]


def test_bleu_single_sentence_by_hand():
    # 6 words each, one word differs at the end: p1 = 5/6, p2 = 4/5, p3 = 3/4, p4 = 2/3, BP = 1.
    scores = metrics.bleu(["a red circle on the left"], [["a red circle on the right"]])
    assert scores[0] == pytest.approx(5 / 6)
    assert scores[1] == pytest.approx(math.sqrt(5 / 6 * 4 / 5))
    assert scores[3] == pytest.approx((5 / 6 * 4 / 5 * 3 / 4 * 2 / 3) ** 0.25)  # = (1/3)^(1/4) = 0.7598


def test_bleu_corpus_pools_counts_and_applies_brevity_penalty():
    # Pooled over the corpus: p1 = (5+3)/(6+3), p2 = (4+2)/(5+2), p3 = (3+1)/(4+1), p4 = (2+0)/(3+0);
    # candidate length 9 < reference length 12, BP = exp(1 - 12/9).
    cands = ["a red circle on the left", "a big blue"]
    refs = [["a red circle on the right"], ["a big blue square on white"]]
    expected = math.exp(1 - 12 / 9) * (8 / 9 * 6 / 7 * 4 / 5 * 2 / 3) ** 0.25
    assert metrics.bleu(cands, refs)[3] == pytest.approx(expected)


def test_bleu_closest_reference_length_and_clipping():
    # The 3-word reference is the closest length, so no brevity penalty; "the the the" clips to 1.
    assert metrics.bleu(["a red circle"], [["a red circle on the left", "a red circle"]], max_n=3) == \
        pytest.approx([1.0, 1.0, 1.0])
    assert metrics.bleu(["the the the"], [["the cat"]], max_n=1)[0] == pytest.approx(1 / 3)  # c=3 > r=2: BP 1
    # No 4-gram in common: BLEU-4 is exactly 0, lower orders are not.
    scores = metrics.bleu(["the cat sat on the mat"], [["the cat is on the mat"]])
    assert scores[3] == 0.0 and scores[0] > 0


def test_cider_d_by_hand():
    # Two images; document frequency 2 for "a" and "circle" makes their weight log2 - log2 = 0; every
    # other n-gram (and "square", df 0) weighs log 2.
    # Image 1: candidate = reference -> cosines (1, 1, 1, 0 [no 4-grams]) -> 10 * 3/4 = 7.5.
    # Image 2: "a blue square" vs "a blue circle": unigrams {blue: L, square: L} . {blue: L} = L^2 over
    #   (sqrt2 L)(L) -> 1/sqrt2; bigrams {a blue, blue square} . {a blue, blue circle} -> 1/2;
    #   trigrams 0; 4-grams 0 -> 10 * (1/sqrt2 + 1/2) / 4.
    corpus, per_image = metrics.cider_d(["a red circle", "a blue square"], [["a red circle"], ["a blue circle"]])
    second = 10 * (1 / math.sqrt(2) + 0.5) / 4
    assert per_image == pytest.approx([7.5, second])
    assert corpus == pytest.approx((7.5 + second) / 2)


def test_cider_d_length_penalty_and_clipping():
    # Disjoint vocabularies, candidate = reference: every n-gram weighs log 2, cosine 1 for n = 1..4.
    score, _ = metrics.cider_d(["red star on white here", "blue ring in the middle"],
                               [["red star on white here"], ["blue ring in the middle"]])
    assert score == pytest.approx(10.0)
    # Two extra words: the Gaussian penalty exp(-2^2 / (2 * 6^2)) applies on top of the cosines.
    padded, _ = metrics.cider_d(["red star star star on white here", "blue ring in the middle"],
                                [["red star on white here"], ["blue ring in the middle"]])
    assert padded < 10.0
    # Repeating a word cannot raise the score above the unrepeated candidate ("-D" clipping).
    assert metrics.cider_d(["red red red", "blue"], [["red"], ["blue"]])[1][0] <= \
        metrics.cider_d(["red", "blue"], [["red"], ["blue"]])[1][0]


def _brute_force_auc(scores, labels):
    pos = [s for s, y in zip(scores, labels) if y]
    neg = [s for s, y in zip(scores, labels) if not y]
    wins = sum(1.0 if p > n else 0.5 if p == n else 0.0 for p, n in itertools.product(pos, neg))
    return wins / (len(pos) * len(neg))


def test_roc_auc_matches_pair_count_with_ties():
    rng = np.random.default_rng(0)
    for _ in range(20):
        scores = rng.integers(0, 6, size=40) / 5.0  # many ties
        labels = rng.random(40) < 0.4
        if labels.all() or not labels.any():
            continue
        assert metrics.roc_auc(scores, labels) == pytest.approx(_brute_force_auc(scores, labels))
    assert metrics.roc_auc([0.9, 0.8, 0.1], [True, True, False]) == 1.0
    assert metrics.roc_auc([0.1, 0.8, 0.9], [True, False, False]) == 0.0


def test_roc_auc_refuses_one_class():
    with pytest.raises(ValueError, match="both classes"):
        metrics.roc_auc([0.1, 0.2], [True, True])


def test_binary_counts():
    out = metrics.binary_counts([True, True, False, False, True], [True, False, True, False, True])
    assert (out["tp"], out["fp"], out["fn"], out["tn"]) == (2, 1, 1, 1)
    assert out["precision"] == pytest.approx(2 / 3) and out["recall"] == pytest.approx(2 / 3)
    assert metrics.binary_counts([False, False], [True, False])["precision"] is None


def test_first_hit_ranks_and_recall():
    ranked = np.array([[3, 1, 2], [0, 2, 1], [1, 0, 3]])
    ranks = metrics.first_hit_ranks(ranked, [{1}, {0, 1}, {2}])
    assert ranks.tolist() == [1, 0, math.inf]  # inf: the right answer is not among the candidates
    # A miss stays a miss at cut-offs beyond the number of candidates.
    assert metrics.recall_at_k(ranks, (1, 2, 10)) == {"r1": pytest.approx(1 / 3), "r2": pytest.approx(2 / 3),
                                                      "r10": pytest.approx(2 / 3)}
