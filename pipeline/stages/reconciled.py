"""Coherent forecasts over `data.hierarchy` (issue #30): the run's forecast of every level
(`pipeline.stages.levels` put the aggregated series in the arrays) reconciled with
`reconcile.method`, written with the bottom in today's forecast partition and each aggregate
level in its own, and the backtest scored per level before and after reconciliation.

Residuals (MinTrace's `wls_var`, `mint_shrink`, `mint_cov`) come from the backtest windows:
per series, the actuals and the predictions of the candidate its forecast was published from
(the network, a comparator; the seasonal-naive baseline for a fallback forecast) at every
backtest cutoff and step. Where the backtest did not score a series (too short, a cutoff it
missed, a flow without a backtest), in-sample seasonal-naive residuals at the same positions
from its end stand in (`y[t] - y[t - m]`); a position before a series' first step is 0 in
actuals and prediction (the series adds nothing to its parents there), masked out of the
scores. The per-level backtest scores (`level_metrics`) reconcile each cutoff leave-one-cutoff-
out: its residuals are the other cutoffs' (less any step of its own window, when cutoffs
overlap), with one window the in-sample seasonal-naive residuals of the `horizon` steps
before it, so a scored window's own errors never weigh its reconciliation (they would flatter
it). Residuals of later cutoffs do weigh an earlier one: leave-one-out, not time-ordered.

Quantiles (`reconcile.intervals`): `normality` (the default) gives each series the quantiles
of the reconciled Gaussian (`pipeline.hierarchy.probabilistic`): the mean is coherent, the
quantiles are in order and the median is the reconciled mean, but a parent's quantile is not
the sum of its children's (quantiles do not add). `quantiles` reconciles each quantile column
like the mean: every column coherent, but under MinTrace they may cross.

Clipping (`output.clip_at_zero` true): the reconciled bottom forecasts (and, with
`quantiles`, quantiles) are clipped as today, then every aggregate is summed from them again
(bottom-up), so parents still equal the sum of their children. With `normality` the quantiles
are clipped at zero after they are computed, row by row (the bottom's as the published
forecast's), not summed: the median is then the unclipped reconciled mean, clipped.

The whole forecast is reconciled at once (every level's rows in memory: the chunking of
`evaluate.chunk_series` does not bound a hierarchy's forecast), then written in chunks.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field

import numpy as np
import polars as pl
import pyarrow as pa

from pipeline.evaluation import metrics as E
from pipeline.forecasting.backtest import ZeroHistory, season_of
from pipeline.forecasting.select import published, series_keys
from pipeline.hierarchy.reconcile import reconcile
from pipeline.names import safe_key
from pipeline.outputs import partitions as output

SLOTS = ("y", "y_hat", "mask")


@dataclass
class Coherence:
    """What reconciliation did: the method asked and used, why they differ, seconds, and the
    per-level scores of the backtest (base and reconciled)."""
    method: str
    method_used: str
    note: str | None
    seconds: float
    level_metrics: pl.DataFrame | None = None
    paths: list[str] = field(default_factory=list)   # what `scored_levels` wrote


def published_models(cols: dict, h: int) -> dict[str, str]:
    """{series id: the backtest candidate its forecast came from} (a fallback's baseline)."""
    ids, models = cols["unique_id"][::h].astype(str), cols["model"][::h].astype(str)
    return {i: m.split(":", 1)[1] if m.startswith("fallback:") else m
            for i, m in zip(ids, models, strict=True)}


def backtest_slots(arrays, cfg, blocks: list, models: dict[str, str]) -> dict[str, np.ndarray]:
    """{y, y_hat, mask} `[n_series, n_windows, h]`: each series' backtest actuals and its
    published candidate's predictions (see the module's docstring), in the arrays' order."""
    w, n = cfg.windows, len(arrays)
    K, h = w.n_windows, w.horizon
    out = {k: np.full((n, K, h), np.nan) for k in SLOTS}
    ids = arrays.ids.astype(str)
    for blk in blocks:
        if blk.k >= K:
            continue
        mine = np.array([models.get(ids[s]) == blk.model for s in blk.series], bool)
        for key, value in zip(SLOTS, (blk.y, blk.y_hat, blk.mask), strict=True):
            out[key][blk.series[mine], blk.k] = value[mine]
    missing = np.flatnonzero(np.isnan(out["y_hat"]).any(axis=(1, 2)))
    pos = (arrays.lengths[missing, None, None] - h - np.arange(K)[None, :, None] * w.step
           + np.arange(h)[None, None, :])                               # [M, K, h]
    naive = seasonal_naive(arrays, season_of(cfg, arrays), missing, pos)
    gap = np.isnan(out["y_hat"][missing])                   # only the slots without a block
    for key in SLOTS:
        out[key][missing] = np.where(gap, naive[key], out[key][missing])
    return out


def seasonal_naive(arrays, m: int, series: np.ndarray, pos: np.ndarray) -> dict:
    """{y, y_hat, mask} at positions `pos` (`[len(series), ...]`, steps from each series'
    start) of `series`: the actuals and `y[t - m]`; a position before the series' first step
    is 0 in all three."""
    expand = (slice(None),) + (None,) * (pos.ndim - 1)
    inside = pos >= 0
    at = arrays.indptr[series][expand] + np.maximum(pos, 0)
    lag = arrays.indptr[series][expand] + np.maximum(pos - m, 0)
    return {k: np.where(inside, v, 0.0) for k, v in
            (("y", arrays.values[at]), ("y_hat", arrays.values[lag]), ("mask", arrays.mask[at]))}


def reconcile_forecast(data, cols: dict, cfg, slots: dict | None) -> tuple[dict, Coherence]:
    """The long forecast columns of every series with `y_hat` and the quantile columns
    reconciled across the levels (`slots`: `backtest_slots`, the residuals), clipped as
    the module says."""
    t0, arrays, lv, h = time.perf_counter(), data.arrays, data.levels, cfg.windows.horizon
    ids = cols["unique_id"][::h].astype(str)
    where = {i: k for k, i in enumerate(ids)}
    order = np.array([where[str(arrays.ids[r])] for r in lv.rows])   # S rows → forecast rows
    qcols = sorted((c for c in cols if c.startswith("q_")), key=lambda c: float(c[2:]))
    base = cols["y_hat"].reshape(-1, h)[order].astype(np.float64)
    q = np.stack([cols[c].reshape(-1, h)[order] for c in qcols], -1).astype(np.float64) \
        if qcols else None
    notes = []
    none = ~np.isfinite(base).all(axis=1)    # no usable value: no forecast, 0 to its parents
    if none.any():
        base[none] = 0
        notes.append(f"{int(none.sum())} series without a finite forecast counted as 0")
    if q is not None and not np.isfinite(q[~none]).all():
        q = None
        notes.append("quantiles not reconciled: some series have none")
    elif q is not None:
        q[none] = 0
    insample = fitted = None
    if slots is not None:
        insample, fitted = (slots[k].reshape(len(arrays), -1)[lv.rows] for k in SLOTS[:2])
    method = cfg.reconcile.resolved(lv.S.shape[0])
    rec = reconcile(base, lv.S, lv.tags, method, insample, fitted, q,
                    cfg.reconcile.intervals, np.array([float(c[2:]) for c in qcols]))
    mean, rq = _clipped(data, cfg, rec.mean, rec.quantiles)
    mean[none] = np.nan                     # they keep their NaN forecast rows
    if rq is not None:
        rq[none] = np.nan
    out = dict(cols)
    out["y_hat"] = _put(cols["y_hat"], mean, order, h)
    for j, c in enumerate(qcols if rq is not None else ()):
        out[c] = _put(cols[c], rq[..., j], order, h)
    note = "; ".join(filter(None, [rec.note, *notes])) or None
    return out, Coherence(method, rec.method_used, note, time.perf_counter() - t0)


def _put(column: np.ndarray, values: np.ndarray, order: np.ndarray, h: int) -> np.ndarray:
    out = column.reshape(-1, h).astype(np.float32).copy()
    out[order] = values
    return out.reshape(-1)


def _clipped(data, cfg, mean: np.ndarray, q: np.ndarray | None):
    """`output.clip_at_zero` true: the bottom rows clipped as the published forecast is,
    every row's mean then summed from them (S @ bottom); the quantiles too with
    `reconcile.intervals: quantiles`, with `normality` each row's clipped at zero where it
    is (the bottom's as the published forecast's)."""
    if cfg.output.clip_at_zero is not True:
        return mean, q
    lv, arrays = data.levels, data.arrays
    n_b = lv.S.shape[1]
    bottom = lv.rows[-n_b:]
    b_mean, b_q = ZeroHistory(arrays).clip(bottom, arrays.lengths, mean[-n_b:],
                                            None if q is None else q[-n_b:])
    mean = lv.S @ b_mean
    if q is not None and cfg.reconcile.intervals == "normality":
        q = np.concatenate([np.maximum(q[:-n_b], 0), b_q])
    elif q is not None:
        q = np.stack([lv.S @ b_q[..., j] for j in range(q.shape[-1])], -1)
    return mean, q


def held_out(cfg, k: int) -> np.ndarray:
    """`[n_windows * h]` bool: the backtest slots (cutoff, step, flattened as `backtest_slots`
    lays them) whose residuals may weigh cutoff `k`'s reconciliation: every other cutoff's,
    less any step inside cutoff `k`'s own window (cutoffs `step` < `horizon` apart overlap)."""
    w = cfg.windows
    k2, j = np.meshgrid(np.arange(w.n_windows), np.arange(w.horizon), indexing="ij")
    offset = (k - k2) * w.step + j           # steps after cutoff k's first scored step
    return ((offset < 0) | (offset >= w.horizon)).reshape(-1)


def reconciled_windows(data, cfg, slots: dict, method: str) -> tuple[np.ndarray, list[str]]:
    """`[S rows, n_windows, h]`: each backtest cutoff's base forecasts (`slots`, in S's row
    order via `data.levels.rows`) reconciled with `method`, leave-one-cutoff-out: cutoff k's
    MinTrace residuals are the other cutoffs' (`held_out`), never its own window's errors.
    With one window (or none left) they are in-sample seasonal-naive residuals of the
    `horizon` steps just before cutoff k (`seasonal_naive`), all before the scored window.
    And the method each cutoff used (fewer residuals than the forecast's may make MinTrace
    fall back where the forecast's did not)."""
    arrays, lv, w = data.arrays, data.levels, cfg.windows
    y, y_hat = (slots[k][lv.rows] for k in SLOTS[:2])
    n, h = len(lv.rows), w.horizon
    m = season_of(cfg, arrays)
    rec, used = np.empty_like(y_hat), []
    for k in range(w.n_windows):
        keep = held_out(cfg, k)
        if keep.sum() >= 2:
            insample, fitted = y.reshape(n, -1)[:, keep], y_hat.reshape(n, -1)[:, keep]
        else:
            first = arrays.lengths[lv.rows] - h - k * w.step            # the window's start
            naive = seasonal_naive(arrays, m, lv.rows, first[:, None] - h + np.arange(h))
            insample, fitted = naive["y"], naive["y_hat"]
        out = reconcile(y_hat[:, k], lv.S, lv.tags, method, insample, fitted)
        rec[:, k] = out.mean
        used.append(out.method_used)
    return rec, used


def level_metrics(data, cfg, slots: dict, method: str, models: dict[str, str] | None = None
                  ) -> pl.DataFrame:
    """Per level, cutoff by cutoff, the backtest's base forecasts (`slots`) and those
    reconciled with `method` (`reconciled_windows`: leave-one-cutoff-out residuals, so the
    scored window's own errors never weigh its reconciliation) scored: MASE and sMAPE (the
    means over the level's series and cutoffs) and WAPE (over them together); `method`: the
    methods the cutoffs used, in order of first use ("mint_shrink, wls_struct": some fell
    back); `published`: the candidates the level's base forecasts came from (`models`, {series
    id: candidate}), most series first."""
    arrays, lv, w = data.arrays, data.levels, cfg.windows
    y, y_hat, mask = (slots[k][lv.rows] for k in SLOTS)
    m = season_of(cfg, arrays)
    rec, used = reconciled_windows(data, cfg, slots, method)
    scale = np.empty(y.shape[:2])
    for k in range(w.n_windows):
        ends = arrays.lengths[lv.rows] - w.horizon - k * w.step
        scale[:, k] = E.mase_scale([arrays.series(r)[:max(e, 0)] for r, e in
                                    zip(lv.rows, ends, strict=True)], m)
    rows, start = [], 0
    for name, ids in lv.tags.items():
        sl = slice(start, start + len(ids))
        start += len(ids)
        published = _published(models or {}, ids)        # once per level, both rows
        for kind, pred in (("base", y_hat), ("reconciled", rec)):
            yy, pp, mm = y[sl].reshape(-1, w.horizon), pred[sl].reshape(-1, w.horizon), \
                mask[sl].reshape(-1, w.horizon)
            rows.append({"level": name, "forecast": kind, "series": len(ids),
                         "published": published,
                         "mase": _nanmean(E.mase(yy, pp, scale[sl].reshape(-1), mm)),
                         "smape": _nanmean(E.smape(yy, pp, mm)),
                         "wape": E.wape_overall(yy, pp, mm)})
    return pl.DataFrame(rows).with_columns(method=pl.lit(", ".join(dict.fromkeys(used))))


def _published(models: dict[str, str], ids) -> str:
    """'auto_ets' when every series of a level published it, else 'gru (9), auto_ets (3)'."""
    names, counts = np.unique([models.get(str(i), "") for i in ids], return_counts=True)
    order = np.lexsort((names, -counts))
    if len(names) == 1:
        return str(names[0])
    return ", ".join(f"{names[j]} ({counts[j]})" for j in order)


def _nanmean(v: np.ndarray) -> float:
    v = np.asarray(v, float)
    return float(np.nanmean(v)) if np.isfinite(v).any() else float("nan")


def coherent(b, data, fc, scored=None):
    """`fc` (a `stages.forecast.Forecast`, changed in place: the flow holds it) made whole and
    reconciled: its `make` gives the bottom series' reconciled rows (the aggregates' are in
    `Forecast.levels`), `Forecast.coherence` the Coherence with the backtest's per-level
    scores (with `scored`, a `stages.Scored`)."""
    cfg, arrays, h = b.cfg, data.arrays, b.cfg.windows.horizon
    cols, bad = fc.make(0, len(arrays))
    blocks = scored.backtest.blocks if scored is not None else []
    models = published_models(cols, h)
    slots = backtest_slots(arrays, cfg, blocks, models)
    cols, info = reconcile_forecast(data, cols, cfg, slots)
    if scored is not None:
        info.level_metrics = level_metrics(data, cfg, slots, info.method_used, models)
    place = {str(i): k for k, i in enumerate(arrays.ids.tolist())}
    at = np.array([place[str(i)] for i in cols["unique_id"][::h]])
    n_b = data.levels.S.shape[1]

    def make(lo: int, hi: int) -> tuple[dict, list[str]]:
        keep = np.repeat((at >= lo) & (at < hi) & (at < n_b), h)
        return {k: v[keep] for k, v in cols.items()}, bad if lo == 0 else []
    top = np.repeat(at >= n_b, h)
    fc.make, fc.levels, fc.coherence = make, {k: v[top] for k, v in cols.items()}, info
    return fc


def scored_levels(b, data, scored) -> Coherence:
    """A flow without a forecast (`backtest`): the backtest scored per level
    (`level_metrics`) for the candidates a forecast would publish (`evaluate.select`'s per
    group and level, else the default model; no fallback: the seasonal-naive stand-in where the
    backtest did not score a series), written beside `metrics` (`Coherence.paths`); the
    method is `reconcile.method` resolved, `seconds` the scoring's."""
    t0, cfg, arrays = time.perf_counter(), b.cfg, data.arrays
    models = {str(i): published(scored.selection, key, cfg)
              for i, key in zip(arrays.ids, series_keys(arrays), strict=True)}
    slots = backtest_slots(arrays, cfg, scored.backtest.blocks, models)
    method = cfg.reconcile.resolved(data.levels.S.shape[0])
    table = level_metrics(data, cfg, slots, method, models)
    used = table["method"][0]
    out = Coherence(method, used, None if used == method else
                    f"some or all backtest cutoffs reconciled with {used}",
                    time.perf_counter() - t0, table)
    out.paths = [output.write(cfg, "level_metrics", arrays.data_end(), table.to_arrow(),
                              b.flow)]
    return out


def write_levels(b, data, fc) -> list[str]:
    """Each aggregate level's reconciled rows (`fc.levels`) in its own partition,
    `<output.path>/forecast_levels/job=<name>/data_end=<end>/level=<level>/`: the forecast's
    columns with every level column after `unique_id` (null where the level does not use
    it, so the levels open as one dataset; the level is the partition key); and the
    per-level backtest scores (`level_metrics`, beside `metrics`)."""
    cfg, lv, end = b.cfg, data.levels, data.arrays.data_end()
    ids = fc.levels["unique_id"].astype(str)
    level_of, keys = lv.level_of(), lv.keys.rows_by_key("id", named=True, unique=True)
    types = {f.name: f.type for f in lv.keys.to_arrow().schema}
    level = np.array([level_of[i] for i in ids], dtype=object)
    written = []
    for name in list(lv.tags)[:-1]:
        sel = level == name
        table = output.frames_table([{k: v[sel] for k, v in fc.levels.items()}], b.run_id,
                                    data.arrays.freq, ["unique_id", "ds", "cutoff", "step",
                                                       "y_hat", *fc.columns, "model", "group"])
        for j, c in enumerate(lv.hierarchy.columns, 1):    # null where the level has none
            table = table.add_column(j, c, pa.array([keys[i][c] for i in ids[sel]],
                                                    types[c]))
        written.append(output.write(cfg, "forecast_levels", end, table, b.flow,
                                    {"level": safe_key(name.replace("/", "-"))}))
    scores = fc.coherence.level_metrics
    if scores is not None:
        written.append(output.write(cfg, "level_metrics", end, scores.to_arrow(), b.flow))
    return written
