"""Caption columns as valid UTF-8 strings, for every reader of input shards (pipeline and training).

Free of torch, so the pipeline's CPU decode tasks import it without the model stack.
"""

from __future__ import annotations

import pyarrow as pa


def utf8_text(column: pa.ChunkedArray | pa.Array) -> tuple[pa.Array, list[bool]]:
    """A caption column as strings, and which rows were not valid UTF-8.

    A binary caption column is decoded as UTF-8. A string column is normally valid already, but
    parquet readers do not check, and one bad value would raise in every later `to_pylist()`.
    Invalid values come back with U+FFFD in place of the bad bytes (the row fails; the text
    stays readable in `failed/`). Null stays null.
    """
    if isinstance(column, pa.ChunkedArray):
        column = column.combine_chunks() if column.num_chunks else pa.array([], column.type)
    large = pa.types.is_large_string(column.type) or pa.types.is_large_binary(column.type)
    string_type = pa.large_string() if large else pa.string()  # every block of a run gets one type
    if pa.types.is_null(column.type):
        return pa.array([None] * len(column), string_type), [False] * len(column)
    if pa.types.is_string(column.type) or pa.types.is_large_string(column.type):
        try:
            column.validate(full=True)
            return column, [False] * len(column)
        except pa.ArrowInvalid:
            column = column.view(pa.large_binary() if large else pa.binary())
    texts, invalid = [], []
    for value in column.to_pylist():
        try:
            texts.append(None if value is None else value.decode("utf-8"))
            invalid.append(False)
        except UnicodeDecodeError:
            texts.append(value.decode("utf-8", errors="replace"))
            invalid.append(True)
    return pa.array(texts, string_type), invalid
