"""The page's series sections: one row per series (published model, backtest MASE against
seasonal naive, the next values) sorted and filtered by the page's script, the forecast as a
`data:` CSV link, the fallback series and why, and the sample of series drawn
(`pipeline.outputs.html` assembles the page)."""
from __future__ import annotations

import base64
import math
from dataclasses import dataclass, field

import numpy as np
import polars as pl
import pyarrow as pa
import pyarrow.parquet as pq

from pipeline.data import grid
from pipeline.data.io import filesystem_for
from pipeline.data.series import STATUS
from pipeline.forecasting.backtest import concat_columns
from pipeline.outputs import plots
from pipeline.outputs.htmlkit import (
    CSV_ROW_BYTES,
    _img,
    _num_cell,
    _table,
    _values_note,
    esc,
)
from pipeline.secrets import redact

SERIES_ROWS = 1000         # rows of the per-series table at most: beyond, the highest MASE


NEXT_STEPS = 6             # forecast steps per series in the table


FALLBACKS_SHOWN = 200      # rows of the fallback table at most


CSV_BYTES = 4 * 2 ** 20    # the forecast's CSV is linked (inlined) up to this size


@dataclass
class _View:
    """What several sections read, computed once: the forecast's rows as the output holds
    them (`frame`: unique_id, group, ds, step, model, y_hat, q_…; every step when `whole`,
    else the first NEXT_STEPS; None without a forecast), one row per series (`series`:
    unique_id, group, model, next: the first NEXT_STEPS values), why each fallback series got
    the fallback (`reasons`), the backtest's per-series metric columns (`metrics`), and where
    the rows came from (`source`: '' when read back whole, else a note)."""
    frame: pl.DataFrame | None = None
    whole: bool = False
    series: pl.DataFrame | None = None
    reasons: dict[str, str] = field(default_factory=dict)
    metrics: dict | None = None
    source: str = ""

    @classmethod
    def of(cls, b, o) -> _View:
        metrics = (concat_columns(o.scored.backtest.metrics)
                   if o.scored is not None and o.scored.backtest.metrics else None)
        if o.forecast is None or o.data is None:
            return cls(metrics=metrics)
        frame, whole, source = _forecast_rows(o.forecast, o.data.arrays.freq,
                                              b.cfg.windows.horizon)
        if frame is None or not len(frame):
            return cls(metrics=metrics, source=source)
        series = (frame.filter(pl.col("step") <= NEXT_STEPS).sort("unique_id", "step")
                  .group_by("unique_id", maintain_order=True)
                  .agg(pl.col("group").first(), pl.col("model").first(),
                       pl.col("y_hat").alias("next")))
        fell = series.filter(pl.col("model").str.starts_with("fallback"))
        return cls(frame, whole, series, _fallback_reasons(b, o, fell["unique_id"].to_list()),
                   metrics, source)


def _forecast_rows(fc, freq, horizon: int) -> tuple[pl.DataFrame | None, bool, str]:
    """(rows, whether every step of every series is there, a note when not every series is):
    the forecast read back from its Parquet partition — every row when its CSV may be small
    enough to link, else the first NEXT_STEPS steps — or, with nothing to read back (a Delta
    table, a forecast not written), the rows kept in memory (`Forecast.cols`: the drawn
    series' once written)."""
    if fc.path and not fc.delta:
        whole = fc.n_series * horizon * CSV_ROW_BYTES <= CSV_BYTES
        try:
            fs, path = filesystem_for(fc.path)
            table = pq.read_table(path, filesystem=fs, filters=None if whole else
                                  [("step", "<=", NEXT_STEPS)])
        except (OSError, pa.ArrowException) as e:
            return None, False, f"the forecast could not be read back ({esc(redact(str(e)))})"
        frame = pl.from_arrow(table.drop_columns([c for c in ("cutoff", "run_id", "created_at")
                                                  if c in table.column_names]))
        return _ordered(frame), whole, ""
    cols = fc.cols
    if not cols or not len(cols["unique_id"]):
        return None, False, ""
    table = pa.table({k: grid.to_arrow(v, freq) if k == "ds" else pa.array(np.asarray(v))
                      for k, v in cols.items() if k != "cutoff"})
    source = ("" if not fc.path else
              f"only the {len(set(map(str, cols['unique_id']))):,} series the run kept for its "
              f"drawings: the forecast went to a Delta table ({esc(redact(fc.path))}), which "
              "this page does not read back")
    return _ordered(pl.from_arrow(table)), not fc.path, source


def _ordered(frame: pl.DataFrame) -> pl.DataFrame:
    """The forecast's columns a reader wants, in order, rows by series and step."""
    quantiles = sorted((c for c in frame.columns if c.startswith("q_")), key=lambda c: float(c[2:]))
    return frame.select("unique_id", "group", "ds", "step", "model", "y_hat",
                        *quantiles).sort("unique_id", "step")


def _fallback_reasons(b, o, ids: list[str]) -> dict[str, str]:
    """{series id: why it got the fallback forecast} of the fallback series `ids`: skipped by
    validation (the report's issue and detail), its job failed to train or forecast, no
    champion registered for it, or no model forecast for it."""
    if not ids:
        return {}
    arrays, fc = o.data.arrays, o.forecast
    rep = o.data.report.filter(pl.col("action") == "skipped")
    skipped = {}
    for r in rep.iter_rows(named=True):
        skipped.setdefault(str(r["series"]), f"{r['issue']}: {r['detail']}")
    position = {str(i): k for k, i in enumerate(arrays.ids.tolist())}
    owner = np.full(len(arrays), "", object)
    for j in o.jobs:
        owner[j.series] = j.name
    groups = arrays.groups
    failed, trained = set(fc.failed), set(b.failed_jobs) - set(fc.failed)
    out = {}
    for sid in ids:
        s = position.get(sid)
        job = owner[s] if s is not None else ""
        group = str(groups[s]) if s is not None and groups is not None else "global"
        if sid in skipped:
            out[sid] = f"skipped, {skipped[sid]}"
        elif s is not None and arrays.status[s] != 0:
            out[sid] = f"skipped, {STATUS[int(arrays.status[s])]}"
        elif job in failed:
            out[sid] = f"the forecast of job {job} was not finite"
        elif job in trained:
            out[sid] = f"job {job} failed to train"
        elif group in fc.missing or "global" in fc.missing:
            out[sid] = f"no champion registered for {group}"
        else:
            out[sid] = "no model forecast for the series"
    return out


def _csv_link(fc, view: _View) -> str:
    """A `data:` link to the forecast as CSV (unique_id, group, ds in ISO 8601, model, y_hat,
    quantile and interval columns) when the whole forecast is at most CSV_BYTES of it; else
    where the forecast is."""
    where = (f"the {'Delta table' if fc.delta else 'Parquet files'} at "
             f"<code>{esc(redact(fc.path))}</code>") if fc.path else "the forecast output"
    if view.frame is None or not view.whole:
        return f"all of it in {where}"
    data = forecast_csv(view.frame)
    if len(data) > CSV_BYTES:
        return f"all of it in {where} (its CSV would be {len(data) / 2 ** 20:.1f} MiB)"
    link = base64.b64encode(data).decode("ascii")
    return (f"<a id=\"csv\" href=\"data:text/csv;base64,{link}\" download=\"forecasts.csv\">"
            f"forecasts.csv</a> ({len(view.frame):,} rows, {len(data) / 1024:,.0f} KiB; "
            f"also in {where})")


def forecast_csv(frame: pl.DataFrame) -> bytes:
    """The forecast rows as CSV bytes: unique_id, group, ds (ISO 8601: date, date and time,
    with the offset of tz-aware times; integer steps as they are), model, y_hat and the
    quantile and interval columns."""
    ds = frame.schema["ds"]
    if isinstance(ds, pl.Datetime):
        fmt = "%Y-%m-%dT%H:%M:%S" + ("%:z" if ds.time_zone else "")
        ds_text = pl.col("ds").dt.to_string(fmt)
    elif ds == pl.Date:
        ds_text = pl.col("ds").dt.to_string("%Y-%m-%d")
    else:
        ds_text = pl.col("ds")
    return frame.select("unique_id", "group", ds_text.alias("ds"), "model", "y_hat",
                        *(c for c in frame.columns if c.startswith("q_"))
                        ).write_csv().encode("utf-8")


def _per_series(cfg, o, view: _View) -> str:
    """One row per series: id, group, published model, backtest MASE of that model and of
    seasonal naive (mean over the cutoffs), the first NEXT_STEPS forecast values. Sorted by
    id; beyond SERIES_ROWS series, the SERIES_ROWS of highest MASE (said under the table).
    The inline script sorts it by a click on a column head and filters it by a text box."""
    if view.series is None:
        return ""
    table, unit = view.series, cfg.data.unit
    k = min(NEXT_STEPS, cfg.windows.horizon)
    scored = view.metrics is not None
    # the published model's own backtest: this run's, unless the forecast came from champions
    mine = scored and o.decisions is None and not (o.forecast.note or "").startswith("champions")
    if scored:
        ids = table["unique_id"].to_list()
        models = table["model"].to_list()
        base = _lookup(view.metrics, "seasonal_naive")
        by_model = {m: _lookup(view.metrics, m) for m in set(models)} if mine else {}
        table = table.with_columns(
            pl.Series("mase", [by_model.get(m, {}).get(i, math.nan)
                               for i, m in zip(ids, models, strict=True)], pl.Float64),
            pl.Series("mase_base", [base.get(i, math.nan) for i in ids], pl.Float64))
        mases = ["mase", "mase_base"] if mine else ["mase_base"]
    table, note = _capped(table, mine)
    heads = ["id", "group", "published model"]
    if scored:
        heads += ["#MASE", "#MASE seasonal naive"] if mine else ["#MASE seasonal naive"]
    first, second = _head_rows(heads, k, f"next values ({esc(unit)})" if unit else
                               "next values")
    rows = []
    for r in table.iter_rows(named=True):
        cells = [f"<td>{esc(r['unique_id'])}</td><td>{esc(r['group'])}</td>"
                 f"<td>{esc(r['model'])}</td>"]
        if scored:
            cells += [_num_cell(r[c], 3) for c in mases]
        nxt = list(r["next"])[:k]
        cells += [_num_cell(v) for v in nxt] + ["<td class=\"num\"></td>"] * (k - len(nxt))
        rows.append(f"<tr>{''.join(cells)}</tr>")
    mase_note = ("" if not scored else " MASE: the published model's backtest error over "
                 "that of seasonal naive on the series' own history (below 1: better), the "
                 "mean over the cutoffs; beside it, the MASE of seasonal naive's own backtest "
                 "forecasts." if mine else " The published models came from the registered "
                 "champions, scored per group above, not per series here; MASE seasonal "
                 "naive: this run's backtest.")
    return ("<section id=\"per-series\"><h2>Forecasts per series</h2>"
            + (f"<p class=\"note\">{view.source}.</p>" if view.source else "")
            + f"<table id=\"forecasts\"><thead><tr>{first}</tr><tr>{second}</tr></thead>"
            + "<tbody>" + "".join(rows) + "</tbody></table>"
            + f"<p class=\"note\">+1 is the first step after the series' own last one; "
              f"{_values_note(unit)}.{mase_note}{note}</p></section>")


def _capped(table: pl.DataFrame, mine: bool) -> tuple[pl.DataFrame, str]:
    """The table's first SERIES_ROWS rows (by highest MASE when `mine`, else by id) and the
    note saying so; the table and "" when it is not longer."""
    n = len(table)
    if n <= SERIES_ROWS:
        return table, ""
    if mine:
        return (table.sort(pl.col("mase").fill_nan(None), descending=True,
                           nulls_last=True).head(SERIES_ROWS),
                f" Showing the {SERIES_ROWS:,} series of highest backtest MASE of {n:,}, "
                "worst first; every series is in the forecast output.")
    return (table.head(SERIES_ROWS), f" Showing the first {SERIES_ROWS:,} series by id of "
            f"{n:,}; every series is in the forecast output.")


def _head_rows(heads: list[str], k: int, values: str) -> tuple[str, str]:
    """The per-series table's two header rows: `heads` (numeric when they start '#') over
    both rows, then `values` over the k step columns +1 … +k."""
    num = " class=\"num\""
    first = "".join(f"<th rowspan=\"2\" data-col=\"{c}\"{num if h[0] == '#' else ''}>"
                    f"{esc(h.lstrip('#'))}</th>" for c, h in enumerate(heads))
    first += f"<th class=\"num\" colspan=\"{k}\">{values}</th>"
    second = "".join(f"<th class=\"num\" data-col=\"{len(heads) + i}\">+{i + 1}</th>"
                     for i in range(k))
    return first, second


def _lookup(metrics: dict, model: str) -> dict[str, float]:
    ids, mase = per_series_mase(metrics, model)
    return dict(zip(ids.tolist(), mase.tolist(), strict=True))


def _fallbacks(view: _View) -> str:
    """The series whose forecast is the fallback, each with why (up to FALLBACKS_SHOWN)."""
    if view.series is None or not view.reasons:
        return ""
    fell = view.series.filter(pl.col("model").str.starts_with("fallback"))
    rows = [f"<tr><td>{esc(i)}</td><td>{esc(g)}</td><td>{esc(m)}</td>"
            f"<td>{esc(view.reasons.get(i, ''))}</td></tr>"
            for i, g, m in fell.select("unique_id", "group", "model")
            .head(FALLBACKS_SHOWN).iter_rows()]
    more = (f" The first {FALLBACKS_SHOWN} of {len(fell):,} are listed."
            if len(fell) > FALLBACKS_SHOWN else "")
    return ("<section id=\"fallback\"><h2>Fallback series</h2>"
            + _table("fallbacks", ["id", "group", "forecast", "why"], rows)
            + f"<p class=\"note\">{len(fell):,} series got the fallback forecast instead of a "
              f"model's; the series drawn below include some of them.{more}</p></section>")


def per_series_mase(metrics: dict, model: str) -> tuple[np.ndarray, np.ndarray]:
    """(ids, MASE) of `model` per series, the mean over its backtest cutoffs (finite only)."""
    mase = np.asarray(metrics["mase"], float)
    sel = (np.asarray(metrics["model"]).astype(str) == model) & np.isfinite(mase)
    ids, inv = np.unique(np.asarray(metrics["unique_id"]).astype(str)[sel], return_inverse=True)
    return ids, np.bincount(inv, weights=mase[sel]) / np.bincount(inv)


def _series(cfg, outcome, view: _View) -> str:
    """A sample of series (`evaluate.plots`, chosen as the plots on disk are, fallback
    series among them when there are any), each captioned with its group and model and, for
    a fallback, why."""
    data, fc, scored = outcome.data, outcome.forecast, outcome.scored
    cols = fc.cols if fc is not None else None
    bt = scored.predictions if scored is not None else None
    if data is None or not (cols or bt):
        return ""
    every = ({"unique_id": view.series["unique_id"].to_numpy(),
              "model": view.series["model"].to_numpy()} if view.series is not None else None)
    chosen = plots.choose(every or cols or bt, cfg.evaluate.plots)
    if view.series is not None:
        cols = _with_rows(cols, view, data.arrays, fc, chosen)
    info = ({r[0]: r[1:] for r in view.series.select("unique_id", "group", "model").iter_rows()}
            if view.series is not None else {})
    figures = []
    for sid in chosen:
        png = plots.series_png(data.arrays, sid, cols, bt, cfg.windows.horizon,
                               plots.quantiles_of(cols, bt), plots.value_label(cfg))
        figures.append(f"<figure>{_img(png, f'forecast of series {sid}')}"
                       f"<figcaption>{esc(sid)}{_caption(info.get(sid), view.reasons.get(sid))}"
                       "</figcaption></figure>")
    if not figures:
        return ""
    return ("<section id=\"series\"><h2>Series</h2><p class=\"note\">History, the latest "
            "backtest against the actuals with the baselines at its cutoff (seasonal naive "
            "dashed, naive dotted), the forecast; bands from the lowest to the highest "
            "quantile.</p>" + "".join(figures) + "</section>")


def _with_rows(cols: dict | None, view: _View, arrays, fc, ids: list[str]) -> dict | None:
    """The forecast's long columns (`Forecast.cols`, ds as grid ordinals) with the rows of
    the series in `ids` they lack (fallback series are not among the drawn ones): from the rows
    read back, or read again for those series when only their first steps were."""
    have = set(np.asarray(cols["unique_id"]).astype(str)) if cols else set()
    need = [i for i in ids if i not in have]
    if not need:
        return cols
    rows = view.frame.filter(pl.col("unique_id").is_in(need))
    if not view.whole and fc.path and not fc.delta:
        fs, path = filesystem_for(fc.path)
        rows = _ordered(pl.from_arrow(pq.read_table(path, filesystem=fs,
                                                    filters=[("unique_id", "in", need)])))
    position = {str(i): k for k, i in enumerate(arrays.ids.tolist())}
    ends = arrays.end[[position[i] for i in rows["unique_id"].to_list()]]
    extra = {k: rows[k].to_numpy() for k in rows.columns if k != "ds"}
    extra["ds"] = ends + extra["step"].astype(np.int64) * arrays.freq.step   # grid ordinals
    extra["cutoff"] = ends
    extra = {k: v.astype(object) if v.dtype.kind in "OUT" else v for k, v in extra.items()}
    return concat_columns([c for c in (cols, extra) if c])


def _caption(info: tuple | None, reason: str | None) -> str:
    """' — group g, model m' of a series' forecast, and why for a fallback."""
    if info is None:
        return ""
    group, model = info
    why = f"; fallback: {esc(reason)}" if reason else ""
    return f" — {'group ' + esc(group) + ', ' if group else ''}model {esc(model)}{why}"
