"""The window index: exact arrays on hand-built series, and gathered windows equal slices."""
import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from pipeline.config import WindowsConfig
from pipeline.data import windows as W
from pipeline.data.loader import WindowLoader
from pipeline.data.prepare import plan_windows
from pipeline.data.series import SeriesArrays


def pairs(idx: W.WindowIndex) -> list[tuple[int, int]]:
    return list(zip(idx.series.tolist(), idx.start.tolist(), strict=True))


def test_starts_between_is_aligned_on_the_latest_window():
    idx = W.starts_between([0, 0, 5], [4, -1, 9], stride=2)
    assert pairs(idx) == [(0, 0), (0, 2), (0, 4), (2, 5), (2, 7), (2, 9)]
    assert pairs(W.starts_between([0], [5], stride=2)) == [(0, 1), (0, 3), (0, 5)]
    assert idx.series.dtype == np.int32 and idx.start.dtype == np.int32


def test_cap_keeps_the_most_recent_windows():
    idx = W.starts_between([0, 0, 5], [4, -1, 9], stride=2, max_windows=2)
    assert pairs(idx) == [(0, 2), (0, 4), (2, 7), (2, 9)]


def test_splits_at_one_cutoff_exact():
    cfg = WindowsConfig(lookback=3, horizon=2, val_size=2, n_windows=1)
    lengths = np.array([10, 7])
    ok = np.array([True, True])
    cut = W.cutoff_positions(lengths, 2, 1, 2)[0]
    assert cut.tolist() == [8, 5]
    # train: target end <= cutoff - val_size  ->  start <= 8 - 2 - 5 = 1
    assert pairs(W.train_windows(cut, cfg, ok)) == [(0, 0), (0, 1)]
    # validation: target end in (cutoff - 2, cutoff]
    assert pairs(W.val_windows(cut, cfg, ok)) == [(0, 2), (0, 3), (1, 0)]
    assert pairs(W.backtest_windows(cut, lengths, cfg, ok)) == [(0, 5), (1, 2)]
    assert pairs(W.forecast_windows(lengths, 3, ok)) == [(0, 7), (1, 4)]


def test_windows_never_cross_the_cutoff_or_the_series_end():
    cfg = WindowsConfig(lookback=4, horizon=3, val_size=5, stride=3, n_windows=3, step=2)
    arrays = SeriesArrays.from_list([np.arange(n) for n in (9, 30, 17, 12)])
    plan = plan_windows(arrays, cfg)
    oldest = plan.cutoffs[-1]
    assert plan.cutoffs.tolist() == [[6, 27, 14, 9], [4, 25, 12, 7], [2, 23, 10, 5]]
    end = plan.train.start + cfg.lookback + cfg.horizon
    assert (end <= oldest[plan.train.series] - cfg.val_size).all()
    vend = plan.val.start + cfg.lookback + cfg.horizon
    assert (vend <= oldest[plan.val.series]).all()
    assert (vend > oldest[plan.val.series] - cfg.val_size).all()
    assert pairs(plan.train) == [(1, 2), (1, 5), (1, 8), (1, 11)]  # 23 - 5 - 7 = 11
    for k, bt in enumerate(plan.backtest):
        c = plan.cutoffs[k]
        assert (bt.start + cfg.lookback == c[bt.series]).all()
        assert (c[bt.series] + cfg.horizon <= arrays.lengths[bt.series]).all()
    assert [bt.series.tolist() for bt in plan.backtest] == [[0, 1, 2, 3], [0, 1, 2, 3], [1, 2, 3]]


def test_skipped_series_get_no_windows():
    cfg = WindowsConfig(lookback=2, horizon=1, val_size=1)
    arrays = SeriesArrays.from_list([np.arange(8), np.arange(8)])
    arrays.status[0] = 1
    plan = plan_windows(arrays, cfg)
    assert set(plan.train.series.tolist()) == {1} and plan.backtest[0].series.tolist() == [1]


def test_gather_over_gaps_returns_filled_values_and_mask():
    arrays = SeriesArrays.from_list([[1, 2, 2, 4, 5, 6]], mask=[[1, 1, 0, 1, 1, 1]])
    loader = WindowLoader(arrays, 3, 2, np.zeros(1), np.ones(1))
    b = loader.gather(torch.tensor([0]), torch.tensor([1]))
    assert b.x[0, :, 0].tolist() == [2, 2, 4] and b.y[0].tolist() == [5, 6]
    assert b.y_mask[0].tolist() == [1, 1]
    b = loader.gather(torch.tensor([0]), torch.tensor([0]))
    assert b.y[0].tolist() == [4, 5]


@settings(max_examples=60, deadline=None)
@given(lengths=st.lists(st.integers(1, 40), min_size=1, max_size=8),
       L=st.integers(1, 8), H=st.integers(1, 6), stride=st.integers(1, 4),
       cap=st.one_of(st.none(), st.integers(1, 5)), seed=st.integers(0, 2**16))
def test_every_gathered_window_equals_the_slice_of_its_series(lengths, L, H, stride, cap, seed):
    rng = np.random.default_rng(seed)
    series = [rng.normal(size=n).astype(np.float32) for n in lengths]
    arrays = SeriesArrays.from_list(series)
    lens = arrays.lengths
    idx = W.starts_between(np.zeros(len(lens)), lens - L - H, stride, cap)
    loc = rng.normal(size=len(lens)).astype(np.float32)
    scale = rng.uniform(0.5, 2, size=len(lens)).astype(np.float32)
    loader = WindowLoader(arrays, L, H, loc, scale)
    seen = 0
    gen = torch.Generator().manual_seed(seed)
    for b in loader.batches(idx, batch_size=7, shuffle=True, generator=gen):
        for s, t0, x, y in zip(b.series.tolist(), b.start.tolist(), b.x[..., 0], b.y, strict=True):
            want = (series[s][t0:t0 + L + H] - loc[s]) / scale[s]
            assert len(want) == L + H  # never crosses the series end
            np.testing.assert_array_equal(torch.cat([x, y]).numpy(), want.astype(np.float32))
            seen += 1
    assert seen == len(idx)
    if cap is not None:
        assert (np.bincount(idx.series, minlength=len(lens)) <= cap).all()


def test_chunked_construction_equals_one_pass(monkeypatch):
    rng = np.random.default_rng(0)
    first = rng.integers(0, 5, 50)
    last = rng.integers(-3, 60, 50)
    whole = W.starts_between(first, last, 3, 7)
    monkeypatch.setattr(W, "CHUNK", 4)
    chunked = W.starts_between(first, last, 3, 7)
    assert pairs(chunked) == pairs(whole)


def test_window_scaling_uses_only_each_lookback():
    rng = np.random.default_rng(0)
    series = [rng.normal(50, 5, 40).astype(np.float32), rng.normal(-3, 0.1, 40).astype(np.float32)]
    arrays = SeriesArrays.from_list(series)
    loader = WindowLoader(arrays, 8, 4, np.zeros(2), np.ones(2), window_scaling=True)
    b = loader.gather(torch.tensor([0, 1, 1]), torch.tensor([3, 0, 20]))
    x = b.x[..., 0]
    torch.testing.assert_close(x.mean(1), torch.zeros(3), atol=1e-5, rtol=0)
    torch.testing.assert_close(x.std(1, unbiased=False), torch.ones(3), atol=1e-4, rtol=0)
    for i, (s, t) in enumerate([(0, 3), (1, 0), (1, 20)]):  # invert: the raw values again
        raw = torch.cat([x[i], b.y[i]]) * b.scale[i] + b.loc[i]
        np.testing.assert_allclose(raw.numpy(), series[s][t:t + 12], rtol=1e-5)
    arrays.values[arrays.indptr[0] + 11:arrays.indptr[1]] = 1e6  # after the lookback
    again = loader.gather(torch.tensor([0]), torch.tensor([3]))
    assert again.loc[0] == b.loc[0] and again.scale[0] == b.scale[0]


def test_window_recent_centres_on_the_last_steps_and_keeps_the_lookback_std():
    """`centre` = k: the location is the mean of the observed values among the lookback's
    last k steps (padding and missing steps left out; none observed: the lookback's mean), the
    scale the whole lookback's std; outputs invert to the raw values."""
    x = np.array([100.0, 90, 80, 70, 10, 12, 14, 16, 1, 2, 3, 4])   # a level that fell
    arrays = SeriesArrays.from_list([x, x.copy()])
    loader = WindowLoader(arrays, 8, 4, np.zeros(2), np.ones(2), window_scaling=True, centre=3)
    b = loader.gather(torch.tensor([0]), torch.tensor([0]))
    look = x[:8]
    assert b.loc.item() == pytest.approx(look[-3:].mean())             # 14: the recent level
    assert b.scale.item() == pytest.approx(look.std(), rel=1e-6)
    np.testing.assert_allclose(b.x[0, :, 0].numpy(), (look - 14) / look.std(), rtol=1e-5)
    np.testing.assert_allclose((b.y[0] * b.scale[0] + b.loc[0]).numpy(), x[8:], rtol=1e-5)
    arrays.mask[arrays.indptr[1] + 6:arrays.indptr[1] + 8] = 0      # missing: left out
    assert loader.gather(torch.tensor([1]), torch.tensor([0])).loc.item() == 12
    arrays.mask[arrays.indptr[1] + 5] = 0                           # none of the last 3
    assert loader.gather(torch.tensor([1]), torch.tensor([0])).loc.item() == pytest.approx(
        look[:5].mean())
    padded = loader.gather(torch.tensor([0]), torch.tensor([-6]))    # 2 real steps: 100, 90
    assert padded.loc.item() == 95 and padded.scale.item() == 5
    assert WindowLoader(arrays, 8, 4, np.zeros(2), np.ones(2), window_scaling=True,
                        centre=50).gather(torch.tensor([0]), torch.tensor([0])).loc.item() \
        == pytest.approx(look.mean())                               # k beyond the lookback


def test_window_recent_centre_is_fixed_in_the_resolved_config_and_kept_by_a_champion():
    """Weekly data's season follows the median length (1 under two years, 52 from two): the
    run fixes `windows.recent_steps` in the config it logs, so a champion trained on short
    history centres its windows on the same span when it forecasts longer data later."""
    from pipeline import config as C
    from pipeline.data.calendar import parse_freq
    from pipeline.data.loader import recent_steps
    from pipeline.data.prepare import resolve_recent_steps
    from pipeline.tracking.champions import champion_config
    weekly = parse_freq("1w")
    short = SeriesArrays.from_list([np.arange(60.0)] * 3, freq=weekly)
    long = SeriesArrays.from_list([np.arange(150.0)] * 3, freq=weekly)
    cfg = C.load(None, ["windows.scaling=window_recent", "windows.lookback_horizons=4",
                        "windows.horizon=8"])
    assert recent_steps(short, cfg) == 1 and recent_steps(long, cfg) == 52   # unfixed
    trained = resolve_recent_steps(cfg, short)
    assert trained.windows.recent_steps == 1 and trained.windows.lookback == 32
    assert recent_steps(long, trained) == 1
    today = C.load(None, ["windows.scaling=window_recent"])
    kept = champion_config(today, trained.to_dict(), "global")
    assert kept.windows.recent_steps == 1 and recent_steps(long, kept) == 1
    assert resolve_recent_steps(C.load(None, []), short).windows.recent_steps is None
    assert resolve_recent_steps(cfg, long).windows.recent_steps == 52
    with pytest.raises(C.ConfigError, match="windows.recent_steps"):
        C.load(None, ["windows.recent_steps=0"])


def test_short_series_get_left_padded_windows_with_min_length():
    """windows.min_length below lookback + horizon: a short series keeps its latest windows,
    starting before its first step, targets always inside the data."""
    cfg = WindowsConfig(lookback=6, horizon=2, val_size=2, n_windows=1, min_length=5)
    assert cfg.padded and cfg.shortest == 5 and cfg.required_length == 8
    lengths = np.array([5, 12])
    ok = np.array([True, True])
    cut = W.cutoff_positions(lengths, 2, 1, 2)[0]                   # [3, 10]
    train = pairs(W.train_windows(cut, cfg, ok))
    # series 0: latest start 3 - 2 - 6 - 2 = -7 < -6 (a target step before the series): none
    # series 1: 10 - 2 - 8 = 0: the unpadded window
    assert train == [(1, 0)]
    assert pairs(W.val_windows(cut, cfg, ok)) == [(0, -5), (1, 1), (1, 2)]
    assert pairs(W.backtest_windows(cut, lengths, cfg, ok)) == [(0, -3), (1, 4)]
    assert pairs(W.forecast_windows(lengths, 6, ok, padded=True)) == [(0, -1), (1, 6)]
    assert pairs(W.forecast_windows(lengths, 6, ok)) == [(1, 6)]       # no padding: skipped


def test_a_left_padded_window_repeats_the_first_step_and_masks_nothing_it_should_not():
    arrays = SeriesArrays.from_list([np.array([10.0, 11, 12, 13, 14]), np.arange(100, 112.0)])
    loader = WindowLoader(arrays, 6, 2, np.zeros(2), np.ones(2))
    b = loader.gather(torch.tensor([0, 1]), torch.tensor([-3, 2]))
    assert b.x[0, :, 0].tolist() == [10, 10, 10, 10, 11, 12]          # 3 padded steps
    assert b.y[0].tolist() == [13, 14] and b.y_mask[0].tolist() == [1, 1]
    assert b.x[1, :, 0].tolist() == [102, 103, 104, 105, 106, 107]    # an ordinary window
    w = WindowLoader(arrays, 6, 2, np.zeros(2), np.ones(2), window_scaling=True)
    padded = w.gather(torch.tensor([0]), torch.tensor([-3]))
    real = np.array([10.0, 11, 12])                                 # padding not in the stats
    assert padded.loc.item() == real.mean()
    assert abs(padded.scale.item() - real.std()) < 1e-6


def test_lookback_in_horizons():
    assert WindowsConfig(horizon=6, lookback_horizons=3).lookback == 18
    assert WindowsConfig().lookback == 168
    import pytest

    from pipeline.config import ConfigError
    with pytest.raises(ConfigError, match="windows.lookback and windows.lookback_horizons"):
        WindowsConfig(lookback=10, lookback_horizons=2)
