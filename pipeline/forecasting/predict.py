"""Predictions in original units: a trained model over a window index, and the frames the
pipeline writes (DESIGN.md §3): one row per (series, forecast step).

`predict` gathers the windows' lookbacks (and, for backtests, the actuals), runs the model in
eval mode and inverts the per-series scaling. `predict_job` is what the backtest and the final
forecast call: a job's model (a single model or an `Ensemble`) from given origins. Imports
neither Ray nor MLflow.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from pipeline.config import Config, WindowsConfig
from pipeline.data.loader import WindowLoader, loader_at
from pipeline.data.series import SeriesArrays
from pipeline.data.windows import WindowIndex, backtest_windows, forecast_windows
from pipeline.models.ensemble import Ensemble, combine
from pipeline.training.device import torch_threads


@dataclass
class Predictions:
    series: np.ndarray          # [N] series numbers
    origin: np.ndarray          # [N] position of the first forecast step in its series
    y_hat: np.ndarray           # [N, H] point forecast (the median when quantiles are learned)
    q_hat: np.ndarray | None    # [N, H, Q] quantile forecasts, or None
    y: np.ndarray | None        # [N, H] actuals (backtests), or None
    mask: np.ndarray | None     # [N, H] 1 where the actual was observed


@torch.no_grad()
def predict(model: nn.Module, loader: WindowLoader, index: WindowIndex, *, quantiles=(),
            with_target: bool = True, batch_size: int = 4096) -> Predictions:
    """Forecasts for the windows of `index`; with_target=False for windows whose horizon lies
    beyond the data (the final forecast)."""
    model.eval()
    device = loader.device
    model.to(device)
    qs, acts, masks = [], [], []
    for b in loader.batches(index, batch_size, with_target=with_target):
        out = model(b.x, b.xf, b.static, b.idx).float()                   # [B, H, Q]
        shape = (-1, 1, 1)
        out = out * b.scale.reshape(shape) + b.loc.reshape(shape)         # original units
        qs.append(out.cpu())
        if with_target:
            acts.append((b.y * b.scale[:, None] + b.loc[:, None]).cpu())
            masks.append(b.y_mask.cpu())
    q = torch.cat(qs).numpy() if qs else np.zeros((0, loader.H, max(len(quantiles), 1)))
    point = q[..., _median_channel(quantiles)] if len(quantiles) else q[..., 0]
    return Predictions(
        series=index.series.copy(), origin=index.start + loader.L, y_hat=point,
        q_hat=q if len(quantiles) else None,
        y=torch.cat(acts).numpy() if acts else None,
        mask=torch.cat(masks).numpy() if masks else None)


def predict_job(model: nn.Module, arrays: SeriesArrays, cfg: Config, cutoff: np.ndarray,
                eligible: np.ndarray, *, quantiles=(), with_target: bool = True,
                device="cpu", loader: WindowLoader | None = None,
                batch_size: int = 4096) -> Predictions:
    """Forecasts of a job's model from each eligible series' position `cutoff[s]` ([S]; `eligible`
    [S] bool): with_target=True the backtest window (its target [c, c + H) known, returned as
    actuals), False the forecast past c (the final forecast: cutoff = the lengths). `loader`:
    `loader_at(arrays, cfg, cutoff, device)` when the caller has one. An Ensemble predicts with
    each member on its own windows (its lookback, ending at the same origin) and combines the
    forecasts in original units over the members that can forecast each series; series none
    can forecast are left out. Runs under `train.threads`, as the training did: the float sums
    of a forward pass may depend on the number of threads."""
    with torch_threads(cfg.train.threads):
        return _predict_job(model, arrays, cfg, cutoff, eligible, quantiles, with_target,
                            loader or loader_at(arrays, cfg, cutoff, device), batch_size)


def _predict_job(model, arrays, cfg, cutoff, eligible, quantiles, with_target, loader,
                 batch_size) -> Predictions:
    if not isinstance(model, Ensemble):
        idx = _windows(arrays, cfg.windows, cutoff, eligible, with_target)
        return predict(model, loader, idx, quantiles=quantiles, with_target=with_target,
                       batch_size=batch_size)
    preds = []
    for member, lookback in zip(model.members, model.lookbacks, strict=True):
        wcfg = dataclasses.replace(cfg.windows, lookback=lookback, lookback_horizons=None)
        idx = _windows(arrays, wcfg, cutoff, eligible, with_target)
        preds.append(predict(member, loader.with_lookback(lookback), idx, quantiles=quantiles,
                             with_target=with_target, batch_size=batch_size))
    return _combined(preds, model.combine, arrays, cutoff, loader.H, quantiles, with_target)


def _windows(arrays: SeriesArrays, wcfg: WindowsConfig, cutoff: np.ndarray,
             eligible: np.ndarray, with_target: bool) -> WindowIndex:
    if with_target:
        return backtest_windows(cutoff, arrays.lengths, wcfg, eligible)
    return forecast_windows(np.asarray(cutoff), wcfg.lookback, eligible, wcfg.padded)


def _combined(preds: list[Predictions], how: str, arrays: SeriesArrays, cutoff: np.ndarray,
              horizon: int, quantiles, with_target: bool) -> Predictions:
    """The members' predictions combined per series, step and quantile; the actuals from the
    arrays."""
    series = np.unique(np.concatenate([p.series for p in preds])).astype(np.int32)   # sorted
    n_q = max(len(quantiles), 1)
    stack = np.full((len(preds), len(series), horizon, n_q), np.nan, np.float32)
    covered = np.zeros((len(preds), len(series)), bool)
    for k, p in enumerate(preds):
        rows = np.searchsorted(series, p.series)
        stack[k, rows] = p.q_hat if len(quantiles) else p.y_hat[..., None]  # [N, H] -> [N, H, 1]
        covered[k, rows] = True
    q = combine(stack, how, covered)
    origin = np.asarray(cutoff)[series].astype(np.int64)
    y = mask = None
    if with_target:
        rows = (arrays.indptr[series] + origin)[:, None] + np.arange(horizon)    # [N, H]
        y, mask = arrays.values[rows], arrays.mask[rows].astype(np.float32)
    point = q[..., _median_channel(quantiles)] if len(quantiles) else q[..., 0]
    return Predictions(series=series, origin=origin, y_hat=point,
                       q_hat=q if len(quantiles) else None, y=y, mask=mask)


def _median_channel(quantiles) -> int:
    return int(np.argmin(np.abs(np.asarray(quantiles) - 0.5)))


def step_times(arrays: SeriesArrays, series: np.ndarray, origin: np.ndarray, horizon: int
               ) -> np.ndarray:
    """[N, H] int64 grid ordinals of forecast steps `origin .. origin + H - 1`."""
    steps = origin[:, None].astype(np.int64) + np.arange(horizon)[None, :]
    return arrays.start[series][:, None] + steps * arrays.freq.step


def history(arrays: SeriesArrays, series: np.ndarray, end: np.ndarray) -> list[np.ndarray]:
    """values[0:end[i]] of each series i (views, no copy)."""
    return [arrays.values[arrays.indptr[s]:arrays.indptr[s] + e]
            for s, e in zip(series.tolist(), np.asarray(end).tolist(), strict=True)]


def observed(arrays: SeriesArrays, series: np.ndarray) -> np.ndarray:
    """[N] bool: whether each of `series` has at least one observed value (`mask` 1). A series
    whose every value was NaN/inf is zero-filled on the grid (`pipeline.data.fill`); those
    zeros are no data to forecast from."""
    counts = np.r_[0, np.cumsum(arrays.mask, dtype=np.int64)]
    return counts[arrays.indptr[series + 1]] > counts[arrays.indptr[series]]


def long_frame(arrays: SeriesArrays, series: np.ndarray, origin: np.ndarray, y_hat: np.ndarray,
               model: str, *, quantiles=(), q_hat: np.ndarray | None = None,
               y: np.ndarray | None = None, extra: dict | None = None) -> dict[str, np.ndarray]:
    """Columns of the long output: unique_id, ds, cutoff, step, y_hat[, q_…][, y], model, group.
    `ds` and `cutoff` (the last step known when forecasting) are grid ordinals of
    `arrays.freq` (`pipeline.outputs.partitions.to_table` writes them as the input held time)."""
    n, h = y_hat.shape
    times = step_times(arrays, series, origin, h)
    rep = np.repeat
    cols = {   # ids and groups as object arrays: each row points at its series' one string
        "unique_id": rep(_strings(arrays.ids[series]), h),
        "ds": times.reshape(-1),                                          # [N, H] -> [N*H]
        "cutoff": rep(times[:, 0] - arrays.freq.step, h),
        "step": np.tile(np.arange(1, h + 1, dtype=np.int16), n),
        "y_hat": y_hat.reshape(-1).astype(np.float32),
    }
    for j, q in enumerate(quantiles):
        cols[quantile_column(q)] = q_hat[..., j].reshape(-1).astype(np.float32)
    if y is not None:
        cols["y"] = y.reshape(-1).astype(np.float32)
    cols["model"] = np.full(n * h, model, dtype=object)
    groups = _strings(arrays.groups[series]) if arrays.groups is not None else \
        np.full(n, "", dtype=object)
    cols["group"] = rep(groups, h)
    for k, v in (extra or {}).items():
        cols[k] = np.full(n * h, v, dtype=object) if np.isscalar(v) else rep(v, h)
    return cols


def _strings(values: np.ndarray) -> np.ndarray:
    """[N] values as an object array of Python str (one per series, not per row)."""
    return values.astype(str).astype(object)


def quantile_column(q: float) -> str:
    """0.1 -> 'q_0.1', 0.95 -> 'q_0.95'."""
    return f"q_{q:g}"
