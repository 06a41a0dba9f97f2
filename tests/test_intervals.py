"""Split-conformal intervals: the quantile arithmetic by hand, coverage on exchangeable
synthetic residuals, widths per step and per group with the pooled fallback."""
from __future__ import annotations

import math

import numpy as np
import pytest

from pipeline.evaluation import metrics as E
from pipeline.forecasting import intervals

NAN = math.nan
Z80, Z95 = 1.2815515655446004, 1.959963984540054      # normal quantiles 0.9 and 0.975


# ---------------------------------------------------------------------- the arithmetic

# |r| at step 0: {1, 2, 3, 4}; step 1: {10, 20, 30, 40}; step 2: none (n = 4, 4, 0)
TINY = np.array([[1.0, -10, NAN], [-2, 20, NAN], [3, NAN, NAN], [-4, 30, NAN], [NAN, -40, NAN]])


def test_width_is_the_kth_smallest_score_with_k_ceil_n_plus_one_times_level():
    c = intervals.fit(TINY, [0.5, 0.8, 0.9])
    # k = ceil(5·0.5) = 3, ceil(5·0.8) = 4, ceil(5·0.9) = 5 > n = 4: capped to the largest
    np.testing.assert_array_equal(c.width, [[3, 30, NAN], [4, 40, NAN], [4, 40, NAN]])
    np.testing.assert_array_equal(c.capped, [[False, False, True], [False, False, True],
                                             [True, True, True]])
    np.testing.assert_array_equal(c.count, [4, 4, 0])


def test_ceil_is_not_fooled_by_rounding():
    scores = np.arange(1.0, 10.0)[:, None]           # n = 9; 10 × 0.7 = 7.000000000000001
    c = intervals.fit(scores, [0.7])
    assert c.width[0, 0] == 7 and not c.capped[0, 0]
    c = intervals.fit(-scores, [0.71])               # ceil(7.1) = 8
    assert c.width[0, 0] == 8


def test_apply_writes_the_quantile_columns_in_ascending_order():
    c = intervals.fit(TINY[:, :2], [0.8, 0.5])
    cols = c.apply(np.array([[10.0, 100.0], [0.0, -1.0]]))
    assert list(cols) == ["q_0.1", "q_0.25", "q_0.75", "q_0.9"]
    np.testing.assert_array_equal(cols["q_0.1"], [[6, 60], [-4, -41]])
    np.testing.assert_array_equal(cols["q_0.25"], [[7, 70], [-3, -31]])
    np.testing.assert_array_equal(cols["q_0.75"], [[13, 130], [3, 29]])
    np.testing.assert_array_equal(cols["q_0.9"], [[14, 140], [4, 39]])
    assert list(intervals.fit(TINY, [0.95]).apply(np.zeros((1, 3)))) == ["q_0.025", "q_0.975"]


def test_bad_arguments_name_the_setting():
    with pytest.raises(ValueError, match=r"levels must be coverage fractions in \(0, 1\)"):
        intervals.fit(TINY, [80])
    with pytest.raises(ValueError, match="levels must be"):
        intervals.fit(TINY, [])
    with pytest.raises(ValueError, match=r"residuals must be \[N, H\]"):
        intervals.fit(TINY[:, 0], [0.8])
    with pytest.raises(ValueError, match=r"groups must be \[N\] = \[5\]"):
        intervals.fit(TINY, [0.8], groups=np.zeros(4))
    with pytest.raises(ValueError, match=r"y_hat must be \[N, H\] with H = 3"):
        intervals.fit(TINY, [0.8]).apply(np.zeros((2, 2)))


# ---------------------------------------------------------------------- coverage

SCALES = np.array([1.0, 2.0, 4.0, 8.0])             # noise grows with the step


def synthetic(n: int, scales, seed: int, missing: float = 0.1):
    """Point forecasts, actuals = forecast + i.i.d. noise (step j: scale j), and a mask."""
    rng = np.random.default_rng(seed)
    y_hat = rng.normal(100, 20, (n, len(scales)))
    y = y_hat + rng.normal(0, 1, (n, len(scales))) * scales
    mask = rng.random((n, len(scales))) > missing
    return y_hat, np.where(mask, y, NAN), mask


def test_coverage_on_new_windows_is_nominal_at_every_step():
    y_hat, y, mask = synthetic(8000, SCALES, seed=0)
    c = intervals.fit(y[:4000] - y_hat[:4000], [0.8, 0.95])
    cols = c.apply(y_hat[4000:])
    test = np.s_[4000:]
    for level, lo, hi in [(0.8, "q_0.1", "q_0.9"), (0.95, "q_0.025", "q_0.975")]:
        per_step = E.coverage(y[test].T, cols[lo].T, cols[hi].T, mask[test].T)   # [H]
        assert np.abs(per_step - level).max() <= 0.02, (level, per_step)
        overall = E.coverage(y[test].reshape(1, -1), cols[lo].reshape(1, -1),
                             cols[hi].reshape(1, -1), mask[test].reshape(1, -1))[0]
        assert abs(overall - level) <= 0.01, (level, overall)
    assert not c.capped.any()
    assert (np.diff(c.width, axis=1) > 0).all()                  # wider with the step's noise
    np.testing.assert_allclose(c.width / SCALES, [[Z80] * 4, [Z95] * 4], rtol=0.05)


# ---------------------------------------------------------------------- groups

def grouped(seed: int):
    """Groups a (noise 1, 3000 windows), b (noise 5, 3000) and c (noise 20, 10: too few)."""
    sizes, noise = {"a": 3000, "b": 3000, "c": 10}, {"a": 1.0, "b": 5.0, "c": 20.0}
    rng = np.random.default_rng(seed)
    groups = np.concatenate([np.full(n, g, dtype=object) for g, n in sizes.items()])
    scale = np.array([noise[g] for g in groups])[:, None]                  # [N] -> [N, 1]
    return groups, rng.normal(0, 1, (len(groups), 3)) * scale


def test_groups_get_their_own_widths_and_a_small_group_the_pooled_ones():
    groups, res = grouped(seed=1)
    c = intervals.fit(res, [0.8, 0.95], groups=groups, min_series=30)
    assert c.groups.tolist() == ["a", "b", "c"]
    np.testing.assert_array_equal(c.group_own, [[True] * 3, [True] * 3, [False] * 3])
    a, b, small = c.group_width
    np.testing.assert_allclose(a, [[Z80] * 3, [Z95] * 3], rtol=0.05)
    np.testing.assert_allclose(b, [[5 * Z80] * 3, [5 * Z95] * 3], rtol=0.05)
    np.testing.assert_array_equal(small, c.width)                 # pooled
    assert (c.width > a).all() and (c.width < b).all()
    w = c.widths(4, np.array(["b", "c", "unseen", "a"], dtype=object))
    np.testing.assert_array_equal(w, np.stack([b, c.width, c.width, a]))
    np.testing.assert_array_equal(c.widths(2), np.stack([c.width, c.width]))


def test_grouped_intervals_cover_each_group():
    groups, res = grouped(seed=2)
    c = intervals.fit(res[::2], [0.8], groups=groups[::2])
    cols = c.apply(np.zeros((len(groups) // 2, 3)), groups[1::2])
    for g in ("a", "b"):
        sel = groups[1::2] == g
        cov = E.coverage(res[1::2][sel].reshape(1, -1), cols["q_0.1"][sel].reshape(1, -1),
                         cols["q_0.9"][sel].reshape(1, -1))[0]
        assert abs(cov - 0.8) <= 0.02, (g, cov)


def test_a_group_falls_back_to_pooled_only_at_steps_where_it_has_too_few_residuals():
    groups, res = grouped(seed=3)
    res[np.flatnonzero(groups == "a")[:2990], 2] = NAN          # a keeps 10 at step 2
    c = intervals.fit(res, [0.8], groups=groups)
    np.testing.assert_array_equal(c.group_own[0], [True, True, False])
    assert c.group_width[0, 0, 2] == c.width[0, 2]
    assert c.group_width[0, 0, 0] != c.width[0, 0]


def test_min_series_below_what_a_level_needs_is_flagged():
    groups = np.array(["x"] * 5 + ["y"] * 40)
    res = np.arange(1.0, 46.0)[:, None]
    c = intervals.fit(res, [0.9], groups=groups, min_series=5)
    assert c.group_own[0, 0] and c.group_capped[0, 0, 0]       # ceil(6·0.9) = 6 > 5
    assert c.group_width[0, 0, 0] == 5                         # the largest of 1..5
    assert not c.capped.any()


def test_widths_saved_as_json_load_back_exactly():
    """What a run logs (`Calibration.to_json`) and `forecast --from-registry` reads back: the
    same widths, flags and groups, with and without groups, NaN where a step had no residual."""
    import json

    from pipeline.forecasting.intervals import Calibration
    groups, res = grouped(3)
    res[:, -1] = np.nan                                       # a step never observed
    fitted = {"gru": intervals.fit(res, (0.8, 0.95), groups),
              "naive": intervals.fit(res[:, :2], (0.8, 0.95))}
    cal = Calibration((0.8, 0.95), fitted, {"gru": {"coverage_80": 0.81}})
    back = Calibration.from_json(json.loads(json.dumps(cal.to_json())))
    assert back.levels == cal.levels and back.coverage == cal.coverage
    for name, conf in fitted.items():
        got = back.fitted[name]
        for field in conf.__dataclass_fields__:
            a, b = getattr(conf, field), getattr(got, field)
            if isinstance(a, np.ndarray):
                assert a.shape == b.shape, (name, field)
                np.testing.assert_array_equal(a, b, err_msg=f"{name}.{field}")
            else:
                assert a == b, (name, field)
    assert np.isnan(back.fitted["gru"].width[:, -1]).all()
    y_hat = np.ones((5, res.shape[1]))
    g = groups[[0, 3000, 6000, 1, 6001]]                      # a, b, c (pooled), a, c
    for a, b in zip(back.fitted["gru"].apply(y_hat, g).values(),
                    fitted["gru"].apply(y_hat, g).values(), strict=True):
        np.testing.assert_array_equal(a, b)
