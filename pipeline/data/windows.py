"""The window index: a window is (series, start), two int32 arrays; windows are never copied.

Positions count steps from the start of each series. A cutoff `c[s]` says series s is known
for steps [0, c[s]); a window at `start` reads the lookback [start, start + L) and the target
[start + L, start + L + H). For one cutoff:
- training windows have their target inside [0, c - val_size),
- validation windows have their target end inside (c - val_size, c],
- the backtest window has its lookback end at c (target [c, c + H)),
- the forecast window has its lookback end at the series' end (target beyond the data).
Training and validation starts are aligned on the most recent window, `stride` apart, and at
most `max_windows` per series are kept (the most recent ones); within a series they ascend.
With `windows.min_length` below the required length, a start may be negative: the window is
left-padded (the loader repeats the series' first step), its target always inside the data.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from pipeline.config import WindowsConfig
from pipeline.data.series import SeriesArrays

CHUNK = 1 << 22  # windows built per pass


@dataclass
class WindowIndex:
    series: np.ndarray  # [W] int32
    start: np.ndarray   # [W] int32

    def __len__(self) -> int:
        return len(self.series)

    @property
    def nbytes(self) -> int:
        return self.series.nbytes + self.start.nbytes

    def take(self, rows: np.ndarray) -> WindowIndex:
        return WindowIndex(self.series[rows], self.start[rows])


def starts_between(first: np.ndarray, last: np.ndarray, stride: int = 1,
                   max_windows: int | None = None) -> WindowIndex:
    """Windows with start in [first[s], last[s]] for each series s, aligned on last[s]."""
    first = np.asarray(first, np.int64)
    last = np.asarray(last, np.int64)
    n = np.where(last >= first, (last - first) // stride + 1, 0)
    if max_windows is not None:
        n = np.minimum(n, max_windows)
    ends = np.cumsum(n)
    series = np.empty(int(ends[-1]) if len(n) else 0, np.int32)  # [W]
    start = np.empty_like(series)                                  # [W]
    lowest = last - (n - 1) * stride                               # oldest start kept
    lo = 0
    while lo < len(n):  # chunks of series bound the int64 temporaries to CHUNK windows
        hi = max(int(np.searchsorted(ends, ends[lo] - n[lo] + CHUNK, side="right")), lo + 1)
        a, b = int(ends[lo] - n[lo]), int(ends[hi - 1])
        k = np.arange(b - a, dtype=np.int64) - np.repeat(ends[lo:hi] - n[lo:hi] - a, n[lo:hi])
        series[a:b] = np.repeat(np.arange(lo, hi, dtype=np.int32), n[lo:hi])
        start[a:b] = np.repeat(lowest[lo:hi], n[lo:hi]) + k * stride  # k: 0..n_s-1
        lo = hi
    return WindowIndex(series, start)


def cutoff_positions(lengths: np.ndarray, horizon: int, n_windows: int, step: int) -> np.ndarray:
    """[n_windows, S] cutoffs counted back from each series' end, latest first:
    c_k = len - horizon - k * step."""
    k = np.arange(n_windows)[:, None]
    return (np.asarray(lengths)[None, :] - horizon - k * step).astype(np.int64)


def _earliest(last: np.ndarray, cfg: WindowsConfig) -> np.ndarray:
    """The first start allowed: 0, or with left-padding (`cfg.padded`) as far back as a
    series' latest start needs, never so far that a target step precedes the series."""
    if not cfg.padded:
        return np.zeros_like(last)
    return np.maximum(np.minimum(last, 0), -cfg.lookback)


def train_windows(cutoff: np.ndarray, cfg: WindowsConfig, eligible: np.ndarray) -> WindowIndex:
    last = np.asarray(cutoff) - cfg.val_size - cfg.lookback - cfg.horizon
    first = _earliest(last, cfg)
    last = np.where(eligible, last, first - 1)
    return starts_between(first, last, cfg.stride, cfg.max_windows_per_series)


def val_windows(cutoff: np.ndarray, cfg: WindowsConfig, eligible: np.ndarray) -> WindowIndex:
    last = np.asarray(cutoff) - cfg.lookback - cfg.horizon
    first = np.maximum(last - cfg.val_size + 1, _earliest(last, cfg))
    last = np.where(eligible, last, first - 1)
    return starts_between(first, last, cfg.stride, cfg.max_windows_per_series)


def backtest_windows(cutoff: np.ndarray, lengths: np.ndarray, cfg: WindowsConfig,
                     eligible: np.ndarray) -> WindowIndex:
    """One window per series whose lookback ends at its cutoff and whose target is known."""
    cutoff = np.asarray(cutoff)
    history = 1 if cfg.padded else cfg.lookback      # left-padded: one known step suffices
    ok = eligible & (cutoff >= history) & (cutoff + cfg.horizon <= lengths)
    s = np.flatnonzero(ok).astype(np.int32)
    return WindowIndex(s, (cutoff[s] - cfg.lookback).astype(np.int32))


def forecast_windows(lengths: np.ndarray, lookback: int, eligible: np.ndarray,
                     padded: bool = False) -> WindowIndex:
    """One window per series whose lookback ends at the series' last step (left-padded where
    the series is shorter than the lookback, when `padded`)."""
    s = np.flatnonzero(eligible & (lengths >= (1 if padded else lookback))).astype(np.int32)
    return WindowIndex(s, (np.asarray(lengths)[s] - lookback).astype(np.int32))


def materialized_bytes(n_windows: int, lookback: int, horizon: int, channels: int = 1) -> int:
    """What a float32 tensor of every window would take: the cost this design avoids."""
    return n_windows * (lookback + horizon) * channels * 4


@dataclass
class WindowPlan:
    """The window indexes of one job: training and validation at the latest backtest cutoff,
    and one backtest index per cutoff (latest first)."""

    cutoffs: np.ndarray           # [n_windows, S]
    train: WindowIndex
    val: WindowIndex
    backtest: list[WindowIndex]

    @property
    def nbytes(self) -> int:
        return sum(i.nbytes for i in [self.train, self.val, *self.backtest])

    def of(self, eligible: np.ndarray) -> WindowPlan:
        """The plan of the series where `eligible` ([S] bool) is true: the same windows, in the
        same order, as planning those series alone."""
        def keep(idx: WindowIndex) -> WindowIndex:
            return idx if eligible.all() else idx.take(np.flatnonzero(eligible[idx.series]))
        return WindowPlan(self.cutoffs, keep(self.train), keep(self.val),
                          [keep(b) for b in self.backtest])


def plan_windows(arrays: SeriesArrays, cfg: WindowsConfig,
                 eligible: np.ndarray | None = None, final: bool = False) -> WindowPlan:
    """Windows of the usable series (and, when given, only those where `eligible` is true).
    final=True: no backtest; training and validation use every step (the forecast model)."""
    ok = arrays.status == 0
    if eligible is not None:
        ok = ok & eligible
    lengths = arrays.lengths
    if final:
        cut = lengths[None, :].astype(np.int64)
        return WindowPlan(cut, train_windows(cut[0], cfg, ok), val_windows(cut[0], cfg, ok), [])
    cutoffs = cutoff_positions(lengths, cfg.horizon, cfg.n_windows, cfg.step)
    oldest = cutoffs[-1]  # train before the oldest backtest cutoff: no test data seen
    return WindowPlan(
        cutoffs=cutoffs,
        train=train_windows(oldest, cfg, ok),
        val=val_windows(oldest, cfg, ok),
        backtest=[backtest_windows(c, lengths, cfg, ok) for c in cutoffs],
    )
