"""Batches gathered from the flat series arrays by index arithmetic, on the CPU or the GPU.

`WindowLoader` moves the arrays to a device once; a batch of windows (series, start) is then
`values[indptr[series] + start + arange(L + H)]`, scaled by the per-series statistics of the
cutoff in use. Calendar features are computed once per grid ordinal the windows can reach
(`CalendarTable`) and gathered like the values. The batch follows the models' tensor contract:
  x      [B, L, 1 + C_past]  scaled target, past covariates, future covariates and calendar
                             over the lookback
  xf     [B, H, C_fut]       future covariates and calendar over the horizon (None if none)
  y      [B, H]              scaled target (None for forecast windows)
  y_mask [B, H]              1 where the target was observed
  static [B, C_s], idx [B]   static features and embedding index (None when not used)
  weight [B]                 scale / m of the window's series (MASE's weight; None unless the
                             loader was given the season m)

`batches(..., sampler=SeriesSampler(index))` draws series-balanced batches instead of a
permutation of the windows (`train.sampling: series`).
"""
from __future__ import annotations

import copy
import math
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import numpy as np
import torch

from pipeline.config import Config
from pipeline.data.calendar import resolve_features
from pipeline.data.calendar_table import CalendarTable, cyclic
from pipeline.data.scaling import WINDOW_METHODS, covariate_scaling, fit_scaling, mase_scale
from pipeline.data.series import SeriesArrays, season_of
from pipeline.data.windows import WindowIndex


@dataclass
class WindowBatch:
    x: torch.Tensor
    xf: torch.Tensor | None
    y: torch.Tensor | None
    y_mask: torch.Tensor | None
    static: torch.Tensor | None
    idx: torch.Tensor | None
    loc: torch.Tensor      # [B] to invert the scaling of outputs
    scale: torch.Tensor    # [B]
    series: torch.Tensor   # [B]
    start: torch.Tensor    # [B]
    weight: torch.Tensor | None = None  # [B] window scale / the series' MASE scale m_s

    def __len__(self) -> int:
        return self.x.shape[0]


def stack_batches(batches: Sequence[WindowBatch]) -> WindowBatch:
    """G batches of equal size -> one batch with a leading member dimension [G, B, ...]."""
    def st(name):
        first = getattr(batches[0], name)
        return None if first is None else torch.stack([getattr(b, name) for b in batches])
    return WindowBatch(**{name: st(name) for name in WindowBatch.__dataclass_fields__})


def static_matrix(arrays: SeriesArrays) -> np.ndarray | None:
    """[S, C_s] float32: numeric static columns standardized, string columns one-hot."""
    cols = []
    for col in arrays.static.values():
        if np.issubdtype(np.asarray(col).dtype, np.number):
            v = np.asarray(col, np.float64)
            cols.append(((v - v.mean()) / (v.std() or 1.0))[:, None])
        else:
            _, codes = np.unique(np.asarray(col).astype(str), return_inverse=True)
            cols.append(np.eye(codes.max() + 1)[codes])  # [S] -> [S, K]
    return np.concatenate(cols, 1).astype(np.float32) if cols else None


def embedding_index(arrays: SeriesArrays, kind: str) -> np.ndarray | None:
    """[S] int64: the series number ('series') or the group number ('group')."""
    if kind == "series":
        return np.arange(len(arrays), dtype=np.int64)
    if kind == "group":
        return np.unique(arrays.groups.astype(str), return_inverse=True)[1].astype(np.int64)
    return None


class WindowLoader:
    """Gathers windows of fixed lookback/horizon from SeriesArrays held on `device`. With the
    season `season` (MASE's m), each batch carries weight = its windows' scale / m_s, m_s the
    series' MASE scale from its steps before `cutoff` (default: every step)."""

    def __init__(self, arrays: SeriesArrays, lookback: int, horizon: int, loc: np.ndarray,
                 scale: np.ndarray, *, calendar: list[str] = (), embedding: str = "none",
                 use_static: bool = True, device: str | torch.device = "cpu",
                 window_scaling: bool = False, centre: int = 0, covariate_stats=(None, None),
                 season: int | None = None, cutoff: np.ndarray | None = None) -> None:
        self.L, self.H, self.device = lookback, horizon, torch.device(device)
        self.window_scaling, self.centre = window_scaling, centre
        self.calendar = list(calendar)
        self.freq = arrays.freq
        self.lengths = arrays.lengths
        t = self._to
        self.values, self.mask = t(arrays.values), t(arrays.mask)
        self.indptr, self.start = t(arrays.indptr), t(arrays.start)   # start: grid ordinals
        self.past = t(arrays.past) if arrays.past is not None else None
        self.future = t(arrays.future) if arrays.future is not None else None
        # per series and column (loc, scale) [S, C] of the covariates, or None: unscaled
        self.past_stats, self.future_stats = (
            None if st is None else (t(st[0].astype(np.float32)), t(st[1].astype(np.float32)))
            for st in covariate_stats)
        self.loc, self.scale = t(np.asarray(loc, np.float32)), t(np.asarray(scale, np.float32))
        st = static_matrix(arrays) if use_static else None
        self.static = t(st) if st is not None else None
        emb = embedding_index(arrays, embedding)
        self.embed = t(emb) if emb is not None else None
        self.steps = torch.arange(lookback + horizon, device=self.device)
        self.mase_scale = None if season is None else t(mase_scale(
            arrays, arrays.lengths if cutoff is None else cutoff, season).astype(np.float32))
        self.cal = self._calendar_table(arrays.start, lookback)

    def with_lookback(self, lookback: int) -> WindowLoader:
        """The same loader (arrays, scaling, features: shared, not copied) reading `lookback`
        steps of history."""
        out = copy.copy(self)
        out.L, out.steps = lookback, torch.arange(lookback + self.H, device=self.device)
        if self.cal is not None and lookback > self.cal.pad:   # reaches further back
            out.cal = self._calendar_table(self.cal.start, lookback)
        return out

    def _calendar_table(self, start: np.ndarray, pad: int) -> CalendarTable | None:
        if not self.calendar:
            return None
        return CalendarTable(self.freq, self.calendar, start, self.lengths, pad, self.H,
                             self.device)

    def _to(self, a: np.ndarray) -> torch.Tensor:
        return torch.from_numpy(np.ascontiguousarray(a)).to(self.device)

    @property
    def past_size(self) -> int:
        """Channels of x besides the target."""
        return self.x_channels - 1

    @property
    def x_channels(self) -> int:
        cp = 0 if self.past is None else self.past.shape[1]
        cf = 0 if self.future is None else self.future.shape[1]
        return 1 + cp + cf + 2 * len(self.calendar)

    @property
    def future_size(self) -> int:
        cf = 0 if self.future is None else self.future.shape[1]
        return cf + 2 * len(self.calendar)

    @property
    def static_size(self) -> int:
        return 0 if self.static is None else self.static.shape[1]

    def gather(self, series: torch.Tensor, start: torch.Tensor, with_target: bool = True,
               *, in_table: bool | None = None) -> WindowBatch:
        """Windows (series[b], start[b]); with_target=False reads the lookback only (forecast
        windows whose horizon lies beyond the data). `in_table`: whether the windows' calendar
        positions are known to lie in the table (None: check)."""
        if in_table is None and self.cal is not None:
            in_table = self.cal.covers(series.cpu().numpy(), start.cpu().numpy(),
                                       self.L + self.H)
        series = series.to(self.device, torch.long)
        start = start.to(self.device, torch.long)
        L, H = self.L, self.H
        T = L + H if with_target else L
        pos = start[:, None] + self.steps[None, :T]                          # [B, T]
        # a negative position (a left-padded window) reads the series' first step
        rows = self.indptr[series][:, None] + pos.clamp(min=0)                # [B, T]
        loc, scale = self.loc[series], self.scale[series]
        if self.window_scaling:
            loc, scale = self._lookback_stats(rows[:, :L], pos[:, :L] >= 0)
        v = (self.values[rows] - loc[:, None]) / scale[:, None]               # [B, T]
        feats, fut = [v[:, :L, None]], []                                     # [B, L, 1]
        if self.past is not None:
            feats.append(self._scaled(self.past[rows[:, :L]], self.past_stats, series))
        if self.future is not None:
            frows = rows if with_target else torch.cat(                       # hold the last
                [rows, rows[:, -1:].expand(-1, H)], 1)                        # value: [B, L+H]
            f = self._scaled(self.future[frows], self.future_stats, series)   # [B, L+H, Cf]
            feats.append(f[:, :L])
            fut.append(f[:, L:])
        if self.calendar:
            at = start[:, None] + self.steps[None, :]                         # [B, L+H]
            cal = self.cal.gather(series, at) if in_table else cyclic(        # [B, L+H, 2K]
                self.freq, self.calendar, self.start[series, None] + at * self.freq.step)
            feats.append(cal[:, :L])
            fut.append(cal[:, L:])
        return WindowBatch(
            x=torch.cat(feats, -1), xf=torch.cat(fut, -1) if fut else None,
            y=v[:, L:] if with_target else None,
            y_mask=self.mask[rows[:, L:]].float() if with_target else None,
            static=self.static[series] if self.static is not None else None,
            idx=self.embed[series] if self.embed is not None else None,
            loc=loc, scale=scale, series=series, start=start,
            weight=None if self.mase_scale is None else scale / self.mase_scale[series])

    @staticmethod
    def _scaled(x: torch.Tensor, stats, series: torch.Tensor) -> torch.Tensor:
        """Covariates x [B, T, C] scaled by their series' statistics ([S, C] -> [B, 1, C])."""
        if stats is None:
            return x
        return (x - stats[0][series, None]) / stats[1][series, None]

    def _lookback_stats(self, rows: torch.Tensor, real: torch.Tensor
                        ) -> tuple[torch.Tensor, torch.Tensor]:
        """Mean and std of each window's observed lookback values ([B, L] rows -> [B], [B];
        padding left out); a (near) constant lookback gets scale 1. With `centre` = k > 0 the
        location is the mean of the observed values among the lookback's last k steps (the
        whole lookback's mean where none is observed): the window is centred on its recent
        level, its scale still the lookback's std."""
        v, m = self.values[rows], self.mask[rows].float() * real              # [B, L]
        n = m.sum(1).clamp(min=1)
        loc = (v * m).sum(1) / n
        std = (((v - loc[:, None]) ** 2) * m).sum(1).div(n).sqrt()
        ok = std > 1e-6 * loc.abs().clamp(min=1)
        if self.centre:
            k = min(self.centre, v.shape[1])
            nk = m[:, -k:].sum(1)
            recent = (v[:, -k:] * m[:, -k:]).sum(1) / nk.clamp(min=1)
            loc = torch.where(nk > 0, recent, loc)
        return loc, torch.where(ok, std, torch.ones_like(std))

    def batches(self, index: WindowIndex, batch_size: int, *, shuffle: bool = False,
                generator: torch.Generator | None = None, steps: int | None = None,
                with_target: bool = True, sampler: SeriesSampler | None = None
                ) -> Iterator[WindowBatch]:
        """Batches over a window index, optionally in a seeded random order.

        steps=None: one pass, the last batch possibly smaller. steps=k: exactly k full batches
        from an endless stream of fresh permutations (so groups of different sizes can take
        the same number of steps). `sampler` (of this index): series-balanced draws instead,
        as many batches of the same sizes."""
        in_table = self.cal is None or self.cal.covers(index.series, index.start, self.L + self.H)
        series = torch.from_numpy(index.series).to(self.device)
        start = torch.from_numpy(index.start).to(self.device)
        order = window_order(len(index), batch_size, shuffle, generator, steps) \
            if sampler is None else sampler.order(batch_size, generator, steps)
        for rows in order:
            rows = rows.to(self.device)
            yield self.gather(series[rows], start[rows], with_target, in_table=in_table)


def window_order(n: int, batch_size: int, shuffle: bool = False,
                 generator: torch.Generator | None = None, steps: int | None = None
                 ) -> Iterator[torch.Tensor]:
    """Row numbers of each batch (see `WindowLoader.batches`)."""
    def perm() -> torch.Tensor:
        return torch.randperm(n, generator=generator) if shuffle else torch.arange(n)

    if steps is None:
        order = perm()
        for i in range(0, n, batch_size):
            yield order[i:i + batch_size]
        return
    if n == 0:
        return
    buf = perm()
    for _ in range(steps):
        while len(buf) < batch_size:
            buf = torch.cat([buf, perm()])
        yield buf[:batch_size]
        buf = buf[batch_size:]


class SeriesSampler:
    """Series-balanced draws over a window index (`train.sampling: series`): each batch picks
    B series uniformly, with replacement, among the series that have windows, then one window
    of each: uniformly, or with `halflife` (in windows) from a truncated exponential over the
    window's age (0 = the series' latest window): P(age = a) ∝ 2^(−a / halflife)."""

    def __init__(self, index: WindowIndex, halflife: float | None = None) -> None:
        rows = np.lexsort((index.start, index.series))     # by series, oldest window first
        _, first, counts = np.unique(index.series[rows], return_index=True, return_counts=True)
        self.rows = torch.from_numpy(rows.astype(np.int64))
        self.first = torch.from_numpy(first.astype(np.int64))
        self.counts = torch.from_numpy(counts.astype(np.int64))
        self.halflife = halflife
        self.n_windows = len(index)

    def draw(self, n: int, generator: torch.Generator | None = None) -> torch.Tensor:
        """[n] rows of the index, one draw each."""
        pick = torch.randint(len(self.counts), (n,), generator=generator)
        count = self.counts[pick]
        u = torch.rand(n, generator=generator, dtype=torch.float64)
        if self.halflife is None:
            age = (u * count).long()
        else:   # inverse CDF of the truncated geometric: P(age <= a) = (1 - r^(a+1)) / (1 - r^c)
            log_r = -math.log(2.0) / self.halflife
            tail = -torch.expm1(count.double() * log_r)                      # 1 - r^c
            age = (torch.log1p(-u * tail) / log_r).floor().long()
        age = torch.minimum(age, count - 1)
        return self.rows[self.first[pick] + count - 1 - age]

    def order(self, batch_size: int, generator: torch.Generator | None = None,
              steps: int | None = None) -> Iterator[torch.Tensor]:
        """Rows of each batch: `steps` full batches, or (None) as many batches as one pass over
        the windows takes, the last one as small as that pass's."""
        if self.n_windows == 0:
            return
        sizes = [batch_size] * steps if steps is not None else \
            [min(batch_size, self.n_windows - i) for i in range(0, self.n_windows, batch_size)]
        for size in sizes:
            yield self.draw(size, generator)


def loss_season(arrays: SeriesArrays, cfg: Config) -> int | None:
    """MASE's m when a loss of the model (or of an ensemble member) or `train.val_metric` is
    mase, else None: evaluate.season, else the frequency's default season."""
    if "mase" not in [*cfg.model.member_losses(), cfg.train.val_metric]:
        return None
    return season_of(cfg, arrays)


def recent_steps(arrays: SeriesArrays, cfg: Config) -> int:
    """The steps at a lookback's end that centre each window under `windows.scaling:
    window_recent`: `windows.recent_steps`, else one season (`season_of`; one step for data
    without a season); 0 (the whole lookback) otherwise."""
    if cfg.windows.scaling != "window_recent":
        return 0
    return cfg.windows.recent_steps or max(1, season_of(cfg, arrays))


def loader_at(arrays: SeriesArrays, cfg: Config, cutoff: np.ndarray, device="cpu"
              ) -> WindowLoader:
    """A loader over every series with the config's geometry, calendar and embedding, and the
    scaling of the target and the covariates fitted before `cutoff` (per series); with a mase
    loss, MASE's per-series scale before `cutoff` for the batches' weights."""
    loc, scale = fit_scaling(arrays, cutoff, cfg.windows.scaling)
    return WindowLoader(arrays, cfg.windows.lookback, cfg.windows.horizon, loc, scale,
                        calendar=resolve_features(cfg.data.calendar, arrays.freq),
                        embedding=cfg.model.embedding, device=device,
                        window_scaling=cfg.windows.scaling in WINDOW_METHODS,
                        centre=recent_steps(arrays, cfg),
                        covariate_stats=covariate_scaling(arrays, cutoff, cfg.windows.scaling),
                        season=loss_season(arrays, cfg), cutoff=cutoff)
