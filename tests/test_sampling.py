"""Series-balanced sampling (train.sampling: series) and recency weighting
(train.recency_halflife): the draws' distributions, checked with fixed seeds; and `windows`
sampling unchanged."""
import math

import numpy as np
import pytest
import torch
from conftest import SMALL, sines, weights
from scipy import stats

from pipeline import config as C
from pipeline.data.loader import SeriesSampler, WindowLoader, window_order
from pipeline.data.series import SeriesArrays
from pipeline.data.windows import WindowIndex, starts_between
from pipeline.models import make_loss
from pipeline.training.jobs import job_data, new_model, run_job, run_jobs_locally
from pipeline.training.loop import fit
from pipeline.training.plan import plan_jobs

COUNTS = [5, 5000, 50, 500]          # windows per series: very unequal


def index_of(counts, shuffle=False):
    """Series s has counts[s] windows, starts 0 .. counts[s] - 1 (start = its age from the
    oldest); `shuffle` mixes the rows, as a sharded or filtered index may be."""
    idx = starts_between(np.zeros(len(counts)), np.asarray(counts) - 1)
    if shuffle:
        idx = idx.take(np.random.default_rng(0).permutation(len(idx)))
    return idx


def draws(sampler, n, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.cat(list(sampler.order(1000, g, steps=n // 1000))).numpy()


def test_series_are_drawn_uniformly_whatever_their_window_counts():
    idx = index_of(COUNTS, shuffle=True)
    rows = draws(SeriesSampler(idx), 40_000)
    seen = np.bincount(idx.series[rows], minlength=len(COUNTS))
    assert stats.chisquare(seen).pvalue > 0.01, seen          # expected 10,000 each
    # windows sampling, for contrast, follows the window counts
    perm = torch.randperm(len(idx), generator=torch.Generator().manual_seed(0))
    by_window = np.bincount(idx.series[perm[:1000].numpy()], minlength=len(COUNTS))
    assert by_window[0] < 10 and by_window[1] > 850


def test_windows_within_a_series_are_uniform_without_recency():
    idx = index_of(COUNTS, shuffle=True)
    rows = draws(SeriesSampler(idx), 200_000)
    series, start = idx.series[rows], idx.start[rows]
    small = np.bincount(start[series == 0], minlength=5)      # every one of the 5 windows
    assert stats.chisquare(small).pvalue > 0.01, small
    big = np.bincount(start[series == 1] // 500, minlength=10)  # 5,000 windows in 10 bins
    assert stats.chisquare(big).pvalue > 0.01, big
    assert start[series == 1].min() < 10 and start[series == 1].max() > 4990


def truncated_geometric_mean(count, halflife):
    r = 2.0 ** (-1.0 / halflife)
    a = np.arange(count)
    p = r ** a / (r ** a).sum()
    return float((a * p).sum()), float((a * a * p).sum() - (a * p).sum() ** 2)


@pytest.mark.parametrize("halflife", [3.0, 40.0])
def test_recency_weighting_follows_the_half_life(halflife):
    """The age (0 = a series' latest window) has P(a) ∝ 2^(-a / halflife), truncated at the
    series' window count: the mean age per series matches, the latest window is drawn about
    twice as often as the one a half-life older."""
    idx = index_of(COUNTS, shuffle=True)
    rows = draws(SeriesSampler(idx, halflife=halflife), 200_000, seed=1)
    series, age = idx.series[rows], (np.asarray(COUNTS) - 1)[idx.series[rows]] - idx.start[rows]
    for s, count in enumerate(COUNTS):
        mean, var = truncated_geometric_mean(count, halflife)
        got = age[series == s]
        assert got.min() >= 0 and got.max() <= count - 1
        assert abs(got.mean() - mean) < 4 * math.sqrt(var / len(got)), (s, got.mean(), mean)
    big = age[series == 1]
    if halflife == 40.0:
        ratio = (big == 0).sum() / (big == 40).sum()
        assert 1.6 < ratio < 2.5, ratio
    expected = np.bincount(np.minimum(age[series == 2], 9), minlength=10)
    r = 2.0 ** (-1.0 / halflife)
    p = r ** np.arange(50) / (r ** np.arange(50)).sum()
    probs = np.append(p[:9], p[9:].sum())
    assert stats.chisquare(expected, probs * expected.sum()).pvalue > 0.01


def test_an_epoch_takes_as_many_batches_of_the_same_sizes():
    idx = index_of([7, 30, 3])                      # 40 windows
    sampler = SeriesSampler(idx)
    g = torch.Generator().manual_seed(0)
    assert [len(b) for b in sampler.order(16, g)] == [16, 16, 8]
    assert [len(b) for b in window_order(40, 16, True, g)] == [16, 16, 8]
    assert [len(b) for b in sampler.order(16, g, steps=5)] == [16] * 5
    assert list(SeriesSampler(WindowIndex(np.zeros(0, np.int32), np.zeros(0, np.int32)))
                .order(16, g)) == []


def test_windows_sampling_is_the_seeded_permutation_it_always_was():
    """`train.sampling: windows` (the default) draws batches as before: one permutation of the
    windows per epoch from the epoch's generator (or a stream of them with steps)."""
    assert C.load(None, []).train.sampling == "windows"
    arrays = sines(3, length=100)
    idx = starts_between(np.zeros(3), arrays.lengths - 30)
    loader = WindowLoader(arrays, 20, 10, np.zeros(3), np.ones(3))
    got = torch.cat([torch.stack([b.series, b.start], 1) for b in loader.batches(
        idx, 32, shuffle=True, generator=torch.Generator().manual_seed(5))])
    perm = torch.randperm(len(idx), generator=torch.Generator().manual_seed(5))
    want = torch.stack([torch.from_numpy(idx.series)[perm].long(),
                        torch.from_numpy(idx.start)[perm].long()], 1)
    assert torch.equal(got, want)


def mixed_lengths():
    """Six learnable series, three long and three short: their window counts differ."""
    long, short = sines(3, length=300), sines(3, length=120, seed=1)
    return SeriesArrays.from_list(
        [a.values[a.indptr[i]:a.indptr[i + 1]] for a in (long, short) for i in range(3)])


def test_series_sampling_trains_seeded_with_as_many_samples_per_epoch():
    arrays = mixed_lengths()
    base = [*SMALL, "train.epochs=2"]
    plain = C.load(None, base)
    series = C.load(None, [*base, "train.sampling=series"])
    recent = C.load(None, [*base, "train.sampling=series", "train.recency_halflife=10"])
    job = plan_jobs(arrays, plain)[0]
    a, b = run_job(arrays, job, series), run_job(arrays, job, series)
    assert a.ok and all(torch.equal(x, y) for x, y in zip(weights(a).values(),
                                                          weights(b).values(), strict=True))
    p, r = run_job(arrays, job, plain), run_job(arrays, job, recent)
    assert len({a.history[0]["train_loss"], p.history[0]["train_loss"],
                r.history[0]["train_loss"]}) == 3
    data = job_data(arrays, job, plain, torch.device("cpu"))
    for cfg in (plain, series, recent):  # one pass's worth of windows per epoch, whatever the
        model = new_model(data.loader, cfg, len(arrays), 0)            # sampling
        (res,) = fit(model, [data], cfg.train, make_loss(cfg.model), progress=False)
        assert res.samples == 2 * len(data.train)


def test_series_sampling_in_a_pack_equals_each_member_alone():
    """Packed per-group training with series sampling: each group draws its own stream, as it
    would alone."""
    arrays = sines(9, length=260, groups=["a", "b", "c"])
    arrays.status[0] = 1
    base = [*SMALL, "model.encoder.type=cnn", "train.mode=per_group", "data.group_col=g",
            "train.epochs=2", "train.steps_per_epoch=3", "train.sampling=series",
            "train.recency_halflife=20"]
    separate = C.load(None, base)
    packed = {r.name: r for r in run_jobs_locally(
        arrays, plan_jobs(arrays, separate),
        C.load(None, [*base, "train.per_group.packed=true", "train.pack=always"]))}
    for job in plan_jobs(arrays, separate):
        a, b = weights(packed[job.name]), weights(run_job(arrays, job, separate))
        for k in a:
            torch.testing.assert_close(a[k], b[k], rtol=1e-4, atol=1e-5)


def test_recency_needs_series_sampling():
    with pytest.raises(C.ConfigError, match="train.recency_halflife needs train.sampling"):
        C.load(None, ["train.recency_halflife=10"])
    with pytest.raises(C.ConfigError, match="train.sampling = 'episodes'"):
        C.load(None, ["train.sampling=episodes"])
    with pytest.raises(C.ConfigError, match="train.recency_halflife = -1.0"):
        C.load(None, ["train.sampling=series", "train.recency_halflife=-1"])
