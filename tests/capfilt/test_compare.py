"""Round against round: standard errors of the test figures, their formatting, the noise verdict."""

from __future__ import annotations

import math

import pytest

from capfilt import compare


def _round(r, tr1, ir1, cider, cider_se, attributes, attributes_se, n=100):
    return {"round": r, "retrieval": {"n": n, "itm": {"i2t_r1": tr1, "t2i_r1": ir1}},
            "captioning": {"cider_d": cider, "cider_d_se": cider_se, "bleu_4": 0.07,
                           "attributes": {"recall": attributes, "recall_se": attributes_se}}}


def test_a_recall_at_1_has_the_standard_error_of_a_proportion():
    assert compare.proportion_se(0.06, 100) == pytest.approx(math.sqrt(0.06 * 0.94 / 100))
    assert compare.proportion_se(0.0, 100) == 0.0
    assert compare.proportion_se(None, 100) is None and compare.proportion_se(0.5, None) is None


def test_figures_print_with_their_standard_error():
    assert compare.with_se(0.06, compare.proportion_se(0.06, 100)) == "0.060 ± 0.024"
    assert compare.with_se(0.5304, 0.04449) == "0.530 ± 0.044"
    assert compare.with_se(0.5, None) == "0.500" and compare.with_se(None, None) == "n/a"
    figures = compare.round_figures(_round(0, 0.06, 0.05, 0.53, 0.044, 0.377, 0.02))
    assert figures["TR@1"] == (0.06, pytest.approx(0.02375, abs=1e-5)) and figures["BLEU-4"] == (0.07, None)
    assert figures["CIDEr"] == (0.53, 0.044) and figures["attributes"] == (0.377, 0.02)


def test_recall_at_10_is_a_figure_where_the_evaluation_has_it():
    res = _round(0, 0.06, 0.05, 0.53, 0.044, 0.377, 0.02)
    assert "TR@10" not in compare.round_figures(res)  # an older eval.json: nothing made up
    res["retrieval"]["itm"] |= {"i2t_r10": 0.2, "t2i_r10": 0.31}
    figures = compare.round_figures(res)
    assert figures["TR@10"] == (0.2, pytest.approx(0.04)) and figures["IR@10"][0] == 0.31
    later = _round(1, 0.06, 0.05, 0.53, 0.044, 0.377, 0.02)
    later["retrieval"]["itm"] |= {"i2t_r10": 0.41, "t2i_r10": 0.31}
    assert "TR@10 +0.210 ± 0.063 (gain)" in compare.compare_line(later, res)


def test_a_difference_under_two_standard_errors_is_called_noise():
    before, after = _round(0, 0.06, 0.05, 0.53, 0.04, 0.30, 0.01), _round(1, 0.05, 0.30, 0.494, 0.04, 0.40, 0.01)
    rows = {row["figure"]: row for row in compare.compare(after, before)}
    tr = rows["TR@1"]
    assert tr["difference"] == pytest.approx(-0.01)
    assert tr["se"] == pytest.approx(math.hypot(compare.proportion_se(0.06, 100), compare.proportion_se(0.05, 100)))
    assert tr["noise"] is True
    assert rows["IR@1"]["noise"] is False and rows["IR@1"]["difference"] > 0  # 0.05 -> 0.30: a gain
    assert rows["CIDEr"]["noise"] is True and rows["CIDEr"]["se"] == pytest.approx(math.hypot(0.04, 0.04))
    assert rows["attributes"]["noise"] is False  # +0.10 with an SE of 0.014
    assert rows["BLEU-4"]["se"] is None and rows["BLEU-4"]["noise"] is None  # no SE, no verdict
    line = compare.compare_line(after, before)
    assert line.startswith("round 1 vs round 0 (difference ± its SE; within noise when |difference| < 2 SE): ")
    assert "TR@1 -0.010 ± 0.032 (within noise)" in line and "IR@1 +0.250 ± " in line and "(gain)" in line
    assert "CIDEr -0.036 ± 0.057 (within noise)" in line and "BLEU-4 +0.000," in line
    worse = compare.compare_line(_round(1, 0.06, 0.05, 0.53, 0.04, 0.20, 0.01), before)
    assert "attributes -0.100 ± 0.014 (loss)" in worse
