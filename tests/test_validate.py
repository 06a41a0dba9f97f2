"""Every bad input of the data contract gives a clear error or a report entry."""
from datetime import datetime

import numpy as np
import polars as pl
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from conftest import hourly, write_long

from pipeline import config as C
from pipeline.data.calendar import Freq
from pipeline.data.prepare import prepare
from pipeline.data.series import STATUS_CODE
from pipeline.errors import DataError


def cfg_for(path, *overrides):
    return C.load(None, [f"data.path={path}", "data.freq=1h", "windows.lookback=4",
                         "windows.horizon=2", *overrides])


def two_series(tmp_path, y0=None, **cols):
    n = 12
    ids = ["a"] * n + ["b"] * n
    ds = np.r_[hourly(n), hourly(n)]
    y = np.r_[np.arange(n) if y0 is None else y0, 100 + np.arange(n)]
    return write_long(tmp_path / "in" / "x.parquet", ids, ds, y, **cols)


def test_clean_input_builds_exact_arrays(tmp_path):
    path = two_series(tmp_path)
    prep = prepare(cfg_for(path))
    a = prep.arrays
    assert a.ids.tolist() == ["a", "b"] and a.indptr.tolist() == [0, 12, 24]
    np.testing.assert_array_equal(a.values, np.r_[np.arange(12), 100 + np.arange(12)])
    assert a.mask.all() and a.status.tolist() == [0, 0] and len(prep.report) == 0
    assert a.start.tolist() == [hourly(1)[0].astype(np.int64)] * 2


@pytest.mark.parametrize("col", ["unique_id", "ds", "y"])
def test_missing_column_is_named(tmp_path, col):
    path = two_series(tmp_path)
    renamed = pq.read_table(path).rename_columns(
        [c + "_x" if c == col else c for c in ["unique_id", "ds", "y"]])
    pq.write_table(renamed, path)
    with pytest.raises(DataError, match=f"column '{col}' is missing from .*x.parquet"):
        prepare(cfg_for(path))


def test_missing_column_suggests_the_nearest(tmp_path):
    path = two_series(tmp_path, price=np.ones(24))
    with pytest.raises(DataError, match="column 'prices' is missing.*did you mean 'price'"):
        prepare(cfg_for(path, "data.past_covariates=[prices]"))


@pytest.mark.parametrize("col, value, expected", [
    ("ds", ["2024-01-01"] * 24, "column 'ds' .* has type String; expected a timestamp"),
    ("y", ["1.0"] * 24, "column 'y' .* has type String; expected a numeric target"),
])
def test_mistyped_column_is_named(tmp_path, col, value, expected):
    path = two_series(tmp_path)
    t = pq.read_table(path)
    t = t.set_column(t.schema.get_field_index(col), col, pa.array(value))
    pq.write_table(t, path)
    with pytest.raises(DataError, match=expected):
        prepare(cfg_for(path))


def test_duplicate_rows_name_series_time_and_rows(tmp_path):
    ds = hourly(6)
    path = write_long(tmp_path / "d.parquet", ["a"] * 7, np.r_[ds, ds[2:3]], np.arange(7))
    with pytest.raises(DataError, match=r"series 'a' at 2024-01-01 02:00:00 \(rows \[2, 6\]\)"):
        prepare(cfg_for(path))


def test_unsorted_input_is_sorted_and_reported(tmp_path):
    order = np.random.default_rng(0).permutation(12)
    path = write_long(tmp_path / "u.parquet", ["a"] * 12, hourly(12)[order], np.arange(12)[order])
    prep = prepare(cfg_for(path))
    np.testing.assert_array_equal(prep.arrays.values, np.arange(12))
    assert prep.report.filter(pl.col("issue") == "unsorted")["action"].to_list() == ["sorted"]


def test_input_in_order_skips_the_sort_and_builds_the_arrays_of_shuffled_input(tmp_path):
    """Rows already by (id, time) are not sorted again (one pass checks it); the same rows
    interleaved across series, or one series' rows swapped, give the same arrays."""
    ids, ds = np.repeat(["a", "b", "c"], 12), np.tile(hourly(12), 3)
    y, cat = np.arange(36.0), np.repeat(["x", "y", "z"], 12)
    preps = {}
    for name, order in {"sorted": np.arange(36),
                        "interleaved": np.random.default_rng(1).permutation(36),
                        "one swap": np.r_[0, 2, 1, 3:36]}.items():
        path = write_long(tmp_path / name / "x.parquet", ids[order], ds[order], y[order],
                          cat=cat[order])
        preps[name] = prepare(cfg_for(path, "data.static_cols=[cat]"))
    assert len(preps["sorted"].report) == 0
    for name in ("interleaved", "one swap"):
        a, b = preps[name].arrays, preps["sorted"].arrays
        assert a.ids.tolist() == b.ids.tolist() == ["a", "b", "c"]
        np.testing.assert_array_equal(a.values, b.values)
        np.testing.assert_array_equal(a.static["cat"], b.static["cat"])
        assert set(preps[name].report["issue"]) == {"unsorted"}
    assert preps["one swap"].report["series"].to_list() == ["a"]


def test_gaps_are_filled_masked_and_reported(tmp_path):
    keep = [0, 1, 2, 5, 6, 7, 8, 9, 10, 11]
    path = write_long(tmp_path / "g.parquet", ["a"] * 10, hourly(12)[keep], np.arange(12)[keep])
    prep = prepare(cfg_for(path))
    a = prep.arrays
    assert a.values.tolist() == [0, 1, 2, 2, 2, 5, 6, 7, 8, 9, 10, 11]  # forward filled
    assert a.mask.tolist() == [1, 1, 1, 0, 0, 1, 1, 1, 1, 1, 1, 1]
    row = prep.report.row(0, named=True)
    assert (row["series"], row["issue"], row["action"]) == ("a", "gaps", "filled")


def test_off_grid_timestamp_is_an_error_naming_series_and_row(tmp_path):
    ds = hourly(6).copy()
    ds[3] += np.timedelta64(30, "m")
    path = write_long(tmp_path / "o.parquet", ["a"] * 6, ds, np.arange(6))
    with pytest.raises(DataError, match=r"series 'a' .* 03:30:00 \(row 3\) is off the 1h grid"):
        prepare(cfg_for(path))


def test_frequency_is_inferred(tmp_path):
    ds = np.datetime64("2024-01-01", "ns") + np.arange(12) * np.timedelta64(15, "m")
    path = write_long(tmp_path / "f.parquet", ["a"] * 12, ds, np.arange(12))
    cfg = C.load(None, [f"data.path={path}", "windows.lookback=4", "windows.horizon=2"])
    assert prepare(cfg).arrays.freq == Freq("ns", 15 * 60 * 10**9)


def nan_series(tmp_path):
    y0 = np.arange(12, dtype=float)
    y0[[0, 5]] = [np.nan, np.inf]
    return two_series(tmp_path, y0=y0)


def test_nan_policy_impute_fills_and_masks(tmp_path):
    prep = prepare(cfg_for(nan_series(tmp_path), "data.nan_policy=impute"))
    a = prep.arrays
    assert a.series(0).tolist() == [1, 1, 2, 3, 4, 4, 6, 7, 8, 9, 10, 11]
    assert a.mask[:12].tolist() == [0, 1, 1, 1, 1, 0, 1, 1, 1, 1, 1, 1]
    assert a.status.tolist() == [0, 0]
    assert prep.report.row(0, named=True)["detail"] == "2 NaN/inf target value(s)"


def test_nan_policy_drop_skips_the_series(tmp_path):
    prep = prepare(cfg_for(nan_series(tmp_path), "data.nan_policy=drop"))
    assert prep.arrays.status.tolist() == [STATUS_CODE["nan_target_dropped"], 0]
    assert prep.skipped() == {"nan_target_dropped": 1}
    assert prep.report.filter(pl.col("action") == "skipped")["series"].to_list() == ["a"]


def test_nan_policy_fail_names_series_and_row(tmp_path):
    with pytest.raises(DataError, match=r"series 'a' has a NaN/inf value at row 0 \(2 in this"):
        prepare(cfg_for(nan_series(tmp_path), "data.nan_policy=fail"))


def test_all_nan_series_is_skipped(tmp_path):
    prep = prepare(cfg_for(two_series(tmp_path, y0=np.full(12, np.nan))))
    assert prep.skipped() == {"no_finite_values": 1}
    assert prep.arrays.series(0).tolist() == [0.0] * 12


def test_short_series_are_skipped_and_counted(tmp_path):
    ids = ["long"] * 12 + ["short"] * 5
    path = write_long(tmp_path / "s.parquet", ids, np.r_[hourly(12), hourly(5)], np.arange(17))
    prep = prepare(cfg_for(path))
    assert prep.skipped() == {"too_short": 1}
    row = prep.report.row(0, named=True)
    assert row["series"] == "short" and row["detail"].startswith("5 steps < 6 needed")


def test_negative_values_skipped_when_forbidden(tmp_path):
    y0 = np.arange(12) - 3.0
    prep = prepare(cfg_for(two_series(tmp_path, y0=y0), "data.nonnegative=true"))
    assert prep.skipped() == {"negative_values": 1}


def test_empty_input_is_an_error(tmp_path):
    path = write_long(tmp_path / "e" / "e.parquet", [], [], [])
    with pytest.raises(DataError, match="empty"):
        prepare(cfg_for(path))
    (tmp_path / "none").mkdir()
    with pytest.raises(DataError, match="holds no Parquet files"):
        prepare(cfg_for(tmp_path / "none"))


def test_missing_path_and_corrupt_file_are_errors(tmp_path):
    with pytest.raises(DataError, match="does not exist"):
        prepare(cfg_for(tmp_path / "nowhere"))
    bad = tmp_path / "c" / "bad.parquet"
    bad.parent.mkdir()
    bad.write_bytes(b"PAR1 this is not parquet")
    with pytest.raises(DataError, match="bad.parquet"):
        prepare(cfg_for(bad.parent))


def test_static_column_must_be_constant_per_series(tmp_path):
    path = two_series(tmp_path, cat=["x"] * 11 + ["y"] + ["z"] * 12)
    with pytest.raises(DataError, match="column 'cat' .* constant per series, but series 'a'"):
        prepare(cfg_for(path, "data.static_cols=[cat]"))


def test_series_split_across_files_is_an_error(tmp_path):
    write_long(tmp_path / "in" / "1.parquet", ["a"] * 6, hourly(6), np.arange(6))
    write_long(tmp_path / "in" / "2.parquet", ["a"] * 6, hourly(6, "2024-01-02"), np.arange(6))
    with pytest.raises(DataError, match="series 'a' appears in more than one input file"):
        prepare(cfg_for(tmp_path / "in"))


def test_covariates_static_and_hive_group_are_aligned(tmp_path):
    n = 12
    for g in ("A", "B"):
        write_long(tmp_path / "h" / f"store={g}" / "p.parquet", [f"{g}1"] * n, hourly(n),
                   np.arange(n), promo=np.arange(n) % 2, temp=np.arange(n) * 0.5,
                   cat=[g.lower()] * n)
    prep = prepare(cfg_for(tmp_path / "h", "data.group_col=store", "data.static_cols=[cat]",
                           "data.past_covariates=[temp]", "data.future_covariates=[promo]"))
    a = prep.arrays
    assert a.groups.tolist() == ["A", "B"] and a.static["cat"].tolist() == ["a", "b"]
    assert a.past.shape == (24, 1) and a.future[:4, 0].tolist() == [0, 1, 0, 1]
    np.testing.assert_array_equal(a.past[:12, 0], np.arange(12) * 0.5)


def test_reserved_and_case_colliding_group_values_are_refused(tmp_path):
    path = two_series(tmp_path, store=["global"] * 12 + ["x"] * 12)
    with pytest.raises(DataError, match="group column 'store' has the value 'global', which "
                                        "the pipeline reserves"):
        prepare(cfg_for(path, "data.group_col=store"))
    path = two_series(tmp_path, store=["Store_A"] * 12 + ["store_a"] * 12)
    with pytest.raises(DataError, match="'Store_A' and 'store_a', whose model files"):
        prepare(cfg_for(path, "data.group_col=store"))


def out_of_range_series(tmp_path):
    y0 = np.arange(12, dtype=float)
    y0[[3, 7, 9]] = [1e39, -3.5e38, 3.4e38]  # 3.4e38 is within float32's range (max 3.4028e38)
    return two_series(tmp_path, y0=y0)


def test_out_of_range_target_is_imputed_masked_and_reported(tmp_path):
    prep = prepare(cfg_for(out_of_range_series(tmp_path), "data.nan_policy=impute"))
    a = prep.arrays
    assert np.isfinite(a.values).all()
    assert a.series(0)[[3, 7]].tolist() == [2, 6]  # forward filled
    assert a.mask[:12].tolist() == [1, 1, 1, 0, 1, 1, 1, 0, 1, 1, 1, 1]
    assert a.status.tolist() == [0, 0]
    [row] = prep.report.rows(named=True)
    assert (row["series"], row["issue"], row["action"]) == ("a", "out_of_range_target", "imputed")
    assert row["file"].endswith("x.parquet")
    assert row["detail"] == ("2 target value(s) beyond the range of float32 (about ±3.4e38), "
                             "which would be inf: 1e+39 at row 3 (2024-01-01 03:00:00), "
                             "-3.5e+38 at row 7 (2024-01-01 07:00:00)")


def test_out_of_range_target_drop_skips_the_series(tmp_path):
    prep = prepare(cfg_for(out_of_range_series(tmp_path), "data.nan_policy=drop"))
    assert prep.arrays.status.tolist() == [STATUS_CODE["nan_target_dropped"], 0]
    [row] = prep.report.rows(named=True)
    assert (row["series"], row["issue"], row["action"]) == ("a", "out_of_range_target", "skipped")
    assert "1e+39 at row 3 (2024-01-01 03:00:00)" in row["detail"]


def test_out_of_range_target_fail_names_series_and_row(tmp_path):
    with pytest.raises(DataError, match=r"column 'y' in .*x\.parquet: series 'a' has a value "
                                        r"beyond the range of float32 .*: 1e\+39 at row 3 "
                                        r"\(2024-01-01 03:00:00\); 2 such value"):
        prepare(cfg_for(out_of_range_series(tmp_path), "data.nan_policy=fail"))


def test_out_of_range_covariate_is_an_error_naming_column_series_and_row(tmp_path):
    price = np.ones(24)
    price[14] = 1e39
    path = two_series(tmp_path, price=price)
    with pytest.raises(DataError, match=r"column 'price' in .*x\.parquet: series 'b' has the "
                                        r"value 1e\+39 at row 14 \(2024-01-01 02:00:00\), beyond "
                                        r"the range of float32"):
        prepare(cfg_for(path, "data.past_covariates=[price]"))


def write_table(path, ids, ds, ds_type, y) -> str:
    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.table({"unique_id": pa.array(ids), "ds": pa.array(ds, ds_type),
                             "y": pa.array(y, pa.float64())}), path)
    return str(path)


@pytest.mark.parametrize("ds_type", [pa.timestamp("us"), pa.timestamp("ms"),
                                     pa.timestamp("us", tz="UTC"), pa.date32()])
def test_timestamps_beyond_int64_nanoseconds_are_named(tmp_path, ds_type):
    ds = [datetime(2024, 1, d) for d in (1, 2, 3, 1)] + [datetime(2300, 1, 1),
                                                         datetime(1600, 1, 1)]
    if ds_type == pa.date32():
        ds = [d.date() for d in ds]
    path = write_table(tmp_path / "t.parquet", ["a"] * 3 + ["b"] * 3, ds, ds_type, np.arange(6.0))
    with pytest.raises(DataError, match=r"column 'ds' in .*t\.parquet has 2 timestamp\(s\) "
                                        r"outside the range .*1677-09-21.*2262-04-11.*: "
                                        r"2300-01-01[^,]* \(row 4, series 'b'\), "
                                        r"1600-01-01[^,]* \(row 5, series 'b'\)"):
        prepare(cfg_for(path, "data.freq=1d"))


def test_null_ids_are_an_error_naming_file_column_and_rows(tmp_path):
    ids = ["a"] * 12 + ["b", None, "b", None] + ["b"] * 8
    path = write_long(tmp_path / "n.parquet", ids, np.r_[hourly(12), hourly(12)], np.arange(24))
    with pytest.raises(DataError, match=r"column 'unique_id' in .*n\.parquet has 2 null "
                                        r"value\(s\), first at rows \[13, 15\]"):
        prepare(cfg_for(path))


def test_null_timestamps_are_an_error_naming_file_column_rows_and_series(tmp_path):
    ds = hourly(12).astype("datetime64[us]").tolist() * 2
    ds[2] = ds[20] = None
    path = write_table(tmp_path / "n.parquet", ["a"] * 12 + ["b"] * 12, ds,
                       pa.timestamp("ns"), np.arange(24.0))
    with pytest.raises(DataError, match=r"column 'ds' in .*n\.parquet has 2 null value\(s\), "
                                        r"first at rows \[2, 20\] \(series 'a', 'b'\)"):
        prepare(cfg_for(path))
