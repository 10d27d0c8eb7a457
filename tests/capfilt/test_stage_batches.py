"""capfilt/stages/common.py: model batches that do not depend on how Ray bundled the rows; row isolation."""

from __future__ import annotations

import pyarrow as pa

from capfilt import schema
from capfilt.stages.common import map_rows_isolated, model_batches


def tagged(shards: list[str], positions: list[int]) -> pa.Table:
    return pa.table({schema.SHARD: shards, schema.ROW: pa.array(positions, pa.int64())})


def test_model_batches_follow_shard_and_position_not_the_block():
    # Two blocks bundled one way, then the same rows bundled another way.
    one = tagged(["a"] * 5 + ["b"] * 3, [0, 1, 2, 3, 4, 0, 1, 2])
    other = tagged(["b", "a", "a", "b", "a", "a", "b", "a"], [2, 3, 0, 0, 4, 1, 1, 2])
    def as_keys(table, batches):
        shards, rows = table[schema.SHARD].to_pylist(), table[schema.ROW].to_pylist()
        return [[(shards[i], rows[i]) for i in b] for b in batches]
    first = as_keys(one, model_batches(one, list(range(8)), 2))
    second = as_keys(other, model_batches(other, list(range(8)), 2))
    assert first == second == [[("a", 0), ("a", 1)], [("a", 2), ("a", 3)], [("a", 4)],
                               [("b", 0), ("b", 1)], [("b", 2)]]
    # Rows already failed are left out; a plain table is cut into consecutive batches.
    assert as_keys(one, model_batches(one, [1, 3, 5], 2)) == [[("a", 1)], [("a", 3)], [("b", 0)]]
    assert model_batches(pa.table({"x": [1, 2, 3]}), [0, 1, 2], 2) == [[0, 1], [2]]


def test_a_failing_row_costs_only_itself():
    def double(rows):
        if 3 in rows:
            raise ValueError("row 3 is bad")
        return [2 * r for r in rows]

    rows, results, errors = map_rows_isolated(double, [[0, 1], [2, 3], [4]], "stage")
    assert rows == [0, 1, 2, 3, 4]
    assert results == [0, 2, 4, None, 8]
    assert errors == [None, None, None, "stage: ValueError: row 3 is bad", None]
