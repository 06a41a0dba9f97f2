"""Predictions in original units: a trained model over a window index, and the frames the
pipeline writes (DESIGN.md §3): one row per (series, forecast step).

`predict` gathers the windows' lookbacks (and, for backtests, the actuals), runs the model in
eval mode and inverts the per-series scaling. Imports neither Ray nor MLflow.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from pipeline.data.loader import WindowLoader
from pipeline.data.series import SeriesArrays
from pipeline.data.windows import WindowIndex


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


def long_frame(arrays: SeriesArrays, series: np.ndarray, origin: np.ndarray, y_hat: np.ndarray,
               model: str, *, quantiles=(), q_hat: np.ndarray | None = None,
               y: np.ndarray | None = None, extra: dict | None = None) -> dict[str, np.ndarray]:
    """Columns of the long output: unique_id, ds, cutoff, step, y_hat[, q_…][, y], model, group.
    `ds` and `cutoff` (the last step known when forecasting) are grid ordinals of
    `arrays.freq` (`pipeline.output.to_table` writes them as the input held time)."""
    n, h = y_hat.shape
    times = step_times(arrays, series, origin, h)
    rep = np.repeat
    cols = {
        "unique_id": rep(arrays.ids[series].astype(str), h),
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
    groups = arrays.groups[series].astype(str) if arrays.groups is not None else \
        np.full(n, "", dtype=object)
    cols["group"] = rep(groups, h)
    for k, v in (extra or {}).items():
        cols[k] = np.full(n * h, v, dtype=object) if np.isscalar(v) else rep(v, h)
    return cols


def quantile_column(q: float) -> str:
    """0.1 -> 'q_0.1', 0.95 -> 'q_0.95'."""
    return f"q_{q:g}"
