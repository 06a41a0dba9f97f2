"""Statistical comparators: the same numbers as statsforecast's own StatsForecast, exact keys
and shapes, and the seasonal-naive fallback where a model cannot fit a series."""
from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
from statsforecast import StatsForecast
from statsforecast.models import AutoARIMA, AutoETS, AutoTheta, DynamicOptimizedTheta

from pipeline.evaluation import comparators
from pipeline.evaluation.comparators import COMPARATORS, Fallback, forecast

NAMES = ["auto_ets", "auto_theta", "auto_arima", "dynamic_theta"]
CLASSES = {"auto_ets": AutoETS, "auto_theta": AutoTheta, "auto_arima": AutoARIMA,
           "dynamic_theta": DynamicOptimizedTheta}
LEVELS = [80, 95]


def panel(lengths, season: int, seed: int) -> list[np.ndarray]:
    """Positive series with a trend, a season (when > 1) and noise."""
    rng = np.random.default_rng(seed)
    out = []
    for n in lengths:
        t = np.arange(n)
        wave = rng.uniform(2, 8) * np.sin(2 * np.pi * t / season) if season > 1 else 0.0
        out.append(50 + rng.normal(0, 0.3) * t + wave + rng.normal(0, 1.5, n).cumsum() * 0.3
                   + rng.normal(0, 1, n))
    return out


def statsforecast_columns(histories, h: int, season: int) -> dict[str, np.ndarray]:
    """StatsForecast's own forecast of the panel, as {our key: [N, h]}."""
    df = pd.DataFrame({"unique_id": np.repeat(np.arange(len(histories)),
                                              [len(y) for y in histories]),
                       "ds": np.concatenate([np.arange(len(y)) for y in histories]),
                       "y": np.concatenate(histories)})
    models = [CLASSES[n](season_length=season) for n in NAMES]
    fc = StatsForecast(models=models, freq=1).forecast(df=df, h=h, level=LEVELS)
    fc = fc.sort_values(["unique_id", "ds"])
    out = {}
    for name, kind in CLASSES.items():
        for suffix in ["", *(f"-{s}-{l}" for l in LEVELS for s in ("lo", "hi"))]:
            column = fc[kind.__name__ + suffix].to_numpy()
            out[name + suffix] = column.reshape(-1, h)                # [N·h] -> [N, h]
    return out


MONTHLY = panel([48, 55, 60, 66, 72, 80], season=12, seed=0)
YEARLY = panel([15, 20, 26, 31, 35, 40], season=1, seed=1)


@pytest.mark.slow
@pytest.mark.parametrize(("histories", "h", "season"), [(MONTHLY, 12, 12), (YEARLY, 6, 1)],
                         ids=["monthly", "yearly"])
def test_forecasts_equal_statsforecast_point_and_intervals(histories, h, season):
    got = forecast(histories, h, season, NAMES, LEVELS)
    assert got.fallbacks == []
    expected = statsforecast_columns(histories, h, season)
    assert list(got.columns) == list(expected)
    for key, values in expected.items():
        assert got.columns[key].shape == (len(histories), h) and got.columns[key].dtype == float
        np.testing.assert_allclose(got.columns[key], values, rtol=1e-6, atol=0, err_msg=key)


def test_keys_and_shapes_are_exact():
    got = forecast(YEARLY[:2], 3, 1, ["auto_theta", "auto_ets"], [95, 80])
    assert list(got.columns) == [
        "auto_theta", "auto_theta-lo-95", "auto_theta-hi-95", "auto_theta-lo-80",
        "auto_theta-hi-80", "auto_ets", "auto_ets-lo-95", "auto_ets-hi-95", "auto_ets-lo-80",
        "auto_ets-hi-80"]
    assert all(v.shape == (2, 3) and v.dtype == np.float64 for v in got.columns.values())
    points = forecast(YEARLY[:2], 3, 1, ["auto_theta"])
    assert list(points.columns) == ["auto_theta"]
    np.testing.assert_array_equal(points.columns["auto_theta"], got.columns["auto_theta"])


def test_a_three_point_series_falls_back_to_seasonal_naive_and_is_reported():
    short = np.array([4.0, 7.0, 5.0])
    histories = [YEARLY[0], short]
    before = [y.copy() for y in histories]
    got = forecast(histories, 4, 12, NAMES, LEVELS)
    # AutoETS and the Theta models refuse 3 points ("tiny datasets"); AutoARIMA fits a mean
    refused = ["auto_ets", "auto_theta", "dynamic_theta"]
    assert [(f.series, f.model) for f in got.fallbacks] == [(1, name) for name in refused]
    assert all(f.reason == "NotImplementedError: tiny datasets" for f in got.fallbacks)
    for name in refused:
        for key in [name, *(f"{name}-{s}-{l}" for l in LEVELS for s in ("lo", "hi"))]:
            np.testing.assert_array_equal(got.columns[key][1], [5.0] * 4)   # shorter than m
        np.testing.assert_array_equal(got.fell_back(name), [False, True])
    arima = AutoARIMA(season_length=12).forecast(y=short, h=4, level=LEVELS)
    np.testing.assert_allclose(got.columns["auto_arima"][1], arima["mean"], rtol=1e-12)
    np.testing.assert_array_equal(got.fell_back("auto_arima"), [False, False])
    assert all(np.array_equal(a, b) for a, b in zip(histories, before, strict=True))


def test_a_non_finite_forecast_falls_back_with_the_last_season(monkeypatch):
    class Broken:
        def forecast(self, y, h, level=None):
            out = {"mean": np.full(h, np.nan)}
            out |= {f"{s}-{l}": np.zeros(h) for l in level or () for s in ("lo", "hi")}
            return out

    monkeypatch.setitem(COMPARATORS, "broken", lambda season_length: Broken())
    y = np.arange(1.0, 11.0)
    got = comparators.forecast([y], 5, 4, ["broken"], [80])
    assert got.fallbacks == [Fallback(0, "broken", "not finite: mean")]
    for key in ("broken", "broken-lo-80", "broken-hi-80"):
        np.testing.assert_array_equal(got.columns[key], [[7, 8, 9, 10, 7]])


def test_season_one_and_repeated_calls_are_deterministic():
    a = forecast(YEARLY[:3], 5, 1, ["auto_ets", "auto_theta"], [80])
    b = forecast(YEARLY[:3], 5, 1, ["auto_ets", "auto_theta"], [80])
    assert a.fallbacks == b.fallbacks == []
    for key in a.columns:
        np.testing.assert_array_equal(a.columns[key], b.columns[key])
        assert np.isfinite(a.columns[key]).all()


def test_bad_arguments_name_the_setting():
    with pytest.raises(ValueError, match=r"unknown comparator\(s\) \['ets'\]; known"):
        forecast(YEARLY[:1], 3, 1, ["ets"])
    with pytest.raises(ValueError, match="levels must be whole percentages"):
        forecast(YEARLY[:1], 3, 1, ["auto_ets"], [0.8])
    with pytest.raises(ValueError, match=r"h and season must be >= 1; got h=0"):
        forecast(YEARLY[:1], 0, 1, ["auto_ets"])
    with pytest.raises(ValueError, match="history 1 must be a non-empty 1-D array of finite"):
        forecast([YEARLY[0], np.array([1.0, np.nan, 2.0])], 3, 1, ["auto_ets"])
    with pytest.raises(ValueError, match="history 0 must be"):
        forecast([np.array([])], 3, 1, ["auto_ets"])
