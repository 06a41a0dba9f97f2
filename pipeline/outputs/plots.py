"""Plots (PNG): for a sample of series, recent history, the latest backtest against the actuals
with the baselines at its cutoff, and the forecast with its quantile band; and the distribution
of per-series errors. Written next to the other outputs, or returned as bytes (the HTML report
inlines them). matplotlib is imported only when something is drawn."""
from __future__ import annotations

import io
import os

import numpy as np

from pipeline.data.calendar import to_datetime64
from pipeline.names import safe_key

BASELINE_STYLE = {"seasonal_naive": ("--", "tab:green", "seasonal naive"),
                  "naive": (":", "tab:purple", "naive"),   # name -> (line style, colour, label)
                  "auto_ets": ("-.", "tab:red", "AutoETS"),      # the comparators
                  "auto_theta": ("-.", "tab:brown", "AutoTheta"),
                  "auto_arima": ("-.", "tab:pink", "AutoARIMA"),
                  "dynamic_theta": ("-.", "tab:cyan", "DynamicOptimizedTheta"),
                  "combination": ("-.", "tab:olive", "combination")}
OTHER_STYLE = ("-", "0.6")       # a model without a style of its own (the network, drawn
                                 # beside a comparator that was published)


def _pyplot():
    import matplotlib  # optional: only runs with evaluate.plots > 0 or a report need it
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    return plt


def value_label(cfg) -> str:
    """What the series' values are called on axes: `data.unit` when set, else the target
    column's name."""
    return cfg.data.unit or cfg.data.target_col


def _png(fig) -> bytes:
    """The figure as PNG bytes, cropped to what it draws (no label or legend cut off at its
    edge); the figure is closed."""
    buf = io.BytesIO()
    try:
        fig.savefig(buf, format="png", bbox_inches="tight", pad_inches=0.1)
    finally:
        _pyplot().close(fig)
    return buf.getvalue()


def render_series(sid: str, hist_t, hist_y, bt: dict | None, fc: dict | None,
                  baselines: dict | None = None, ylabel: str = "y") -> bytes:
    """One series' figure as PNG bytes. bt/fc: {'ds', 'y_hat', 'model', optional 'lo', 'hi'}
    arrays of one series (the latest backtest, the forecast); baselines: {'naive' |
    'seasonal_naive': {'ds', 'y_hat'}} at the backtest's cutoff."""
    fig, ax = _pyplot().subplots(figsize=(10, 3.4), dpi=100)
    ax.plot(hist_t, hist_y, color="0.3", lw=1, label="actual")
    for name, b in (baselines or {}).items():
        style, colour, label = BASELINE_STYLE.get(name, (*OTHER_STYLE, name))
        ax.plot(b["ds"], b["y_hat"], ls=style, color=colour, lw=1.2, label=label)
    for part, colour, what in ((bt, "tab:orange", "backtest"), (fc, "tab:blue", "forecast")):
        if part is None:
            continue
        ax.plot(part["ds"], part["y_hat"], color=colour, lw=1.4,
                label=f"{what} ({part['model']})")
        if "lo" in part:
            ax.fill_between(part["ds"], part["lo"], part["hi"], color=colour, alpha=0.18,
                            lw=0, label=f"{what} interval")
    ax.set_title(str(sid), fontsize=10, parse_math=False)    # an id is text, never mathtext
    ax.set_xlabel("step" if np.issubdtype(np.asarray(hist_t).dtype, np.integer) else "time")
    ax.set_ylabel(ylabel)
    ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0))   # beside the data
    fig.autofmt_xdate()
    fig.tight_layout()
    return _png(fig)


def plot_series(path: str, sid: str, hist_t, hist_y, bt: dict | None, fc: dict | None,
                baselines: dict | None = None, ylabel: str = "y") -> None:
    """One PNG file of `render_series`."""
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "wb") as f:
        f.write(render_series(sid, hist_t, hist_y, bt, fc, baselines, ylabel))


def choose(forecasts: dict, n: int) -> list[str]:
    """`n` series ids to draw: the first (sorted) that have a model forecast, then, when some
    series got the fallback, the first of those in a third of the places (at least one, with
    n >= 2); fallbacks fill the places model forecasts do not."""
    if n <= 0 or not forecasts or not len(forecasts["unique_id"]):
        return []
    ids = np.asarray(forecasts["unique_id"]).astype(str)
    fell = np.char.startswith(np.asarray(forecasts["model"]).astype(str), "fallback")
    model, fallback = sorted(set(ids[~fell])), sorted(set(ids[fell]) - set(ids[~fell]))
    k = min(len(fallback), max(1, n // 3)) if n >= 2 and fallback else 0
    model = model[:n - k]
    return [str(i) for i in model + fallback[:n - len(model)]]


def series_png(arrays, sid: str, forecasts: dict | None, backtest: dict | None, horizon: int,
               quantiles=(), ylabel: str = "y") -> bytes:
    """The figure of series `sid` as PNG bytes: its last 5 horizons of history, its latest
    backtest and the baselines at that cutoff (from the long backtest columns), its forecast
    (from the long forecast columns); bands from the lowest and highest quantile."""
    s = int(np.flatnonzero(arrays.ids.astype(str) == sid)[0])
    y = arrays.series(s)
    keep = min(len(y), 5 * horizon)
    t = arrays.start[s] + np.arange(len(y) - keep, len(y)) * arrays.freq.step   # ordinals
    fc = _pick(forecasts, np.asarray(forecasts["unique_id"]).astype(str) == sid, quantiles,
               arrays.freq) if forecasts else None
    bt, baselines = latest_backtest(backtest, sid, quantiles, arrays.freq,
                                    fc["model"] if fc else None) if backtest else (None, {})
    return render_series(sid, to_datetime64(t, arrays.freq), y[-keep:], bt, fc, baselines,
                         ylabel)


def plot_sample(out_dir: str, arrays, forecasts: dict, backtest: dict | None, n: int,
                horizon: int, quantiles=(), ylabel: str = "y") -> list[str]:
    """PNGs for the first `n` series (by id) that have a model forecast; returns the paths."""
    paths = []
    for sid in choose(forecasts, n):
        path = os.path.join(out_dir, f"{safe_key(sid)}.png")   # ids are data, not paths
        os.makedirs(out_dir, exist_ok=True)
        with open(path, "wb") as f:
            f.write(series_png(arrays, sid, forecasts, backtest, horizon, quantiles, ylabel))
        paths.append(path)
    return paths


def latest_backtest(cols: dict, sid: str, quantiles, freq, published: str | None = None
                    ) -> tuple[dict | None, dict]:
    """The backtest of `sid` at its latest cutoff of one model — the `published` one (whose
    forecast was written) when it has one there, else the network's — and every other model's
    forecast at that cutoff ({name: columns}: baselines, comparators, the combination), one
    line each. (None, {}) without a backtest."""
    ids = np.asarray(cols["unique_id"]).astype(str)
    models = np.asarray(cols["model"]).astype(str)
    mine = ids == sid
    base = np.isin(models, list(BASELINE_STYLE))
    pool = mine & ~base if (mine & ~base).any() else mine
    if not pool.any():
        return None, {}
    at = mine & (cols["cutoff"] == cols["cutoff"][pool].max())
    there = list(dict.fromkeys(models[at]))
    first = [m for m in there if m not in BASELINE_STYLE] or [None]
    main = published if published in there else first[0]
    bt = _pick(cols, at & (models == main), quantiles, freq) if main is not None else None
    return bt, {m: _pick(cols, at & (models == m), (), freq) for m in there if m != main}


def _pick(cols: dict, rows: np.ndarray, quantiles, freq) -> dict | None:
    """{'ds', 'y_hat', 'model'[, 'lo', 'hi']} of the selected rows; None when there are none."""
    if not rows.any():
        return None
    out = {"ds": to_datetime64(cols["ds"][rows], freq), "y_hat": cols["y_hat"][rows],
           "model": str(np.asarray(cols["model"])[rows][0])}
    have = [q for q in quantiles if f"q_{q:g}" in cols      # the band: the widest present
            and np.isfinite(cols[f"q_{q:g}"][rows]).any()]    # (a fallback has none)
    if len(have) >= 2:
        out["lo"], out["hi"] = cols[f"q_{min(have):g}"][rows], cols[f"q_{max(have):g}"][rows]
    return out


def quantiles_of(*frames: dict | None) -> list[float]:
    """The quantiles of the long columns' `q_…` columns (a model's, or conformal intervals'),
    ascending: what the bands are drawn from."""
    return sorted({float(k[2:]) for f in frames if f for k in f if k.startswith("q_")})


def error_histograms(model: str, model_mase: np.ndarray, base_mase: np.ndarray,
                     skill: np.ndarray) -> bytes:
    """Two panels as PNG bytes: per-series MASE of `model` and of seasonal naive (shared bins,
    the tail beyond the 99th percentile in the last bin), and per-series skill
    1 - MASE / MASE of seasonal naive (clipped to [-2, 1])."""
    fig, (left, right) = _pyplot().subplots(1, 2, figsize=(10, 3.4), dpi=100)
    both = np.concatenate([model_mase, base_mase])
    top = float(np.percentile(both, 99)) if both.size else 1.0
    bins = np.linspace(0.0, max(top, 1e-9), 31)
    for values, colour, label in ((model_mase, "tab:blue", model),
                                  (base_mase, "tab:green", "seasonal naive")):
        left.hist(np.clip(values, 0, bins[-1]), bins=bins, color=colour, alpha=0.55,
                  label=f"{label} (median {np.median(values):.3f})" if values.size else label)
    left.set_xlabel(f"MASE per series (the last bin: all above {bins[-1]:.2f})")
    left.set_ylabel("series")
    left.legend(fontsize=7)
    right.hist(np.clip(skill, -2.0, 1.0), bins=np.linspace(-2.0, 1.0, 31), color="tab:orange")
    right.axvline(0.0, color="0.2", lw=1, ls="--")
    right.set_xlabel(f"skill vs seasonal naive (1 − MASE ratio, clipped at −2)\nof {model}",
                     parse_math=False)
    right.set_ylabel("series")
    fig.tight_layout()
    return _png(fig)
