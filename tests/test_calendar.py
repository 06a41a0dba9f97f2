"""Frequencies on the calendar: parsing, grids (month ends, leap years, quarters, business days,
anchored weeks, DST days), inference, gap filling, forecast timestamps in the input's type and
zone, calendar features on the device, and mixed inputs refused."""
from __future__ import annotations

import datetime as dt

import numpy as np
import polars as pl
import pyarrow as pa
import pytest
import torch

from pipeline import config as C
from pipeline.data import grid
from pipeline.data.calendar import (
    NS,
    Freq,
    civil_from_days,
    days_from_civil,
    iso_week,
    label,
    parse_freq,
    to_datetime64,
)
from pipeline.data.prepare import prepare
from pipeline.errors import DataError

H = NS["h"]


def write(path, ids, ds, y=None, dtype=None) -> str:
    """A long table as Parquet; `ds` a list of datetimes/dates/ints, `dtype` its Arrow type."""
    y = np.arange(len(ids), dtype=float) + 1 if y is None else y
    table = pa.table({"unique_id": ids, "ds": pa.array(ds, type=dtype), "y": y})
    path.parent.mkdir(parents=True, exist_ok=True)
    import pyarrow.parquet as pq
    pq.write_table(table, path)
    return str(path)


def cfg_for(path, *extra) -> C.Config:
    return C.load(None, [f"data.path={path}", "data.calendar=[]", "windows.lookback=2",
                         "windows.horizon=1", "windows.val_size=0", *extra])


# ------------------------------------------------------------------ parsing, civil dates

@pytest.mark.parametrize("text,unit,step,extra", [
    ("1h", "ns", H, {}), ("15min", "ns", 15 * 60 * 10**9, {}), ("30s", "ns", 30 * 10**9, {}),
    ("1d", "D", 1, {}), ("2d", "D", 2, {}), ("1w", "D", 7, {"weekday": None}),
    ("1w-mon", "D", 7, {"weekday": 0}), ("2w-sun", "D", 14, {"weekday": 6}),
    ("1bd", "B", 1, {}), ("1mo", "M", 1, {"month_end": None}),
    ("1mo-end", "M", 1, {"month_end": True}), ("1q", "M", 3, {}), ("1q-start", "M", 3,
                                                                    {"month_end": False}),
    ("1y", "M", 12, {}), ("2y-end", "M", 24, {"month_end": True}), ("1", "int", 1, {}),
])
def test_parse_freq(text, unit, step, extra):
    f = parse_freq(text)
    assert (f.unit, f.step) == (unit, step)
    for k, v in extra.items():
        assert getattr(f, k) == v


@pytest.mark.parametrize("text", ["1fortnight", "0h", "1h-mon", "1w-xyz", "1mo-middle", "h1"])
def test_parse_freq_refuses_what_it_cannot_place(text):
    with pytest.raises(ValueError, match="frequency"):
        parse_freq(text)


def test_civil_dates_round_trip_on_numpy_and_torch():
    days = np.arange(-100_000, 100_000, 397)                  # 1696 … 2243
    y, m, d = civil_from_days(days)
    assert np.array_equal(days_from_civil(y, m, d), days)
    ref = [dt.date(1970, 1, 1) + dt.timedelta(days=int(x)) for x in days[:500]]
    assert [(int(a), int(b), int(c)) for a, b, c in zip(y[:500], m[:500], d[:500],
                                                        strict=True)] == \
        [(r.year, r.month, r.day) for r in ref]
    t = torch.from_numpy(days)
    assert torch.equal(days_from_civil(*civil_from_days(t)), t)
    iso = [r.isocalendar()[1] for r in ref]
    assert iso_week(days[:500]).tolist() == iso


def test_month_ordinals_give_month_ends_and_leap_years():
    end = Freq("M", 1, month_end=True)
    feb = [(2023 - 1970) * 12 + 1, (2024 - 1970) * 12 + 1, (2100 - 1970) * 12 + 1,
           (2000 - 1970) * 12 + 1]
    assert [str(d) for d in to_datetime64(feb, end).astype("datetime64[D]")] == \
        ["2023-02-28", "2024-02-29", "2100-02-28", "2000-02-29"]
    start = Freq("M", 3)
    assert str(to_datetime64([(2024 - 1970) * 12 + 9], start)[0])[:10] == "2024-10-01"
    assert label((2024 - 1970) * 12 + 5, end) == "20240630T000000"


def test_business_day_ordinals_skip_weekends():
    b = Freq("B", 1)
    days = np.arange(days_from_civil(2024, 6, 24), days_from_civil(2024, 7, 8))  # Mon..Sun+1
    d = pl.DataFrame({"ds": (days * 86400 * 10**9).astype("datetime64[ns]")})
    ords, on = grid.ordinals(d, "ds", b)
    assert on.tolist() == [True] * 5 + [False] * 2 + [True] * 5 + [False] * 2
    assert np.diff(ords[on]).tolist() == [1] * 9                    # Fri -> Mon is one step
    back = b.days(ords[on])
    assert back.tolist() == days[on].tolist()


# ------------------------------------------------------------------ grids through prepare

def dates(start: str, n: int, freq: str) -> list:
    return pl.date_range(dt.date.fromisoformat(start), dt.date(2100, 1, 1), interval=freq,
                         eager=True).head(n).to_list()


@pytest.mark.parametrize("freq,start,interval,expect", [
    ("1mo", "2023-01-01", "1mo", "1mo"),
    ("1mo-end", "2023-01-31", "1mo", "1mo-end"),
    ("1q", "2023-02-01", "3mo", "1q"),
    ("1y", "2001-01-01", "1y", "1y"),
    ("1w-wed", "2024-01-03", "1w", "1w-wed"),
    ("1d", "2024-01-01", "1d", "1d"),
])
def test_calendar_grids_read_fill_and_forecast_on_the_calendar(tmp_path, freq, start, interval,
                                                             expect):
    """Each frequency's grid: a gap (one stamp dropped) is filled and masked on the calendar,
    forecast timestamps continue the calendar, and inference finds the same frequency."""
    ds = dates(start, 14, interval)
    if freq == "1mo-end":
        ds = [(pl.Series([d]).dt.month_end()[0]) for d in ds]
    kept = ds[:5] + ds[6:]                                         # a gap at position 5
    path = write(tmp_path / "in.parquet", ["a"] * len(kept), kept, dtype=pa.date32())
    for given in (freq, None):
        prep = prepare(cfg_for(path, *( [f"data.freq={given}"] if given else [])))
        a = prep.arrays
        assert a.freq.name == expect and a.lengths.tolist() == [14]
        assert a.mask.tolist() == [1] * 5 + [0] + [1] * 8
        assert "gaps" in set(prep.report["issue"])
        step = to_datetime64(a.start[0] + np.arange(16) * a.freq.step, a.freq)
        assert [str(x)[:10] for x in step[:14]] == [str(d) for d in ds]
        nxt = pl.Series([ds[-1]]).dt.offset_by(interval.replace("1mo", "1mo"))[0]
        if freq == "1mo-end":
            nxt = pl.Series([nxt]).dt.month_end()[0]
        assert str(step[14])[:10] == str(nxt)
        col = grid.to_arrow(a.start + 14 * a.freq.step, a.freq)
        assert col.type == pa.date32() and str(col[0]) == str(nxt)     # the input's type


def test_off_grid_stamps_are_named(tmp_path):
    ds = dates("2023-01-01", 6, "1mo")
    ds[3] = dt.date(2023, 4, 15)                                   # not a month start
    path = write(tmp_path / "in.parquet", ["a"] * 6, ds, dtype=pa.date32())
    with pytest.raises(DataError, match=r"series 'a' .*2023-04-15 \(row 3\) is off the 1mo"):
        prepare(cfg_for(path, "data.freq=1mo"))
    wk = dates("2024-01-01", 6, "1w")                              # Mondays
    wk[2] = wk[2] + dt.timedelta(days=1)
    path = write(tmp_path / "w.parquet", ["a"] * 6, wk, dtype=pa.date32())
    with pytest.raises(DataError, match=r"off the 1w-mon grid"):
        prepare(cfg_for(path, "data.freq=1w-mon"))


@pytest.mark.parametrize("odd", ["weekly", "mid-month"])
def test_the_mixed_frequency_error_names_the_odd_series_not_a_monthly_one(tmp_path, odd):
    """Five monthly series and one odd one (weekly, or monthly with one mid-month stamp), no
    data.freq: the error names the odd series and its stamp (a day-step grid inferred from
    the mix used to reject a correct monthly series: 'off the 31d grid')."""
    ids, ds = [], []
    for k in range(5):
        ids += [f"m{k}"] * 12
        ds += dates("2023-01-01", 12, "1mo")
    odd_ds = dates("2023-01-02", 12, "1w") if odd == "weekly" else dates("2023-01-01", 12, "1mo")
    if odd == "mid-month":
        odd_ds[4] = dt.date(2023, 5, 15)
    ids, ds = ids + ["odd"] * 12, ds + odd_ds
    path = write(tmp_path / "in.parquet", ids, ds, dtype=pa.date32())
    first = "2023-01-02" if odd == "weekly" else "2023-05-15"
    with pytest.raises(DataError, match=rf"series 'odd' has ds {first} off the monthly grid "
                                        r"that 5 of the 6 series .* 1 series are off it"):
        prepare(cfg_for(path))


def test_business_days_skip_weekends_and_refuse_a_weekend_stamp(tmp_path):
    days = [d for d in dates("2024-06-03", 30, "1d") if d.weekday() < 5]   # Mon-Fri
    path = write(tmp_path / "in.parquet", ["a"] * len(days), days, dtype=pa.date32())
    a = prepare(cfg_for(path)).arrays
    assert a.freq.name == "1bd" and a.lengths.tolist() == [len(days)] and a.mask.all()
    assert a.freq.default_season() == 5
    sat = days + [dt.date(2024, 7, 6)]
    path = write(tmp_path / "sat.parquet", ["a"] * len(sat), sat, dtype=pa.date32())
    with pytest.raises(DataError, match="2024-07-06 .*off the 1bd grid"):
        prepare(cfg_for(path, "data.freq=1bd"))


@pytest.mark.parametrize("zone,dst", [("Europe/Berlin", "2024-03-31"),
                                      ("America/New_York", "2024-11-03")])
def test_daily_series_at_local_midnight_cross_dst_without_a_gap(tmp_path, zone, dst):
    local = pl.datetime_range(dt.datetime(2024, 3, 1) if zone == "Europe/Berlin" else
                              dt.datetime(2024, 10, 1), dt.datetime(2024, 12, 1), "1d",
                              eager=True, time_zone=zone).head(60)
    assert str(dst) in [str(d.date()) for d in local]
    path = write(tmp_path / "in.parquet", ["a"] * 60, local.to_list(),
                 dtype=pa.timestamp("us", tz=zone))
    prep = prepare(cfg_for(path))
    a = prep.arrays
    assert a.freq.name == "1d" and a.freq.tz == zone and a.mask.all() and a.lengths[0] == 60
    out = grid.to_arrow(a.start + np.arange(62) * a.freq.step, a.freq)
    assert out.type == pa.timestamp("ns", tz=zone)
    back = pl.from_arrow(out)
    assert (back.dt.hour() == 0).all() and back.dt.date().diff().drop_nulls().dt.total_days(
    ).eq(1).all()                                                # midnight every day, DST or not


def test_hourly_tz_aware_data_stays_in_its_zone(tmp_path):
    t = pl.datetime_range(dt.datetime(2024, 3, 30), dt.datetime(2024, 4, 2), "1h", eager=True,
                          time_zone="Europe/Berlin")
    path = write(tmp_path / "in.parquet", ["a"] * len(t), t.to_list(),
                 dtype=pa.timestamp("us", tz="Europe/Berlin"))
    a = prepare(cfg_for(path)).arrays
    assert a.freq.name == "1h" and a.mask.all()                   # the DST hour is no gap
    col = grid.to_arrow(a.end, a.freq)
    assert col.type == pa.timestamp("ns", tz="Europe/Berlin")


def test_integer_steps(tmp_path):
    path = write(tmp_path / "in.parquet", ["a"] * 8, [1, 2, 3, 5, 6, 7, 8, 9], dtype=pa.int64())
    a = prepare(cfg_for(path)).arrays
    assert a.freq.name == "1" and a.lengths.tolist() == [9] and a.mask.sum() == 8
    assert grid.to_arrow(a.end + 1, a.freq).to_pylist() == [10]
    with pytest.raises(ValueError, match="no calendar features"):
        a.freq.calendar_values(np.array([1]), ["month"])


def test_mixed_time_zones_and_frequencies_across_files_are_refused(tmp_path):
    t = [dt.datetime(2024, 1, 1) + dt.timedelta(hours=i) for i in range(10)]
    write(tmp_path / "tz" / "a.parquet", ["a"] * 10, t, dtype=pa.timestamp("us", tz="UTC"))
    write(tmp_path / "tz" / "b.parquet", ["b"] * 10, t,
          dtype=pa.timestamp("us", tz="Europe/Berlin"))
    with pytest.raises(DataError, match=r"files disagree on column 'ds': .*a.parquet .*UTC.*"
                                        r"b.parquet .*Europe/Berlin"):
        prepare(cfg_for(tmp_path / "tz"))
    write(tmp_path / "fq" / "a.parquet", ["a"] * 10, t, dtype=pa.timestamp("us"))
    write(tmp_path / "fq" / "b.parquet", ["b"] * 10,
          [dt.datetime(2024, 1, 1) + dt.timedelta(days=i) for i in range(10)],
          dtype=pa.timestamp("us"))
    with pytest.raises(DataError, match=r"different frequencies: .*a.parquet is 1h, "
                                        r".*b.parquet is 1d"):
        prepare(cfg_for(tmp_path / "fq"))


# ------------------------------------------------------------------ features and seasons

def test_calendar_features_by_frequency_match_python_dates():
    days = np.arange(days_from_civil(2023, 12, 20), days_from_civil(2024, 3, 10))
    ref = [dt.date(1970, 1, 1) + dt.timedelta(days=int(x)) for x in days]
    d = Freq("D", 1)
    dow, dom, month, week = d.calendar_values(torch.from_numpy(days),
                                              ["dayofweek", "dayofmonth", "month",
                                               "weekofyear"])
    assert dow.tolist() == [r.weekday() for r in ref]
    assert (dom + 1).tolist() == [r.day for r in ref] and (month + 1).tolist() == \
        [r.month for r in ref]
    assert (week + 1).tolist() == [r.isocalendar()[1] for r in ref]
    m = Freq("M", 3)
    (q,) = m.calendar_values(np.array([(2024 - 1970) * 12 + k for k in (0, 3, 6, 9)]),
                             ["quarter"])
    assert q.tolist() == [0, 1, 2, 3]
    h = Freq("ns", H)
    hour, _ = h.calendar_values(np.array([5 * H, 29 * H]), ["hour", "dayofweek"])
    assert hour.tolist() == [5, 5]


def test_default_seasons_and_features_by_frequency():
    assert {f: parse_freq(f).default_season(np.array([200])) for f in
            ("1h", "15min", "1d", "1bd", "1w", "1mo", "1q", "1y", "1")} == {
        "1h": 24, "15min": 96, "1d": 7, "1bd": 5, "1w": 52, "1mo": 12, "1q": 4, "1y": 1, "1": 1}
    assert parse_freq("1w").default_season(np.array([80])) == 1   # under two years of weeks
    assert Freq("M", 1).auto_features() == ["month"]
    assert Freq("M", 3).auto_features() == ["quarter"]
    assert Freq("D", 7, weekday=0).auto_features() == ["weekofyear"]
    assert Freq("ns", H).auto_features() == ["hour", "dayofweek"]
    assert Freq("M", 12).auto_features() == [] and Freq("int", 1).auto_features() == []
