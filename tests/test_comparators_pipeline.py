"""The statistical comparators and conformal intervals wired into the pipeline (#15 items 4-5):
backtest rows equal to statsforecast's own forecasts (in this process and on Ray), the AutoETS
fallback of the final forecast, statistical champions registered as a spec and refitted, and
conformal intervals reaching their coverage through the pipeline's path."""
from __future__ import annotations

import numpy as np
import pytest
from statsforecast.models import AutoETS, AutoTheta

from pipeline import config as C
from pipeline.backtest import backtest, final_forecast
from pipeline.data.series import SeriesArrays
from pipeline.data.windows import cutoff_positions
from pipeline.jobs import Job

H, SEASON, CAP = 6, 12, 60
CLASSES = {"auto_ets": AutoETS, "auto_theta": AutoTheta}


def monthly_like(n_series: int = 5, seed: int = 0) -> SeriesArrays:
    """Series of different lengths with a level, a trend, a season of 12 and noise."""
    rng = np.random.default_rng(seed)
    out = []
    for i in range(n_series):
        t = np.arange(90 + 7 * i)
        out.append(50 + 0.2 * t + 6 * np.sin(2 * np.pi * t / SEASON) + rng.normal(0, 1, t.size))
    return SeriesArrays.from_list(out)


def small_cfg(*extra: str) -> C.Config:
    return C.load(None, ["windows.lookback=24", f"windows.horizon={H}", "windows.n_windows=2",
                         "data.calendar=[]", f"evaluate.season={SEASON}",
                         f"evaluate.comparator_history={CAP}", *extra])


def comparator_blocks(bt) -> dict:
    """{(model, k): block} of the comparators' backtest blocks."""
    return {(b.model, b.k): b for b in bt.blocks if b.model in CLASSES}


def test_backtest_comparators_equal_statsforecast_per_series():
    arrays, cfg = monthly_like(), small_cfg()
    bt = backtest(arrays, [Job("global", np.arange(len(arrays)))], {}, cfg)
    cuts = cutoff_positions(arrays.lengths, H, 2, H)
    blocks = comparator_blocks(bt)
    assert sorted(blocks) == [(m, k) for m in CLASSES for k in (0, 1)]
    for (name, k), block in blocks.items():
        for i, s in enumerate(block.series):
            hist = arrays.values[arrays.indptr[s]:arrays.indptr[s] + cuts[k][s]]
            want = CLASSES[name](season_length=SEASON).forecast(
                y=hist.astype(np.float64)[-CAP:], h=H)["mean"]
            np.testing.assert_array_equal(block.y_hat[i], want)
    summary = bt.summary()
    assert list(summary) == ["naive", "seasonal_naive", "auto_ets", "auto_theta"]
    assert bt.fallbacks == {"auto_ets": 0, "auto_theta": 0}
    assert bt.forecasts == {"auto_ets": 2 * len(arrays), "auto_theta": 2 * len(arrays)}
    # the written rows carry the same forecasts, as float32
    frames = [f for f in bt.frames if f["model"][0] == "auto_ets"]
    assert sum(len(f["y_hat"]) for f in frames) == 2 * len(arrays) * H


def test_comparators_off_and_capped_history():
    arrays = monthly_like(3)
    off = backtest(arrays, [Job("global", np.arange(3))], {},
                   small_cfg("evaluate.comparators=[]"))
    assert list(off.summary()) == ["naive", "seasonal_naive"]
    cfg = C.load(None, ["evaluate.comparator_history=auto"])
    assert cfg.evaluate.history_cap(24) == 240 and cfg.evaluate.history_cap(1) == 100
    assert C.load(None, ["evaluate.comparator_history=null"]).evaluate.history_cap(12) == 120


@pytest.mark.parametrize(("override", "message"), [
    ("evaluate.comparators=[ets]", "evaluate.comparators[] = 'ets'"),
    ("evaluate.comparators=[auto_ets, auto_ets]", "a name repeats"),
    ("evaluate.comparator_history=0", "evaluate.comparator_history = 0"),
    ("evaluate.comparator_history=all", "evaluate.comparator_history = 'all'"),
    ("evaluate.fallback=auto_arima", "evaluate.fallback = 'auto_arima'"),
    ("evaluate.intervals=split", "evaluate.intervals = 'split'"),
    ("evaluate.levels=[80, 100]", "evaluate.levels"),
    ("evaluate.intervals=conformal", "needs windows.n_windows >= 2"),
    ("model.name=auto_ets", "model.name = 'auto_ets'"),
])
def test_bad_settings_are_one_line_errors_naming_the_key(override, message):
    with pytest.raises(C.ConfigError, match=message.replace("[", r"\[").replace("]", r"\]")):
        C.load(None, [override])


def test_backtest_on_ray_equals_the_local_one(ray_session):
    from pipeline.execution import RayRunner
    arrays, cfg = monthly_like(), small_cfg()
    jobs = [Job("global", np.arange(len(arrays)))]
    local = comparator_blocks(backtest(arrays, jobs, {}, cfg))
    with RayRunner(cfg.ray) as runner:
        remote = comparator_blocks(backtest(arrays, jobs, {}, cfg, runner=runner))
    assert local.keys() == remote.keys()
    for key in local:
        np.testing.assert_array_equal(local[key].series, remote[key].series)
        np.testing.assert_array_equal(local[key].y_hat, remote[key].y_hat)


def test_auto_ets_fallback_forecasts_the_series_the_model_cannot():
    arrays = monthly_like(3)
    cfg = small_cfg("evaluate.fallback=auto_ets")
    cols = final_forecast(arrays, [], {}, cfg)
    assert set(cols["model"]) == {"fallback:auto_ets"}
    for s in range(3):
        hist = arrays.values[arrays.indptr[s]:arrays.indptr[s + 1]].astype(np.float64)
        want = AutoETS(season_length=SEASON).forecast(y=hist[-CAP:], h=H)["mean"]
        np.testing.assert_array_equal(cols["y_hat"][s * H:(s + 1) * H],
                                      want.astype(np.float32))
    default = final_forecast(arrays, [], {}, small_cfg())
    assert set(default["model"]) == {"fallback:seasonal_naive"}
    np.testing.assert_array_equal(default["y_hat"][:H], arrays.values[90 - SEASON:90 - SEASON + H])
