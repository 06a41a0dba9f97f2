"""Aggregate the bottom series up a hierarchy: the aggregated long frame, the sparse summing
matrix S and the level tags hierarchicalforecast takes.

Row order (of S, of `ids`, of the aggregated frame and of every array `reconcile` takes): the
levels from the top down, then the bottom; within a level, its distinct keys sorted by the
level columns' values (Polars' sort of the native types, nulls cannot occur); the bottom in
sorted id order, which is also S's column order, so S's bottom block is the identity.

Ids of aggregated series are `total` for the grand total and `col=value` pairs joined by `/`
for the others: `region=North`, `region=North/store=S1`. Values are Polars' string cast of
the column (`1.5`, `true`, `2024-01-31`). To keep ids unambiguous whatever the values hold,
`%`, `/` and `=` in a column name or value are percent-escaped (`%25`, `%2F`, `%3D`), so a
value `N/E` gives `region=N%2FE`, and every id maps back to one key. An aggregated id equal to
a bottom series' id is an error naming it.
"""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import polars as pl
from scipy import sparse

from pipeline.errors import DataError
from pipeline.hierarchy.spec import KEY, Hierarchy, check

COUNT = "n_bottom"  # in the aggregated frame: bottom series summed at that step
_ESCAPES = (("%", "%25"), ("/", "%2F"), ("=", "%3D"))


@dataclass(frozen=True)
class Aggregation:
    """What `aggregate` builds, every part in the module's row order.

    frame: the aggregated series (levels above the bottom) in long form: id (str), time, the
        summed target (and `aggregate`'s `also` columns), `n_bottom` (how many bottom series
        had a value at that step; a step none had is absent, a gap like the bottom's) and the
        level columns (null where the level does not use them).
    S: the summing matrix, `[n_all, n_bottom]` CSR of ones.
    ids: every row's id (str; bottom ids cast to str), `[n_all]`.
    tags: level name → its ids, top first then the bottom (named by the id column);
        hierarchicalforecast's `tags` format.
    """
    frame: pl.DataFrame
    S: sparse.csr_matrix
    ids: np.ndarray
    tags: dict[str, np.ndarray]

    @property
    def n_bottom(self) -> int:
        return self.S.shape[1]


def escape(text: str) -> str:
    """A column name or value made safe for an id (see the module's docstring)."""
    for raw, esc in _ESCAPES:
        text = text.replace(raw, esc)
    return text


def _escaped(expr: pl.Expr) -> pl.Expr:
    for raw, esc in _ESCAPES:
        expr = expr.str.replace_all(raw, esc, literal=True)
    return expr


def level_id(level: tuple[str, ...]) -> pl.Expr:
    """The expression giving a level's series id from its columns."""
    if not level:
        return pl.lit("total", dtype=pl.String)
    return pl.concat_str([pl.lit(f"{escape(c)}=") + _escaped(pl.col(c).cast(pl.String))
                          for c in level], separator="/")


def level_keys(statics: pl.DataFrame, hierarchy: Hierarchy) -> list[pl.DataFrame]:
    """Per level above the bottom, its distinct keys in row order with their `id`."""
    out = []
    for level in hierarchy.levels:
        if level:
            keys = statics.select(level).unique().sort(level)
            out.append(keys.with_columns(id=level_id(level)))
        else:
            out.append(pl.DataFrame({"id": ["total"]}))
    return out


def summing(statics: pl.DataFrame, hierarchy: Hierarchy, id_col: str = "unique_id"
            ) -> tuple[sparse.csr_matrix, np.ndarray, dict[str, np.ndarray]]:
    """(S, ids, tags) from `statics`, one row per bottom series with its id and level
    columns (checked: no nulls, one parent per child). Built from integer codes per level:
    S has one 1 per bottom series and level (bottom included), never a dense matrix."""
    statics = statics.select(id_col, *hierarchy.columns).sort(id_col)
    n_bottom = statics.height
    bottom = statics[id_col].cast(pl.String).to_numpy()
    rows, tags, offset = [], {}, 0
    indexed = statics.with_row_index("_i")
    for level, keys in zip(hierarchy.levels, level_keys(statics, hierarchy), strict=True):
        if level:
            coded = keys.with_row_index("_code").select(*level, "_code")
            codes = indexed.join(coded, on=list(level), how="left", maintain_order="left")
            rows.append(codes["_code"].to_numpy().astype(np.int64) + offset)
        else:
            rows.append(np.full(n_bottom, offset, dtype=np.int64))
        tags[hierarchy.name(level)] = keys["id"].to_numpy().astype(object)
        offset += keys.height
    rows.append(np.arange(n_bottom, dtype=np.int64) + offset)
    tags[id_col] = bottom.astype(object)
    ids = np.concatenate(list(tags.values()))
    _check_unique(tags, id_col)
    cols = np.tile(np.arange(n_bottom, dtype=np.int64), len(rows))
    S = sparse.csr_matrix((np.ones(cols.size), (np.concatenate(rows), cols)),
                          shape=(offset + n_bottom, n_bottom))
    return S, ids, tags


def _check_unique(tags: dict[str, np.ndarray], id_col: str) -> None:
    clash = np.intersect1d(np.concatenate([v for k, v in tags.items() if k != id_col])
                           .astype(str), tags[id_col].astype(str))
    if clash.size:
        raise DataError(f"series {str(clash[0])!r} has the id of an aggregated series of "
                        f"{KEY}; rename the series")


def aggregate(frame: pl.DataFrame, hierarchy: Hierarchy, id_col: str = "unique_id",
              time_col: str = "ds", target_col: str = "y", validate: bool = True,
              also: Sequence[str] = ()) -> Aggregation:
    """The long table (id, time, target, the hierarchy's columns) → Aggregation. `y` is summed
    per level key and step over the bottom series with a value there (null or NaN targets
    count as absent, like a gap), and so are the columns `also` (over the same rows, after
    the target, in the frame); `validate=False` skips `check` (done by the caller)."""
    if validate:
        check(frame, hierarchy, id_col)
    cols = list(hierarchy.columns)
    statics = frame.select(id_col, *cols).unique(id_col)
    S, ids, tags = summing(statics, hierarchy, id_col)
    present = frame.select(id_col, time_col, target_col, *also, *cols).filter(
        pl.col(target_col).is_not_null() & pl.col(target_col).is_not_nan())
    schema = frame.select(cols).schema
    parts, offset = [], 0
    for level, keys in zip(hierarchy.levels, level_keys(statics, hierarchy), strict=True):
        sums = (present.group_by([*level, time_col])
                .agg(pl.col(target_col, *also).sum(), pl.len().cast(pl.Int64).alias(COUNT)))
        order = keys.with_row_index("_row", offset=offset)
        sums = (sums.join(order, on=list(level), how="left") if level else
                sums.with_columns(id=pl.lit("total"), _row=pl.lit(offset, pl.UInt32)))
        parts.append(sums.select(
            pl.col("id").alias(id_col), time_col, target_col, *also, COUNT,
            *[pl.col(c) if c in level else pl.lit(None, schema[c]).alias(c) for c in cols],
            "_row"))
        offset += keys.height
    out = pl.concat(parts, how="vertical_relaxed").sort("_row", time_col).drop("_row")
    return Aggregation(frame=out, S=S, ids=ids, tags=tags)
