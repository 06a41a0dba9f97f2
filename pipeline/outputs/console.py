"""The console: every stage's result rendered as aligned lines on stdout. Stages return results
(`pipeline.stages.steps`), `pipeline.stages.record` hands each here and this module alone
prints them, so what a run says and what it did cannot drift apart; tests assert on the
results, and on this text only in the console's golden test (tests/golden/console.txt)."""
from __future__ import annotations

import math
import os
import sys

import polars as pl

from pipeline.data import windows as W
from pipeline.data.grid import describe
from pipeline.secrets import redact
from pipeline.training.device import packs
from pipeline.training.jobs import spreads_members

METRICS = ["mae", "rmse", "smape", "mase", "wape", "skill_mase"]


def recipe_line(cfg) -> str:
    """The model the recipe resolved, in one line."""
    m, t, ens = cfg.model, cfg.train, cfg.model.ensemble
    enc = m.encoder
    members = (f", {ens.members} members (lookbacks {ens.lookbacks or '-'} horizons, losses "
               f"{', '.join(ens.losses or [m.loss])}, {ens.combine})" if ens.members > 1 else "")
    ev = cfg.evaluate
    combined = (f"; forecast: the {ev.combine_by} of it and {', '.join(ev.combine)}"
                + (" (evaluate.select: network)" if ev.select == "network" else "")
                if ev.combine else "")
    return (f"{enc.type} {enc.num_layers}×{enc.hidden_size} → {m.decoder.type} "
            f"{m.decoder.hidden_size}, lookback {cfg.windows.lookback}{members}; "
            f"{t.epochs} epochs × {t.steps_per_epoch} steps of {t.batch_size}, {t.sampling} "
            f"sampling{combined}")


def data(prep, cfg, report_path: str | None) -> None:
    """The data stage: input, series, repairs, windows, memory, skipped series, report."""
    a, plan = prep.arrays, prep.plan
    print(f"input        {redact(cfg.data.path)}: {prep.parts} part(s), {prep.rows:,} rows, "
          f"frequency {describe(a.freq)}")
    print(f"series read  {len(a):,} ({int((a.status == 0).sum()):,} usable, "
          f"{a.indptr[-1]:,} steps on the grid)")
    skipped = prep.skipped()
    print("skipped      " + (", ".join(f"{v:,} {k}" for k, v in skipped.items())
                             if skipped else "none"))
    repaired = prep.report.filter(pl.col("action") != "skipped").group_by("issue").len()
    for issue, n in sorted(repaired.iter_rows()):
        print(f"repaired     {n:,} × {issue}")
    n_bt = sum(len(b) for b in plan.backtest)
    mat = W.materialized_bytes(len(plan.train) + len(plan.val), cfg.windows.lookback,
                               cfg.windows.horizon)
    print(f"windows      {len(plan.train):,} train, {len(plan.val):,} validation, "
          f"{n_bt:,} backtest over {cfg.windows.n_windows} cutoff(s)")
    print(f"memory       arrays {a.nbytes() / 2**20:,.1f} MiB, window index "
          f"{plan.nbytes / 2**20:,.1f} MiB (materialized windows would take "
          f"{mat / 2**20:,.1f} MiB)")
    if getattr(prep, "recipe", None):
        print(f"recipe       auto: {recipe_line(cfg)}")
    rows = prep.report.filter(pl.col("action") == "skipped")
    for row in rows.head(10).iter_rows(named=True):
        print(f"  skipped {row['series']}: {row['issue']} ({row['detail']})")
    if len(rows) > 10:
        print(f"  … {len(rows) - 10} more in the report")
    if report_path:
        print(f"report       {redact(report_path)} ({len(prep.report)} rows)")


def training_start(cfg, job_packs: list, device, final: bool) -> None:
    """The training line: jobs, mode, device, threads, and how members or groups train."""
    what = "final model (all data)" if final else "before the backtest cutoffs"
    threads = cfg.train.threads
    how = f"{threads} thread{'s' * (threads != 1)}" if isinstance(threads, int) else ""
    members = cfg.model.ensemble.members
    if members > 1 or (cfg.train.mode == "per_group" and cfg.train.per_group.packed):
        who = f"{members} members" if members > 1 else "groups"
        how += f", {who} " + ("packed" if packs(cfg.train, device) else "a Ray task each"
                              if spreads_members(cfg, job_packs) else "one after another")
    n_jobs = sum(len(p) for p in job_packs)
    print(f"training     {cfg.model.name}: {n_jobs} job(s), mode {cfg.train.mode}, "
          f"device {device}{', ' + how.lstrip(', ') if how else ''}, {what}", flush=True)


def training(trained) -> None:
    """One line per job of a `stages.Trained`, then where the model files went."""
    print(f"  {'job':<12} {'series':>7} {'windows':>9} {'epochs':>6} {'best val':>9} "
          f"{'samples/s':>10}  status")
    for r in trained.results:
        status = (f"FAILED after {r.attempts} attempt(s): {r.error}" if not r.ok else
                  f"ok, resumed at epoch {r.resumed_epoch + 1}" if r.resumed_epoch else "ok")
        print(f"  {r.name:<12} {r.n_series:>7,} {r.n_windows:>9,} {len(r.history):>6} "
              f"{r.best_val:>9.4f} {r.samples_per_s:>10,.0f}  {status}")
    print(f"models       {redact(trained.folder)}")


def warm_start(n: int, fresh: list[str]) -> None:
    print(f"warm start   {n} job(s) from the champion"
          + (f"; from scratch (no champion of this architecture): {', '.join(fresh[:5])}"
             if fresh else ""))


def backtest(scored, cfg) -> None:
    """The overall comparison of a `stages.Scored` against the baselines, and its outputs."""
    print(f"backtest     {cfg.windows.n_windows} cutoff(s), every {cfg.windows.step} steps, "
          f"{cfg.windows.horizon} steps ahead")
    print("  " + f"{'model':<22}" + "".join(f"{c:>11}" for c in METRICS))
    for model, row in scored.summary.items():
        print("  " + f"{model:<22}" + "".join(f"{row.get(c, math.nan):>11.4f}"
                                              for c in METRICS))
    print("  (skill_mase = 1 - MASE / MASE of seasonal naive)")
    print(f"outputs      {redact(scored.paths[0])}")
    for p in scored.paths[1:]:
        print(f"             {redact(p)}")


def comparator_fallbacks(fallbacks: dict[str, int], made: dict[str, int]) -> None:
    """A warning line for the comparators that fell back to seasonal naive somewhere."""
    parts = [f"{name} {n:,} of {made[name]:,}" for name, n in fallbacks.items() if n]
    if parts:
        print(f"warning: comparator forecasts replaced by seasonal naive (the model could not "
              f"fit the series): {', '.join(parts)}", file=sys.stderr)


def selection(selection: dict, metric: str = "mase") -> None:
    """Per group, the published candidate and every candidate's backtest score."""
    print(f"published    per group, the lowest backtest {metric} (evaluate.select: auto)")
    width = max([14, *(len(g) for g in selection)])     # group, or level:group
    for g, c in sorted(selection.items()):
        scores = ", ".join(f"{m} {_num(v)}" for m, v in c.scores.items())
        print(f"  {g or 'all':<{width}} {c.model:<16} ({scores})")


def coverage(cal, model: str) -> None:
    """Each conformal level's coverage on the latest backtest window, per model."""
    levels = ", ".join(f"{round(100 * v)} %" for v in cal.levels)
    print(f"intervals    conformal ({levels}) from the older cutoffs' residuals; coverage on "
          "the latest window:")
    for m in sorted(cal.coverage, key=lambda m: m != model):
        row = cal.coverage[m]
        print("  " + f"{m:<22}" + "".join(f"{k:>14} {v:.3f}" for k, v in row.items()))


def promotion(model: str, decisions: list, metric: str = "mase") -> None:
    print(f"promote      challenger {model} against the champions, backtest {metric}")
    for d in decisions:
        if d.challenger is None:
            print(f"  {d.group:<14} {d.note}")
            continue
        was = f"{d.champion:.4f} ({d.champion_label})" if d.champion is not None else "none"
        by = f" ({d.challenger_model})" if d.challenger_model not in ("", model) else ""
        print(f"  {d.group:<14} challenger {d.challenger:.4f}{by}  champion {was:<28} "
              f"{'-> promoted' if d.promoted else 'kept'}{'  ' + d.note if d.note else ''}")
        if d.version:
            print(f"               registered version {d.version}")


def missing_champions(names: list[str]) -> None:
    print(f"registry     no champion for {len(names)} group(s) ({', '.join(names[:5])}): "
          "seasonal-naive fallback")


def forecast(fc, horizon: int) -> None:
    """Where a `stages.Forecast` went: series, fallbacks, champions, plots."""
    print(f"forecast     {fc.n_series:,} series × {horizon} steps ({fc.n_fallback} by "
          f"{fc.fallback}{', ' + fc.note if fc.note else ''}) -> {redact(fc.path)}")
    if fc.plots:
        print(f"plots        {len(fc.plots)} PNGs in {redact(os.path.dirname(fc.plots[0]))}")
    if getattr(fc, "coherence", None) is not None:      # data.hierarchy
        levels(fc)


def levels(fc) -> None:
    """data.hierarchy: how the levels were reconciled, where they went, and the backtest per
    level, base against reconciled (`stages.reconciled.Coherence`)."""
    c = fc.coherence
    used = c.method if c.method_used == c.method else f"{c.method} -> {c.method_used}"
    print(f"reconciled   every level with {used} in {c.seconds:.2f} s"
          + (f" ({c.note})" if c.note else ""))
    for path in fc.level_paths:
        print(f"             {redact(path)}")
    if c.level_metrics is not None:
        _level_table(c)


def level_scores(c, paths: list[str]) -> None:
    """A flow without a forecast: the backtest per level, base against reconciled."""
    print(f"levels       backtest per level, reconciled with {c.method_used} in "
          f"{c.seconds:.2f} s" + (f" ({c.note})" if c.note else ""))
    for path in paths:
        print(f"             {redact(path)}")
    _level_table(c)


def _level_table(c) -> None:
    print(f"  {'level':<16} {'forecast':<11} {'series':>7} {'mase':>9} {'smape':>9} {'wape':>9}"
          "  published")
    for r in c.level_metrics.iter_rows(named=True):
        print(f"  {r['level']:<16} {r['forecast']:<11} {r['series']:>7} {r['mase']:>9.4f} "
              f"{r['smape']:>9.4f} {r['wape']:>9.4f}"
              + (f"  {r['published']}" if r["forecast"] == "base" else ""))


def comparison(c) -> None:
    """The leaderboards and champions of a `compare.Comparison`."""
    metric = c.metric
    print(f"leaderboard  {metric} (lower is better), experiment {c.experiment!r}, {c.where}, "
          f"{len(c.runs)} run(s)")
    print(f"  overall  {'rank':>4}  {'model':<16} {'mode':<10} {'batch':<18} {'run':<10} "
          f"{metric:>9} {'seas.naive':>10}")
    for i, r in enumerate(c.runs.iter_rows(named=True), 1):
        print(f"           {i:>4}  {r['model']:<16} {r['train_mode']:<10} "
              f"{str(r['batch_id']):<18} {r['run_id'][:8]:<10} {r['value']:>9.4f} "
              f"{_num(r['seasonal_naive']):>10}")
    rows = c.board.filter(pl.col("group") == "global") if c.by == "global" else \
        c.board.filter(~pl.col("group").is_in(["global", "all"]))
    print(f"  {'per group' if c.by == 'group' else 'global'}  {'group':<14} {'champion':<16} "
          f"{'run':<10} {metric:>9}   runner-up")
    for g in c.champions.iter_rows(named=True):
        others = rows.filter((pl.col("group") == g["group"]) &
                             (pl.col("run_id") != g["run_id"]))
        runner = (f"{others['model'][0]} {others['run_id'][0][:8]} {others['value'][0]:.4f}"
                  if len(others) else "-")
        print(f"             {g['group']:<14} {g['model']:<16} {g['run_id'][:8]:<10} "
              f"{g['value']:>9.4f}   {runner}")
    for g in c.champions.iter_rows(named=True):
        if g["group"] not in c.registered:
            continue
        name, version, changed = c.registered[g["group"]]
        print(f"champion     {name}@champion = version {version} " + (
            f"({g['model']}, {metric} {g['value']:.4f}, run {g['run_id'][:8]})" if changed
            else "(unchanged)"))


def _num(v) -> str:
    return f"{v:.4f}" if v is not None and math.isfinite(v) else "-"


def html(path: str) -> None:
    print(f"report       {redact(path)}")


def tracking(log) -> None:
    print(f"tracking     {log.where()}" + (f" ({len(log.failures)} logging failure(s), "
                                           "outputs kept)" if log.failures else ""))


def wall_time(total: float, seconds: dict[str, float]) -> None:
    print(f"wall time    {total:.1f} s ("
          + ", ".join(f"{k} {v:.1f}" for k, v in seconds.items()) + ")")
