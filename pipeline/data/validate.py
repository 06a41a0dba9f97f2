"""Read one input part, validate it against the data contract, and build its SeriesArrays.

`load_part` is the per-partition function the data stage maps over the input (on Ray or
locally). Problems that make the data unusable raise `DataError` naming the column, series and
row; problems limited to a series are repaired or the series is marked skipped, and every such
case becomes a report row. Row numbers count from 0 within the file.

Ranges: timestamps are held as int64 nanoseconds (UTC), so one before 1677-09-21 00:12:43 or
after 2262-04-11 23:47:16 is an error naming the file, column, values, rows and series, whatever
the column's unit (Datetime of any unit or time zone, or Date). Targets and covariates are held
as float32: a finite target beyond float32's range (|y| above about 3.4e38, which would become
inf) follows `data.nan_policy` like a NaN/inf target, reported as `out_of_range_target` with its
rows and timestamps; such a covariate value is an error naming the column, series and row (a
covariate that large is a unit or scaling mistake, and filling it would hide that).
"""
from __future__ import annotations

import difflib

import numpy as np
import polars as pl

from pipeline.config import DataConfig, WindowsConfig
from pipeline.data import grid
from pipeline.data.calendar import Freq
from pipeline.data.fill import report_row, scatter_covariates, scatter_target
from pipeline.data.io import Part, file_schema, read_columns
from pipeline.data.series import STATUS, STATUS_CODE, SeriesArrays
from pipeline.errors import DataError

ROW = "_row"
ORD = "_ord"          # the row's ordinal on the frequency's grid
ON = "_on_calendar"   # the row's stamp is on the grid's calendar (anchor day, time of day)
NS_RANGE = "1677-09-21 00:12:43 to 2262-04-11 23:47:16 UTC"  # what int64 nanoseconds can hold
SHOWN = 5  # offending rows named in an error or report detail
MAX_FILL_RATIO = 10  # a series whose grid is this many times longer than its rows is suspicious


def required_columns(data: DataConfig) -> list[str]:
    cols = [data.id_col, data.time_col, data.target_col, data.group_col, *data.static_cols,
            *data.past_covariates, *data.future_covariates]
    return list(dict.fromkeys(c for c in cols if c))


def fmt_ts(value) -> str:
    """A timestamp as the input holds it (Datetime, Date or integer step), for messages."""
    if isinstance(value, int | np.integer) and not isinstance(value, bool):
        return str(int(value))
    return str(value)


def load_part(part: Part, data: DataConfig, freq: Freq, windows: WindowsConfig,
              inferred_from: str | None = None) -> tuple[SeriesArrays, list[dict]]:
    """One part → (its series arrays, its report rows). `inferred_from`: the file `freq` was
    inferred from (None: `data.freq` named it); this part must have the same frequency."""
    df = _read(part, data, freq)
    if inferred_from is not None:
        _check_same_freq(df, part, data, freq, inferred_from)
    report: list[dict] = []
    df = _sort(df, part, data, report)
    _check_duplicates(df, part, data)
    return _to_arrays(df, part, data, freq, windows, report), report


def _check_same_freq(df, part: Part, data: DataConfig, freq: Freq, first: str) -> None:
    try:
        mine = grid.infer(df, data.id_col, data.time_col)
    except ValueError:                   # no series with two stamps here: nothing to compare
        return
    if mine.name != freq.name:
        raise DataError(f"files of different frequencies: {first} is {freq.name}, "
                        f"{part.path} is {mine.name} (column {data.time_col!r}); set "
                        "data.freq, or keep one frequency per input")


# ------------------------------------------------------------------ reading and typing

def check_columns(part: Part, data: DataConfig) -> None:
    """Every configured column is in the file (or its hive keys); else the nearest name."""
    names = file_schema(part).names + list(part.partition)
    for col in required_columns(data):
        if col not in names:
            close = difflib.get_close_matches(col, names, n=1)
            hint = f"; did you mean {close[0]!r}?" if close else ""
            raise DataError(f"column {col!r} is missing from {part.path} "
                            f"(it has {', '.join(names)}){hint}")


def _read(part: Part, data: DataConfig, freq: Freq) -> pl.DataFrame:
    check_columns(part, data)
    df = pl.from_arrow(read_columns(part, required_columns(data))).with_row_index(ROW)
    df = _cast(df, part, data, freq)
    if part.n_chunks > 1:  # route whole series to chunks by a hash of the id
        df = df.filter(pl.col(data.id_col).hash(seed=0) % part.n_chunks == part.chunk)
    _check_nulls(df, part, data)
    return _cast_covariates(_place(df, data, freq), part, data)


def _cast(df: pl.DataFrame, part: Part, data: DataConfig, freq: Freq) -> pl.DataFrame:
    """Ids to strings, each stamp's grid ordinal (ORD, ON), the target to float64; covariates
    are checked for their type here and cast by `_cast_covariates`."""
    def bad(col: str, expected: str) -> DataError:
        return DataError(f"column {col!r} in {part.path} has type {df.schema[col]}; "
                         f"expected {expected}")

    exprs = []
    id_t = df.schema[data.id_col]
    if not (id_t.is_integer() or id_t in (pl.String, pl.Categorical) or isinstance(id_t, pl.Enum)):
        raise bad(data.id_col, "a string or integer series id")
    exprs.append(pl.col(data.id_col).cast(pl.String))
    kind = grid.time_kind(df.schema[data.time_col])
    if kind is None:
        raise bad(data.time_col, "a timestamp (Datetime or Date) or an integer step")
    if (kind == "int") != (freq.unit == "int"):
        raise bad(data.time_col, f"{'integer steps' if freq.unit == 'int' else 'timestamps'} "
                                 f"for data.freq {freq.name!r}")
    if kind != "int":
        timestamps_ns(df, part, data.id_col, data.time_col)  # in range, or an error naming them
    if not df.schema[data.target_col].is_numeric():
        raise bad(data.target_col, "a numeric target")
    exprs.append(pl.col(data.target_col).cast(pl.Float64).fill_null(float("nan")))
    for col in [*data.past_covariates, *data.future_covariates]:
        if not (df.schema[col].is_numeric() or df.schema[col] == pl.Boolean):
            raise bad(col, "a numeric or boolean covariate")
    if data.group_col:
        exprs.append(pl.col(data.group_col).cast(pl.String))
    return df.with_columns(exprs)


def _place(df: pl.DataFrame, data: DataConfig, freq: Freq) -> pl.DataFrame:
    """Each row's ordinal on the grid (ORD) and whether it is on the grid's calendar (ON)."""
    ords, on = grid.ordinals(df, data.time_col, freq)
    return df.with_columns(pl.Series(ORD, ords), pl.Series(ON, on))


def timestamps_ns(df: pl.DataFrame, part: Part, id_col: str, time_col: str) -> pl.Series:
    """`time_col` (Datetime of any unit and time zone, or Date) as int64 nanoseconds since the
    epoch, UTC; nulls stay null. A timestamp int64 nanoseconds cannot hold is a DataError naming
    the file, the column, the first values, their rows (the `_row` column, else positions) and
    series."""
    ts = pl.col(time_col)
    t = df.schema[time_col]
    if isinstance(t, pl.Datetime) and t.time_zone is not None:
        ts = ts.dt.convert_time_zone("UTC").dt.replace_time_zone(None)
    # a strict cast raises a bare Polars error; this one gives null where it overflows
    ns = df.select(ts.cast(pl.Datetime("ns"), strict=False).cast(pl.Int64))[time_col]
    if ns.null_count() == df[time_col].null_count():
        return ns
    if ROW not in df.columns:
        df = df.with_row_index(ROW)
    out = df.filter(ns.is_null() & df[time_col].is_not_null())
    shown = ", ".join(f"{v} (row {r}, series {i!r})" for v, r, i in zip(
        out[time_col].cast(pl.String).head(SHOWN), out[ROW].head(SHOWN),
        out[id_col].cast(pl.String).head(SHOWN), strict=True))
    more = f"; first {SHOWN} shown" if len(out) > SHOWN else ""
    raise DataError(f"column {time_col!r} in {part.path} has {len(out)} timestamp(s) outside "
                    f"the range the pipeline holds timestamps in ({NS_RANGE}, int64 "
                    f"nanoseconds): {shown}{more}. Fix or drop these rows")


def _check_nulls(df: pl.DataFrame, part: Part, data: DataConfig) -> None:
    for col in [data.id_col, data.time_col]:
        nulls = df.filter(pl.col(col).is_null())
        if len(nulls):
            rows = nulls[ROW].head(SHOWN).to_list()
            series = ""
            if col != data.id_col:
                ids = nulls[data.id_col].unique(maintain_order=True)
                series = (f" (series {', '.join(repr(i) for i in ids.head(SHOWN))}"
                          f"{f' and {len(ids) - SHOWN} more' if len(ids) > SHOWN else ''})")
            raise DataError(f"column {col!r} in {part.path} has {len(nulls)} null value(s), "
                            f"first at rows {rows}{series}")


def _cast_covariates(df: pl.DataFrame, part: Part, data: DataConfig) -> pl.DataFrame:
    """Covariates to float32 (nulls become NaN, filled later); a finite value beyond float32's
    range would become inf, so it is an error naming the column, series and row."""
    cols = [*data.past_covariates, *data.future_covariates]
    for col in cols:
        c = pl.col(col)
        if df.schema[col] != pl.Float64:  # only a float64 can overflow float32
            continue
        over = df.filter(c.is_finite() & c.cast(pl.Float32).is_infinite())
        if len(over):
            first = over.row(0, named=True)
            raise DataError(
                f"column {col!r} in {part.path}: series {first[data.id_col]!r} has the value "
                f"{first[col]:g} at row {first[ROW]} ({fmt_ts(first[data.time_col])}), beyond "
                f"the range of float32 (about ±3.4e38) that covariates are held in; "
                f"{len(over)} such value(s) in {over[data.id_col].n_unique()} series in this "
                "file. Rescale the covariate")
    return df.with_columns([pl.col(c).cast(pl.Float32).fill_null(float("nan")) for c in cols])


def _sort(df: pl.DataFrame, part: Part, data: DataConfig, report: list[dict]) -> pl.DataFrame:
    """Rows by series id, then time (stable); a report row per series that was out of time
    order. Input already in that order (the usual case) is checked in one pass, not sorted."""
    sid, ts = pl.col(data.id_col), pl.col(ORD)
    ordered = ((sid > sid.shift(1)) | ((sid == sid.shift(1)) & (ts >= ts.shift(1))))
    if df.select(ordered.fill_null(True).all()).item():
        return df
    df = df.sort([data.id_col, ORD], maintain_order=True)
    ids = df[data.id_col]
    back = (df[ROW].diff() < 0) & (ids == ids.shift(1))  # time order broken inside a series
    if back.any():
        counts = ids.filter(back).value_counts(sort=False)
        for sid, n in counts.sort(data.id_col).iter_rows():
            report.append(report_row(part, sid, "unsorted", "sorted",
                                     f"{n} row(s) were out of time order; sorted"))
    return df


def _check_duplicates(df: pl.DataFrame, part: Part, data: DataConfig) -> None:
    sid, ts = pl.col(data.id_col), pl.col(ORD)
    dup = df.filter((sid == sid.shift(1)) & (ts == ts.shift(1)))
    if len(dup):
        first = dup.row(0, named=True)
        twin = df.filter((sid == first[data.id_col]) & (ts == first[ORD]))[ROW].to_list()
        raise DataError(
            f"duplicate ({data.id_col}, {data.time_col}) rows in {part.path}: series "
            f"{first[data.id_col]!r} at {fmt_ts(first[data.time_col])} (rows {twin}); "
            f"{len(dup)} duplicate row(s) in this file")


# ------------------------------------------------------------------ the regular grid

def _to_arrays(df: pl.DataFrame, part: Part, data: DataConfig, freq: Freq,
               windows: WindowsConfig, report: list[dict]) -> SeriesArrays:
    code = df[data.id_col].rle_id().to_numpy().astype(np.int64)  # series number of each row
    t = df[ORD].to_numpy()
    first_row = np.flatnonzero(np.r_[True, code[1:] != code[:-1]]) if len(df) else np.zeros(0, int)
    ids = df[data.id_col].gather(first_row).to_numpy().astype(object)   # one per series
    start = t[first_row]
    rel = t - start[code]
    _check_grid(df, part, data, rel, freq, code, ids)
    pos = rel // freq.step
    counts = np.bincount(code, minlength=len(ids))
    lengths = pos[np.r_[first_row[1:], len(df)] - 1] + 1 if len(df) else np.zeros(0, np.int64)
    _check_fill_ratio(part, ids, lengths, counts, freq)
    indptr = np.r_[0, np.cumsum(lengths)].astype(np.int64)
    flat = indptr[code] + pos  # where each row lands on the grid
    status = np.zeros(len(ids), np.int8)
    y = df[data.target_col].to_numpy()
    values, mask, no_finite = scatter_target(y, flat, indptr, len(ids))
    _target_report(part, data, y, mask[flat] == 1, code, ids, df, lengths - counts, status, report)
    status[(status == 0) & no_finite] = STATUS_CODE["no_finite_values"]
    if data.nonnegative:
        neg = np.bincount(code, weights=(y < 0), minlength=len(ids)) > 0
        status[(status == 0) & neg] = STATUS_CODE["negative_values"]
    status[(status == 0) & (lengths < windows.shortest)] = STATUS_CODE["too_short"]
    _status_report(part, ids, lengths, status, windows, report)
    past = scatter_covariates(df, data.past_covariates, flat, indptr, part, ids, report)
    future = scatter_covariates(df, data.future_covariates, flat, indptr, part, ids, report)
    return SeriesArrays(
        ids=ids, indptr=indptr, values=values, mask=mask, start=start.astype(np.int64),
        freq=freq, status=status, past=past, future=future,
        past_names=list(data.past_covariates), future_names=list(data.future_covariates),
        static={c: _per_series(df, data, c, first_row, part) for c in data.static_cols},
        groups=(_per_series(df, data, data.group_col, first_row, part).astype(object)
                if data.group_col else None),
    )


def _check_grid(df, part, data, rel, freq: Freq, code, ids) -> None:
    """Every stamp on the grid's calendar (its anchor day and time of day) and a whole number
    of steps after its series' first one; else an error naming the series and rows."""
    off = np.flatnonzero((rel % freq.step != 0) | ~df[ON].to_numpy())
    if len(off):
        i = int(off[0])
        rows = [int(df[ROW][int(j)]) for j in off[:SHOWN]]
        raise DataError(
            f"series {ids[code[i]]!r} in {part.path}: {data.time_col} "
            f"{fmt_ts(df[data.time_col][i])} (row {df[ROW][i]}) is off the {freq.name} grid "
            f"({grid.describe(freq)}) that starts at its first stamp; {len(off)} row(s) are "
            f"off the grid, first at rows {rows}. Set data.freq (with its anchor, e.g. 1mo-end, "
            "1w-mon) or aggregate the input to a regular frequency")


def _check_fill_ratio(part, ids, lengths, counts, freq: Freq) -> None:
    bad = np.flatnonzero((lengths > MAX_FILL_RATIO * counts) & (lengths > 10_000))
    if len(bad):
        s = bad[0]
        raise DataError(f"series {ids[s]!r} in {part.path} spans {lengths[s]} steps of "
                        f"{freq.name} but has only {counts[s]} rows; is data.freq "
                        "right, or are some timestamps wrong?")


def _target_report(part, data, y, observed, code, ids, df, gaps, status, report) -> None:
    """NaN/inf targets, and finite ones beyond float32's range (inf once held as float32, so not
    `observed`), follow data.nan_policy; each kind gets a report row per series."""
    nan = ~np.isfinite(y)
    kinds = {"nan_target": nan, "out_of_range_target": ~nan & ~observed}
    if data.nan_policy == "fail" and not observed.all():
        i = int(np.flatnonzero(~observed)[0])
        raise _target_error(part, data, y, i, ids[code[i]], df,
                            int(kinds["nan_target" if nan[i] else "out_of_range_target"].sum()))
    for issue, is_bad in kinds.items():
        rows = np.flatnonzero(is_bad)
        # rows are sorted by series, so each series' rows are one run
        series, first, n_bad = np.unique(code[rows], return_index=True, return_counts=True)
        for s, lo, n in zip(series, first, n_bad, strict=True):
            if data.nan_policy == "drop":
                status[s] = STATUS_CODE["nan_target_dropped"]
            action = "skipped" if data.nan_policy == "drop" else "imputed"
            detail = (f"{n} NaN/inf target value(s)" if issue == "nan_target" else
                      f"{n} target value(s) beyond the range of float32 (about ±3.4e38), which "
                      f"would be inf: {_rows_at(data, y, rows[lo:lo + n], df)}")
            report.append(report_row(part, ids[s], issue, action, detail))
    for s in np.flatnonzero(gaps):
        report.append(report_row(part, ids[s], "gaps", "filled",
                                 f"{gaps[s]} missing timestamp(s) filled and masked"))


def _rows_at(data, y, rows, df) -> str:
    """'1e+39 at row 3 (2024-01-01 03:00:00), …' for the first of `rows` (positions in df)."""
    shown = ", ".join(f"{y[i]:g} at row {df[ROW][int(i)]} ({fmt_ts(df[data.time_col][int(i)])})"
                      for i in rows[:SHOWN])
    return shown + (f"; first {SHOWN} shown" if len(rows) > SHOWN else "")


def _target_error(part, data, y, i, series, df, n) -> DataError:
    where = f"column {data.target_col!r} in {part.path}: series {series!r} has"
    fix = "data.nan_policy is 'fail' (use 'impute' or 'drop'"
    if not np.isfinite(y[i]):
        return DataError(f"{where} a NaN/inf value at row {df[ROW][i]} ({n} in this file); "
                         f"{fix})")
    return DataError(f"{where} a value beyond the range of float32 (about ±3.4e38), which would "
                     f"be inf: {_rows_at(data, y, [i], df)}; {n} such value(s) in this file; "
                     f"{fix}, or rescale the target)")


def _status_report(part, ids, lengths, status, windows: WindowsConfig, report) -> None:
    """A row per skipped series, and per series kept on left-padded windows."""
    need = windows.shortest
    reasons = {STATUS_CODE["too_short"]: lambda s: f"{lengths[s]} steps < {need} needed " + (
               "(windows.min_length)" if windows.padded else "(lookback + horizon + backtest)"),
               STATUS_CODE["no_finite_values"]: lambda s: "no finite target value",
               STATUS_CODE["negative_values"]: lambda s: "negative target values"}
    for s in np.flatnonzero(np.isin(status, list(reasons))):
        report.append(report_row(part, ids[s], STATUS[int(status[s])], "skipped",
                                 reasons[int(status[s])](s)))
    if windows.padded:
        for s in np.flatnonzero((status == 0) & (lengths < windows.required_length)):
            report.append(report_row(part, ids[s], "short", "padded",
                                     f"{lengths[s]} steps < {windows.required_length} (lookback "
                                     "+ horizon + backtest): windows left-padded"))


def _per_series(df, data, col, first_row, part) -> np.ndarray:
    """A column constant per series, one value per series (`df` sorted by series)."""
    sid, c = pl.col(data.id_col), pl.col(col)
    if df.select(((sid == sid.shift(1)) & c.ne_missing(c.shift(1))).any()).item():
        varying = (df.group_by(data.id_col).agg(c.n_unique().alias("n"))
                   .filter(pl.col("n") > 1).sort(data.id_col))
        raise DataError(f"column {col!r} in {part.path} must be constant per series, but series "
                        f"{varying[data.id_col][0]!r} has {varying['n'][0]} different values "
                        f"({len(varying)} series vary)")
    return df[col].gather(first_row).to_numpy()
