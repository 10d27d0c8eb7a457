"""The filter threshold read off the human pairs: the pipeline's own scores, and the share it keeps."""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from capfilt import schema
from capfilt.calibrate import human_match_scores, threshold_from_human
from capfilt.config import load_config
from capfilt.stages.prepare import Prepare
from capfilt.stages.filter import Filter
from tests.tiny_blip import shard_rows, write_shard

# Captions BLIP's cleaning and a short token limit change: the pipeline scores them cleaned and cut.
CAPTIONS = ["A Photo: of (thing) number one!!", "a photo of thing number two, with a long tail of words after it",
            "*** ###", "THE third; photo ~ of a thing"]


@pytest.fixture(scope="module")
def human(tmp_path_factory):
    """12 human rows: 9 with images (one caption is nothing but BLIP punctuation), 1 corrupt image,
    2 failed downloads."""
    rows = shard_rows("h", 12, failed=2, corrupt=1)
    for row, caption in zip(rows, CAPTIONS):
        row["caption"] = caption
    folder = tmp_path_factory.mktemp("human")
    return folder, pq.read_table(write_shard(folder / "00000.parquet", rows))


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_scores_are_the_filter_stages_caption_itm(blip_dirs, human, dtype):
    """Calibration scores each human row exactly as the filter stage scores it on the prepare stage's
    output: same text cleaning and token limit (run.filter.max_text_tokens, not eval's), same dtype."""
    folder, table = human
    cfg = load_config(None, ["run.filter.max_text_tokens=8", f"run.resources.dtype={dtype}",
                             f"run.filter.model={blip_dirs['filter']}"])
    keys, scores = human_match_scores(blip_dirs["filter"], folder, cfg)
    # The corrupt image, the failed downloads and the caption cleaned to nothing are not scored.
    assert keys == [f"h{i:04d}" for i in range(9) if i != 2]

    decoded = Prepare(cfg.run)(table)
    no_captions = pa.array([[]] * table.num_rows, pa.list_(pa.string()))
    written = Filter(cfg.run)(decoded.append_column(schema.SYNTHETIC, no_captions))
    caption_itm = dict(zip(written["key"].to_pylist(), written[schema.CAPTION_ITM].to_pylist()))
    np.testing.assert_array_equal(scores, np.asarray([caption_itm[k] for k in keys], dtype=np.float32))
    assert len(set(scores.tolist())) > 1


def test_the_threshold_keeps_its_share(blip_dirs, human):
    folder, _ = human
    cfg = load_config()
    _, scores = human_match_scores(blip_dirs["filter"], folder, cfg)
    for quantile in (0.1, 0.5, 0.9):
        threshold = threshold_from_human(blip_dirs["filter"], folder, cfg, quantile)
        kept = float(np.mean(scores >= threshold))
        assert 1 - quantile - 1e-9 <= kept <= 1 - quantile + 2 / len(scores)  # never short, at most a step over


def test_each_scorer_threshold_is_the_quantile_of_its_human_pair_scores(blip_dirs, human, tmp_path):
    """One scoring pass gives the ITM threshold (bootstrap.threshold_quantile) and each scorer's with a
    threshold_quantile, each the quantile of the scores the filter stage gives the human captions."""
    from capfilt.calibrate import human_thresholds, quantile_threshold
    from tests.model.tiny_models import clip_dir

    folder, table = human
    clip = clip_dir(tmp_path / "clip")
    cfg = load_config(None, ["bootstrap.threshold_quantile=0.2", f"run.filter.model={blip_dirs['filter']}",
                             f"run.scorers=[{{name: clip, model: {clip}, threshold_quantile: 0.3}}, "
                             f"{{name: m, model: {blip_dirs['filter']}, threshold_quantile: 0.2}}, "
                             f"{{name: fixed, model: {clip}, threshold: 0.1}}]"])
    thresholds = human_thresholds(blip_dirs["filter"], folder, cfg)
    assert sorted(thresholds) == ["clip", "itm", "m"]  # `fixed` has no quantile: its threshold stays

    decoded = Prepare(cfg.run)(table)
    no_captions = pa.array([[]] * table.num_rows, pa.list_(pa.string()))
    written = Filter(cfg.run)(decoded.append_column(schema.SYNTHETIC, no_captions)).to_pylist()
    scored = [row for row in written if row[schema.CAPTION_ITM] is not None]
    assert len(scored) == 8
    for name, column, quantile in (("itm", schema.CAPTION_ITM, 0.2), ("m", schema.score_column("m"), 0.2),
                                   ("clip", schema.score_column("clip"), 0.3)):
        scores = np.asarray([row[column] for row in scored], np.float32)
        assert thresholds[name] == quantile_threshold(scores, quantile), name
    assert thresholds["m"] == thresholds["itm"]  # the filter's folder as a scorer: its very ITM
