"""Forecast plots (PNG) for a sample of series: recent history, the latest backtest against the
actuals, and the forecast with its quantile band. Written next to the other outputs."""
from __future__ import annotations

import os

import numpy as np

from pipeline.data.calendar import to_datetime64
from pipeline.names import safe_key


def plot_series(path: str, sid: str, hist_t, hist_y, bt: dict | None, fc: dict) -> None:
    """One PNG. bt/fc: {'ds', 'y_hat', optional 'lo', 'hi', 'y'} arrays of one series."""
    import matplotlib  # optional: only runs with evaluate.plots > 0 need it
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(9, 3.2), dpi=100)
    ax.plot(hist_t, hist_y, color="0.35", lw=1, label="history")
    if bt is not None:
        ax.plot(bt["ds"], bt["y_hat"], color="tab:orange", lw=1.2, label="backtest")
    ax.plot(fc["ds"], fc["y_hat"], color="tab:blue", lw=1.4, label=f"forecast ({fc['model']})")
    if "lo" in fc:
        ax.fill_between(fc["ds"], fc["lo"], fc["hi"], color="tab:blue", alpha=0.2,
                        label="interval")
    ax.set_title(str(sid), fontsize=10)
    ax.legend(fontsize=7, loc="upper left")
    fig.autofmt_xdate()
    fig.tight_layout()
    os.makedirs(os.path.dirname(path), exist_ok=True)
    fig.savefig(path)
    plt.close(fig)


def plot_sample(out_dir: str, arrays, forecasts: dict, backtest: dict | None, n: int,
                horizon: int, quantiles=()) -> list[str]:
    """PNGs for the first `n` series (by id) that have a model forecast; returns the paths."""
    if n <= 0 or not forecasts:
        return []
    ids = np.asarray(forecasts["unique_id"]).astype(str)
    models = np.asarray(forecasts["model"]).astype(str)
    chosen = sorted(set(ids[~np.char.startswith(models, "fallback")]))[:n] or sorted(set(ids))[:n]
    where = {s: i for i, s in enumerate(arrays.ids.astype(str))}
    paths = []
    for sid in chosen:
        s = where[sid]
        y = arrays.series(s)
        keep = min(len(y), 5 * horizon)
        t = arrays.start[s] + np.arange(len(y) - keep, len(y)) * arrays.freq.step   # ordinals
        fc = _pick(forecasts, sid, quantiles, arrays.freq)
        bt = _pick(backtest, sid, (), arrays.freq, latest=True) if backtest else None
        path = os.path.join(out_dir, f"{safe_key(sid)}.png")   # ids are data, not paths
        plot_series(path, sid, to_datetime64(t, arrays.freq), y[-keep:], bt, fc)
        paths.append(path)
    return paths


def _pick(cols: dict, sid: str, quantiles, freq, latest: bool = False) -> dict | None:
    rows = (np.asarray(cols["unique_id"]).astype(str) == sid)
    if latest:  # the model's rows at the latest backtest cutoff
        rows &= ~np.isin(np.asarray(cols["model"]).astype(str), ["naive", "seasonal_naive"])
        if not rows.any():
            return None
        rows &= cols["cutoff"] == cols["cutoff"][rows].max()
    out = {"ds": to_datetime64(cols["ds"][rows], freq), "y_hat": cols["y_hat"][rows],
           "model": str(np.asarray(cols["model"])[rows][0])}
    if len(quantiles) >= 2:
        out["lo"] = cols[f"q_{min(quantiles):g}"][rows]
        out["hi"] = cols[f"q_{max(quantiles):g}"][rows]
    return out
