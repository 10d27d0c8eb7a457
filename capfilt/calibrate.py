"""A filter threshold read off known-clean pairs, for filters whose P(match) is under-confident.

BLIP's filter drops a text when ITM says "unmatched" (P(match) < 0.5). A filter fine-tuned
briefly, with ITM's 1 positive : 2 negatives training mix, can rank captions well and still put
every P(match) below 0.5, and then keeps nothing. The human-annotated pairs are clean by
definition, so the q-quantile of the filter's P(match) over them is the threshold that keeps a
share 1 - q of clean captions. They are also the filter's fine-tuning data, so their scores run
high and the threshold errs toward strict. No test or truth data is involved.

The scores are the pipeline's own: the human rows go through the prepare stage and the filter
stage with the run's settings (`run.image`, `run.filter.max_text_tokens`, `run.resources.dtype`,
BLIP's text cleaning), so each one is the `caption_itm` that `capfilt run` with this filter
writes for that row, and the threshold is applied to the very numbers it was read off.
`score_human` is that path in general: besides each row's own caption it scores given texts
against the row's image and, with a captioner, runs the captioner stage first and scores its
captions too, all in the one filter call `capfilt run` makes per image (the filter audit,
capfilt/audit.py, scores its shuffled captions and synthetic captions so).

The named scorers of `run.scorers` score the same rows in that call; one with a
`threshold_quantile` q gets the q-quantile of its scores of the human captions as its threshold
(`human_thresholds`), as the filter's P(match) does with `bootstrap.threshold_quantile`.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from capfilt import schema
from capfilt.config import Config, model_batch_size
from capfilt.model.hub import resolve_model
from capfilt.model_folders import check_model_folder
from capfilt.stages.caption import Captioner
from capfilt.stages.prepare import Prepare
from capfilt.stages.filter import Filter
from capfilt.storage import parquet_files


@dataclass
class TextScores:
    """One score of the scored human rows' texts: the BLIP filter's ITM P(match) or a named scorer's."""

    own: np.ndarray  # [N] of each row's own caption: its `caption_itm` or `score_<name>`
    given: list[list[float]]  # of the texts given for the row (`extra`), in their order
    synthetic: list[list[float]]  # of the captioner stage's captions


@dataclass
class HumanScores:
    """The human rows the pipeline scored, in file and row order, with every score it gave them."""

    read: int  # rows in the files, scored or not
    keys: list[str]
    captions: list[str]  # each row's own (human) caption
    synthetic: list[list[str]]  # the captioner stage's captions ([] without `generate`)
    # "itm" (the BLIP filter's P(match); none without a BLIP filter) and each run.scorers name
    scores: dict[str, TextScores]


def score_human(filter_dir: str | Path, human_dir: str | Path, cfg: Config,
                captioner_dir: str | Path | None = None, generate: bool = False,
                extra: Mapping[str, list[str]] | None = None) -> HumanScores:
    """Run the human rows through the prepare, (captioner,) filter stages with the run's settings.

    Each model decodes the images at its own input side, as in `capfilt run`; `generate` also runs
    the captioner stage
    (`run.caption`: nucleus sampling seeded by the row key, so the captions `capfilt run` would
    write for these images). `extra[key]` are more texts scored against row `key`'s image, in the
    same filter call as its own caption and synthetic captions. `filter_dir` "" runs no BLIP filter
    (as `run.filter.model` ""): the named scorers alone score. Rows the pipeline would fail or not
    score (failed download, refused image, caption empty after cleaning, a model error) are left
    out; `read` counts them all.
    """
    if generate and not captioner_dir:
        raise ValueError("generating synthetic captions needs a captioner (--captioner)")
    if filter_dir:
        check_model_folder(filter_dir, "filter", "--filter")
    if captioner_dir:
        check_model_folder(captioner_dir, "captioner", "--captioner")
    for i, named in enumerate(cfg.run.scorers):
        check_model_folder(resolve_model(named.model), "scorer", f"run.scorers[{i}].model")
    run = replace(cfg.run, filter=replace(cfg.run.filter, model=str(filter_dir)),
                  caption=replace(cfg.run.caption, model=str(captioner_dir or "")))
    scorer = Filter(run)
    captioner = Captioner(run) if generate else None
    prepare = Prepare(run)
    cols = run.columns
    # score name -> its (web caption, other texts) columns
    columns = {"itm": (schema.CAPTION_ITM, schema.SYNTHETIC_ITM)} if filter_dir else {}
    columns |= {name: (schema.score_column(name), schema.synthetic_score_column(name)) for name in scorer.scorers}
    out = HumanScores(0, [], [], [], {})
    own: dict[str, list[float]] = {name: [] for name in columns}
    given_scores: dict[str, list[list[float]]] = {name: [] for name in columns}
    synthetic_scores: dict[str, list[list[float]]] = {name: [] for name in columns}
    for path in parquet_files(human_dir):
        file_schema = path.read_schema()
        schema.require_columns(file_schema, {"key": cols.key, "text": cols.text, "image": cols.image}, str(path))
        names = [cols.key, cols.text, cols.image] + [c for c in (cols.status, "error_message")
                                                     if c in file_schema.names]
        with path.open_input_file() as handle:  # a local file or an object (capfilt.storage)
            batch_size = model_batch_size(run.filter, scorer.device.type == "cuda")
            for batch in pq.ParquetFile(handle).iter_batches(batch_size=batch_size, columns=names):
                out.read += batch.num_rows
                table = prepare(pa.Table.from_batches([batch]))
                if captioner is not None:
                    table = captioner(table)
                    synthetic = [s or [] for s in table[schema.SYNTHETIC].to_pylist()]
                    table = table.drop_columns([schema.SYNTHETIC])
                else:
                    synthetic = [[] for _ in range(table.num_rows)]
                keys = table[cols.key].to_pylist()
                given = [list((extra or {}).get(k, [])) for k in keys]
                texts = pa.array([g + s for g, s in zip(given, synthetic)], pa.list_(pa.string()))
                scored = scorer(table.append_column(schema.SYNTHETIC, texts))
                by_name = {name: (scored[web].to_pylist(), scored[others].to_pylist())
                           for name, (web, others) in columns.items()}
                # The filter stage scores a row's own caption by every score or by none: the first tells.
                first = next(iter(by_name.values()))[0]
                rows = zip(keys, scored[cols.text].to_pylist(), given, synthetic)
                for row, (key, caption, g, s) in enumerate(rows):
                    if first[row] is None:
                        continue
                    out.keys.append(key)
                    out.captions.append(caption)
                    out.synthetic.append(s)
                    for name, (web_scores, text_scores) in by_name.items():
                        own[name].append(web_scores[row])
                        given_scores[name].append(text_scores[row][:len(g)])
                        synthetic_scores[name].append(text_scores[row][len(g):])
    out.scores = {name: TextScores(np.asarray(own[name], dtype=np.float32), given_scores[name], synthetic_scores[name])
                  for name in columns}
    return out


def human_match_scores(filter_dir: str | Path, human_dir: str | Path, cfg: Config) -> tuple[list[str], np.ndarray]:
    """(keys, ITM P(match)) of the human rows the pipeline scores, in file and row order."""
    scores = score_human(filter_dir, human_dir, cfg)
    if not scores.keys:
        raise ValueError(f"{human_dir}: no human pair with an image to calibrate the filter threshold on")
    return scores.keys, scores.scores["itm"].own


def quantile_threshold(scores: np.ndarray, quantile: float) -> float:
    """The `quantile` of `scores` as a threshold: `score >= it` keeps at least 1 - quantile of them."""
    # "lower": an actual score at or below the quantile, so the kept share is never short of 1 - q.
    return float(np.quantile(scores, quantile, method="lower"))


def threshold_from_human(filter_dir: str | Path, human_dir: str | Path, cfg: Config, quantile: float) -> float:
    """The `quantile` of the human pairs' P(match): a threshold keeping at least 1 - quantile of them."""
    _, scores = human_match_scores(filter_dir, human_dir, cfg)
    return quantile_threshold(scores, quantile)


def human_thresholds(filter_dir: str | Path, human_dir: str | Path, cfg: Config) -> dict[str, float]:
    """The thresholds read off the human pairs in one scoring pass: `itm` (with
    `bootstrap.threshold_quantile` q: the q-quantile of P(match)) and each run.scorers name with a
    `threshold_quantile` q (the q-quantile of its scores); each keeps at least 1 - q of the pairs."""
    scores = score_human(filter_dir, human_dir, cfg)
    if not scores.keys:
        raise ValueError(f"{human_dir}: no human pair with an image to calibrate the filter threshold on")
    quantile = cfg.bootstrap.threshold_quantile
    out = {"itm": quantile_threshold(scores.scores["itm"].own, quantile)} if quantile else {}
    return out | {s.name: quantile_threshold(scores.scores[s.name].own, s.threshold_quantile)
                  for s in cfg.run.scorers if s.threshold_quantile}
