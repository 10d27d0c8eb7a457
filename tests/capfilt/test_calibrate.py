"""The filter threshold read off the human pairs: the pipeline's own scores, and the share it keeps."""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from capfilt import schema
from capfilt.calibrate import human_match_scores, threshold_from_human
from capfilt.config import FilterConfig, load_config
from capfilt.stages.common import unpack_pixels
from capfilt.stages.decode import Decode
from capfilt.stages.filter import Filter
from tests.tiny_blip import INPUT_SCHEMA, IMAGE_SIZE, blip_dirs, shard_rows  # noqa: F401 - fixture


@pytest.fixture(scope="module")
def human(tmp_path_factory):
    """12 human rows: 9 with images, 1 corrupt image, 2 failed downloads."""
    table = pa.Table.from_pylist(shard_rows("h", 12, failed=2, corrupt=1), schema=INPUT_SCHEMA)
    folder = tmp_path_factory.mktemp("human")
    pq.write_table(table, folder / "00000.parquet")
    return folder, table


def test_scores_are_the_pipelines_and_the_threshold_keeps_its_share(blip_dirs, human):
    folder, table = human
    cfg = load_config()
    cfg = replace(cfg, run=replace(cfg.run, filter=FilterConfig(model=str(blip_dirs["filter"]))))
    scores = human_match_scores(blip_dirs["filter"], folder, cfg)
    assert scores.shape == (9,)  # the corrupt image and the failed downloads are not scored

    # The CapFilt stages on the same rows give the same P(match) for each web caption.
    decoded = Decode(cfg.run, IMAGE_SIZE)(table)
    good = [i for i, err in enumerate(decoded[schema.ERROR].to_pylist()) if err is None]
    images = unpack_pixels([decoded[schema.PIXELS][i].as_py() for i in good])
    itm, _ = Filter(cfg.run).score(images, [[table["caption"][i].as_py()] for i in good])
    np.testing.assert_allclose(np.sort(scores), np.sort([group[0] for group in itm]), atol=1e-5)

    for quantile in (0.1, 0.5, 0.9):
        threshold = threshold_from_human(blip_dirs["filter"], folder, cfg, quantile)
        kept = float(np.mean(scores >= threshold))
        assert 1 - quantile - 1e-9 <= kept <= 1 - quantile + 2 / len(scores)  # never short, at most a step over
