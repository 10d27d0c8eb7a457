"""The demo world's own evaluation: attribute accuracy and filter quality on hand-made runs."""

from __future__ import annotations

import math

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from capfilt import demo_eval


def test_attribute_scores_by_hand():
    from capfilt.demo_world import parse_caption

    ref = "a large red circle on the left of a white background"  # 5 attributes
    got = demo_eval.attribute_scores(["a small red circle on the left, white background", "junk"], [ref, ref],
                              parse_caption)
    assert got["recall"] == pytest.approx(4 / 10)  # size wrong in the first, nothing in the second
    assert got["precision"] == pytest.approx(4 / 5)
    assert got["per_attribute"]["size"] == 0.0 and got["per_attribute"]["colour"] == 0.5



def test_attribute_recall_has_the_standard_error_of_a_ratio():
    from capfilt.demo_world import parse_caption

    ref = "a large red circle on the left of a white background"  # 5 attributes
    got = demo_eval.attribute_scores(["a small red circle on the left, white background", "junk"], [ref, ref],
                                     parse_caption)
    # hits (4, 0) of (5, 5): residuals h - 0.4 t = (2, -2), sqrt(8 / (2 * 1)) / 5
    assert got["recall_se"] == pytest.approx(0.4)
    one = demo_eval.attribute_scores(["a red circle"], [ref], parse_caption)
    assert one["recall_se"] is None  # one caption: no spread to measure

def _write(path, rows):
    path.parent.mkdir(parents=True, exist_ok=True)
    table = pa.table({
        "key": pa.array([r[0] for r in rows], pa.string()),
        "caption_itm": pa.array([r[1] for r in rows], pa.float32()),
        "threshold": pa.array([0.5] * len(rows), pa.float32()),
        "synthetic": pa.array([r[2] for r in rows], pa.list_(pa.string())),
        "synthetic_keep": pa.array([r[3] for r in rows], pa.list_(pa.bool_())),
    })
    pq.write_table(table, path)


def test_filter_quality_by_hand(tmp_path):
    right = "a large red circle on the left of a white background"
    wrong = "a small blue star at the top of a black background"
    off_one = "a large red circle on the left of a black background"
    truth = [("k0", "clean"), ("k1", "clean"), ("k2", "swap"), ("k3", "swap"), ("k4", "junk"),
             ("k5", "mismatch"), ("k6", "failed"), ("k7", "clean")]
    pq.write_table(pa.table({"key": [k for k, _ in truth], "split": ["web"] * 8,
                             "clean_caption": [right] * 8, "noise": [n for _, n in truth]}),
                   tmp_path / "truth.parquet")
    run = tmp_path / "run"
    _write(run / "data" / "00000.parquet", [("k0", 0.9, [right], [True]), ("k2", 0.6, [], []),
                                            ("k3", 0.2, [off_one], [True]), ("k7", 0.8, [], [])])
    _write(run / "rejected" / "00000.parquet", [("k1", 0.3, [wrong], [False]), ("k4", 0.1, [], []),
                                                ("k5", 0.05, [], []), ("x9", 0.4, [], [])])
    _write(run / "failed" / "00000.parquet", [("k6", None, None, None)])
    out = demo_eval.filter_quality(run, tmp_path / "truth.parquet")
    # removed = itm < 0.5: k1 k3 k4 k5; noisy: k2 k3 k4 k5 -> tp 3, fp 1 (k1), fn 1 (k2), tn 2.
    assert (out["tp"], out["fp"], out["fn"], out["tn"]) == (3, 1, 1, 2)
    assert out["precision"] == pytest.approx(0.75) and out["recall"] == pytest.approx(0.75)
    # Clean {0.9, 0.8, 0.3} vs noisy {0.6, 0.2, 0.1, 0.05}: 11 of 12 pairs ordered right.
    assert out["roc_auc"] == pytest.approx(11 / 12)
    assert out["scored"] == 7 and out["not_in_truth"] == 1
    per = out["per_noise"]
    assert per["clean"]["keep_rate"] == pytest.approx(2 / 3) and per["swap"]["keep_rate"] == 0.5
    assert per["junk"]["keep_rate"] == 0.0 and per["mismatch"]["rejected"] == 1
    assert per["failed"] == {"rows": 1, "data": 0, "rejected": 0, "failed": 1, "unscored": 1, "kept": 0,
                             "keep_rate": None, "mean_itm": None}
    syn = out["synthetic"]
    assert (syn["generated"], syn["kept"]) == (3, 2) and syn["kept_share"] == pytest.approx(2 / 3)
    # Kept: 5/5 + 4/5 attributes right; removed: 0/5.
    assert syn["attributes_kept"] == pytest.approx(0.9) and syn["attributes_removed"] == 0.0
    assert syn["attributes_all"] == pytest.approx(9 / 15)
    assert not math.isnan(out["f1"])
