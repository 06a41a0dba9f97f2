"""Timestamps to grid ordinals and back, with Polars (`pipeline.data.calendar.Freq` says what
the grid is). The input's `ds` may be Datetime (naive or tz-aware, any unit), Date, or an
integer step; forecasts' `ds` and `cutoff` are written back in the same type and zone.

`ordinals(df, col, freq)` gives each row's ordinal and whether it lies on the grid (off-grid
rows are an error naming the series and rows, raised by the caller); `infer(...)` finds the
frequency and its anchors from a sample; `to_arrow(ordinals, freq)` makes output columns.
"""
from __future__ import annotations

import dataclasses

import numpy as np
import polars as pl
import pyarrow as pa

from pipeline.data.calendar import DAY_NS, Freq, format_ns

_EPOCH = pl.lit(0).cast(pl.Date)


def time_kind(dtype: pl.DataType) -> str | None:
    """datetime | date | int for a usable `ds` column type, else None."""
    if isinstance(dtype, pl.Datetime):
        return "datetime"
    if dtype == pl.Date:
        return "date"
    if dtype.is_integer():
        return "int"
    return None


def zone(dtype: pl.DataType) -> str | None:
    return dtype.time_zone if isinstance(dtype, pl.Datetime) else None


def _local(col: str, dtype: pl.DataType) -> pl.Expr:
    """The column as naive local wall-clock Datetime[ns] (its zone's, when it has one)."""
    e = pl.col(col)
    if dtype == pl.Date:
        return e.cast(pl.Datetime("ns"))
    e = e.dt.cast_time_unit("ns")
    return e.dt.replace_time_zone(None) if zone(dtype) else e


def ordinals(df: pl.DataFrame, col: str, freq: Freq) -> tuple[np.ndarray, np.ndarray]:
    """(each row's ordinal int64, whether the row is on the grid's calendar: the anchor's day
    and the time of day). Whether consecutive rows are a whole number of steps apart is the
    caller's check (positions relative to each series' first row)."""
    dtype = df.schema[col]
    if freq.unit == "int":
        return df[col].cast(pl.Int64).to_numpy(), np.ones(len(df), bool)
    if freq.unit == "ns":              # instants: UTC nanoseconds
        e = pl.col(col)
        if dtype == pl.Date:
            e = e.cast(pl.Datetime("ns"))
        elif zone(dtype):
            e = e.dt.convert_time_zone("UTC").dt.replace_time_zone(None)
        return df.select(e.dt.cast_time_unit("ns").cast(pl.Int64))[col].to_numpy(), \
            np.ones(len(df), bool)
    local = df.select(_local(col, dtype).alias("t"))["t"]
    days = local.dt.date().cast(pl.Int32).to_numpy().astype(np.int64)
    tod = (local.cast(pl.Int64).to_numpy() - days * DAY_NS)
    ok = tod == freq.time_ns
    if freq.unit == "D":
        if freq.weekday is not None:
            ok &= (days + 3) % 7 == freq.weekday
        return days, ok
    if freq.unit == "B":
        week, wd = np.divmod(days + 3, 7)                # Monday = 0
        return 5 * week + np.minimum(wd, 4), ok & (wd < 5)
    y, m, d = (local.dt.year().to_numpy(), local.dt.month().to_numpy(),
               local.dt.day().to_numpy())
    months = (y.astype(np.int64) - 1970) * 12 + m - 1
    if freq.month_end:
        ok &= d == local.dt.month_end().dt.day().to_numpy()
    else:
        ok &= d == 1
    return months, ok


def to_arrow(ords: np.ndarray, freq: Freq) -> pa.Array:
    """Ordinals as the input held time: timestamp[ns] (its zone), date32, or int64."""
    ords = np.asarray(ords, np.int64)
    if freq.unit == "int":
        return pa.array(ords, pa.int64())
    if freq.unit == "ns":
        utc = pa.array(ords, pa.timestamp("ns"))
        if freq.tz:
            return utc.cast(pa.timestamp("ns", tz=freq.tz))
        return utc
    days = freq.days(ords)
    if freq.kind == "date":
        return pa.array(days.astype(np.int32), pa.date32())
    wall = days * DAY_NS + freq.time_ns                     # local wall-clock nanoseconds
    if not freq.tz:
        return pa.array(wall, pa.timestamp("ns"))
    local = pl.Series("t", wall).cast(pl.Datetime("ns"))    # the local time, in the zone
    return local.dt.replace_time_zone(freq.tz, ambiguous="earliest",
                                      non_existent="null").to_arrow()


# ------------------------------------------------------------------ inference

def complete(freq: Freq, df: pl.DataFrame, col: str, found: Freq | None) -> Freq:
    """A configured frequency with what only the data says: the time zone and kind of `col`,
    the time of day of its stamps, and the anchors the configuration left open (a month's
    first or last day, a week's weekday), from `found` (the inferred frequency) or the first
    stamp."""
    dtype = df.schema[col]
    kind, tz = time_kind(dtype), zone(dtype)
    if freq.unit in ("ns", "int") or not len(df):
        return dataclasses.replace(freq, tz=tz, kind=kind)
    local = df.select(_local(col, dtype).alias("t"))["t"].drop_nulls()
    first_day = int(local.dt.date().cast(pl.Int32)[0])
    time_ns = int(local.cast(pl.Int64)[0]) - first_day * DAY_NS
    out = dataclasses.replace(freq, tz=tz, kind=kind, time_ns=time_ns)
    if freq.unit == "M" and freq.month_end is None:
        end = found.month_end if found is not None and found.unit == "M" else \
            bool((local.dt.day() == local.dt.month_end().dt.day()).all() &
                 ~(local.dt.day() == 1).all())
        out = dataclasses.replace(out, month_end=bool(end))
    if freq.unit == "D" and freq.step % 7 == 0 and freq.weekday is None:
        out = dataclasses.replace(out, weekday=(first_day + 3) % 7)
    return out


def infer(df: pl.DataFrame, id_col: str, col: str, sample_rows: int = 1_000_000) -> Freq:
    """The frequency of `col` from a sample: integer steps, sub-daily durations, days, weeks
    (anchored on their weekday), business days (no weekend stamps and 3-day steps over
    weekends), or months, quarters and years (every stamp on a month's first day, or every
    one on its last); the anchors and the time of day come from the data. Raises ValueError
    when no series has two stamps."""
    df = df.head(sample_rows).sort(id_col, col)
    dtype = df.schema[col]
    kind = time_kind(dtype)
    if kind == "int":
        return Freq("int", _mode_step(df[col].cast(pl.Int64).to_numpy(), df[id_col]), kind="int")
    ns, _ = ordinals(df, col, Freq("ns", 1))
    step = _mode_step(ns, df[id_col])
    tz = zone(dtype)
    if step < DAY_NS and kind == "datetime":
        return Freq("ns", step, tz=tz, kind=kind)
    local = df.select(_local(col, dtype).alias("t"))["t"]
    days = local.dt.date().cast(pl.Int32).to_numpy().astype(np.int64)
    tod = int((local.cast(pl.Int64).to_numpy() - days * DAY_NS)[0])
    base = dict(time_ns=tod, tz=tz, kind=kind)
    day, month_day = local.dt.day().to_numpy(), local.dt.month_end().dt.day().to_numpy()
    _check_monthly_majority(df, id_col, col, day == 1, day == month_day)
    if (day == 1).all() or (day == month_day).all():
        months = _mode_step((local.dt.year().to_numpy().astype(np.int64) - 1970) * 12
                            + local.dt.month().to_numpy(), df[id_col])
        return Freq("M", months, month_end=not (day == 1).all(), **base)
    dstep = _mode_step(days, df[id_col])
    weekday = (days + 3) % 7
    if dstep == 1 and (weekday < 5).all() and (weekday >= 5).sum() == 0 and \
            _has_weekend_jumps(days, df[id_col]):
        return Freq("B", 1, **base)
    if dstep % 7 == 0 and (weekday == weekday[0]).all():
        return Freq("D", dstep, weekday=int(weekday[0]), **base)
    return Freq("D", dstep, **base)


class MixedFrequency(ValueError):
    """Most series of the sample are on one grid and these are not (named in the message)."""


def _check_monthly_majority(df: pl.DataFrame, id_col: str, col: str, first: np.ndarray,
                            last: np.ndarray) -> None:
    """When most series have every stamp on a month's first (or last) day and some do not,
    the odd ones are the error — a weekly series among monthly ones, or one mid-month stamp —
    not the monthly series a day-step grid would then reject: name the first of them, its
    first off stamp, and how many series are off."""
    for on, anchor in ((first, "first"), (last, "last")):
        per = pl.DataFrame({"id": df[id_col], "on": on, "t": df[col]}).group_by(
            "id", maintain_order=True).agg(pl.col("on").all().alias("all"),
                                           pl.col("t").filter(~pl.col("on")).first().alias("off"))
        good = int(per["all"].sum())
        if good == len(per) or 2 * good <= len(per):
            continue
        bad = per.filter(~pl.col("all"))
        raise MixedFrequency(
            f"series {bad['id'][0]!r} has {col} {bad['off'][0]} off the monthly grid that "
            f"{good} of the {len(per)} series in the sample follow (every stamp on a month's "
            f"{anchor} day); {len(bad)} series are off it. Forecast series of one frequency "
            "per run: aggregate or drop the others, or fix the stamps")


def _same_series(ids: pl.Series) -> np.ndarray:
    """[n - 1] bool: row i + 1 is of the same series as row i (ids compared in Polars, not
    as Python strings)."""
    return ids.slice(1).eq_missing(ids.slice(0, len(ids) - 1)).to_numpy() if len(ids) > 1 else \
        np.zeros(0, bool)


def _mode_step(values: np.ndarray, ids: pl.Series) -> int:
    same = _same_series(ids)
    d = np.diff(values)[same]
    d = d[d > 0]
    if len(d) == 0:
        raise ValueError("no series has two timestamps")
    vals, counts = np.unique(d, return_counts=True)
    return int(vals[np.argmax(counts)])


def _has_weekend_jumps(days: np.ndarray, ids: pl.Series) -> bool:
    """Weekday-only stamps whose Friday is followed by the next Monday (a business-day
    grid), rather than a daily series that merely has no weekend in its sample."""
    d = np.diff(days)[_same_series(ids)]
    return bool((d == 3).any())


def describe(freq: Freq) -> str:
    """The frequency as the summary prints it."""
    where = f", {freq.tz}" if freq.tz else ""
    if freq.unit in ("D", "B", "M") and freq.time_ns:
        where += f", at {format_ns(freq.time_ns)} local"
    return f"{freq.name}{where}"

