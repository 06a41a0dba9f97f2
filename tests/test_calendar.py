import numpy as np
import polars as pl
import pytest

from pipeline.data.calendar import calendar_values, cyclic_encode, format_freq, parse_freq


def test_calendar_fields_match_polars():
    rng = np.random.default_rng(0)
    t = rng.integers(-2 * 10**18, 4 * 10**18, 5000)  # 1906 … 2096
    s = pl.Series(t).cast(pl.Datetime("ns"))
    hour, dow, dom, month = calendar_values(t, ["hour", "dayofweek", "dayofmonth", "month"])
    np.testing.assert_array_equal(hour, s.dt.hour().to_numpy())
    np.testing.assert_array_equal(dow, s.dt.weekday().to_numpy() - 1)  # polars: Monday = 1
    np.testing.assert_array_equal(dom, s.dt.day().to_numpy() - 1)
    np.testing.assert_array_equal(month, s.dt.month().to_numpy() - 1)


def test_cyclic_encoding_shape_and_range():
    t = np.arange(48, dtype=np.int64).reshape(2, 24) * 3_600_000_000_000
    enc = cyclic_encode(t, ["hour", "month"])
    assert enc.shape == (2, 24, 4)
    np.testing.assert_allclose(enc[0, :, 0] ** 2 + enc[0, :, 1] ** 2, 1, rtol=1e-6)
    np.testing.assert_allclose(enc[0], enc[1], atol=1e-5)  # same hours a day apart


@pytest.mark.parametrize("text, ns", [("1h", 3600 * 10**9), ("H", 3600 * 10**9),
                                      ("15min", 900 * 10**9), ("15m", 900 * 10**9),
                                      ("1d", 86400 * 10**9), ("2w", 14 * 86400 * 10**9)])
def test_parse_freq(text, ns):
    assert parse_freq(text) == ns
    assert parse_freq(format_freq(ns)) == ns


@pytest.mark.parametrize("text", ["1mo", "1y", "abc", "0h"])
def test_parse_freq_refuses_calendar_units(text):
    with pytest.raises(ValueError, match="frequency"):
        parse_freq(text)
