"""Evaluation metrics and baselines: hand-computed cases, properties, and the M4 Hourly table."""
from __future__ import annotations

import csv
import math
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays

from pipeline.evaluation import metrics as ev

M4_DIR = Path(__file__).parents[2] / "shared" / "data" / "m4"
NAN = math.nan


def close(a, b):
    np.testing.assert_allclose(np.asarray(a, float), np.asarray(b, float), rtol=1e-12,
                               atol=1e-12, equal_nan=True)


# ----------------------------------------------------------------------------- point metrics

Y = np.array([[1.0, 2.0, 3.0], [10.0, 10.0, 10.0]])
YHAT = np.array([[2.0, 2.0, 1.0], [10.0, 13.0, 6.0]])   # errors [1, 0, 2] and [0, 3, 4]


def test_mae_and_rmse_on_a_hand_case():
    close(ev.mae(Y, YHAT), [1.0, 7 / 3])
    close(ev.rmse(Y, YHAT), [math.sqrt(5 / 3), math.sqrt(25 / 3)])


def test_smape_on_a_hand_case_uses_the_0_to_200_scale():
    # series 0: 200·1/3, 0, 200·2/4; series 1: 0, 200·3/23, 200·4/16
    close(ev.smape(Y, YHAT), [(200 / 3 + 100) / 3, (600 / 23 + 50) / 3])


def test_smape_counts_a_zero_over_zero_term_as_zero():
    y, yhat = np.array([[0.0, 0.0, 2.0]]), np.array([[0.0, 1.0, 2.0]])
    close(ev.smape(y, yhat), [200 / 3])


def test_mask_ignores_entries_even_when_they_are_nan():
    y = np.array([[1.0, NAN, 3.0]])
    yhat = np.array([[2.0, 5.0, 1.0]])
    mask = np.array([[1, 0, 1]])
    close(ev.mae(y, yhat, mask), [1.5])
    close(ev.rmse(y, yhat, mask), [math.sqrt(2.5)])
    close(ev.smape(y, yhat, mask), [(200 / 3 + 100) / 2])
    close(ev.wape(y, yhat, mask), [3 / 4])
    close(ev.mase(y, yhat, [0.5], mask), [3.0])


def test_a_fully_masked_series_gets_nan():
    mask = np.array([[1, 1, 1], [0, 0, 0]])
    for f in (ev.mae, ev.rmse, ev.smape):
        close(f(Y, YHAT, mask)[1], NAN)
    close(ev.pinball(Y, YHAT[..., None], [0.5], mask)[1], NAN)


def test_mase_divides_mae_by_the_scale_and_keeps_nan_scales():
    close(ev.mase(Y, YHAT, [0.5, NAN]), [2.0, NAN])


def test_mase_scale_uses_the_seasonal_lag():
    # lag 2 differences of [1, 2, 4, 7, 11]: 3, 5, 7
    close(ev.mase_scale([np.array([1.0, 2, 4, 7, 11])], 2), [5.0])


def test_mase_scale_falls_back_to_lag_one_for_short_histories():
    # length 3 < m + 1 = 5: lag-1 differences 1, 2
    close(ev.mase_scale([np.array([1.0, 2, 4])], 4), [1.5])


def test_mase_scale_is_nan_for_a_zero_scale_or_a_single_value():
    periodic = np.array([1.0, 5, 1, 5, 1, 5])              # lag-2 differences all zero
    close(ev.mase_scale([periodic, np.array([3.0]), np.array([])], 2), [NAN, NAN, NAN])
    close(ev.mase(np.ones((1, 2)), np.zeros((1, 2)), ev.mase_scale([periodic], 2)), [NAN])


def test_wape_per_series_and_overall_differ():
    close(ev.wape(Y, YHAT), [3 / 6, 7 / 30])
    assert ev.wape_overall(Y, YHAT) == pytest.approx(10 / 36)


def test_wape_with_zero_actuals_is_zero_when_perfect_and_nan_otherwise():
    y = np.zeros((2, 2))
    close(ev.wape(y, np.array([[0.0, 0.0], [1.0, 0.0]])), [0.0, NAN])
    assert math.isnan(ev.wape_overall(y, np.ones((2, 2))))


# -------------------------------------------------------------------------- quantile metrics

def test_pinball_on_a_hand_case():
    y = np.array([[10.0, 20.0]])
    q_pred = np.array([[[8.0, 12.0], [20.0, 25.0]]])       # [1, 2, 2] for quantiles 0.1, 0.9
    # step 0: e = 2 -> 0.1·2 = 0.2; e = -2 -> 0.1·2 = 0.2. step 1: 0; e = -5 -> 0.1·5 = 0.5
    close(ev.pinball(y, q_pred, [0.1, 0.9]), [(0.2 + 0.2 + 0.0 + 0.5) / 4])


def test_pinball_at_the_median_is_half_the_mae():
    close(ev.pinball(Y, YHAT[..., None], [0.5]), ev.mae(Y, YHAT) / 2)


def test_coverage_counts_the_bounds_as_inside_and_honours_the_mask():
    y = np.array([[1.0, 2.0, 3.0, 4.0]])
    lo, hi = np.full((1, 4), 2.0), np.full((1, 4), 3.0)
    close(ev.coverage(y, lo, hi), [0.5])
    close(ev.coverage(y, lo, hi, np.array([[0, 1, 1, 1]])), [2 / 3])


# ---------------------------------------------------------------------- tables and summaries

def test_metrics_table_names_every_metric_and_infers_symmetric_intervals():
    q_pred = np.stack([YHAT - 1, YHAT, YHAT + 1, YHAT + 100], axis=-1)   # [N, H, 4]
    table = ev.metrics_table(Y, YHAT, [0.5, 1.0], quantiles=[0.1, 0.5, 0.9, 0.95],
                             q_pred=q_pred)
    assert set(table) == {"mae", "rmse", "smape", "mase", "wape", ev.WAPE_NUM, ev.WAPE_DEN,
                          "pinball", "coverage_80"}
    close(table["mase"], [2.0, 7 / 3])
    close(table[ev.WAPE_NUM], [3.0, 7.0])
    close(table["coverage_80"], [2 / 3, 1 / 3])               # inside where |e| <= 1


def test_metrics_table_takes_explicit_intervals():
    q_pred = np.stack([YHAT - 3, YHAT - 1, YHAT + 1, YHAT + 3], axis=-1)
    table = ev.metrics_table(Y, YHAT, [1.0, 1.0], quantiles=[0.05, 0.25, 0.75, 0.95],
                             q_pred=q_pred, intervals=[(0.05, 0.95), (0.25, 0.75)])
    close(table["coverage_90"], [1.0, 2 / 3])
    close(table["coverage_50"], [2 / 3, 1 / 3])


@pytest.mark.parametrize("intervals", [[(0.1, 0.8)], [(0.2, 0.8)]])
def test_metrics_table_rejects_asymmetric_or_unknown_intervals(intervals):
    with pytest.raises(ValueError, match="interval"):
        ev.metrics_table(Y, YHAT, [1.0, 1.0], quantiles=[0.1, 0.9],
                         q_pred=np.stack([YHAT, YHAT], -1), intervals=intervals)


def test_summarize_means_ignore_nan_and_wape_is_the_overall_ratio():
    table = ev.metrics_table(Y, YHAT, [0.5, NAN])
    summary = ev.summarize(table)
    assert set(summary) == {"mae", "rmse", "smape", "mase", "wape"}
    assert summary["mase"] == pytest.approx(2.0)
    assert summary["mae"] == pytest.approx((1 + 7 / 3) / 2)
    assert summary["wape"] == pytest.approx(ev.wape_overall(Y, YHAT))


def test_summarize_of_concatenated_tables_equals_one_big_table():
    halves = [ev.metrics_table(Y[i:i + 1], YHAT[i:i + 1], [1.0]) for i in range(2)]
    joined = {k: np.concatenate([t[k] for t in halves]) for k in halves[0]}
    assert ev.summarize(joined) == pytest.approx(ev.summarize(ev.metrics_table(Y, YHAT, [1, 1])))


def test_owa_and_skill_on_hand_cases():
    assert ev.owa(10.0, 1.0, 20.0, 2.0) == pytest.approx(0.5)
    assert ev.owa(18.383, 2.395, 18.383, 2.395) == pytest.approx(1.0)
    assert ev.skill(0.8, 1.0) == pytest.approx(0.2)
    close(ev.skill(np.array([1.0, 3.0, 1.0]), np.array([2.0, 2.0, 0.0])), [0.5, -0.5, NAN])


# ----------------------------------------------------------------------------- baselines

def test_naive_repeats_the_last_value_and_gives_nan_for_an_empty_history():
    close(ev.naive([np.array([1.0, 2, 3]), np.array([7.0]), np.array([])], 2, 24),
          [[3, 3], [7, 7], [NAN, NAN]])


def test_seasonal_naive_repeats_the_last_season_and_falls_back_to_naive():
    hist = [np.array([9.0, 1, 2, 3]), np.array([5.0, 6])]
    close(ev.seasonal_naive(hist, 7, 3), [[1, 2, 3, 1, 2, 3, 1], [6] * 7])


def _alternating(n, low=1.0, high=3.0):
    return np.where(np.arange(n) % 2 == 0, low, high)


def test_seasonality_test_on_hand_cases():
    # alternating 1, 3 with n = 12, m = 2: r1 = -11/12, r2 = 10/12;
    # limit = 1.645·sqrt((1 + 2·(11/12)²)/12) = 0.777 < 0.833
    assert ev.seasonality_test(_alternating(12), 2)
    # n = 6: r2 = 4/6 = 0.667 < 1.645·sqrt((1 + 2·(5/6)²)/6) = 1.038
    assert not ev.seasonality_test(_alternating(6), 2)
    assert not ev.seasonality_test(np.full(30, 4.0), 2)       # constant: no autocorrelation
    assert not ev.seasonality_test(_alternating(40), 1)
    assert not ev.seasonality_test(_alternating(40)[:5], 2)   # n < 3m


def test_naive2_reseasonalises_a_hand_built_series():
    # 2×2 moving average of alternating 1, 3 is 2: indices [0.5, 1.5]; adjusted last value
    # 3 / 1.5 = 2; forecast phases 0, 1, 0 -> 1, 3, 1
    close(ev.naive2([_alternating(12)], 3, 2), [[1, 3, 1]])


def test_naive2_is_naive_without_seasonality_or_positive_data():
    short = _alternating(5)                                   # n < 3m
    shifted = _alternating(12) - 2.0                          # seasonal but not positive
    noise = np.random.default_rng(0).uniform(1, 2, 200)
    for x in (short, shifted, noise):
        close(ev.naive2([x], 4, 2), [np.full(4, x[-1])])


def _naive2_by_loops(x, h, m):
    """Naive2 written out step by step after R's decompose (independent of the module's
    vectorized version; seasonality assumed to pass)."""
    n, half = len(x), m // 2
    w = [0.5 / m] + [1 / m] * (m - 1) + [0.5 / m] if m % 2 == 0 else [1 / m] * m
    sums, counts = [0.0] * m, [0] * m
    for t in range(half, n - half):
        trend = sum(w[j] * x[t - half + j] for j in range(len(w)))
        sums[t % m] += x[t] / trend
        counts[t % m] += 1
    figure = [s / c for s, c in zip(sums, counts, strict=True)]
    figure = [f / (sum(figure) / m) for f in figure]
    level = x[-1] / figure[(n - 1) % m]
    return [level * figure[(n + j) % m] for j in range(h)]


@pytest.mark.parametrize("m", [4, 3])
def test_naive2_matches_a_loop_implementation_of_the_decomposition(m):
    t = np.arange(11 * m + 1)
    x = (10 + 0.1 * t) * (1 + 0.3 * np.sin(2 * np.pi * t / m + 0.4)) + 0.05 * np.cos(t)
    assert ev.seasonality_test(x, m)
    close(ev.naive2([x], 2 * m + 1, m)[0], _naive2_by_loops(list(x), 2 * m + 1, m))


# ----------------------------------------------------------------------------- properties

_values = st.floats(-1e3, 1e3, allow_nan=False, width=64)
_batch = st.integers(1, 4).flatmap(lambda n: st.integers(1, 6).map(lambda h: (n, h)))


@st.composite
def _forecast_pair(draw):
    shape = draw(_batch)
    y = draw(arrays(float, shape, elements=_values))
    yhat = draw(arrays(float, shape, elements=_values))
    mask = draw(arrays(bool, shape))
    return y, yhat, mask


@settings(max_examples=60, deadline=None)
@given(_forecast_pair())
def test_perfect_forecasts_score_zero(pair):
    y, _, mask = pair
    mask[:, 0] = True                                         # at least one observed entry
    table = ev.metrics_table(y, y, np.ones(len(y)), mask, [0.1, 0.9],
                             np.stack([y, y], -1))
    for name in ("mae", "rmse", "smape", "mase", "wape", "pinball"):
        close(table[name], np.zeros(len(y)))
    close(table["coverage_80"], np.ones(len(y)))


@settings(max_examples=80, deadline=None)
@given(_forecast_pair())
def test_smape_is_bounded_and_mae_never_exceeds_rmse(pair):
    y, yhat, mask = pair
    s = ev.smape(y, yhat, mask)
    a, r = ev.mae(y, yhat, mask), ev.rmse(y, yhat, mask)
    seen = mask.any(axis=1)
    assert np.isnan(s[~seen]).all()
    assert ((s[seen] >= 0) & (s[seen] <= 200 + 1e-9)).all()
    assert (a[seen] <= r[seen] * (1 + 1e-12) + 1e-12).all()


@settings(max_examples=60, deadline=None)
@given(_forecast_pair())
def test_a_mask_equals_dropping_the_masked_entries(pair):
    y, yhat, mask = pair
    for i in np.flatnonzero(mask.any(axis=1)):
        keep = mask[i]
        for f in (ev.mae, ev.rmse, ev.smape, ev.wape):
            close(f(y[i:i + 1], yhat[i:i + 1], mask[i:i + 1]),
                  f(y[i:i + 1, keep], yhat[i:i + 1, keep]))


@settings(max_examples=40, deadline=None)
@given(st.integers(1, 5), st.integers(1, 12),
       arrays(float, 10, elements=st.floats(0.1, 100, width=64)))
def test_seasonal_naive_of_a_periodic_history_continues_it(m, h, season):
    x = np.tile(season[:m], 4)
    expected = np.tile(season[:m], h // m + 1)[:h]
    close(ev.seasonal_naive([x], h, m), [expected])


# ----------------------------------------------------------------------------- M4 Hourly

def _load_m4(name: str) -> list[np.ndarray]:
    """Rows of a wide M4 CSV (id, values..., right-padded with empty cells) as 1-D arrays."""
    with open(M4_DIR / name, newline="") as f:
        rows = csv.reader(f)
        next(rows)                                            # header V1, V2, ...
        return [np.array([float(v) for v in row[1:] if v]) for row in rows]


@pytest.mark.skipif(not (M4_DIR / "Hourly-test.csv").exists(),
                    reason=f"M4 Hourly data not found in {M4_DIR}")
def test_m4_hourly_baselines_reproduce_the_published_table():
    train, test = _load_m4("Hourly-train.csv"), np.stack(_load_m4("Hourly-test.csv"))
    assert len(train) == 414 and test.shape == (414, 48)
    scale = ev.mase_scale(train, 24)
    published = {ev.naive2: (18.383, 2.395), ev.seasonal_naive: (13.912, 1.193)}
    for baseline, (smape, mase) in published.items():
        summary = ev.summarize(ev.metrics_table(test, baseline(train, 48, 24), scale))
        assert round(summary["smape"], 3) == smape, baseline.__name__
        assert round(summary["mase"], 3) == mase, baseline.__name__
    n2 = ev.summarize(ev.metrics_table(test, ev.naive2(train, 48, 24), scale))
    sn = ev.summarize(ev.metrics_table(test, ev.seasonal_naive(train, 48, 24), scale))
    # published 0.627; from unrounded averages it is 0.62750, so allow the last digit
    assert ev.owa(sn["smape"], sn["mase"], n2["smape"], n2["mase"]) == pytest.approx(
        0.627, abs=1e-3)


def test_ratios_are_never_inf(recwarn):
    from pipeline.evaluation.metrics import _ratio
    got = _ratio(np.array([1e300, 0.0, 1.0, 2.0]), np.array([1e-300, 0.0, 0.0, 4.0]))
    np.testing.assert_array_equal(got, [np.nan, 0.0, np.nan, 0.5])
    assert not [w for w in recwarn if issubclass(w.category, RuntimeWarning)]
