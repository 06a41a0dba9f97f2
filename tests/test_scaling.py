"""Per-series scaling is leak-free and matches a direct computation."""
import numpy as np
import pytest

from pipeline.data import scaling
from pipeline.data.series import SeriesArrays

METHODS = ["standard", "robust", "minmax"]


def random_arrays(seed=0, n=6):
    rng = np.random.default_rng(seed)
    values = [rng.normal(rng.uniform(-50, 50), rng.uniform(0.1, 9), rng.integers(3, 40))
              for _ in range(n)]
    masks = [rng.random(len(v)) > 0.2 for v in values]
    return SeriesArrays.from_list(values, mask=masks), values, masks


def reference(v, m, method):
    v = v[m].astype(np.float64)
    if len(v) == 0:
        return 0.0, 1.0
    if method == "standard":
        return v.mean(), v.std()
    if method == "minmax":
        return v.min(), v.max() - v.min()
    q25, q50, q75 = np.quantile(v, [0.25, 0.5, 0.75])
    return q50, q75 - q25


@pytest.mark.parametrize("method", METHODS)
def test_statistics_match_a_direct_computation(method):
    arrays, values, masks = random_arrays()
    cut = np.array([len(v) // 2 for v in values])
    cut[0] = 0  # nothing known yet: identity scaling
    loc, scale = scaling.fit_scaling(arrays, cut, method)
    for s, (v, m) in enumerate(zip(values, masks, strict=True)):
        want_loc, want_scale = reference(v[:cut[s]], m[:cut[s]], method)
        assert loc[s] == pytest.approx(want_loc, rel=1e-5, abs=1e-5)
        assert scale[s] == pytest.approx(want_scale if want_scale > 0 else 1.0, rel=1e-4)


@pytest.mark.parametrize("method", METHODS)
def test_values_after_the_cutoff_do_not_change_the_statistics(method):
    arrays, values, masks = random_arrays(seed=3)
    cut = np.array([max(1, len(v) - 5) for v in values])
    before = scaling.fit_scaling(arrays, cut, method)
    rng = np.random.default_rng(9)
    for s, c in enumerate(cut):  # rewrite everything from the cutoff on
        a, b = arrays.indptr[s] + c, arrays.indptr[s + 1]
        arrays.values[a:b] = rng.normal(1e6, 1e5, b - a)
        arrays.mask[a:b] = 1
    after = scaling.fit_scaling(arrays, cut, method)
    np.testing.assert_array_equal(before[0], after[0])
    np.testing.assert_array_equal(before[1], after[1])


def test_chunked_pass_equals_single_pass(monkeypatch):
    arrays, values, _ = random_arrays(seed=5, n=40)
    cut = np.array([len(v) for v in values])
    whole = scaling.fit_scaling(arrays, cut, "standard")
    monkeypatch.setattr(scaling, "CHUNK", 16)
    np.testing.assert_allclose(scaling.fit_scaling(arrays, cut, "standard"), whole, rtol=1e-6)


def test_constant_series_and_inverse_round_trip():
    arrays = SeriesArrays.from_list([[5.0] * 8, [1.0, 2.0, 3.0, 4.0]])
    loc, scale = scaling.fit_scaling(arrays, np.array([8, 4]), "standard")
    assert loc.tolist() == [5.0, 2.5] and scale[0] == 1.0
    y = np.array([[5.0, 6.0], [1.0, 4.0]], np.float32)
    z = scaling.apply(y, loc, scale)
    np.testing.assert_allclose(scaling.invert(z, loc, scale), y, rtol=1e-6)
    np.testing.assert_allclose(scaling.invert(z[..., None], loc, scale)[..., 0], y, rtol=1e-6)


def test_none_is_identity():
    arrays, values, _ = random_arrays()
    loc, scale = scaling.fit_scaling(arrays, np.array([len(v) for v in values]), "none")
    assert (loc == 0).all() and (scale == 1).all()
