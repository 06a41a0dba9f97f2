"""The statistical comparators and conformal intervals wired into the pipeline (#15 items 4-5):
backtest rows equal to statsforecast's own forecasts (in this process and on Ray), the AutoETS
fallback of the final forecast, the combination, and conformal intervals reaching their coverage
through the pipeline's path (statistical champions end to end: test_statistical_champions.py)."""
from __future__ import annotations

import numpy as np
import pytest
from statsforecast.models import AutoETS, AutoTheta

from pipeline import config as C
from pipeline.data.series import SeriesArrays
from pipeline.data.windows import cutoff_positions
from pipeline.forecasting.backtest import backtest
from pipeline.forecasting.final import final_forecast
from pipeline.training.plan import Job

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
    ("evaluate.combine=[auto_arima]", "evaluate.combine names 'auto_arima', which is not in"),
])
def test_bad_settings_are_one_line_errors_naming_the_key(override, message):
    with pytest.raises(C.ConfigError, match=message.replace("[", r"\[").replace("]", r"\]")):
        C.load(None, [override])


def test_backtest_on_ray_equals_the_local_one(ray_session):
    from pipeline.execution.ray_train import RayRunner
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


def test_combination_is_the_mean_of_the_network_and_the_comparators():
    """evaluate.combine: scored in the backtest as `combination` (the mean of the network's
    and AutoTheta's forecasts at every cutoff), and the final forecast where the network
    forecasts (AutoTheta refitted on the whole history)."""
    import dataclasses

    from pipeline.training.jobs import run_jobs_locally
    from pipeline.training.plan import plan_jobs
    arrays = monthly_like(4)
    cfg = small_cfg("evaluate.comparators=[auto_theta]", "evaluate.combine=[auto_theta]",
                    "train.epochs=1", "train.steps_per_epoch=2",
                    "model.encoder.hidden_size=4", "model.decoder.hidden_size=4")
    jobs = plan_jobs(arrays, cfg)
    models = {r.name: r.model() for r in run_jobs_locally(arrays, jobs, cfg)}
    bt = backtest(arrays, jobs, models, cfg)
    by = {(b.model, b.k): b for b in bt.blocks}
    for k in (0, 1):
        net, theta, comb = (by[(m, k)] for m in (cfg.model.name, "auto_theta", "combination"))
        np.testing.assert_array_equal(comb.series, net.series)
        rows = np.searchsorted(theta.series, net.series)
        np.testing.assert_allclose(comb.y_hat, (net.y_hat + theta.y_hat[rows]) / 2, rtol=1e-6)
        np.testing.assert_array_equal(comb.y, net.y)
    assert {"combination", cfg.model.name, "auto_theta"} <= set(bt.summary())
    with pytest.raises(C.ConfigError, match="evaluate.combine averages point forecasts"):
        small_cfg("evaluate.combine=[auto_ets]", "model.loss=quantile",
                  "model.quantiles=[0.1, 0.5, 0.9]")
    plain = dataclasses.replace(cfg, evaluate=dataclasses.replace(cfg.evaluate, combine=[]))
    mine, theirs = final_forecast(arrays, jobs, models, plain), \
        final_forecast(arrays, jobs, models, cfg)
    assert set(theirs["model"]) == {"combination"} and set(mine["model"]) == {cfg.model.name}
    for s in range(len(arrays)):
        hist = arrays.values[arrays.indptr[s]:arrays.indptr[s + 1]].astype(np.float64)
        theta = AutoTheta(season_length=SEASON).forecast(y=hist[-CAP:], h=H)["mean"]
        rows = slice(s * H, (s + 1) * H)
        np.testing.assert_allclose(theirs["y_hat"][rows], (mine["y_hat"][rows] + theta) / 2,
                                   rtol=1e-5)


def test_combination_by_median_takes_the_middle_forecast_at_every_step():
    """evaluate.combine_by: median with two comparators: the combination is, step by step, the
    middle one of the network's, AutoETS's and AutoTheta's forecasts, in the backtest and in
    the final forecast; a bad value is refused naming the key."""
    from pipeline.forecasting.backtest import combined
    from pipeline.training.jobs import run_jobs_locally
    from pipeline.training.plan import plan_jobs
    np.testing.assert_array_equal(combined(np.array([[9.0, 1.0]]), [np.array([[1.0, 2.0]]),
                                  np.array([[2.0, 3.0]])], "median"), [[2.0, 2.0]])
    arrays = monthly_like(3)
    cfg = small_cfg("evaluate.comparators=[auto_ets, auto_theta]",
                    "evaluate.combine=[auto_ets, auto_theta]", "evaluate.combine_by=median",
                    "train.epochs=1", "train.steps_per_epoch=2",
                    "model.encoder.hidden_size=4", "model.decoder.hidden_size=4")
    jobs = plan_jobs(arrays, cfg)
    models = {r.name: r.model() for r in run_jobs_locally(arrays, jobs, cfg)}
    by = {(b.model, b.k): b for b in backtest(arrays, jobs, models, cfg).blocks}
    for k in (0, 1):
        net, comb = by[(cfg.model.name, k)], by[("combination", k)]
        stats = [by[(m, k)].y_hat[np.searchsorted(by[(m, k)].series, net.series)]
                 for m in ("auto_ets", "auto_theta")]
        np.testing.assert_allclose(comb.y_hat, np.median([net.y_hat, *stats], 0), rtol=1e-6)
    alone = []
    cols = final_forecast(arrays, jobs, models, cfg, alone=alone)
    net = {int(s): y for p in alone for s, y in zip(p.series, p.y_hat, strict=True)}
    assert list(cols["unique_id"][::H]) == list(arrays.ids) and len(net) == len(arrays)
    for s in range(len(arrays)):
        hist = arrays.values[arrays.indptr[s]:arrays.indptr[s + 1]].astype(np.float64)[-CAP:]
        stats = [M(season_length=SEASON).forecast(y=hist, h=H)["mean"]
                 for M in (AutoETS, AutoTheta)]
        rows = slice(s * H, (s + 1) * H)
        np.testing.assert_allclose(cols["y_hat"][rows], np.median([net[s], *stats], 0),
                                   rtol=1e-5)
    with pytest.raises(C.ConfigError, match="evaluate.combine_by"):
        small_cfg("evaluate.combine_by=max")


# ------------------------------------------------------------------------ conformal intervals

def exchangeable(n_series: int = 400, n: int = 60, seed: int = 5) -> SeriesArrays:
    """A level per series plus i.i.d. noise: the naive forecasts' errors are exchangeable
    across series and cutoffs."""
    rng = np.random.default_rng(seed)
    return SeriesArrays.from_list([rng.uniform(10, 50) + rng.normal(0, 2, n)
                                   for _ in range(n_series)])


def test_conformal_intervals_reach_their_coverage_on_the_latest_window():
    from pipeline.forecasting.intervals import calibrate
    arrays = exchangeable()
    cfg = C.load(None, ["windows.lookback=12", f"windows.horizon={H}", "windows.n_windows=3",
                        "data.calendar=[]", "evaluate.season=1", "evaluate.comparators=[]",
                        "evaluate.intervals=conformal", "evaluate.levels=[50, 80, 95]"])
    bt = backtest(arrays, [Job("global", np.arange(len(arrays)))], {}, cfg)
    cal = calibrate(bt, None, cfg.evaluate.levels)
    assert set(cal.coverage) == {"naive", "seasonal_naive"}
    for level in (50, 80, 95):
        got = cal.coverage["naive"][f"coverage_{level}"]
        assert abs(got - level / 100) < 0.03, (level, got)


def test_conformal_widths_go_around_the_final_forecast_by_the_model_fallen_back_to():
    from pipeline.forecasting.intervals import calibrate, with_intervals
    arrays = exchangeable(60)
    cfg = C.load(None, ["windows.lookback=12", f"windows.horizon={H}", "windows.n_windows=2",
                        "data.calendar=[]", "evaluate.season=1", "evaluate.comparators=[]",
                        "evaluate.intervals=conformal"])
    bt = backtest(arrays, [Job("global", np.arange(len(arrays)))], {}, cfg)
    cal = calibrate(bt, None, cfg.evaluate.levels)
    cols = with_intervals(final_forecast(arrays, [], {}, cfg), cal, H)
    width = cal.fitted["seasonal_naive"].width                     # [levels, H]
    y_hat = cols["y_hat"].reshape(-1, H)
    np.testing.assert_allclose(cols["q_0.1"].reshape(-1, H), y_hat - width[0], rtol=1e-6)
    np.testing.assert_allclose(cols["q_0.975"].reshape(-1, H), y_hat + width[1], rtol=1e-6)


def test_chunks_keep_the_order_and_number_the_fallbacks_over_every_history(monkeypatch,
                                                                           capsys):
    import pipeline.forecasting.backtest as B
    from pipeline.evaluation.comparators import forecast
    from pipeline.outputs import console as report
    histories = [h.astype(np.float64) for h in
                 (monthly_like(5).series(s) for s in range(5))]
    histories[3] = np.array([1.0, 2.0, 4.0])          # too short for AutoETS: seasonal naive
    whole = forecast([h[-CAP:] for h in histories], H, SEASON, ["auto_ets"])
    monkeypatch.setattr(B, "CHUNK", 2)
    chunked = B.comparator_forecasts(histories, H, SEASON, ["auto_ets"], CAP)
    np.testing.assert_array_equal(chunked.columns["auto_ets"], whole.columns["auto_ets"])
    assert [f.series for f in chunked.fallbacks] == [f.series for f in whole.fallbacks] == [3]
    report.comparator_fallbacks({"auto_ets": 1, "auto_theta": 0},
                                {"auto_ets": 5, "auto_theta": 5})
    assert capsys.readouterr().err == ("warning: comparator forecasts replaced by seasonal "
                                       "naive (the model could not fit the series): "
                                       "auto_ets 1 of 5\n")
