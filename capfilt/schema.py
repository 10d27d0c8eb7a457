"""The data contract: every column name and type the stages, writers and tests share.

Input shards are img2dataset parquet as it is; the columns CapFilt reads are named by
`ColumnsConfig` (`--key-col`, `--image-col`, `--text-col`). Everything CapFilt adds is named
here, once. `docs/data-format.md` is the prose version of this module.
"""

from __future__ import annotations

import pyarrow as pa

# img2dataset's value of `status` for a row whose image was fetched and decoded.
STATUS_SUCCESS = "success"

# --- columns CapFilt adds to every output row -----------------------------------------------
CAPTION_ITM = "caption_itm"  # float32: filter's ITM P(match) for the web caption
CAPTION_ITC = "caption_itc"  # float32: filter's ITC cosine for the web caption
CAPTION_KEEP = "caption_keep"  # bool: the web caption is kept
SYNTHETIC = "synthetic"  # list<string>: the captioner's captions
SYNTHETIC_ITM = "synthetic_itm"  # list<float32>, aligned with SYNTHETIC
SYNTHETIC_ITC = "synthetic_itc"  # list<float32>, aligned with SYNTHETIC
SYNTHETIC_KEEP = "synthetic_keep"  # list<bool>, aligned with SYNTHETIC
TEXTS = "texts"  # list<string>: the kept texts, the training targets
ERROR = "error"  # string: why a row failed ("<stage>: <reason>"), null otherwise

# --- provenance, constant within a run ---------------------------------------------------------
ROUND = "round"  # int32: bootstrap round
CAPTIONER = "captioner"  # string: captioner model folder (absolute path)
FILTER = "filter"  # string: filter model folder (absolute path)
THRESHOLD = "threshold"  # float32: ITM threshold the keep policy used
KEEP_POLICY = "keep_policy"  # string: "both", "web" or "synthetic"

# --- columns of `capfilt export` files (capfilt/export_pairs.py) ------------------------------
TEXT = "text"  # string: with --explode, the one kept text of this sample (row)
TEXT_INDEX = "text_index"  # int32: with --explode, its position in `texts`
HF_IMAGE = "image"  # the image column of an `--format hf` export, a datasets `Image()` feature

# Transient columns that live only between stages, never written.
SHARD = "_shard"  # string: input shard the row came from (drives per-shard commits)
ROW = "_row"  # int64: the row's position in its input shard (output files are written in this order)
DECODE_ERROR = "_decode_error"  # string: why the model actor refused this row's image ("decode: ...")
CAPTION_ERROR = "_caption_error"  # string: why the captioner failed on this row (model actors only add columns)
FILTER_ERROR = "_filter_error"  # string: why the filter failed on this row
TRANSIENT = (SHARD, ROW, DECODE_ERROR, CAPTION_ERROR, FILTER_ERROR)

# Where a row goes.
DATA, REJECTED, FAILED = "data", "rejected", "failed"
OUTPUT_DIRS = (DATA, REJECTED, FAILED)

ADDED_FIELDS = [
    pa.field(CAPTION_ITM, pa.float32()),
    pa.field(CAPTION_ITC, pa.float32()),
    pa.field(CAPTION_KEEP, pa.bool_()),
    pa.field(SYNTHETIC, pa.list_(pa.string())),
    pa.field(SYNTHETIC_ITM, pa.list_(pa.float32())),
    pa.field(SYNTHETIC_ITC, pa.list_(pa.float32())),
    pa.field(SYNTHETIC_KEEP, pa.list_(pa.bool_())),
    pa.field(TEXTS, pa.list_(pa.string())),
    pa.field(ERROR, pa.string()),
    pa.field(ROUND, pa.int32()),
    pa.field(CAPTIONER, pa.string()),
    pa.field(FILTER, pa.string()),
    pa.field(THRESHOLD, pa.float32()),
    pa.field(KEEP_POLICY, pa.string()),
]
ADDED_NAMES = [f.name for f in ADDED_FIELDS]


# --- per named scorer (run.scorers), after the columns above, in run.scorers' order -------------
def score_column(name: str) -> str:
    """float32: scorer `name`'s score of the web caption (null where it was not scored)."""
    return f"score_{name}"


def synthetic_score_column(name: str) -> str:
    """list<float32>: scorer `name`'s score of each synthetic caption, aligned with SYNTHETIC."""
    return f"synthetic_score_{name}"


def score_columns(score: str) -> tuple[str, str]:
    """The (web caption, synthetic captions) columns of a score: the BLIP filter's "itm" or a scorer name's."""
    if score == "itm":
        return CAPTION_ITM, SYNTHETIC_ITM
    return score_column(score), synthetic_score_column(score)


def scorer_fields(names: tuple[str, ...] | list[str]) -> list[pa.Field]:
    """The columns of the named scorers of a run: fixed for the run by its run.scorers."""
    return [field for name in names for field in (pa.field(score_column(name), pa.float32()),
                                                   pa.field(synthetic_score_column(name), pa.list_(pa.float32())))]


def output_schema(input_schema: pa.Schema, scorers: tuple[str, ...] | list[str] = ()) -> pa.Schema:
    """Input columns (passed through, unchanged) followed by the columns CapFilt adds, then those of
    the named `scorers` (run.scorers' names)."""
    added = ADDED_FIELDS + scorer_fields(scorers)
    clash = [f.name for f in added if f.name in input_schema.names]
    if clash:
        raise ValueError(
            f"input column(s) {clash} collide with columns CapFilt writes; rename them in the input"
        )
    return pa.schema(list(input_schema) + added)


def require_columns(schema: pa.Schema, names: dict[str, str], where: str) -> None:
    """Raise naming the config key and the missing column, e.g. `columns.image='jpg'`."""
    for config_key, column in names.items():
        if column not in schema.names:
            raise KeyError(
                f"{where}: column {column!r} (run.columns.{config_key}) is missing; "
                f"columns present: {schema.names}"
            )
