"""A filter threshold read off known-clean pairs, for filters whose P(match) is under-confident.

BLIP's filter drops a text when ITM says "unmatched" (P(match) < 0.5). A filter fine-tuned
briefly, with ITM's 1 positive : 2 negatives training mix, can rank captions well and still put
every P(match) below 0.5, and then keeps nothing. The human-annotated pairs are clean by
definition, so the q-quantile of the filter's P(match) over them is the threshold that keeps a
share 1 - q of clean captions. They are also the filter's fine-tuning data, so their scores run
high and the threshold errs toward strict. No test or truth data is involved.

The scores are the pipeline's own: the human rows go through the decode stage and the filter
stage with the run's settings (`run.image`, `run.filter.max_text_tokens`, `run.resources.dtype`,
BLIP's text cleaning), so each one is the `caption_itm` that `capfilt run` with this filter
writes for that row, and the threshold is applied to the very numbers it was read off.
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from capfilt import schema
from capfilt.config import Config, model_batch_size
from capfilt.images import load_image_spec
from capfilt.stages.decode import Decode
from capfilt.stages.filter import Filter
from capfilt.storage import parquet_files


def human_match_scores(filter_dir: str | Path, human_dir: str | Path, cfg: Config,
                       captioner_dir: str | Path | None = None) -> tuple[list[str], np.ndarray]:
    """(keys, ITM P(match)) of the human rows the pipeline scores, in file and row order.

    Images are sized for `captioner_dir`'s input first when it is given, as `capfilt run` sizes
    them for its captioner (else for the filter's). Rows the pipeline would fail or not score
    (failed download, refused image, caption empty after cleaning) are left out.
    """
    run = replace(cfg.run, filter=replace(cfg.run.filter, model=str(filter_dir)))
    scorer = Filter(run)
    decode = Decode(run, load_image_spec(captioner_dir or filter_dir).size)
    cols = run.columns
    keys: list[str] = []
    scores: list[float] = []
    for path in parquet_files(human_dir):
        file_schema = path.read_schema()
        schema.require_columns(file_schema, {"key": cols.key, "text": cols.text, "image": cols.image}, str(path))
        names = [cols.key, cols.text, cols.image] + [c for c in (cols.status, "error_message")
                                                     if c in file_schema.names]
        with path.open_input_file() as handle:  # a local file or an object (capfilt.storage)
            for batch in pq.ParquetFile(handle).iter_batches(batch_size=model_batch_size(run.filter, scorer.blip.device.type == "cuda"), columns=names):
                table = decode(pa.Table.from_batches([batch]))
                no_captions = pa.array([[]] * table.num_rows, pa.list_(pa.string()))  # only the human caption
                scored = scorer(table.append_column(schema.SYNTHETIC, no_captions))
                for key, itm in zip(scored[cols.key].to_pylist(), scored[schema.CAPTION_ITM].to_pylist()):
                    if itm is not None:
                        keys.append(key)
                        scores.append(itm)
    if not scores:
        raise ValueError(f"{human_dir}: no human pair with an image to calibrate the filter threshold on")
    return keys, np.asarray(scores, dtype=np.float32)


def threshold_from_human(filter_dir: str | Path, human_dir: str | Path, cfg: Config, quantile: float,
                         captioner_dir: str | Path | None = None) -> float:
    """The `quantile` of the human pairs' P(match): a threshold keeping at least 1 - quantile of them."""
    _, scores = human_match_scores(filter_dir, human_dir, cfg, captioner_dir)
    # "lower": an actual score at or below the quantile, so the kept share is never short of 1 - q.
    return float(np.quantile(scores, quantile, method="lower"))
