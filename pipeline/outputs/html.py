"""One batch as a self-contained HTML page: one file, inline CSS, images inlined as base64 PNG
`data:` URIs, the forecast as a `data:` CSV link, one inline script (sorting and filtering the
per-series table; the page is whole without it), nothing fetched: a Content-Security-Policy
forbids everything else and allows that script alone, by its SHA-256.

    html = render(b, outcome)    # b: the pipeline.stages.batch.Batch, outcome: its flow's results
    write(b, outcome, "outputs/report.html")

The page holds what the flow's `pipeline.stages.steps.Outcome` holds (the sections whose stage did
not run are left out): the header (config, flow, batch, frequency, data end and forecast steps
as dates, what was published per group and why, the CSV, run, stage timings, failed jobs), how
to read it, the per-group decisions or champions, one row per series (published model, backtest
MASE against seasonal naive, the next values), the fallback series and why, the backtest
leaderboard against the baselines, the distribution of per-series MASE and skill, a sample of
series drawn by `pipeline.outputs.plots` (fallback ones among them), the validation summary and
the training jobs. Values are labelled with `data.unit` when the config gives one. Every text
that comes from the data or the config goes through `esc`.
"""
from __future__ import annotations

import base64
import hashlib
import html
import math
from dataclasses import dataclass, field

import numpy as np
import polars as pl
import pyarrow as pa
import pyarrow.parquet as pq

from pipeline.config import STATISTICAL
from pipeline.data import grid
from pipeline.data.io import filesystem_for, write_bytes_atomic
from pipeline.data.series import STATUS
from pipeline.evaluation import metrics as E
from pipeline.forecasting.backtest import BASELINES, concat_columns
from pipeline.forecasting.select import default_model
from pipeline.outputs import plots
from pipeline.outputs.console import METRICS
from pipeline.secrets import redact

SKIPPED_SHOWN = 20
SERIES_ROWS = 1000         # rows of the per-series table at most: beyond, the highest MASE
NEXT_STEPS = 6             # forecast steps per series in the table
FALLBACKS_SHOWN = 200      # rows of the fallback table at most
GROUPS_NAMED = 12          # groups the header names one by one at most
CSV_BYTES = 4 * 2 ** 20    # the forecast's CSV is linked (inlined) up to this size
CSV_ROW_BYTES = 40         # a CSV row's least size: more rows than CSV_BYTES / this: no CSV
MONTHS = ["January", "February", "March", "April", "May", "June", "July", "August",
          "September", "October", "November", "December"]
CSS = """
body { font: 14px/1.45 system-ui, sans-serif; margin: 1.5em auto; max-width: 1100px;
       color: #222; padding: 0 1em; }
h1 { font-size: 1.5em; margin-bottom: .2em; } h2 { font-size: 1.2em; margin-top: 1.6em;
  border-bottom: 1px solid #ccc; padding-bottom: .2em; }
table { border-collapse: collapse; margin: .5em 0; }
th, td { padding: .25em .7em; border-bottom: 1px solid #e4e4e4; text-align: left; }
td.num, th.num { text-align: right; font-variant-numeric: tabular-nums; }
tr.model td { font-weight: 600; } td.best { background: #e6f4e6; }
dl { display: grid; grid-template-columns: max-content auto; gap: .15em 1em; }
dt { color: #666; } dd { margin: 0; }
figure { margin: 1em 0; } figure img { max-width: 100%; height: auto; }
figcaption, .note { color: #666; font-size: .9em; } .bad { color: #b00020; }
th[data-col] { cursor: pointer; } th[aria-sort=ascending]::after { content: " \\25B2"; }
th[aria-sort=descending]::after { content: " \\25BC"; }
#forecasts-filter { margin: .3em 0; padding: .2em .4em; width: 20em; }
"""
SCRIPT = """(function () {
  "use strict";
  var table = document.getElementById("forecasts");
  if (!table) { return; }
  var body = table.tBodies[0], heads = table.querySelectorAll("th[data-col]");
  var rows = Array.prototype.slice.call(body.rows);
  function key(row, col, numeric) {
    var cell = row.cells[col];
    if (!numeric) { return cell.textContent; }
    var v = parseFloat(cell.getAttribute("data-v"));
    return isNaN(v) ? null : v;
  }
  Array.prototype.forEach.call(heads, function (th) {
    th.title = "sort by this column";
    th.addEventListener("click", function () {
      var col = Number(th.getAttribute("data-col")), numeric = th.classList.contains("num");
      var up = th.getAttribute("aria-sort") !== "ascending";
      Array.prototype.forEach.call(heads, function (h) { h.removeAttribute("aria-sort"); });
      th.setAttribute("aria-sort", up ? "ascending" : "descending");
      rows.sort(function (a, b) {
        var x = key(a, col, numeric), y = key(b, col, numeric);
        if (x === y) { return 0; }
        if (x === null) { return 1; }
        if (y === null) { return -1; }
        var c = numeric ? x - y : x.localeCompare(y);
        return up ? c : -c;
      });
      rows.forEach(function (r) { body.appendChild(r); });
    });
  });
  var box = document.createElement("input"), count = document.createElement("span");
  box.type = "search";
  box.id = "forecasts-filter";
  box.placeholder = "filter by id, group or model";
  box.setAttribute("aria-label", "filter the series");
  count.className = "note";
  box.addEventListener("input", function () {
    var q = box.value.toLowerCase(), shown = 0;
    rows.forEach(function (r) {
      var text = "";
      Array.prototype.forEach.call(r.cells, function (c) {
        if (!c.classList.contains("num")) { text += c.textContent.toLowerCase() + " "; }
      });
      r.hidden = text.indexOf(q) < 0;
      shown += r.hidden ? 0 : 1;
    });
    count.textContent = q ? " " + shown + " of " + rows.length + " rows" : "";
  });
  table.parentNode.insertBefore(box, table);
  table.parentNode.insertBefore(count, table);
}());
"""


def script_source(script: str = SCRIPT) -> str:
    """The CSP source that allows the inline `script` and no other: 'sha256-<base64>'."""
    digest = hashlib.sha256(script.encode("utf-8")).digest()
    return f"'sha256-{base64.b64encode(digest).decode('ascii')}'"


def csp(script: str = SCRIPT) -> str:
    """Nothing fetched; images from data: URIs, the inline style, the one inline script."""
    return ("default-src 'none'; img-src data:; style-src 'unsafe-inline'; "
            f"script-src {script_source(script)}")


def esc(value) -> str:
    """Text from the data or the config, escaped for HTML text and attribute values."""
    return html.escape(str(value), quote=True)


def write(b, outcome, path: str) -> str:
    """Render the batch's page and write it atomically to `path` (a local path or a pyarrow
    URI); returns the path."""
    path = str(path)
    write_bytes_atomic(render(b, outcome).encode("utf-8"), path)
    return path


def render(b, outcome) -> str:
    """The whole page of batch `b` (its config, timings, failed jobs) and of its flow's
    results `outcome`, as one HTML string."""
    o, cfg, model = outcome, b.cfg, b.cfg.model.name
    view = _View.of(b, o)
    sections = [_header(b, o, view), _reading(o, cfg.data.unit),
                _groups(o.scored, o.decisions, model), _per_series(cfg, o, view),
                _fallbacks(view), _leaderboard(o.scored, model, cfg.data.unit),
                _errors(view.metrics, model), _series(cfg, o, view), _validation(o.data),
                _training(o)]
    title = f"{esc(cfg.name)} — {esc(b.flow)} batch {esc(b.batch_id or '–')}"
    return ("<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">"
            f"<meta http-equiv=\"Content-Security-Policy\" content=\"{csp(SCRIPT)}\">"
            "<link rel=\"icon\" href=\"data:,\">"
            f"<title>{title}</title><style>{CSS}</style></head>\n<body>\n"
            + "\n".join(s for s in sections if s)
            + f"\n<script>{SCRIPT}</script>\n</body></html>\n")


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


def _img(png: bytes, alt: str) -> str:
    return (f"<img src=\"data:image/png;base64,{base64.b64encode(png).decode('ascii')}\" "
            f"alt=\"{esc(alt)}\">")


def _num(v, digits: int = 4) -> str:
    return f"{v:.{digits}f}" if v is not None and math.isfinite(v) else "–"


def _table(table_id: str, head: list[str], rows: list[str]) -> str:
    """A table of pre-rendered <tr> rows; numeric columns are those whose head starts '#'."""
    cells = "".join(f"<th class=\"num\">{esc(h[1:])}</th>" if h.startswith("#") else
                    f"<th>{esc(h)}</th>" for h in head)
    return (f"<table id=\"{table_id}\"><thead><tr>{cells}</tr></thead><tbody>"
            + "".join(rows) + "</tbody></table>")


def _header(b, o, view: _View) -> str:
    """Config, flow, batch; the data (series, frequency, its last step as a date); the
    forecast's steps as dates; what was forecast and published per group and why, with the
    CSV of it; run, wall time per stage, failed jobs."""
    data, fc, cfg = o.data, o.forecast, b.cfg
    stages = ", ".join(f"{esc(k)} {v:.1f} s" for k, v in b.seconds.items())
    failed = (f"<span class=\"bad\">{esc(', '.join(b.failed_jobs))}</span>"
              if b.failed_jobs else "none")
    items = [("config", esc(cfg.name)), ("flow", esc(b.flow)),
             ("batch", esc(b.batch_id or "–")),
             ("data", _data_line(data) if data is not None else "–"),
             ("horizon", _horizon_line(data, cfg) if data is not None else "–"),
             ("forecast", _forecast_line(fc, cfg, view) if fc is not None else
              "none in this flow"),
             ("published", _published(b, o, view)),
             ("run", esc(b.run_id)),
             ("wall time", f"{sum(b.seconds.values()):.1f} s in stages ({stages or 'none'})"),
             ("failed jobs", failed)]
    dl = "".join(f"<dt>{k}</dt><dd>{v}</dd>" for k, v in items if v)
    return f"<header><h1>Forecast report: {esc(cfg.name)}</h1><dl>{dl}</dl></header>"


def when(ordinal: int, freq) -> str:
    """A step of the grid as a planner reads it: '2024-06-30 23:00' (sub-daily), '2024-06-30'
    (days, business days, weeks), 'June 2024' (months), '2024 Q2' (calendar quarters),
    '2024' (calendar years), 'step 812' (integer steps); the zone after tz-aware times."""
    if freq.unit == "int":
        return f"step {int(ordinal)}"
    t = grid.to_arrow(np.array([int(ordinal)]), freq)[0].as_py()
    zone = f" ({freq.tz})" if freq.tz else ""
    if freq.unit == "M":
        first = (t.month - 1) % 3 == 0 if not freq.month_end else t.month % 3 == 0
        if freq.step % 12 == 0 and t.month == (12 if freq.month_end else 1):
            return str(t.year)
        if freq.step % 3 == 0 and first:
            return f"{t.year} Q{(t.month - 1) // 3 + 1}"
        return f"{MONTHS[t.month - 1]} {t.year}"
    if freq.unit in ("D", "B"):
        text = f"{t.year:04d}-{t.month:02d}-{t.day:02d}"
        return text + (f" {t.hour:02d}:{t.minute:02d}{zone}" if freq.time_ns else "")
    return (f"{t.year:04d}-{t.month:02d}-{t.day:02d} {t.hour:02d}:{t.minute:02d}"
            + (f":{t.second:02d}" if t.second or freq.step % 60_000_000_000 else "") + zone)


def _data_line(data) -> str:
    a = data.arrays
    usable = int((a.status == 0).sum())
    end = esc(when(int(a.end.max()), a.freq)) if len(a) else "–"
    return (f"{len(a):,} series ({usable:,} usable), frequency {esc(grid.describe(a.freq))}, "
            f"data end {end}")


def _horizon_line(data, cfg) -> str:
    """The forecast's steps as dates (those of the series that end at the data end)."""
    a, h = data.arrays, cfg.windows.horizon
    if not len(a):
        return f"{h} steps ahead"
    end, step = int(a.end.max()), a.freq.step
    return (f"{h} steps ahead: {esc(when(end + step, a.freq))} to "
            f"{esc(when(end + h * step, a.freq))}")


def _forecast_line(fc, cfg, view: _View) -> str:
    """Which model's forecast was published, how many series fell back, the CSV."""
    source = esc(fc.note) if fc.note else f"the model {esc(cfg.model.name)}"
    return (f"{fc.n_series:,} series × {cfg.windows.horizon} steps — {source}; "
            f"{fc.n_fallback:,} by {esc(fc.fallback)} (too short, skipped or failed); "
            + _csv_link(fc, view))


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


def _published(b, o, view: _View) -> str:
    """Per group, the model(s) its forecast came from and why: the lowest backtest MASE
    (`evaluate.select: auto`), `evaluate.select: network`, the promotion's decision, the
    registered champions; groups with one answer are named together."""
    if view.series is None:
        return ""
    cfg, why = b.cfg, _why(b, o)
    per = (view.series.group_by("group", maintain_order=True)
           .agg(pl.col("model").filter(~pl.col("model").str.starts_with("fallback"))
                .unique().sort().alias("models"))
           .sort("group"))
    lines: dict[tuple[str, str], list[str]] = {}
    for g, models in per.iter_rows():
        text = esc(", ".join(models) or f"fallback:{cfg.evaluate.fallback} only")
        lines.setdefault((text, esc(why(g)) if models else ""), []).append(g)
    if len(lines) == 1:
        ((text, reason), groups), = lines.items()
        named = "every series" if groups == [""] else f"all {len(groups)} groups"
        return f"{text} for {named}" + (f" — {reason}" if reason else "")
    parts = [f"<b>{esc(g) or '(no group)'}</b>: {text}" + (f" — {reason}" if reason else "")
             for (text, reason), groups in lines.items() for g in groups]
    more = len(parts) - GROUPS_NAMED
    return "; ".join(parts[:GROUPS_NAMED]) + (f"; … {more} more groups in the per-group table"
                                             if more > 0 else "")


def _why(b, o):
    """group -> why its model was published (text, escaped by the caller)."""
    cfg, fc = b.cfg, o.forecast
    selection = o.scored.selection if o.scored is not None else {}
    if o.decisions is not None:
        decided = {d.group: d for d in o.decisions}

        def by_decision(g: str) -> str:
            d = decided.get(g) or decided.get("global")
            if d is None:
                return "the registered champion"
            note = "" if not d.note else f" {d.note}" if d.note.startswith("(") else \
                f", {d.note}"
            mine = f"this run's {d.challenger_model or cfg.model.name}"
            if d.promoted and d.champion is None:
                return (f"promoted now, no valid champion before: {mine}, backtest MASE "
                        f"{_num(d.challenger, 3)}{note}")
            if d.promoted:
                return (f"promoted now: {mine}, backtest MASE {_num(d.challenger, 3)} against "
                        f"the champion's {_num(d.champion, 3)}{note}")
            return (f"the registered champion ({d.champion_label}, backtest MASE "
                    f"{_num(d.champion, 3)}) kept against {mine}'s {_num(d.challenger, 3)}"
                    f"{note}")
        return by_decision
    if selection:
        def by_selection(g: str) -> str:
            c = selection.get(g)
            if c is None:
                return f"evaluate.select: {cfg.evaluate.select}"
            others = sorted((v, m) for m, v in c.scores.items()
                            if m != c.model and math.isfinite(v))
            runner = f"; runner-up {others[0][1]} {_num(others[0][0], 3)}" if others else ""
            return (f"lowest backtest MASE of {len(c.scores)} candidates "
                    f"({_num(c.scores.get(c.model, math.nan), 3)}{runner})")
        return by_selection
    if o.scored is not None:
        return lambda g: (f"evaluate.select: {cfg.evaluate.select}"
                          + (f" ({default_model(cfg)} is published whatever its backtest)"
                             if cfg.evaluate.select == "network" else " (the only candidate)"))
    if fc.note:
        return lambda g: "the registered champion"
    return lambda g: "trained in this run (no backtest in this flow)"


def _reading(outcome, unit: str | None = None) -> str:
    """How to read the page, each measure in a sentence (left out when nothing was scored)."""
    if outcome.scored is None:
        return ""
    units = esc(unit) if unit else "the data's units"
    return ("<section><h2>How to read this</h2><p>The backtest hides the last steps of each "
            "series, forecasts them from what came before and compares: <code>MAE</code> is the "
            f"average miss in {units}; <code>RMSE</code> weighs large misses more; "
            "<code>sMAPE</code> is the miss as a percentage of the actual and forecast together "
            "(0 to 200; both 0 counts as 0); <code>MASE</code> divides the miss by that of "
            "repeating last season's values on the series' own history, so 1 means no better "
            "than that and 0.8 means 20 % better — read it first, it compares across series "
            "of any size; <code>WAPE</code> is the total miss over the total actual; "
            "<code>skill_mase</code> is 1 − MASE relative to seasonal naive. Lower is better for "
            "all but skill. The table of series gives each series' published model, its "
            "backtest MASE beside that of seasonal naive and its next values; click a column "
            "head to sort, type in the box to filter.</p></section>")


def _training(outcome) -> str:
    """One row per training job of the backtest model and the final model."""
    rows = []
    for stage, trained in (("train", outcome.trained), ("final", outcome.final)):
        for j in getattr(trained, "results", []):
            status = "ok" if j.ok else f"<span class=\"bad\">FAILED: {esc(j.error)}</span>"
            rows.append(f"<tr><td>{stage}</td><td>{esc(j.name)}</td>"
                        f"<td class=\"num\">{j.n_series:,}</td>"
                        f"<td class=\"num\">{j.n_windows:,}</td>"
                        f"<td class=\"num\">{len(j.history)}</td>"
                        f"<td class=\"num\">{_num(j.best_val)}</td>"
                        f"<td class=\"num\">{j.samples_per_s:,.0f}</td><td>{status}</td></tr>")
    if not rows:
        return ""
    head = ["stage", "job", "#series", "#windows", "#epochs", "#best val", "#samples/s",
            "status"]
    return "<section><h2>Training</h2>" + _table("training", head, rows) + "</section>"


def _leaderboard(scored, model: str, unit: str | None = None) -> str:
    """The backtest summary: the run's model(s) first, then the baselines; best per column
    marked."""
    if scored is None or not scored.summary:
        return ""
    summary = scored.summary
    order = sorted((m for m in summary if m not in BASELINES), key=lambda m: m != model) + \
        [m for m in BASELINES if m in summary]
    extra = sorted({k for row in summary.values() for k in row} - set(METRICS))
    cols = METRICS + extra
    best = {c: _best(c, [summary[m].get(c, math.nan) for m in order]) for c in cols}
    rows = []
    for m in order:
        cells = "".join(
            f"<td class=\"num{' best' if summary[m].get(c, math.nan) == best[c] else ''}\">"
            f"{_num(summary[m].get(c, math.nan))}</td>" for c in cols)
        kind = "baseline" if m in BASELINES else "comparator" if m in STATISTICAL else "model"
        rows.append(f"<tr class=\"{kind}\"><td>{esc(m)}</td>{cells}</tr>")
    head = [f"#{c} ({unit})" if unit and c in ("mae", "rmse") else f"#{c}" for c in cols]
    return ("<section><h2>Backtest leaderboard</h2>"
            + _table("leaderboard", ["model", *head], rows)
            + "<p class=\"note\">Over every series and cutoff; skill_mase = 1 − MASE / MASE "
              "of seasonal naive (above 0: better than seasonal naive). Best per column "
              "shaded.</p></section>")


def _best(col: str, values: list[float]) -> float:
    """The best finite value of a column (NaN: none to mark): the highest skill, the lowest
    error; none for coverage or a column only one row has."""
    finite = [v for v in values if v is not None and math.isfinite(v)]
    if len(finite) < 2 or col.startswith("coverage"):
        return math.nan           # coverage is best near its level, not at an extreme
    return max(finite) if col.startswith("skill") else min(finite)


def _groups(scored, decisions, model: str) -> str:
    """Per group: the promotion decisions when the flow promoted, else the better of the
    run's model and seasonal naive by backtest MASE."""
    if decisions is not None:
        return _decisions(decisions)
    if scored is None:
        return ""
    per = scored.backtest.group_summaries()
    others = sorted({m for by_model in per.values() for m in by_model if m in STATISTICAL})
    rows = []
    for g, by_model in per.items():
        mine = by_model.get(model, {}).get("mase", math.nan)
        base = by_model.get("seasonal_naive", {}).get("mase", math.nan)
        champ = _lowest_mase(by_model, ["seasonal_naive", *others, model])
        rows.append(f"<tr><td>{esc(g) if g else '(all series)'}</td>"
                    f"<td class=\"num\">{_num(mine)}</td>"
                    + "".join(f"<td class=\"num\">{_num(by_model.get(c, {}).get('mase'))}"
                              "</td>" for c in others)
                    + f"<td class=\"num\">{_num(base)}</td>"
                    f"<td class=\"num\">{_num(E.skill(mine, base))}</td>"
                    f"<td>{esc(champ)}</td></tr>")
    head = ["group", f"#mase {model}", *(f"#mase {c}" for c in others),
            "#mase seasonal_naive", "#skill_mase", "best"]
    return ("<section><h2>Per group</h2>" + _table("groups", head, rows)
            + "<p class=\"note\">The best of the model, the statistical comparators and "
              "seasonal naive by backtest MASE per group.</p></section>") if rows else ""


def _lowest_mase(by_model: dict, candidates: list[str]) -> str:
    """The candidate with the lowest finite MASE (the earlier on ties: seasonal naive is
    first); seasonal naive when none has one."""
    scored = [(by_model[m]["mase"], i, m) for i, m in enumerate(candidates)
              if math.isfinite(by_model.get(m, {}).get("mase", math.nan))]
    return min(scored)[2] if scored else "seasonal_naive"


def _decisions(decisions: list) -> str:
    rows = []
    for d in decisions:
        champ = (f"{_num(d.champion)} ({esc(d.champion_label)})" if d.champion is not None
                 else "none")
        verdict = "promoted" if d.promoted else ("–" if d.challenger is None else "kept")
        rows.append(f"<tr><td>{esc(d.group)}</td><td class=\"num\">{_num(d.challenger)}</td>"
                    f"<td>{champ}</td><td>{verdict}</td><td>{esc(d.version or '')}</td>"
                    f"<td>{esc(d.note)}</td></tr>")
    head = ["group", "#challenger mase", "champion mase", "decision", "version", "note"]
    return "<section><h2>Champions per group</h2>" + _table("groups", head, rows) + \
        "</section>"


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
    n, note = len(table), ""
    if n > SERIES_ROWS:
        if mine:
            table = table.sort(pl.col("mase").fill_nan(None), descending=True,
                               nulls_last=True).head(SERIES_ROWS)
            note = (f" Showing the {SERIES_ROWS:,} series of highest backtest MASE of "
                    f"{n:,}, worst first; every series is in the forecast output.")
        else:
            table = table.head(SERIES_ROWS)
            note = (f" Showing the first {SERIES_ROWS:,} series by id of {n:,}; every "
                    "series is in the forecast output.")
    values = f"next values ({esc(unit)})" if unit else "next values"
    heads = ["id", "group", "published model"]
    if scored:
        heads += ["#MASE", "#MASE seasonal naive"] if mine else ["#MASE seasonal naive"]
    num = " class=\"num\""
    first = "".join(f"<th rowspan=\"2\" data-col=\"{c}\"{num if h[0] == '#' else ''}>"
                    f"{esc(h.lstrip('#'))}</th>" for c, h in enumerate(heads))
    first += f"<th class=\"num\" colspan=\"{k}\">{values}</th>"
    second = "".join(f"<th class=\"num\" data-col=\"{len(heads) + i}\">+{i + 1}</th>"
                     for i in range(k))
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


def _values_note(unit: str | None) -> str:
    return f"values in {esc(unit)}" if unit else "values in the target's units"


def _num_cell(v, digits: int | None = None) -> str:
    """A numeric cell: the value for reading, its full value in `data-v` for sorting."""
    ok = v is not None and math.isfinite(v)
    text = (_num(v, digits) if digits is not None else _value(v)) if ok else "–"
    return f"<td class=\"num\" data-v=\"{float(v)!r}\">{text}</td>" if ok else \
        f"<td class=\"num\" data-v=\"\">{text}</td>"


def _value(v: float) -> str:
    """A forecast value to read: about four significant digits, thousands separated."""
    a = abs(v)
    digits = 0 if a >= 1000 else 1 if a >= 100 else 2 if a >= 1 else 4
    return f"{v:,.{digits}f}"


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


def _errors(cols: dict | None, model: str) -> str:
    """Histograms of per-series MASE (model and seasonal naive) and of per-series skill
    (`cols`: the backtest's per-series metric columns)."""
    if not cols:
        return ""
    ids_m, mase_m = per_series_mase(cols, model)
    ids_b, mase_b = per_series_mase(cols, "seasonal_naive")
    _, i, j = np.intersect1d(ids_m, ids_b, return_indices=True)
    skill = np.asarray(E.skill(mase_m[i], mase_b[j]), float).reshape(-1)   # [series]
    skill = skill[np.isfinite(skill)]
    if not (len(mase_m) or len(mase_b)):
        return ""
    png = plots.error_histograms(model, mase_m, mase_b, skill)
    better = f"{(skill > 0).mean():.0%}" if len(skill) else "–"
    return ("<section id=\"errors\"><h2>Per-series errors</h2>"
            + _img(png, "histograms of per-series MASE and skill")
            + f"<p class=\"note\">{len(mase_m)} series scored for {esc(model)}; it beats "
              f"seasonal naive on {better} of the {len(skill)} series both scored (median "
              f"skill {_num(float(np.median(skill)) if len(skill) else math.nan, 3)}). MASE "
              "per series is the mean over the backtest cutoffs.</p></section>")


def _validation(data) -> str:
    """Counts per issue and action of the validation report, the skipped series (up to 20)."""
    if data is None:
        return ""
    a, rep = data.arrays, data.report
    counts = rep.group_by(["issue", "action"]).len().sort(["action", "issue"])
    rows = [f"<tr><td>{esc(i)}</td><td>{esc(act)}</td><td class=\"num\">{n:,}</td></tr>"
            for i, act, n in counts.iter_rows()]
    skipped = rep.filter(pl.col("action") == "skipped")
    items = "".join(f"<li><code>{esc(r['series'])}</code>: {esc(r['issue'])} "
                    f"({esc(r['detail'])})</li>"
                    for r in skipped.head(SKIPPED_SHOWN).iter_rows(named=True))
    more = (f"<li>… {len(skipped) - SKIPPED_SHOWN} more in the report</li>"
            if len(skipped) > SKIPPED_SHOWN else "")
    usable = int((a.status == 0).sum())
    by_status = ", ".join(f"{n:,} {STATUS[k]}" for k, n in
                          zip(*np.unique(a.status[a.status != 0], return_counts=True),
                              strict=True))
    return ("<section><h2>Validation</h2>"
            f"<p>{data.parts} part(s), {data.rows:,} rows; {len(a):,} series, {usable:,} "
            f"usable{'; skipped ' + by_status if by_status else ''}.</p>"
            + (_table("validation", ["issue", "action", "#count"], rows) if rows else
               "<p>No series repaired or skipped.</p>")
            + (f"<h3>Skipped series</h3><ul>{items}{more}</ul>" if items else "")
            + "</section>")


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
