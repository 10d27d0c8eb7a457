"""Input shards: listing them (any filesystem), reading their footers, checking their schemas.

A shard is one parquet file of img2dataset output. Everything about it that the driver needs
comes from the footer alone (rows, row groups, schema), read for many shards at once by a pool
of threads, so the driver never reads row data. The rows themselves are read by Ray workers,
one read unit (a row group) at a time.
"""

from __future__ import annotations

import dataclasses
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import pyarrow as pa
import pyarrow.parquet as pq

from capfilt import schema
from capfilt.config import ColumnsConfig
from capfilt.storage import Location, glob_files, is_glob, location

FOOTER_THREADS = 32  # footers read at once (object stores answer each in tens of milliseconds)

# Arrow types each mapped input column must have (any of).
_STRING = (pa.string(), pa.large_string())
_BINARY = (pa.binary(), pa.large_binary())


@dataclass(frozen=True)
class Shard:
    name: str  # output base name (the input file's stem)
    uri: str  # where the input file is (a path or a URI)
    size: int  # bytes, part of the fingerprint
    mtime_ns: int  # modification time, part of the fingerprint
    rows: int  # from the parquet footer; -1 when unreadable
    schema: pa.Schema | None  # input schema; None when unreadable
    row_groups: tuple[int, ...] = ()  # rows per row group: the read units
    problem: str | None = None  # why the whole shard fails ("schema: ..."), None when usable

    def fingerprint(self) -> dict:
        """What says the input is unchanged (not its path: a moved input directory stays committed)."""
        return {"size": self.size, "mtime_ns": self.mtime_ns, "rows": self.rows}


def shard_name(file_name: str) -> str:
    return file_name[: -len(".parquet")] if file_name.endswith(".parquet") else file_name


def list_shards(spec: str) -> list[Location]:
    """A folder (its `*.parquet`, sorted) or a glob pattern -> input shard files, on any filesystem."""
    if not spec:
        raise ValueError("no input given (--input DIR|GLOB)")
    if is_glob(spec):
        found = glob_files(spec)
    else:
        folder = location(spec)
        found = [folder.at(info) for info in folder.files(".parquet")]
    if not found:
        raise FileNotFoundError(f"no parquet shards match {spec!r}")
    names: dict[str, Location] = {}
    for loc in found:
        name = shard_name(loc.name)
        if name in names:
            raise ValueError(f"two input shards would write the same output name {name!r}: {names[name]} and "
                             f"{loc}; run them into separate --out directories")
        names[name] = loc
    return found


def schema_problem(input_schema: pa.Schema, columns: ColumnsConfig) -> str | None:
    """Why a shard with this schema cannot be processed (naming the column and config key), or None."""
    # A text column with no caption at all is typed null by some writers; it unifies with string.
    # Binary captions are decoded as UTF-8 row by row (stages/prepare.py).
    required = {"key": (columns.key, _STRING), "image": (columns.image, _BINARY),
                "text": (columns.text, (*_STRING, *_BINARY, pa.null()))}
    for config_key, (column, types) in required.items():
        if column not in input_schema.names:
            return (f"schema: column {column!r} (run.columns.{config_key}) is missing; "
                    f"columns present: {input_schema.names}")
        if input_schema.field(column).type not in types:
            return (f"schema: column {column!r} (run.columns.{config_key}) has type "
                    f"{input_schema.field(column).type}, expected {' or '.join(map(str, types))}")
    if columns.status in input_schema.names and input_schema.field(columns.status).type not in _STRING:
        return f"schema: column {columns.status!r} (run.columns.status) must be a string"
    for column in schema.TRANSIENT:
        if column in input_schema.names:
            return f"schema: input column {column!r} is reserved by capfilt; rename it"
    try:
        schema.output_schema(input_schema)
    except ValueError as err:
        return f"schema: {err}"
    return None


def inspect_shard(loc: Location | str, columns: ColumnsConfig) -> Shard:
    """Fingerprint and schema-check one shard from its parquet footer (no row data read)."""
    loc = location(loc)
    info = loc.info()
    base = dict(name=shard_name(loc.name), uri=str(loc), size=info.size, mtime_ns=info.mtime_ns or 0)
    try:
        with loc.open_input_file() as handle:
            meta = pq.ParquetFile(handle).metadata
        input_schema = meta.schema.to_arrow_schema()
    except Exception as err:  # noqa: BLE001 - an unreadable shard fails alone
        return Shard(**base, rows=-1, schema=None, problem=f"unreadable: {type(err).__name__}: {err}")
    row_groups = tuple(meta.row_group(i).num_rows for i in range(meta.num_row_groups))
    return Shard(**base, rows=meta.num_rows, schema=input_schema, row_groups=row_groups,
                 problem=schema_problem(input_schema, columns))


def inspect_shards(locations: list[Location], columns: ColumnsConfig) -> list[Shard]:
    """`inspect_shard` for many shards at once, in input order."""
    with ThreadPoolExecutor(max_workers=min(FOOTER_THREADS, max(1, len(locations)))) as pool:
        return list(pool.map(lambda loc: inspect_shard(loc, columns), locations))


def unify(shards: list[Shard]) -> tuple[pa.Schema | None, list[Shard]]:
    """One read schema for all usable shards; a shard whose types conflict fails alone."""
    unified: pa.Schema | None = None
    out = []
    for shard in shards:
        if shard.problem is None:
            try:
                unified = shard.schema if unified is None else pa.unify_schemas(
                    [unified, shard.schema], promote_options="permissive")
            except (pa.ArrowInvalid, pa.ArrowTypeError) as err:
                shard = dataclasses.replace(shard, problem=f"schema: conflicts with the other shards ({err})")
        out.append(shard)
    return unified, out


def text_as_string(input_schema: pa.Schema, text: str) -> pa.Schema:
    """The schema rows are written with: a binary caption column becomes a string one.

    Captions are text whatever the input stored them as (stages/prepare.py decodes them), and one
    binary shard must not turn every output's caption column into bytes.
    """
    if text not in input_schema.names:
        return input_schema
    index = input_schema.get_field_index(text)
    arrow_type = input_schema.field(text).type
    if pa.types.is_binary(arrow_type):
        return input_schema.set(index, input_schema.field(text).with_type(pa.string()))
    if pa.types.is_large_binary(arrow_type):
        return input_schema.set(index, input_schema.field(text).with_type(pa.large_string()))
    return input_schema


def is_text_type(arrow_type: pa.DataType) -> bool:
    """A caption column the decode stage can turn into strings (string or binary, any width)."""
    return arrow_type in (*_STRING, *_BINARY)


@dataclass(frozen=True)
class ReadUnit:
    """One row group of one shard: what a read task reads and tags with `_shard` and `_row`."""

    shard: str  # shard name
    uri: str  # input file
    row_group: int  # index in the file
    first_row: int  # position of its first row in the shard


def read_units(shards: list[Shard]) -> list[ReadUnit]:
    units = []
    for shard in shards:
        first = 0
        for index, rows in enumerate(shard.row_groups):
            if rows:
                units.append(ReadUnit(shard.name, shard.uri, index, first))
            first += rows
    return units


def conform(table: pa.Table, fields: pa.Schema) -> pa.Table:
    """`table`'s columns as `fields` says: cast to the unified types, absent ones null."""
    n = table.num_rows
    columns = [table[f.name].cast(f.type) if f.name in table.column_names else pa.nulls(n, f.type) for f in fields]
    return pa.Table.from_arrays(columns, schema=fields)


def read_unit(unit: ReadUnit, read_schema: pa.Schema) -> pa.Table:
    """The unit's rows in `read_schema` (columns a shard lacks are null), tagged `_shard` and `_row`.

    Only `read_schema`'s columns are read (the pipeline reads the few it sends to the models).
    """
    with location(unit.uri).open_input_file() as handle:
        file = pq.ParquetFile(handle)
        present = [name for name in read_schema.names if name in file.schema_arrow.names]
        table = conform(file.read_row_group(unit.row_group, columns=present), read_schema)
    n = table.num_rows
    table = table.append_column(pa.field(schema.SHARD, pa.string()), pa.array([unit.shard] * n, pa.string()))
    return table.append_column(pa.field(schema.ROW, pa.int64()),
                               pa.array(range(unit.first_row, unit.first_row + n), pa.int64()))


def read_columns(shard: Shard, fields: pa.Schema) -> pa.Table:
    """All rows of `shard`, in order, with `fields`' columns (absent ones null): what the commit joins back."""
    with location(shard.uri).open_input_file() as handle:
        file = pq.ParquetFile(handle)
        present = [name for name in fields.names if name in file.schema_arrow.names]
        return conform(file.read(columns=present), fields)
