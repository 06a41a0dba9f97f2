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

import math

import numpy as np
import polars as pl

from pipeline.config import STATISTICAL
from pipeline.data import grid
from pipeline.data.io import write_bytes_atomic
from pipeline.data.series import STATUS
from pipeline.evaluation import metrics as E
from pipeline.forecasting.backtest import BASELINES
from pipeline.forecasting.select import default_model, selection_key
from pipeline.outputs import plots
from pipeline.outputs.console import METRICS
from pipeline.outputs.html_series import (
    _csv_link,
    _fallbacks,
    _per_series,
    _series,
    _View,
    per_series_mase,
)
from pipeline.outputs.htmlkit import (
    CSS,
    SCRIPT,
    _img,
    _num,
    _table,
    csp,
    esc,
    when,
)

SKIPPED_SHOWN = 20


GROUPS_NAMED = 12          # groups the header names one by one at most


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
                _levels(getattr(o.forecast, "coherence", None) or o.levels),
                _errors(view.metrics, model), _series(cfg, o, view), _validation(o.data),
                _training(o)]
    title = f"{esc(cfg.name)} — {esc(b.flow)} batch {esc(b.batch_id or '–')}"
    return ("<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">"
            f"<meta http-equiv=\"Content-Security-Policy\" content=\"{csp(SCRIPT)}\">"
            "<link rel=\"icon\" href=\"data:,\">"
            f"<title>{title}</title><style>{CSS}</style></head>\n<body>\n"
            + "\n".join(s for s in sections if s)
            + f"\n<script>{SCRIPT}</script>\n</body></html>\n")


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
        def by_selection(g: str) -> str:     # the page's series: under a hierarchy, the bottom
            c = selection.get(g) or selection.get(selection_key(g, cfg.data.id_col))
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


def _levels(c) -> str:
    """data.hierarchy: the backtest per level, base against reconciled, and whether
    reconciliation lowered the level's MASE (`stages.reconciled.Coherence` or None)."""
    if c is None or c.level_metrics is None:
        return ""
    by = {(r["level"], r["forecast"]): r for r in c.level_metrics.iter_rows(named=True)}
    rows = []
    for level in dict.fromkeys(lv for lv, _ in by):
        base, rec = by[(level, "base")], by[(level, "reconciled")]
        helped = "yes" if rec["mase"] < base["mase"] else "no"
        rows.append(f"<tr><td>{esc(level)}</td><td class=\"num\">{base['series']}</td>"
                    + "".join(f"<td class=\"num\">{_num(r[k])}</td>" for k in
                              ("mase", "smape", "wape") for r in (base, rec))
                    + f"<td>{helped}</td><td>{esc(base['published'])}</td></tr>")
    used = c.method_used + (f" (asked: {c.method}; {c.note})" if c.note else "")
    return ("<section><h2>Levels: base and reconciled</h2>"
            + _table("levels", ["level", "#series", "#mase", "#mase reconciled", "#smape",
                                "#smape reconciled", "#wape", "#wape reconciled", "helped",
                                "published"], rows)
            + f"<p class=\"note\">Backtest per level of data.hierarchy, reconciled with "
              f"{esc(used)}; helped: a lower MASE reconciled; published: the candidates the "
              "level's base forecasts came from (per level under evaluate.select: auto)."
              "</p></section>")


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
