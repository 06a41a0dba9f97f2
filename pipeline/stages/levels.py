"""The levels of `data.hierarchy` in the run's data (issue #30): the aggregated series added to
the bottom series' arrays as ordinary series, so the run's model trains globally over every
level and every stage (backtest, comparators, fallback, forecast) serves them like the rest.

An aggregated series is, at each grid step, the sum of the bottom series present there (their
values as read: gaps and NaN targets already filled), observed (mask 1) where every one of
them was observed; steps no child covers are filled and masked like a bottom series' gaps.
Past and future covariates are the children's mean at the step. Static columns: numeric ones
the children's mean, others the children's common value ("" where they differ); the group
(`data.group_col`) the children's common one, else the aggregated series' own id. Every series
gets the static `LEVEL` (its level's name; the bottom's is the id column's), which the model
takes as a categorical feature like any string static.

The bottom series keep their place (0 … n_bottom - 1); the aggregated ones follow, levels top
first (`Levels.rows` maps the summing matrix's rows to places in the arrays).
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import numpy as np
import polars as pl
from scipy import sparse

from pipeline.config import Config
from pipeline.data.fill import fill_segments
from pipeline.data.prepare import Prepared
from pipeline.data.series import LEVEL, STATUS_CODE, SeriesArrays
from pipeline.hierarchy import Hierarchy, aggregate, check, parse, summing

_ID, _T, _Y, _M = "_series", "_ord", "_y", "_observed"


@dataclass(frozen=True)
class Levels:
    """The hierarchy over the run's arrays. `S` `[n_all, n_bottom]` (sparse), `tags` level →
    ids (top first, the bottom last: `pipeline.hierarchy.reconcile`'s row order), `rows`
    `[n_all]` each row's place in the arrays, `keys` the aggregated series' level columns
    (one row per aggregated id, column `id`)."""
    hierarchy: Hierarchy
    S: sparse.csr_matrix
    tags: dict[str, np.ndarray]
    rows: np.ndarray
    keys: pl.DataFrame

    def level_of(self) -> dict[str, str]:
        """{series id: its level's name} over every level."""
        return {str(i): name for name, ids in self.tags.items() for i in ids}


def with_levels(data: Prepared) -> Prepared:
    """`data` with the aggregated series of `data.hierarchy` appended (and `Prepared.levels`
    set); unchanged without one. A hierarchy the data does not fit is a DataError naming the
    series and column."""
    cfg = data.cfg
    if not cfg.data.hierarchy:
        return data
    arrays, levels = extend(data.arrays, cfg)
    return dataclasses.replace(data, arrays=arrays, levels=levels)


def extend(arrays: SeriesArrays, cfg: Config) -> tuple[SeriesArrays, Levels]:
    """The bottom arrays with the aggregated series appended, and the Levels over them."""
    hierarchy, d = parse(cfg.data.hierarchy), cfg.data
    statics = _statics(arrays, cfg, hierarchy.columns)
    check(statics, hierarchy, d.id_col)
    S, ids, tags = summing(statics, hierarchy, d.id_col)
    agg = aggregate(_long(arrays, statics, hierarchy), hierarchy, _ID, _T, _Y, validate=False,
                    also=[_M, *_covariates(arrays)]).frame
    n_bottom = len(arrays)
    top = _grid(agg, arrays, cfg, ids[:len(ids) - n_bottom])
    place = {str(i): k for k, i in enumerate(arrays.ids.tolist())}
    rows = np.r_[n_bottom + np.arange(len(top)), [place[str(i)] for i in tags[d.id_col]]]
    order = np.argsort(rows[-n_bottom:])          # bottom places → S's columns
    S_top = S[:len(top)][:, order] if len(top) else S[:0]
    top.static = _aggregated_statics(arrays, S_top)
    top.groups = None if arrays.groups is None else _common(arrays.groups, S_top, top.ids)
    names = {i: name for name, level_ids in tags.items() for i in level_ids}
    bottom = dataclasses.replace(arrays, static={
        **arrays.static, LEVEL: np.full(n_bottom, d.id_col, dtype=object)})
    top.static[LEVEL] = np.array([names[i] for i in top.ids], dtype=object)
    keys = agg.select(pl.col(_ID).alias("id"), *hierarchy.columns).unique("id",
                                                                         maintain_order=True)
    return (SeriesArrays.concat([bottom, top]),
            Levels(hierarchy, S, tags, rows.astype(np.int64), keys))


def _statics(arrays: SeriesArrays, cfg: Config, cols: tuple[str, ...]) -> pl.DataFrame:
    """One row per bottom series: its id (str) and the level columns."""
    d = cfg.data
    values = {c: arrays.groups if c == d.group_col else arrays.static[c] for c in cols}
    return pl.DataFrame({d.id_col: arrays.ids.astype(str),
                         **{c: pl.Series(c, list(v)) for c, v in values.items()}})


def _covariates(arrays: SeriesArrays) -> list[str]:
    return [f"_p{j}" for j in range(len(arrays.past_names))] + \
        [f"_f{j}" for j in range(len(arrays.future_names))]


def _long(arrays: SeriesArrays, statics: pl.DataFrame, hierarchy: Hierarchy) -> pl.DataFrame:
    """Every grid step of the bottom series: series number, grid ordinal, value, observed,
    covariates and the series' level columns."""
    seg = np.repeat(np.arange(len(arrays)), arrays.lengths)
    pos = np.arange(len(arrays.values)) - arrays.indptr[seg]
    cols = {_ID: seg.astype(np.int32), _T: arrays.start[seg] + pos * arrays.freq.step,
            _Y: arrays.values.astype(np.float64), _M: arrays.mask}   # sums of u8: Int64
    names = _covariates(arrays)
    for block in (arrays.past, arrays.future):
        if block is not None:
            for j in range(block.shape[1]):
                cols[names.pop(0)] = block[:, j]                       # float32 (means)
    levels = statics.select(hierarchy.columns).with_row_index(_ID).with_columns(
        pl.col(_ID).cast(pl.Int32))
    return pl.DataFrame(cols).join(levels, on=_ID, how="left", maintain_order="left")


def _grid(agg: pl.DataFrame, arrays: SeriesArrays, cfg: Config, ids: np.ndarray
          ) -> SeriesArrays:
    """The aggregated long frame (sorted by series, then step) → arrays on the grid, in the
    order of `ids`."""
    step = arrays.freq.step
    agg = agg.with_columns(pl.col(_ID).cast(pl.String))
    first = agg.group_by(_ID, maintain_order=True).agg(pl.col(_T).min().alias("_start"),
                                                       pl.col(_T).max().alias("_end"))
    spans = pl.DataFrame({_ID: ids.astype(str)}).join(first, on=_ID, how="left",
                                                      maintain_order="left")
    start, end = spans["_start"].to_numpy(), spans["_end"].to_numpy()
    lengths = (end - start) // step + 1
    indptr = np.r_[0, np.cumsum(lengths)].astype(np.int64)
    code = pl.DataFrame({_ID: ids.astype(str), "_k": np.arange(len(ids))})
    agg = agg.join(code, on=_ID, how="left", maintain_order="left")
    k = agg["_k"].to_numpy()
    flat = indptr[k] + (agg[_T].to_numpy() - start[k]) // step
    n = int(indptr[-1])
    values = np.full(n, np.nan, np.float32)
    values[flat] = agg[_Y].to_numpy()
    mask = np.zeros(n, np.uint8)
    count = agg["n_bottom"].to_numpy()
    mask[flat] = agg[_M].to_numpy() >= count - 0.5     # every child observed there
    values, _ = fill_segments(values, np.isfinite(values), indptr)
    past, future = (_mean_block(agg, names, flat, count, indptr) for names in
                    (_covariates(arrays)[:len(arrays.past_names)],
                     _covariates(arrays)[len(arrays.past_names):]))
    status = np.where(lengths < cfg.windows.shortest, STATUS_CODE["too_short"], 0)
    if cfg.data.nonnegative:
        neg = np.add.reduceat(values < 0, indptr[:-1]) > 0 if n else np.zeros(0, bool)
        status = np.where((status == 0) & neg, STATUS_CODE["negative_values"], status)
    return SeriesArrays(ids=ids.astype(object), indptr=indptr, values=values, mask=mask,
                        start=start.astype(np.int64), freq=arrays.freq,
                        status=status.astype(np.int8), past=past, future=future,
                        past_names=arrays.past_names, future_names=arrays.future_names)


def _mean_block(agg: pl.DataFrame, names: list[str], flat, count, indptr
                ) -> np.ndarray | None:
    """Covariates `names` (summed over the children) as the children's mean on the grid."""
    if not names:
        return None
    out = np.empty((int(indptr[-1]), len(names)), np.float32)
    for j, c in enumerate(names):
        v = np.full(int(indptr[-1]), np.nan, np.float32)
        v[flat] = agg[c].to_numpy() / count
        out[:, j], _ = fill_segments(v, np.isfinite(v), indptr)
    return out


def _aggregated_statics(arrays: SeriesArrays, S_top: sparse.csr_matrix) -> dict:
    """The bottom's static columns for the aggregated rows of S (columns in the arrays'
    order): numeric ones the children's mean, the others their common value or ""."""
    out = {}
    size = np.asarray(S_top.sum(axis=1)).ravel()
    for name, col in arrays.static.items():
        col = np.asarray(col)
        if np.issubdtype(col.dtype, np.number):
            out[name] = (S_top @ col.astype(np.float64)) / size
        else:
            out[name] = _common(col, S_top, np.full(S_top.shape[0], "", dtype=object))
    return out


def _common(col: np.ndarray, S_top: sparse.csr_matrix, otherwise: np.ndarray) -> np.ndarray:
    """Per aggregated row, the value its children share, else `otherwise`'s."""
    uniq, codes = np.unique(col.astype(str), return_inverse=True)
    hi = np.asarray(S_top.multiply(codes + 1).max(axis=1).todense()).ravel() - 1
    lo = len(uniq) - np.asarray(S_top.multiply(len(uniq) - codes).max(axis=1).todense()).ravel()
    return np.where(hi == lo, uniq[hi.astype(np.int64)].astype(object),
                    np.asarray(otherwise, dtype=object))
