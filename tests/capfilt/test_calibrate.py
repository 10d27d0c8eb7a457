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
