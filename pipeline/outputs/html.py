"""One batch as a self-contained HTML page: one file, inline CSS, images inlined as base64 PNG
`data:` URIs, no JavaScript, nothing fetched (a Content-Security-Policy forbids it).

    html = render(b, outcome)    # b: the pipeline.stages.batch.Batch, outcome: its flow's results
    write(b, outcome, "outputs/report.html")

The page holds what the flow's `pipeline.stages.steps.Outcome` holds (the sections whose stage did
not run are left out): the header (config, flow, batch, data end, run, stage timings, failed
jobs), the training jobs, the backtest leaderboard against the baselines, the per-group
decisions or champions, the distribution of per-series MASE and skill, the validation summary
and a sample of series drawn by `pipeline.outputs.plots`. Every text that comes from the data or the
config goes through `esc`.
"""
from __future__ import annotations

import base64
import html
import math

import numpy as np
import polars as pl

from pipeline.config import STATISTICAL
from pipeline.data import grid
from pipeline.data.io import write_bytes_atomic
from pipeline.data.series import STATUS
from pipeline.evaluation import metrics as E
from pipeline.forecasting.backtest import BASELINES, concat_columns
from pipeline.outputs import plots
from pipeline.outputs.console import METRICS

SKIPPED_SHOWN = 20
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
"""
CSP = "default-src 'none'; img-src data:; style-src 'unsafe-inline'"


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
    o, model = outcome, b.cfg.model.name
    sections = [_header(b, o.data, o.forecast), _reading(o), _training(o),
                _leaderboard(o.scored, model),
                _groups(o.scored, o.decisions, model), _errors(o.scored, model),
                _validation(o.data), _series(b.cfg, o)]
    title = f"{esc(b.cfg.name)} — {esc(b.flow)} batch {esc(b.batch_id or '–')}"
    return ("<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">"
            f"<meta http-equiv=\"Content-Security-Policy\" content=\"{CSP}\">"
            "<link rel=\"icon\" href=\"data:,\">"
            f"<title>{title}</title><style>{CSS}</style></head>\n<body>\n"
            + "\n".join(s for s in sections if s) + "\n</body></html>\n")


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


def _header(b, data, fc) -> str:
    """Config, flow, batch, what was forecast (frequency, horizon, the data's last step as a
    date), run, wall time per stage, failed jobs."""
    stages = ", ".join(f"{esc(k)} {v:.1f} s" for k, v in b.seconds.items())
    failed = (f"<span class=\"bad\">{esc(', '.join(b.failed_jobs))}</span>"
              if b.failed_jobs else "none")
    items = [("config", esc(b.cfg.name)), ("flow", esc(b.flow)),
             ("batch", esc(b.batch_id or "–")),
             ("data", _data_line(data, b.cfg) if data is not None else "–"),
             ("forecast", _forecast_line(fc, b.cfg) if fc is not None else "none in this flow"),
             ("run", esc(b.run_id)),
             ("wall time", f"{sum(b.seconds.values()):.1f} s in stages ({stages or 'none'})"),
             ("failed jobs", failed)]
    dl = "".join(f"<dt>{k}</dt><dd>{v}</dd>" for k, v in items)
    return f"<header><h1>Forecast report: {esc(b.cfg.name)}</h1><dl>{dl}</dl></header>"


def _data_line(data, cfg) -> str:
    a = data.arrays
    end = str(grid.to_arrow(np.array([int(a.end.max())]), a.freq)[0]) if len(a) else "–"
    return (f"{len(a):,} series, frequency {esc(grid.describe(a.freq))}, last step "
            f"{esc(end)}; {cfg.windows.horizon} steps ahead")


def _forecast_line(fc, cfg) -> str:
    """Which model's forecast was published, and how many series fell back."""
    source = esc(fc.note) if fc.note else f"the model {esc(cfg.model.name)}"
    return (f"{fc.n_series:,} series × {cfg.windows.horizon} steps — {source}; "
            f"{fc.n_fallback:,} by {esc(fc.fallback)} (too short, skipped or failed)")


def _reading(outcome) -> str:
    """How to read the page, each measure in a sentence (left out when nothing was scored)."""
    if outcome.scored is None:
        return ""
    return ("<section><h2>How to read this</h2><p>The backtest hides the last steps of each "
            "series, forecasts them from what came before and compares: <code>MAE</code> is the "
            "average miss in the data's units; <code>RMSE</code> weighs large misses more; "
            "<code>sMAPE</code> is the miss as a percentage of the actual and forecast together "
            "(0 to 200; both 0 counts as 0); <code>MASE</code> divides the miss by that of "
            "repeating last season's values on the series' own history, so 1 means no better "
            "than that and 0.8 means 20 % better — read it first, it compares across series "
            "of any size; <code>WAPE</code> is the total miss over the total actual; "
            "<code>skill_mase</code> is 1 − MASE relative to seasonal naive. Lower is better for "
            "all but skill.</p></section>")


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


def _leaderboard(scored, model: str) -> str:
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
    return ("<section><h2>Backtest leaderboard</h2>"
            + _table("leaderboard", ["model", *(f"#{c}" for c in cols)], rows)
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


def per_series_mase(metrics: dict, model: str) -> tuple[np.ndarray, np.ndarray]:
    """(ids, MASE) of `model` per series, the mean over its backtest cutoffs (finite only)."""
    mase = np.asarray(metrics["mase"], float)
    sel = (np.asarray(metrics["model"]).astype(str) == model) & np.isfinite(mase)
    ids, inv = np.unique(np.asarray(metrics["unique_id"]).astype(str)[sel], return_inverse=True)
    return ids, np.bincount(inv, weights=mase[sel]) / np.bincount(inv)


def _errors(scored, model: str) -> str:
    """Histograms of per-series MASE (model and seasonal naive) and of per-series skill."""
    if scored is None or not scored.backtest.metrics:
        return ""
    cols = concat_columns(scored.backtest.metrics)
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


def _series(cfg, outcome) -> str:
    """A sample of series (`evaluate.plots`, chosen as the plots on disk are)."""
    data, fc, scored = outcome.data, outcome.forecast, outcome.scored
    cols = fc.cols if fc is not None else None
    bt = scored.predictions if scored is not None else None
    if data is None or not (cols or bt):
        return ""
    figures = []
    for sid in plots.choose(cols or bt, cfg.evaluate.plots):
        png = plots.series_png(data.arrays, sid, cols, bt, cfg.windows.horizon,
                               plots.quantiles_of(cols, bt), cfg.data.target_col)
        figures.append(f"<figure>{_img(png, f'forecast of series {sid}')}"
                       f"<figcaption>{esc(sid)}{_caption(cols, sid)}</figcaption></figure>")
    if not figures:
        return ""
    return ("<section id=\"series\"><h2>Series</h2><p class=\"note\">History, the latest "
            "backtest against the actuals with the baselines at its cutoff (seasonal naive "
            "dashed, naive dotted), the forecast; bands from the lowest to the highest "
            "quantile.</p>" + "".join(figures) + "</section>")


def _caption(cols: dict | None, sid: str) -> str:
    """' — group g, model m' of a series' forecast rows."""
    if not cols:
        return ""
    rows = np.asarray(cols["unique_id"]).astype(str) == sid
    group, model = str(np.asarray(cols["group"])[rows][0]), str(np.asarray(cols["model"])[rows][0])
    return f" — {'group ' + esc(group) + ', ' if group else ''}model {esc(model)}"
