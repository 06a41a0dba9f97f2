"""Hierarchies (issue #30): `run` on a hierarchical panel, then every reconciliation method on
the same base forecasts of its backtest: seconds, peak memory, and per-level MASE of the base
forecasts against each method's.

    python benchmarks/hierarchy.py [--series 120] [--stores 4] [--regions 0] [--epochs 10]
        [--steps 40] [--hidden 0] [--methods all] [--out DIR]

The panel is the demo data (`pipeline.data.demo`, hourly, `--series` bottom series in
`--stores` stores) with `data.hierarchy: [[], [store]]`; with `--regions` N > 0 the stores
nest in N regions (a static `region` column) and the hierarchy is `[[], [region], [region,
store]]`. The run is configs/demo.yaml with Ray, tracking and the statistical comparators off
(`--hidden` N > 0: encoder and decoder of N units). In the run, `reconcile_forecast` (every
level's forecast reconciled with `reconcile.method`, auto) and `level_metrics` (the backtest
scored per level, every cutoff reconciled leave-one-cutoff-out) are timed and their peak of
Python-tracked memory (numpy's arrays included) taken with tracemalloc around each call
(hierarchicalforecast is imported before the run, its import timed apart); the printed
per-level table is the run's. Then each method of `--methods` (comma-separated, `all`,
or `none`) is scored by `level_metrics` on the run's backtest the same way. The last line is
one JSON object with every figure. Not a test: the run trains (minutes at the default sizes
on two cores; `--epochs 1 --steps 2` for a dry run).
"""
from __future__ import annotations

import argparse
import importlib
import json
import os
import sys
import tempfile
import time
import tracemalloc

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from pipeline.cli import execute  # noqa: E402
from pipeline.config.hierarchy import METHODS  # noqa: E402
from pipeline.data.demo import make_demo_data  # noqa: E402
from pipeline.forecasting.backtest import concat_columns  # noqa: E402
from pipeline.stages import reconciled as R  # noqa: E402


def timed(fn, into: dict):
    """`fn` that records its seconds and tracemalloc peak MiB in `into` at each call."""
    def wrapper(*args, **kwargs):
        tracemalloc.start()
        t0 = time.perf_counter()
        try:
            return fn(*args, **kwargs)
        finally:
            into["seconds"] = round(time.perf_counter() - t0, 3)
            into["peak_mib"] = round(tracemalloc.get_traced_memory()[1] / 2**20, 1)
            tracemalloc.stop()
    return wrapper


def run_demo(out: str, a, measured: dict):
    """The demo panel written under `out`, and the finished `run` batch over it; `measured`
    gets the run's reconciliation and per-level scoring ({seconds, peak_mib} each)."""
    data = os.path.join(out, "data")
    make_demo_data(data, n_series=a.series, n_groups=a.stores, seed=0, n_regions=a.regions)
    sets = {"data.path": data, "output.path": f"{out}/outputs", "ray.enabled": "false",
            "tracking.enabled": "false", "evaluate.comparators": "[]",
            "train.epochs": a.epochs, "train.steps_per_epoch": a.steps,
            "data.hierarchy": "[[], [store]]"}
    if a.regions > 0:
        sets |= {"data.static_cols": "[category, region]",
                 "data.hierarchy": "[[], [region], [region, store]]"}
    if a.hidden > 0:
        sets |= {"model.encoder.hidden_size": a.hidden, "model.decoder.hidden_size": a.hidden}
    originals = R.reconcile_forecast, R.level_metrics
    R.reconcile_forecast = timed(R.reconcile_forecast, measured.setdefault("reconcile", {}))
    R.level_metrics = timed(R.level_metrics, measured.setdefault("level_metrics", {}))
    try:
        b = execute(["run", "--config", os.path.join(ROOT, "configs", "demo.yaml"),
                     *(x for k, v in sets.items() for x in ("--set", f"{k}={v}"))])
    finally:
        R.reconcile_forecast, R.level_metrics = originals
    if b.exit_code != 0:
        sys.exit(f"the run failed (exit code {b.exit_code})")
    return b


def score_methods(b, methods) -> list[dict]:
    """Per method: seconds, peak MiB and the per-level base and reconciled scores."""
    o, cfg = b.outcome, b.cfg
    rows = o.forecast.rows()                    # the bottom's, read back; the levels' kept
    cols = concat_columns([{k: f[k] for k in ("unique_id", "model")}
                           for f in (rows, o.forecast.levels)])
    slots = R.backtest_slots(o.data.arrays, cfg, o.scored.backtest.blocks,
                             R.published_models(cols, cfg.windows.horizon))
    out = []
    for method in methods:
        tracemalloc.start()
        t0 = time.perf_counter()
        try:
            table = R.level_metrics(o.data, cfg, slots, method)
        except Exception as e:  # a method the panel cannot take: say why, go on
            table, error = None, f"{type(e).__name__}: {e}"
        else:
            error = None
        seconds = time.perf_counter() - t0
        peak = tracemalloc.get_traced_memory()[1] / 2**20
        tracemalloc.stop()
        out.append({"method": method, "seconds": round(seconds, 3), "peak_mib": round(peak, 1),
                     "error": error,
                     "levels": None if table is None else table.to_dicts()})
    return out


def show_run(table) -> list[dict]:
    """The run's own per-level scores: base and reconciled MASE and WAPE."""
    rows = table.to_dicts()
    by = {(r["level"], r["forecast"]): r for r in rows}
    print(f"{'level':<16} {'series':>7} {'MASE base':>10} {'reconciled':>10} "
          f"{'WAPE base':>10} {'reconciled':>10}")
    for level in dict.fromkeys(r["level"] for r in rows):
        base, rec = by[level, "base"], by[level, "reconciled"]
        print(f"{level:<16} {base['series']:>7} {base['mase']:>10.4f} {rec['mase']:>10.4f} "
              f"{base['wape']:>10.4f} {rec['wape']:>10.4f}")
    return rows


def show(results: list[dict]) -> None:
    first = next(r for r in results if r["levels"])
    levels = list(dict.fromkeys(row["level"] for row in first["levels"]))
    base = {row["level"]: row["mase"] for row in first["levels"] if row["forecast"] == "base"}
    print(f"{'method':<32} {'s':>7} {'MiB':>7} " + " ".join(f"{lv[:12]:>12}" for lv in levels))
    print(f"{'base (MASE)':<32} {'':>7} {'':>7} " + " ".join(f"{base[lv]:>12.4f}"
                                                           for lv in levels))
    for r in results:
        if r["levels"] is None:
            print(f"{r['method']:<32} {r['seconds']:>7.2f} {r['peak_mib']:>7.1f} "
                  f"{r['error'][:60]}")
            continue
        rec = {row["level"]: row["mase"] for row in r["levels"] if row["forecast"] ==
               "reconciled"}
        print(f"{r['method']:<32} {r['seconds']:>7.2f} {r['peak_mib']:>7.1f} "
              + " ".join(f"{rec[lv]:>12.4f}" for lv in levels))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--series", type=int, default=120)
    p.add_argument("--stores", type=int, default=4)
    p.add_argument("--regions", type=int, default=0, help="> 0: total, region, store, series")
    p.add_argument("--epochs", type=int, default=10)
    p.add_argument("--steps", type=int, default=40, help="train.steps_per_epoch")
    p.add_argument("--hidden", type=int, default=0, help="> 0: the network's hidden sizes")
    p.add_argument("--methods", default="all", help="comma-separated, all or none")
    p.add_argument("--out", default=None, help="default: a temporary folder")
    a = p.parse_args()
    methods = {"all": METHODS, "none": ()}.get(a.methods, a.methods.split(","))
    out = a.out or tempfile.mkdtemp(prefix="hierarchy-bench-")
    t0 = time.perf_counter()
    importlib.import_module("hierarchicalforecast.methods")   # once, timed apart
    measured: dict = {"import_seconds": round(time.perf_counter() - t0, 2)}
    t0 = time.perf_counter()
    b = run_demo(out, a, measured)
    run_s = time.perf_counter() - t0
    c, n = b.outcome.forecast.coherence, len(b.outcome.data.arrays)
    rec, lm = measured["reconcile"], measured["level_metrics"]
    print(f"\nrun {run_s:.1f} s (data made, trained, backtested, forecast, written); {n:,} "
          f"series over every level, reconciled with {c.method_used} in {rec['seconds']:.2f} s "
          f"(peak {rec['peak_mib']:.1f} MiB traced); per-level backtest scoring "
          f"{lm['seconds']:.2f} s (peak {lm['peak_mib']:.1f} MiB); hierarchicalforecast "
          f"imported before the run in {measured['import_seconds']:.1f} s" +
          (f"; note: {c.note}" if c.note else ""))
    levels = show_run(c.level_metrics)
    results = score_methods(b, methods)
    if results:
        print("\nbacktest MASE per level, every method on the same base forecasts:")
        show(results)
    print(json.dumps({"series": a.series, "stores": a.stores, "regions": a.regions,
                      "all_series": n, "epochs": a.epochs, "steps": a.steps,
                      "run_seconds": round(run_s, 1), "method_used": c.method_used,
                      "note": c.note, "import_seconds": measured["import_seconds"],
                      "reconcile": rec, "level_metrics": lm, "levels": levels,
                      "methods": results}))


if __name__ == "__main__":
    main()
